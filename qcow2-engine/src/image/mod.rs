//! The public image handle.
//!
//! [`Image`] is `Send + Sync`. In this version one mutex serialises all requests on an image
//! (data I/O included); the layering (metadata in [`Meta`], every metadata write through one
//! place) is what lets a later version release the lock around data I/O.

mod backing;
mod mapping;
mod read;
mod resize;
mod status;
mod write;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use backing::{Backing, BackingPolicy, RawBacking, resolve_backing_name};
pub use status::LayerStatus;

use crate::alloc;
use crate::cache::{self, CacheStats, SliceCache};
use crate::error::{Error, IoContext, Result};
use crate::format::header::incompat;
use crate::format::{CompressionType, Header};
use crate::meta::{Meta, MetaMap};
use crate::ops::check;
use crate::storage::{FileStorage, Storage};
use crate::types::{Geometry, GuestOffset, HostOffset};

/// Default limit on backing chain depth.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 32;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Which backing files may be opened.
    pub backing: BackingPolicy,
    /// Longest chain (this image excluded) that will be opened.
    pub max_chain_depth: usize,
    /// L2 cache budget in bytes (default: see [`cache::default_l2_budget`]).
    pub l2_cache_bytes: Option<u64>,
    /// Refcount cache budget in bytes (default: half the L2 default).
    pub refcount_cache_bytes: Option<u64>,
    /// Metadata-only access: do not open the backing file (unallocated ranges then read as
    /// zeros). Only allowed read-only; for `info` on an image whose chain is unavailable.
    pub skip_backing: bool,
    /// Guess the format of a backing file whose image does not record it (qcow2 magic or raw).
    /// Off by default, as in QEMU: never enable it for untrusted images.
    pub probe_backing_format: bool,
    /// Read-only without taking or honouring image locks (qemu-img's `-U`), for inspecting an
    /// image another process is using.
    pub force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            writable: false,
            backing: BackingPolicy::Allow,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            l2_cache_bytes: None,
            refcount_cache_bytes: None,
            skip_backing: false,
            probe_backing_format: false,
            force_share: false,
        }
    }
}

impl OpenOptions {
    /// Read-write with the other defaults.
    pub fn writable() -> Self {
        Self {
            writable: true,
            ..Self::default()
        }
    }
}

/// Flags for [`Image::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range must stay allocated (NBD `NO_HOLE`): mark zeros, never free host clusters.
    pub no_hole: bool,
}

#[derive(Debug)]
pub(crate) struct State {
    pub meta: Meta,
    pub backing: Option<Backing>,
    /// Last decompressed cluster, keyed by its L2 entry.
    pub compressed: Option<(u64, Box<[u8]>)>,
}

/// An open qcow2 image. See the module docs.
#[derive(Debug)]
pub struct Image {
    state: Mutex<State>,
    path: Option<PathBuf>,
    writable: bool,
    geo: Geometry,
}

impl Image {
    /// Opens the image file at `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        if opts.force_share && opts.writable {
            return Err(Error::arg("force_share is only allowed read-only"));
        }
        let storage = if opts.force_share {
            FileStorage::open_unlocked(path)
        } else {
            FileStorage::open(path, opts.writable)
        }
        .ctx(|| format!("opening {}", path.display()))?;
        let mut chain = Vec::new();
        Self::open_with_chain(Arc::new(storage), Some(path), opts, &mut chain)
    }

    /// Opens an image held by any storage. Relative backing names resolve against `path`'s
    /// directory when given (else the backing policy must allow absolute names only).
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut chain = Vec::new();
        Self::open_with_chain(storage, path, opts, &mut chain)
    }

    pub(crate) fn open_with_chain(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
        chain: &mut Vec<backing::FileId>,
    ) -> Result<Image> {
        let mut header = read_header(&*storage)?;
        check_features(&header, opts.writable)?;
        if opts.writable && header.incompatible_features & incompat::DIRTY != 0 {
            // Left behind by a crash: refcounts may be too high (never too low, by our write
            // order; but a foreign writer may differ). Repair before the first write.
            let report = check::check(&storage, check::Repair::All)?;
            if report.corruptions > 0 || report.check_errors > 0 {
                return Err(Error::corrupt(format!(
                    "the image was not closed cleanly and repairing it left {} corruptions",
                    report.corruptions
                )));
            }
            header = read_header(&*storage)?;
        }
        let geo = header.geometry();

        let l1 = read_table(
            &*storage,
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            "L1 table",
        )?;
        let reftable = read_table(
            &*storage,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * geo.cluster_size(),
            "refcount table",
        )?;

        let file_len = storage
            .len()
            .ctx(|| "reading the image length".to_string())?;
        let end_cluster = file_len.div_ceil(geo.cluster_size());
        let l2_budget = opts
            .l2_cache_bytes
            .unwrap_or_else(|| cache::default_l2_budget(header.size));
        let rc_budget = opts
            .refcount_cache_bytes
            .unwrap_or_else(|| cache::default_refcount_budget(header.size));

        if opts.skip_backing && opts.writable {
            return Err(Error::arg("skip_backing is only allowed read-only"));
        }
        let backing = match &header.backing_file {
            Some(_) if opts.skip_backing => None,
            Some(name) => Some(backing::open_backing(&header, name, path, opts, chain)?),
            None => None,
        };

        let map = MetaMap::build(&header, &l1, &reftable)?;
        let mut meta = Meta {
            storage,
            geo,
            l1,
            l2_cache: SliceCache::new("L2 table", geo.cluster_size(), l2_budget),
            rc_cache: SliceCache::new("refcount block", geo.cluster_size(), rc_budget),
            reftable,
            free_hint: 0,
            end_cluster,
            map,
            writable: opts.writable,
            reserve: VecDeque::new(),
            reserve_batch: alloc::FIRST_RESERVE,
            pending_free: Vec::new(),
            dirty: false,
            corrupt: None,
            header: header.clone(),
        };
        if opts.writable {
            meta.verify_metadata_refcounts()?;
        }
        if opts.writable && header.autoclear_features != 0 {
            // We do not maintain bitmaps (or anything else an autoclear bit guards): say so,
            // drop the bitmaps and release their clusters rather than leak them.
            let bitmaps = check::bitmap_extents(&*meta.storage, &header)?;
            header.autoclear_features = 0;
            if !bitmaps.is_empty() {
                header
                    .unknown_extensions
                    .retain(|e| e.kind != check::EXT_BITMAPS);
            }
            meta.header = header;
            meta.write_header()?;
            meta.sync()?;
            let cs = geo.cluster_size();
            for (off, len) in bitmaps {
                let first = off / cs;
                let last = (off + len).div_ceil(cs);
                meta.free_range(HostOffset(first * cs), last - first)?;
            }
        }
        Ok(Image {
            state: Mutex::new(State {
                meta,
                backing,
                compressed: None,
            }),
            path: path.map(Path::to_path_buf),
            writable: opts.writable,
            geo,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.lock().meta.header.size
    }

    /// Cluster size, subclusters and refcount width.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock().meta.header.clone()
    }

    /// The path the image was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Runs `f` on the backing layer, if there is one.
    pub fn with_backing<T>(&self, f: impl FnOnce(Option<&Backing>) -> T) -> T {
        f(self.lock().backing.as_ref())
    }

    /// L2 and refcount cache counters.
    pub fn cache_stats(&self) -> (CacheStats, CacheStats) {
        let st = self.lock();
        (st.meta.l2_cache.stats(), st.meta.rc_cache.stats())
    }

    /// Bytes the image file occupies on the host.
    pub fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.lock()
            .meta
            .storage
            .allocated_bytes()
            .ctx(|| "reading the file size".to_string())
    }

    /// Length of the image file.
    pub fn file_len(&self) -> Result<u64> {
        self.lock()
            .meta
            .storage
            .len()
            .ctx(|| "reading the file size".to_string())
    }

    /// Number of L1 entries in use and L2 tables allocated.
    pub fn l2_tables(&self) -> usize {
        self.lock()
            .meta
            .l1
            .iter()
            .filter(|&&e| e & crate::format::entries::OFFSET_MASK != 0)
            .count()
    }

    fn check_range(&self, st: &State, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= st.meta.header.size => Ok(()),
            _ => Err(Error::arg(format!(
                "range {off:#x}+{len:#x} is outside the image (size {:#x})",
                st.meta.header.size
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly("opened read-only".into()))
        }
    }

    /// Reads `buf.len()` bytes at guest offset `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut st = self.lock();
        self.check_range(&st, off, buf.len() as u64)?;
        st.read(buf, GuestOffset(off))
    }

    /// Writes `buf` at guest offset `off`. On return the data and the metadata that finds it
    /// are in the OS (they survive a crash of this process); [`Image::flush`] makes them durable.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock();
        self.check_range(&st, off, buf.len() as u64)?;
        st.write(buf, GuestOffset(off))
    }

    /// Makes `[off, off + len)` read as zeros without writing zero data where the format can
    /// say "zero" instead. Frees host clusters unless `flags.no_hole`.
    pub fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock();
        self.check_range(&st, off, len)?;
        st.zero_range(
            GuestOffset(off),
            len,
            write::ZeroMode::Zero {
                unmap: !flags.no_hole,
            },
        )
    }

    /// Deallocates `[off, off + len)`: whole clusters (subclusters with extended L2) are
    /// released and their host space punched; partial ones are zeroed. The range reads as
    /// zeros afterwards, never as backing data.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock();
        self.check_range(&st, off, len)?;
        st.zero_range(GuestOffset(off), len, write::ZeroMode::Discard)
    }

    /// Makes every completed write durable (`fdatasync`), and releases the clusters that
    /// discards and overwrites freed since the last flush.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        if st.meta.pending_free.is_empty() {
            st.meta.sync()
        } else {
            st.meta.release_pending()
        }
    }

    /// Grows the virtual size to `new_size` (rounded up to 512 bytes like qemu-img).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock();
        st.resize(new_size)
    }

    /// Allocation status of this layer only, from `off` for at most `len` bytes: returns the
    /// length of the run that shares one status.
    pub fn layer_status(&self, off: u64, len: u64) -> Result<(u64, LayerStatus)> {
        let mut st = self.lock();
        self.check_range(&st, off, len)?;
        st.layer_status(GuestOffset(off), len)
    }

    /// Flushes and closes the image cleanly: releases pending clusters, returns the unused
    /// reserve, and clears the dirty bit. Dropping an image does the same but cannot report
    /// errors; an image that is not closed cleanly is repaired by the next read-write open.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.writable = false;
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.meta.shutdown()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Reads and parses the header cluster (its size comes from the first bytes).
pub(crate) fn read_header(storage: &dyn Storage) -> Result<Header> {
    let mut first = [0u8; 104];
    storage
        .read_at(&mut first, 0)
        .ctx(|| "reading the header".to_string())?;
    let bits = Header::peek_cluster_bits(&first)?;
    let mut cluster0 = vec![0u8; 1 << bits];
    storage
        .read_at(&mut cluster0, 0)
        .ctx(|| "reading the header".to_string())?;
    Header::parse(&cluster0)
}

/// Reads a table of big-endian u64 entries (L1, L2, refcount table); the caller bounds
/// `bytes`. Read in chunks, so a 32 MiB table costs 32 MiB, not 64.
pub(crate) fn read_table(
    storage: &dyn Storage,
    offset: u64,
    bytes: u64,
    what: &str,
) -> Result<Vec<u64>> {
    const CHUNK: u64 = 1 << 20;
    let mut table = Vec::with_capacity((bytes / 8) as usize);
    let mut raw = vec![0u8; CHUNK.min(bytes) as usize];
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(CHUNK) as usize;
        storage
            .read_at(&mut raw[..n], offset + done)
            .ctx(|| format!("reading the {what} at {offset:#x}"))?;
        table.extend(
            raw[..n]
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))),
        );
        done += n as u64;
    }
    Ok(table)
}

/// Refuses what this engine cannot open (or cannot open writable), naming the feature.
fn check_features(h: &Header, writable: bool) -> Result<()> {
    let unknown = h.unknown_incompatible();
    if !unknown.is_empty() {
        return Err(Error::unsupported(format!(
            "unknown incompatible feature: {}",
            unknown.join(", ")
        )));
    }
    if h.incompatible_features & incompat::DATA_FILE != 0 {
        return Err(Error::unsupported("external data files"));
    }
    if h.crypt_method != 0 {
        return Err(Error::unsupported("encrypted images"));
    }
    if h.compression_type == CompressionType::Zstd
        && h.incompatible_features & incompat::COMPRESSION == 0
    {
        return Err(Error::invalid(
            "zstd compression without the compression-type bit",
        ));
    }
    if writable {
        if h.incompatible_features & incompat::CORRUPT != 0 {
            return Err(Error::corrupt(
                "the image is marked corrupt; it can only be opened read-only",
            ));
        }
        if h.nb_snapshots > 0 {
            return Err(Error::unsupported(
                "writing to images with internal snapshots",
            ));
        }
    }
    Ok(())
}
