//! The only I/O seam of the engine.
//!
//! Everything the engine stores goes through [`Storage`]: positioned reads and writes, zeroing,
//! hole punching, `fdatasync` and resizing. Implementations: [`FileStorage`] (a host file),
//! [`MemoryStorage`] (tests, scratch images) and [`FaultStorage`] (a wrapper that fails or
//! "crashes" on demand, for crash-safety tests).

mod fault;
mod file;
pub mod lock;
mod memory;
mod uring;

use std::io;
use std::ops::Range;
use std::sync::Arc;

pub use fault::{FaultPlan, FaultStorage, Mutation};
pub use file::{CacheMode, DIRECT_ALIGN, FileStorage};
pub use memory::MemoryStorage;

/// Positioned block storage. All methods take `&self` so one storage can serve many threads.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the storage read as zeros:
    /// qemu-img ends fresh images right after the L1 table, mid-cluster.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the storage when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Reads guest data: like [`Storage::read_at`], but may bypass the page cache (`O_DIRECT`)
    /// when the storage was opened that way. Metadata always goes through `read_at`.
    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }

    /// Reads guest data for a batch of reads, each like [`Storage::read_data`], setting each
    /// one's `result`. Storage that can submit them together (io_uring) does; the default
    /// reads them one after another.
    fn read_data_batch(&self, reads: &mut [DataRead<'_>]) {
        for r in reads {
            r.result = self.read_data(r.buf, r.offset);
        }
    }

    /// Writes guest data: like [`Storage::write_at`], but may bypass the page cache.
    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }

    /// Makes `[offset, offset + len)` read as zeros, without deallocating where possible.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Deallocates `[offset, offset + len)` (the range then reads as zeros). Advisory: storage
    /// that cannot punch holes writes zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Allocates host blocks for a range that already reads as zeros, so that later direct
    /// writes there overwrite allocated (unwritten) extents. Advisory: the default does
    /// nothing. Why it matters: ext4 serialises `O_DIRECT` writes that allocate blocks on the
    /// inode lock, and a synchronous `pwrite` holds that lock until the device completes it.
    fn preallocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Makes everything written so far durable (`fdatasync` for files).
    fn flush(&self) -> io::Result<()>;

    /// Makes durable what was written, zeroed or punched inside `ranges`, and the storage's
    /// length; other unflushed changes may stay volatile. A barrier that only needs a few
    /// metadata bytes durable need not write back every dirty page of the file (under
    /// buffered guest writes, that is most of what `fdatasync` costs). The default
    /// [`Storage::flush`]es everything.
    fn sync_ranges(&self, _ranges: &[Range<u64>]) -> io::Result<()> {
        self.flush()
    }

    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends to `len` bytes (new bytes read as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Bytes actually allocated on the host (for `actual-size`); `None` when unknown.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_data(buf, offset)
    }
    fn read_data_batch(&self, reads: &mut [DataRead<'_>]) {
        (**self).read_data_batch(reads);
    }
    fn write_data(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_data(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).preallocate(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn sync_ranges(&self, ranges: &[Range<u64>]) -> io::Result<()> {
        (**self).sync_ranges(ranges)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        (**self).allocated_bytes()
    }
}

/// One read of a batch (see [`Storage::read_data_batch`]).
#[derive(Debug)]
pub struct DataRead<'a> {
    pub buf: &'a mut [u8],
    pub offset: u64,
    /// Set by the storage.
    pub result: io::Result<()>,
}

impl<'a> DataRead<'a> {
    /// A read not yet done.
    pub fn new(buf: &'a mut [u8], offset: u64) -> Self {
        Self {
            buf,
            offset,
            result: Ok(()),
        }
    }
}

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary: what `O_DIRECT`
/// needs to read or write without a bounce copy.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, aligned.
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Self { raw, start, len }
    }

    /// The aligned bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The aligned bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Writes zeros in bounded chunks; the fallback for storage without a native zeroing call.
pub(crate) fn write_zeroes_by_writing(
    storage: &dyn Storage,
    mut offset: u64,
    len: u64,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(CHUNK) as usize;
        storage.write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}
