//! A host file as storage: `pread`/`pwrite`, `fallocate`, `fdatasync`, and optionally `O_DIRECT`
//! for guest data.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;

use rustix::fs::FallocateFlags;

use super::uring::{self, ReadOp};
use super::{AlignedBuf, DataRead, Storage, write_zeroes_by_writing};

/// How guest data reaches the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the page cache (QEMU's `cache=writeback`).
    #[default]
    Buffered,
    /// Guest data bypasses the page cache with `O_DIRECT` (QEMU's `cache=none`). Requests that
    /// are not aligned to [`DIRECT_ALIGN`] go through the page cache, which Linux keeps
    /// coherent with direct I/O; so does metadata, which is small and written in place.
    Direct,
}

/// Alignment of offsets, lengths and buffers for `O_DIRECT`: 4096 satisfies both 512-byte and
/// 4 KiB logical-block devices.
pub const DIRECT_ALIGN: usize = 4096;

/// A regular file accessed with positioned I/O (never seek + read: that races between threads).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    writable: bool,
    /// A second descriptor of the same file opened with `O_DIRECT` ([`CacheMode::Direct`]).
    direct: Option<File>,
    /// A read-only description of the same file for io_uring, opened on first use (`None`
    /// if it could not be). The ring must never hold the description that carries the
    /// image's locks: a process killed with requests in flight has its ring torn down
    /// after it has exited, and a reference held there would keep the image locked
    /// against `qemu-img` or our own restart for a while after the kill.
    ring_file: OnceLock<Option<File>>,
}

impl FileStorage {
    /// Opens an existing file, read-only or read-write, and takes QEMU-compatible locks (see
    /// [`super::lock`]): fails with `WouldBlock` if another user of the file conflicts.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        super::lock::lock(&file, writable)?;
        Ok(Self::with(file, writable))
    }

    /// Opens an existing file read-only without taking or honouring locks (qemu-img's
    /// `--force-share`): for inspecting an image somebody is using; reads may be inconsistent.
    pub fn open_unlocked(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).open(path)?;
        Ok(Self::with(file, false))
    }

    /// Creates a new file, locked for writing; fails if it exists (never clobber somebody's
    /// image).
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        super::lock::lock(&file, true)?;
        Ok(Self::with(file, true))
    }

    /// Wraps an already opened file (read-write if it was opened so).
    pub fn from_file(file: File) -> Self {
        let writable =
            rustix::fs::fcntl_getfl(&file).is_ok_and(|f| f.contains(rustix::fs::OFlags::RDWR));
        Self::with(file, writable)
    }

    /// Tells the kernel the file will be read front to back (a larger readahead). Advisory:
    /// a refusal changes nothing but speed.
    pub fn advise_sequential(&self) {
        let _ = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::Sequential);
    }

    fn with(file: File, writable: bool) -> Self {
        Self {
            file,
            writable,
            direct: None,
            ring_file: OnceLock::new(),
        }
    }

    /// Another description of this same file, through `/proc/self/fd` (so a renamed or
    /// replaced path cannot swap it).
    fn reopen(&self, opts: &OpenOptions) -> io::Result<File> {
        opts.open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The description io_uring may use for buffered reads and range syncs (see
    /// `ring_file`), reopened through `/proc/self/fd` like the `O_DIRECT` one.
    fn ring_fd(&self) -> Option<BorrowedFd<'_>> {
        self.ring_file
            .get_or_init(|| self.reopen(OpenOptions::new().read(true)).ok())
            .as_ref()
            .map(AsFd::as_fd)
    }

    /// Switches how guest data is read and written. [`CacheMode::Direct`] reopens the same
    /// file (through `/proc/self/fd`, so a renamed path cannot swap it) with `O_DIRECT`; it
    /// fails with a clear error where the filesystem refuses `O_DIRECT`.
    pub fn set_cache_mode(&mut self, mode: CacheMode) -> io::Result<()> {
        self.direct = match mode {
            CacheMode::Buffered => None,
            CacheMode::Direct => {
                let file = self
                    .reopen(
                        OpenOptions::new()
                            .read(true)
                            .write(self.writable)
                            .custom_flags(libc::O_DIRECT),
                    )
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("this filesystem does not support O_DIRECT: {e}"),
                        )
                    })?;
                Some(file)
            }
        };
        Ok(())
    }

    /// The current cache mode.
    pub fn cache_mode(&self) -> CacheMode {
        if self.direct.is_some() {
            CacheMode::Direct
        } else {
            CacheMode::Buffered
        }
    }

    fn fallocate_or(
        &self,
        flags: FallocateFlags,
        offset: u64,
        len: u64,
        fallback: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::INVAL =>
            {
                fallback()
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn aligned(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN)
}

fn is_aligned_ptr(p: *const u8) -> bool {
    p.align_offset(DIRECT_ALIGN) == 0
}

impl FileStorage {
    /// An aligned read through the `O_DIRECT` descriptor. A short read means end of file: the
    /// rest reads as zeros (as [`Storage::read_at`] promises).
    fn read_direct(&self, direct: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !is_aligned_ptr(buf.as_ptr()) {
            let mut bounce = AlignedBuf::new(buf.len());
            self.read_direct(direct, bounce.bytes_mut(), offset)?;
            buf.copy_from_slice(bounce.bytes());
            return Ok(());
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if !aligned(at, buf.len() - done) {
                return self.read_at(&mut buf[done..], at);
            }
            match direct.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_direct(&self, direct: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if !is_aligned_ptr(buf.as_ptr()) {
            let mut bounce = AlignedBuf::new(buf.len());
            bounce.bytes_mut().copy_from_slice(buf);
            return direct.write_all_at(bounce.bytes(), offset);
        }
        direct.write_all_at(buf, offset)
    }
}

impl Storage for FileStorage {
    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) if aligned(offset, buf.len()) => self.read_direct(direct, buf, offset),
            _ => self.read_at(buf, offset),
        }
    }

    fn read_data_batch(&self, reads: &mut [DataRead<'_>]) {
        // Which reads the ring can do: all of them through the page cache; with O_DIRECT,
        // the aligned ones (the others take read_data's bounce or page-cache path).
        let fd = match &self.direct {
            Some(direct) => Some(direct.as_fd()),
            None => self.ring_fd(),
        };
        let ringable = |r: &DataRead<'_>| {
            self.direct.is_none()
                || (aligned(r.offset, r.buf.len()) && is_aligned_ptr(r.buf.as_ptr()))
        };
        let fd = match fd {
            Some(fd) if reads.iter().filter(|r| ringable(r)).count() >= 2 && uring::available() => {
                fd
            }
            _ => {
                for r in reads {
                    r.result = self.read_data(r.buf, r.offset);
                }
                return;
            }
        };
        let mut which = Vec::with_capacity(reads.len());
        let mut outcome = Vec::with_capacity(reads.len());
        {
            let mut ops: Vec<ReadOp<'_>> = Vec::with_capacity(reads.len());
            for (i, r) in reads.iter_mut().enumerate() {
                if ringable(r) {
                    which.push(i);
                    ops.push(ReadOp::new(r.buf, r.offset));
                }
            }
            if !uring::read_batch(fd, &mut ops) {
                ops.clear(); // no ring after all: every read goes the plain way below
                which.clear();
            }
            outcome.extend(ops.into_iter().map(|op| (op.done, op.error)));
        }
        let mut ring = which.into_iter().zip(outcome).peekable();
        for (i, r) in reads.iter_mut().enumerate() {
            let done = match ring.next_if(|(j, _)| *j == i) {
                Some((_, (_, Some(e)))) => {
                    r.result = Err(e);
                    continue;
                }
                Some((_, (done, None))) => done,
                None => 0,
            };
            // The rest of a short read (end of file, or interrupted), or a read the ring
            // did not take.
            r.result = if done < r.buf.len() {
                self.read_data(&mut r.buf[done..], r.offset + done as u64)
            } else {
                Ok(())
            };
        }
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct) if aligned(offset, buf.len()) => self.write_direct(direct, buf, offset),
            _ => self.write_at(buf, offset),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::other("range overflow"))?;
        // ZERO_RANGE would extend the file; only use it inside the current length.
        let file_len = self.len()?;
        let inside = end.min(file_len).saturating_sub(offset);
        self.fallocate_or(
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            inside,
            || write_zeroes_by_writing(self, offset, inside),
        )?;
        if end > file_len {
            let start = offset.max(file_len);
            write_zeroes_by_writing(self, start, end - start)?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let file_len = self.len()?;
        let len = len.min(file_len.saturating_sub(offset));
        self.fallocate_or(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
            || write_zeroes_by_writing(self, offset, len),
        )
    }

    /// Only in [`CacheMode::Direct`]: buffered writes allocate lazily (delayed allocation)
    /// and gain nothing from it.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct.is_none() || len == 0 {
            return Ok(());
        }
        self.fallocate_or(FallocateFlags::KEEP_SIZE, offset, len, || Ok(()))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Range syncs through io_uring (`storage::uring`: ranged `IORING_OP_FSYNC`);
    /// `fdatasync` where the thread has no ring. Either way a failure is reported like a failed `fdatasync`: the
    /// kernel reports a writeback error of any part of the file to the next sync of any range.
    fn sync_ranges(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<()> {
        // With no range, one byte: the length still has to become durable.
        let first_byte = 0..1;
        let ranges = if ranges.is_empty() {
            std::slice::from_ref(&first_byte)
        } else {
            ranges
        };
        match self.ring_fd().and_then(|fd| uring::sync_ranges(fd, ranges)) {
            Some(result) => result,
            None => self.flush(),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }
}
