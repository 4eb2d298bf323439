//! What an export serves: a block device behind a trait, so the server can be tested without
//! the engine and the engine can be served without knowing NBD.

use std::io;

use qcow2_engine::image::ReadRequest;
use qcow2_engine::{Image, ZeroFlags};

use super::proto::errno;

/// A failed device operation, as the NBD client will see it: an errno from the spec's list
/// and a one-line message (sent in structured error chunks, logged otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    pub errno: u32,
    pub message: String,
}

impl DeviceError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (NBD errno {})", self.message, self.errno)
    }
}

impl std::error::Error for DeviceError {}

/// Device results.
pub type DeviceResult<T = ()> = Result<T, DeviceError>;

/// One run of a device range with one allocation status (NBD block status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// No layer holds data here (reads come from nowhere: zeros).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Which layer provides the bytes: 0 none, 1 the image itself, 2 its backing file, ...
    /// (`qemu:allocation-depth`).
    pub depth: u32,
}

/// A block device that many connections and requests may use at once.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset` (inside the device).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult;
    /// Reads several ranges (each inside the device), one result per range, in order. The
    /// default reads them one after another; the engine plans them together and submits
    /// their I/O at once.
    fn read_batch(&self, reads: &mut [(&mut [u8], u64)]) -> Vec<DeviceResult> {
        reads
            .iter_mut()
            .map(|(buf, offset)| self.read_at(buf, *offset))
            .collect()
    }
    /// Writes at `offset`; on return the data survives a crash of this process.
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult;
    /// Makes every completed write durable.
    fn flush(&self) -> DeviceResult;
    /// Deallocates a range (reads as zeros afterwards for this engine).
    fn trim(&self, offset: u64, len: u64) -> DeviceResult;
    /// Makes a range read as zeros; `no_hole` keeps it allocated.
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult;
    /// Whether [`BlockDevice::write_zeroes`] of this range is cheaper than writing zeros
    /// (NBD `FAST_ZERO`: a client asks so it can skip pre-zeroing when it is not). The
    /// default says no, which only costs the client a fallback.
    fn zeroes_are_fast(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Allocation status of `[offset, offset + len)` (inside the device), in order, from
    /// `offset` on: at most `most` extents (at least one), covering the whole range unless
    /// that would take more. The default says "all data, in the top layer", which is always
    /// safe.
    fn block_status(&self, _offset: u64, len: u64, _most: usize) -> DeviceResult<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
            depth: 1,
        }])
    }
}

/// Maps an engine error to the NBD errno the spec prescribes for it.
pub fn errno_of(e: &qcow2_engine::Error) -> u32 {
    use qcow2_engine::Error as E;
    match e {
        E::ReadOnly(_) => errno::EPERM,
        E::InvalidArgument(_) => errno::EINVAL,
        E::Io { source, .. } => errno_of_io(source),
        _ => errno::EIO,
    }
}

/// Maps a host I/O error: a full disk or quota is `ENOSPC`, as the spec asks.
fn errno_of_io(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => errno::ENOSPC,
        Some(libc::ENOMEM) => errno::ENOMEM,
        _ if e.kind() == io::ErrorKind::OutOfMemory => errno::ENOMEM,
        _ => errno::EIO,
    }
}

fn engine(e: qcow2_engine::Error) -> DeviceError {
    DeviceError::new(errno_of(&e), e.to_string())
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn read_only(&self) -> bool {
        !self.is_writable()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
        Image::read_at(self, buf, offset).map_err(engine)
    }
    fn read_batch(&self, reads: &mut [(&mut [u8], u64)]) -> Vec<DeviceResult> {
        let mut reqs: Vec<ReadRequest<'_>> = reads
            .iter_mut()
            .map(|(buf, offset)| ReadRequest::new(buf, *offset))
            .collect();
        Image::read_batch(self, &mut reqs);
        reqs.into_iter().map(|r| r.result.map_err(engine)).collect()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        Image::write_at(self, buf, offset).map_err(engine)
    }
    fn flush(&self) -> DeviceResult {
        Image::flush(self).map_err(engine)
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        self.discard(offset, len).map_err(engine)
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult {
        Image::write_zeroes(self, offset, len, ZeroFlags { no_hole }).map_err(engine)
    }
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        // Whole allocation units become zero in their L2 entries (v3 has the zero flag);
        // a partial unit needs zero data written.
        let geo = self.geometry();
        let unit = if geo.extended_l2 {
            geo.subcluster_size()
        } else {
            geo.cluster_size()
        };
        let end = offset + len;
        self.header().version >= 3
            && offset.is_multiple_of(unit)
            && (end.is_multiple_of(unit) || end == Image::size(self))
    }
    fn block_status(&self, offset: u64, len: u64, most: usize) -> DeviceResult<Vec<Extent>> {
        // Mapped a window at a time (at most 16 Ki clusters each, so the engine's list stays
        // small too), until the range is covered or `most` extents are known.
        let window = self.geometry().cluster_size() << 14;
        let most = most.max(1);
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = window.min(end - at);
            for m in qcow2_engine::ops::map::map_range(self, at, n).map_err(engine)? {
                // The same reading of the chain as qemu-nbd: a hole is anything without data
                // (zero clusters included), and the depth counts from 1 for layers that
                // allocate.
                let e = Extent {
                    length: m.length,
                    hole: !m.data,
                    zero: m.zero,
                    depth: if m.present { m.depth as u32 + 1 } else { 0 },
                };
                let full = out.len() == most;
                match out.last_mut() {
                    Some(last)
                        if (last.hole, last.zero, last.depth) == (e.hole, e.zero, e.depth) =>
                    {
                        last.length += e.length;
                    }
                    _ if full => return Ok(out),
                    _ => out.push(e),
                }
            }
            at += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_the_spec_errnos() {
        let io = |code| qcow2_engine::Error::io("writing", io::Error::from_raw_os_error(code));
        assert_eq!(errno_of(&io(libc::ENOSPC)), errno::ENOSPC);
        assert_eq!(errno_of(&io(libc::EDQUOT)), errno::ENOSPC);
        assert_eq!(errno_of(&io(libc::EIO)), errno::EIO);
        assert_eq!(
            errno_of(&qcow2_engine::Error::ReadOnly("x".into())),
            errno::EPERM
        );
        assert_eq!(
            errno_of(&qcow2_engine::Error::InvalidArgument("x".into())),
            errno::EINVAL
        );
        assert_eq!(
            errno_of(&qcow2_engine::Error::Corrupt("x".into())),
            errno::EIO
        );
    }

    /// An image of 512-byte clusters, every other one written, over `clusters` clusters.
    fn striped(dir: &std::path::Path, clusters: u64) -> Image {
        let path = dir.join("striped.qcow2");
        let opts = qcow2_engine::CreateOptions {
            size: Some(clusters * 512),
            cluster_size: 512,
            ..qcow2_engine::CreateOptions::default()
        };
        qcow2_engine::create(&path, &opts).unwrap();
        let open = qcow2_engine::OpenOptions {
            writable: true,
            ..qcow2_engine::OpenOptions::default()
        };
        let img = Image::open(&path, &open).unwrap();
        for c in (0..clusters).step_by(2) {
            BlockDevice::write_at(&img, &[1u8; 512], c * 512).unwrap();
        }
        img
    }

    #[test]
    fn block_status_stops_at_the_extent_limit_and_otherwise_covers_the_range() {
        let dir = tempfile::tempdir().unwrap();
        // 40 000 clusters span three of the 16 Ki-cluster mapping windows.
        let clusters = 40_000;
        let img = striped(dir.path(), clusters);
        let all = BlockDevice::block_status(&img, 0, clusters * 512, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, clusters, "one extent per cluster");
        assert!(all.iter().all(|e| e.length == 512));
        assert!(all.iter().step_by(2).all(|e| !e.hole && e.depth == 1));
        assert!(
            all.iter()
                .skip(1)
                .step_by(2)
                .all(|e| e.hole && e.depth == 0)
        );

        let some = BlockDevice::block_status(&img, 512, clusters * 512 - 512, 10).unwrap();
        assert_eq!(
            some,
            all[1..11],
            "the first 10 extents from the offset, exactly"
        );
        let one = BlockDevice::block_status(&img, 0, clusters * 512, 0).unwrap();
        assert_eq!(
            one,
            all[..1],
            "at least one extent, even when asked for none"
        );
    }
}

/// A raw image file as an export (`qcow2-csi nbd --format raw`), through the engine's file
/// storage: the same QEMU-compatible locks, `O_DIRECT` mode and hole punching.
#[derive(Debug)]
pub struct RawFile {
    storage: qcow2_engine::storage::FileStorage,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens (and locks) a raw file.
    pub fn open(
        path: &std::path::Path,
        writable: bool,
        cache: qcow2_engine::CacheMode,
    ) -> io::Result<RawFile> {
        use qcow2_engine::storage::Storage;
        let mut storage = qcow2_engine::storage::FileStorage::open(path, writable)?;
        storage.set_cache_mode(cache)?;
        let size = storage.len()?;
        Ok(RawFile {
            storage,
            size,
            read_only: !writable,
        })
    }
}

fn io_err(what: &str, e: io::Error) -> DeviceError {
    DeviceError::new(errno_of_io(&e), format!("{what}: {e}"))
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
        use qcow2_engine::storage::Storage;
        self.storage
            .read_data(buf, offset)
            .map_err(|e| io_err("reading", e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        use qcow2_engine::storage::Storage;
        self.storage
            .write_data(buf, offset)
            .map_err(|e| io_err("writing", e))
    }
    fn flush(&self) -> DeviceResult {
        use qcow2_engine::storage::Storage;
        self.storage.flush().map_err(|e| io_err("flushing", e))
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        use qcow2_engine::storage::Storage;
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| io_err("punching", e))
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult {
        use qcow2_engine::storage::Storage;
        let done = if no_hole {
            self.storage.write_zeroes(offset, len)
        } else {
            self.storage.punch_hole(offset, len)
        };
        done.map_err(|e| io_err("zeroing", e))
    }
}

/// A device in memory, for the crate's unit tests: counts flushes.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Memory {
    pub bytes: std::sync::Mutex<Vec<u8>>,
    pub flushes: std::sync::atomic::AtomicU32,
}

#[cfg(test)]
impl Memory {
    pub fn new(size: usize) -> Self {
        Self {
            bytes: std::sync::Mutex::new(vec![0; size]),
            flushes: Default::default(),
        }
    }
}

#[cfg(test)]
impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        let o = offset as usize;
        self.bytes.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> DeviceResult {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        self.write_zeroes(offset, len, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> DeviceResult {
        let (o, l) = (offset as usize, len as usize);
        self.bytes.lock().unwrap()[o..o + l].fill(0);
        Ok(())
    }
}
