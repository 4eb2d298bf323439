//! Batches of positioned reads through io_uring: one system call submits a whole batch and
//! waits for it, where a thread per request would pay a wake-up and a context switch each
//! (`docs/benchmarks.md`, "Where the time goes").
//!
//! Each thread has its own ring, made on its first batch. Where io_uring is unavailable (an
//! old kernel, a seccomp profile that blocks it: containerd's and Docker's defaults do, or
//! `kernel.io_uring_disabled`) the thread remembers it and reads with `pread`, so the caller
//! never sees the difference but in speed.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

/// Entries of each thread's ring: the most reads one submission carries.
const RING_ENTRIES: u32 = 64;

/// One read of a batch: fill `buf` from `offset`. `result` is set by [`read_batch`].
#[derive(Debug)]
pub struct ReadOp<'a> {
    pub buf: &'a mut [u8],
    pub offset: u64,
    /// Bytes read so far; less than `buf.len()` after a short read (end of file, or a
    /// partial read the caller completes with `pread`).
    pub done: usize,
    pub error: Option<io::Error>,
}

impl<'a> ReadOp<'a> {
    pub fn new(buf: &'a mut [u8], offset: u64) -> Self {
        Self {
            buf,
            offset,
            done: 0,
            error: None,
        }
    }
}

thread_local! {
    /// This thread's ring: `None` before its first batch, `Some(None)` once io_uring was
    /// found unavailable.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// Whether io_uring can be used on this thread (made on first use).
pub fn available() -> bool {
    RING.with(|r| ring(&mut r.borrow_mut()).is_some())
}

fn ring(slot: &mut Option<Option<IoUring>>) -> Option<&mut IoUring> {
    slot.get_or_insert_with(|| IoUring::new(RING_ENTRIES).ok())
        .as_mut()
}

/// Reads every op of `ops` from `fd` with io_uring, and returns true; or returns false,
/// touching nothing, when this thread has no ring. An op ends with `done == buf.len()`, or
/// short (the caller reads the rest itself), or with `error` set.
pub fn read_batch(fd: BorrowedFd<'_>, ops: &mut [ReadOp<'_>]) -> bool {
    RING.with(|r| {
        let mut slot = r.borrow_mut();
        let Some(ring) = ring(&mut slot) else {
            return false;
        };
        for chunk in ops.chunks_mut(RING_ENTRIES as usize) {
            run(ring, fd, chunk);
        }
        true
    })
}

/// Submits `ops` (at most the ring's size) and reaps every completion.
fn run(ring: &mut IoUring, fd: BorrowedFd<'_>, ops: &mut [ReadOp<'_>]) {
    let fd = types::Fd(fd.as_raw_fd());
    {
        let mut sq = ring.submission();
        for (i, op) in ops.iter_mut().enumerate() {
            let len = u32::try_from(op.buf.len()).unwrap_or(u32::MAX);
            let entry = opcode::Read::new(fd, op.buf.as_mut_ptr(), len)
                .offset(op.offset)
                .build()
                .user_data(i as u64);
            // SAFETY: the buffer is borrowed mutably from `ops` for this whole function, and
            // the function does not return before the kernel has completed every entry
            // pushed here (the loop below reaps exactly as many completions as were pushed,
            // and aborts the process rather than returning if the ring fails).
            #[allow(unsafe_code)]
            let pushed = unsafe { sq.push(&entry) };
            pushed.expect("a batch is never larger than the ring");
        }
    }
    let mut left = ops.len();
    while left > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                // The kernel may still be writing into buffers we would hand back: nothing
                // safe remains but to stop.
                eprintln!("qcow2-engine: io_uring_enter failed with reads in flight: {e}");
                std::process::abort();
            }
        }
        for cqe in ring.completion() {
            let op = &mut ops[cqe.user_data() as usize];
            left -= 1;
            match cqe.result() {
                n if n >= 0 => op.done = n as usize,
                e if e == -libc::EINTR || e == -libc::EAGAIN => {} // the caller retries it
                e => op.error = Some(io::Error::from_raw_os_error(-e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_batch_reads_every_range_and_stops_short_at_the_end_of_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        // More ops than the ring holds, at scattered offsets, one past the end.
        let ranges: Vec<(u64, usize)> = (0..150u64)
            .map(|i| ((i * 7919) % 290_000, 1 + (i as usize * 37) % 9000))
            .chain([(299_000, 4096)])
            .collect();
        let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|&(_, n)| vec![0xee; n]).collect();
        let mut ops: Vec<ReadOp<'_>> = bufs
            .iter_mut()
            .zip(&ranges)
            .map(|(b, &(off, _))| ReadOp::new(b, off))
            .collect();
        if !read_batch(std::os::fd::AsFd::as_fd(&f), &mut ops) {
            eprintln!("skipped: io_uring is not available here");
            return;
        }
        for (op, &(off, n)) in ops.iter().zip(&ranges) {
            assert!(op.error.is_none());
            let end = (off as usize + n).min(data.len());
            assert_eq!(op.done, end - off as usize, "read at {off}");
            assert_eq!(&op.buf[..op.done], &data[off as usize..end]);
        }
    }

    #[test]
    fn a_bad_descriptor_is_an_error_per_op_not_a_panic() {
        // A write-only descriptor cannot be read: EBADF for each op.
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut a = vec![0u8; 16];
        let mut b = vec![0u8; 16];
        let mut ops = [ReadOp::new(&mut a, 0), ReadOp::new(&mut b, 16)];
        if !read_batch(std::os::fd::AsFd::as_fd(&wo), &mut ops) {
            eprintln!("skipped: io_uring is not available here");
            return;
        }
        for op in &ops {
            assert_eq!(op.error.as_ref().unwrap().raw_os_error(), Some(libc::EBADF));
        }
    }
}
