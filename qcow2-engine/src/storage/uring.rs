//! Batches of positioned reads through io_uring: one system call submits a whole batch and
//! waits for it, where a thread per request would pay a wake-up and a context switch each
//! (`docs/benchmarks.md`, "Where the time goes"). And range syncs, which only io_uring offers
//! (`IORING_OP_FSYNC` with an offset and a length: `fdatasync` of a few ranges, not of every
//! dirty page of the file).
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
    let entries: Vec<_> = ops
        .iter_mut()
        .map(|op| {
            let len = u32::try_from(op.buf.len()).unwrap_or(u32::MAX);
            opcode::Read::new(fd, op.buf.as_mut_ptr(), len)
                .offset(op.offset)
                .build()
        })
        .collect();
    submit_and_reap(ring, entries.into_iter(), |i, result| {
        let op = &mut ops[i];
        match result {
            n if n >= 0 => op.done = n as usize,
            e if e == -libc::EINTR || e == -libc::EAGAIN => {} // the caller retries it
            e => op.error = Some(io::Error::from_raw_os_error(-e)),
        }
    });
}

/// Largest length of one range sync (the kernel's field is 32 bits wide).
const SYNC_CHUNK: u64 = 1 << 30;

/// Makes the bytes of `ranges` durable, with the file's own metadata (its length, its
/// allocation), as `fdatasync` would for the whole file: one `IORING_OP_FSYNC` with
/// `IORING_FSYNC_DATASYNC` per range, all submitted together. Dirty pages outside the ranges
/// stay in the page cache. Returns `None`, touching nothing, when this thread has no ring:
/// the caller syncs the whole file instead. An interrupted range sync also returns `None`
/// (a whole-file sync is never wrong).
pub fn sync_ranges(fd: BorrowedFd<'_>, ranges: &[std::ops::Range<u64>]) -> Option<io::Result<()>> {
    RING.with(|r| {
        let mut slot = r.borrow_mut();
        let ring = ring(&mut slot)?;
        let fd = types::Fd(fd.as_raw_fd());
        // Split into pieces the kernel takes; an empty range would mean the whole file.
        let pieces: Vec<(u64, u32)> = ranges
            .iter()
            .flat_map(|r| {
                (r.start..r.end)
                    .step_by(SYNC_CHUNK as usize)
                    .map(move |at| (at, (r.end - at).min(SYNC_CHUNK) as u32))
            })
            .collect();
        let mut error = None;
        let mut interrupted = false;
        for chunk in pieces.chunks(RING_ENTRIES as usize) {
            let entries = chunk.iter().map(|&(at, len)| {
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .offset(at)
                    .len(len)
                    .build()
            });
            submit_and_reap(ring, entries, |_, result| match result {
                0.. => {}
                e if e == -libc::EINTR || e == -libc::EAGAIN => interrupted = true,
                e => {
                    error.get_or_insert(io::Error::from_raw_os_error(-e));
                }
            });
        }
        match error {
            Some(e) => Some(Err(e)),
            None if interrupted => None,
            None => Some(Ok(())),
        }
    })
}

/// Pushes `entries` (at most the ring's size; each gets its index as user data), submits
/// them and calls `done(index, result)` for every completion before returning.
fn submit_and_reap(
    ring: &mut IoUring,
    entries: impl Iterator<Item = io_uring::squeue::Entry>,
    mut done: impl FnMut(usize, i32),
) {
    let mut left = 0;
    {
        let mut sq = ring.submission();
        for (i, entry) in entries.enumerate() {
            let entry = entry.user_data(i as u64);
            // SAFETY: an entry may point at a caller's buffer (a read). Every caller keeps
            // its buffers borrowed for the whole call, and this function does not return
            // before the kernel has completed every entry pushed here (the loop below reaps
            // exactly as many completions as were pushed, and aborts the process rather
            // than returning if the ring fails).
            #[allow(unsafe_code)]
            let pushed = unsafe { sq.push(&entry) };
            pushed.expect("a batch is never larger than the ring");
            left += 1;
        }
    }
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
                eprintln!("qcow2-engine: io_uring_enter failed with requests in flight: {e}");
                std::process::abort();
            }
        }
        for cqe in ring.completion() {
            left -= 1;
            done(cqe.user_data() as usize, cqe.result());
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
    fn range_syncs_succeed_on_a_file_and_fail_on_what_cannot_be_synced() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 3 << 20]).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&f);
        let Some(result) = sync_ranges(fd, &[0..4096, (1 << 20)..(3 << 20)]) else {
            eprintln!("skipped: io_uring is not available here");
            return;
        };
        result.unwrap();
        // A pipe has nothing to sync: EINVAL, reported, not a panic.
        let (r, _w) = std::io::pipe().unwrap();
        let err = sync_ranges(std::os::fd::AsFd::as_fd(&r), std::slice::from_ref(&(0..1)))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
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
