//! The public image handle.
//!
//! [`Image`] is `Send + Sync` and serves many threads at once. How:
//! - **Metadata under one lock, data I/O outside it.** A request takes the state lock only to
//!   turn guest ranges into host ranges (and to allocate); the `pread`/`pwrite` of guest data
//!   runs without it, so reads and in-place rewrites proceed in parallel.
//! - **In-flight allocations are tracked** per guest cluster: a cluster being allocated (or
//!   given new subclusters, or zeroed) is *busy*; another request that needs to change or
//!   fill that cluster waits for it, so two writers never both allocate it and copy-on-write
//!   never copies stale bytes over a newer write.
//! - **Allocations are batched**: one request allocates all its clusters under one lock hold,
//!   writes their data in as few `pwrite`s as the host layout allows, and links them with as
//!   few L2 writes as the table layout allows. Copy-on-write barriers group-commit.
//! - **Released clusters wait for in-flight I/O**: a request may still read or write a host
//!   cluster it looked up before another request unlinked it; such clusters are only released
//!   for reuse while no data I/O is in flight (an I/O gate, shared by requests, exclusive for
//!   the release).
//!
//! Lock order: sector gate (encrypted images), I/O gate, then state lock, then (inside
//! storage syncs) the barrier.

mod backing;
mod compress;
mod data_file;
mod mapping;
mod read;
mod resize;
mod status;
mod write;
mod zero;

use crate::sync::Recover;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

pub use backing::{Backing, BackingPolicy, RawBacking, resolve_backing_name};
pub use data_file::DataFile;
pub use read::ReadRequest;
pub use status::LayerStatus;

use crate::alloc;
use crate::barrier::Barrier;
use crate::cache::{self, CacheStats, SliceCache, Ticket, Writeback};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{self, incompat};
use crate::format::{CompressionType, Header};
use crate::meta::{Meta, MetaMap};
use crate::ops::check;
use crate::storage::{CacheMode, FileStorage, Storage};
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
    /// zeros), and open an encrypted image without its passphrase (its data then cannot be
    /// read). Only allowed read-only; for `info` on an image whose chain is unavailable.
    pub skip_backing: bool,
    /// Guess the format of a backing file whose image does not record it (qcow2 magic or raw).
    /// Off by default, as in QEMU: never enable it for untrusted images.
    pub probe_backing_format: bool,
    /// Read-only without taking or honouring image locks (qemu-img's `-U`), for inspecting an
    /// image another process is using.
    pub force_share: bool,
    /// Page cache or `O_DIRECT` for guest data (backing files included); only for images opened
    /// from a path ([`Image::open`]).
    pub cache: CacheMode,
    /// The passphrase of a LUKS-encrypted image (and of its encrypted backing files).
    pub passphrase: Option<crate::crypto::Passphrase>,
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
            cache: CacheMode::Buffered,
            passphrase: None,
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

/// Everything the state lock guards.
#[derive(Debug)]
pub(crate) struct State {
    pub meta: Meta,
    /// Virtual size of the backing layer (fixed while open), if there is one.
    pub backing_size: Option<u64>,
    /// Last decompressed cluster, keyed by its L2 entry.
    pub compressed: Option<(u64, Box<[u8]>)>,
    /// Guest clusters (by index) whose mapping a request is changing right now.
    pub busy: HashSet<u64>,
    /// Requests waiting on the `settled` condition variable.
    pub sleepers: usize,
}

/// A change's hold on the sector gate (see [`Image::sector_hold`]).
struct SectorHold<'a> {
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _exclusive: Option<std::sync::RwLockWriteGuard<'a, ()>>,
}

/// One request's shared hold on the I/O gate, counted.
struct InFlight<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    count: &'a AtomicUsize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open qcow2 image. See the module docs.
#[derive(Debug)]
pub struct Image {
    state: Mutex<State>,
    /// Signalled whenever guest clusters stop being busy.
    settled: Condvar,
    /// Held shared by every request for its data I/O, exclusive to release freed clusters.
    io_gate: RwLock<()>,
    /// Encrypted images only: held shared by writes and zeroings of whole sectors, and
    /// exclusive by one that starts or ends inside a sector, whose read-modify-write of
    /// that sector must not interleave with another change of it. Taken before the I/O gate.
    sector_gate: RwLock<()>,
    storage: Arc<dyn Storage>,
    barrier: Arc<Barrier>,
    backing: Option<Backing>,
    size: AtomicU64,
    /// Requests between entering and leaving the I/O gate.
    in_flight: AtomicUsize,
    /// Enough clusters are pending release for a batch (see [`Image::note_pending`]).
    release_due: AtomicBool,
    path: Option<PathBuf>,
    writable: bool,
    geo: Geometry,
    /// The encryption of an encrypted image (its cipher, unless opened metadata-only).
    crypto: Option<crate::crypto::Encryption>,
    /// Where guest data is read and written: the image file, or its external data file;
    /// `None` for an image with a data file opened metadata-only.
    data: Option<Arc<dyn Storage>>,
    /// Syncs of `data`: the image file's barrier, or the data file's own.
    data_barrier: Arc<Barrier>,
    /// The external data file, if the image has one (and was not opened metadata-only).
    data_file: Option<DataFile>,
}

impl Image {
    /// Opens the image file at `path`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        if opts.force_share && opts.writable {
            return Err(Error::arg("force_share is only allowed read-only"));
        }
        let mut storage = if opts.force_share {
            FileStorage::open_unlocked(path)
        } else {
            FileStorage::open(path, opts.writable)
        }
        .ctx(|| format!("opening {}", path.display()))?;
        storage
            .set_cache_mode(opts.cache)
            .ctx(|| format!("opening {}", path.display()))?;
        let mut chain = backing::Chain::default();
        Self::open_with_chain(Arc::new(storage), Some(path), opts, &mut chain)
    }

    /// Opens an image held by any storage. Relative backing names resolve against `path`'s
    /// directory when given (else the backing policy must allow absolute names only).
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut chain = backing::Chain::default();
        Self::open_with_chain(storage, path, opts, &mut chain)
    }

    /// [`Image::open_storage`] of an image whose external data file the caller has opened
    /// too (`data`; the image's data file name is then not resolved). For callers that hold
    /// both files already, such as tests running the engine on simulated storage.
    pub fn open_storage_with_data_file(
        storage: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let mut chain = backing::Chain {
            given_data: Some(data),
            ..backing::Chain::default()
        };
        Self::open_with_chain(storage, path, opts, &mut chain)
    }

    pub(crate) fn open_with_chain(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
        chain: &mut backing::Chain,
    ) -> Result<Image> {
        // A data file the caller opened is the top image's (opened first), not a backing one's.
        let given_data = chain.given_data.take();
        let mut header = read_header(&*storage)?;
        check_features(&header, opts.writable)?;
        let crypto = match header.crypt_method {
            0 => None,
            _ => Some(crate::crypto::open_luks(
                &*storage,
                &header,
                opts.passphrase.as_ref(),
                opts.skip_backing && !opts.writable,
                &mut chain.keys,
            )?),
        };
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
            .unwrap_or_else(|| cache::default_l2_budget(header.size, &geo));
        let rc_budget = opts
            .refcount_cache_bytes
            .unwrap_or_else(|| cache::default_refcount_budget(header.size, &geo));

        if opts.skip_backing && opts.writable {
            return Err(Error::arg("skip_backing is only allowed read-only"));
        }
        let backing = match &header.backing_file {
            Some(_) if opts.skip_backing => None,
            Some(name) => Some(backing::open_backing(&header, name, path, opts, chain)?),
            None => None,
        };
        // After the backing chain, whose layers it must not be.
        let data_file = data_file::open(&header, path, opts, chain, given_data)?;
        let data: Option<Arc<dyn Storage>> = match &data_file {
            Some(df) => Some(df.storage.clone()),
            // Opened metadata-only: its data cannot be read.
            None if header.has_data_file() => None,
            None => Some(storage.clone()),
        };

        let map = MetaMap::build(&header, &l1, &reftable)?;
        let barrier = Arc::new(Barrier::default());
        let mut meta = Meta {
            storage: storage.clone(),
            data_file: data_file.as_ref().map(|d| d.storage.clone()),
            barrier: barrier.clone(),
            geo,
            l1,
            l2_cache: SliceCache::new("L2 table", geo.cluster_size(), l2_budget),
            rc_cache: SliceCache::new("refcount block", geo.cluster_size(), rc_budget),
            reftable,
            end_cluster,
            map,
            writable: opts.writable,
            allocator: alloc::Allocator::default(),
            dirty: false,
            corrupt: None,
            recorded: None,
            header: header.clone(),
        };
        if opts.writable {
            meta.verify_metadata_refcounts()?;
        }
        // The raw data file bit is the one autoclear bit this engine maintains.
        let kept = header.autoclear_features & header::autoclear::RAW_DATA;
        let kept = if header.has_data_file() { kept } else { 0 };
        if opts.writable && header.autoclear_features & !kept != 0 {
            // We do not maintain bitmaps (or anything else an autoclear bit guards): say so,
            // drop the bitmaps and release their clusters rather than leak them.
            let bitmaps = check::bitmap_extents(&*meta.storage, &header)?;
            header.autoclear_features = kept;
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
                meta.free_range(HostOffset(first * cs), last - first);
            }
        }
        let size = meta.header.size;
        let data_barrier = match &data_file {
            Some(_) => Arc::new(Barrier::default()),
            None => barrier.clone(),
        };
        Ok(Image {
            state: Mutex::new(State {
                meta,
                backing_size: backing.as_ref().map(Backing::size),
                compressed: None,
                busy: HashSet::new(),
                sleepers: 0,
            }),
            settled: Condvar::new(),
            io_gate: RwLock::new(()),
            sector_gate: RwLock::new(()),
            storage,
            barrier,
            backing,
            size: AtomicU64::new(size),
            in_flight: AtomicUsize::new(0),
            release_due: AtomicBool::new(false),
            path: path.map(Path::to_path_buf),
            writable: opts.writable,
            geo,
            crypto,
            data,
            data_barrier,
            data_file,
        })
    }

    /// The storage guest data lives in (the image file, or its external data file).
    pub(crate) fn data(&self) -> Result<&Arc<dyn Storage>> {
        self.data.as_ref().ok_or_else(|| {
            Error::arg("the image was opened without its external data file (metadata only)")
        })
    }

    /// The external data file, if the image has one and it is open.
    pub fn data_file(&self) -> Option<&DataFile> {
        self.data_file.as_ref()
    }

    /// A raw data file with nothing under the image: by the spec it reads as the image
    /// (every mapped cluster at its own offset, everything else zeros, which every writer
    /// keeps true), so reads go to it directly, without looking at the L2 tables.
    pub(crate) fn raw_data_file(&self) -> Option<&Arc<dyn Storage>> {
        self.data_file
            .as_ref()
            .filter(|d| d.raw && self.backing.is_none())
            .map(|d| &d.storage)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().recover()
    }

    /// Waits until guest cluster `cluster` is not busy; returns the lock held again.
    pub(crate) fn wait_idle<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        cluster: u64,
    ) -> MutexGuard<'a, State> {
        while st.busy.contains(&cluster) {
            st = self.sleep(st);
        }
        st
    }

    /// Waits for [`Image::wake`]; returns the lock held again.
    fn sleep<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.sleepers += 1;
        let mut st = self.settled.wait(st).recover();
        st.sleepers -= 1;
        st
    }

    /// Wakes the requests waiting for busy clusters or slice writes, if there are any (a
    /// futex wake is a system call; most requests have nobody to wake).
    pub(crate) fn wake(&self, st: &State) {
        if st.sleepers > 0 {
            self.settled.notify_all();
        }
    }

    /// Writes back pinned L2 slices until every ticket is redeemed (see `cache`), dropping
    /// the state lock, held on entry and on return, around each write. Every ticket is
    /// redeemed even after an error; the first error is returned.
    pub(crate) fn write_back_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        tickets: &[Ticket],
    ) -> (MutexGuard<'a, State>, Result<()>) {
        let mut failure = None;
        for &t in tickets {
            loop {
                match st.meta.l2_cache.writeback(t) {
                    Writeback::Done => break,
                    Writeback::Failed(why) => {
                        failure.get_or_insert_with(|| {
                            Error::io(
                                format!("writing the L2 table slice at {:#x}", t.slice),
                                why.to_io(),
                            )
                        });
                        break;
                    }
                    Writeback::Wait => st = self.sleep(st),
                    Writeback::Write { generation, bytes } => {
                        drop(st);
                        // Alone, a buffered write is a copy into the page cache. With other
                        // requests in flight it would wait for the inode lock their direct
                        // I/O holds shared, and stall them: then the slice goes direct too.
                        // (Linux keeps the two coherent; one slice is never written twice
                        // at once.)
                        let result = if self.in_flight.load(Ordering::Relaxed) <= 1 {
                            self.storage.write_at(&bytes, t.slice)
                        } else {
                            self.storage.write_data(&bytes, t.slice)
                        };
                        st = self.lock();
                        st.meta.l2_cache.writeback_done(
                            t.slice,
                            generation,
                            result.map_err(|e| (&e).into()),
                        );
                        self.wake(&st);
                    }
                }
            }
        }
        (st, failure.map_or(Ok(()), Err))
    }

    /// Refills the reserve ahead of need, with the barrier outside the state lock, so that
    /// allocating requests rarely wait for a refill. Failures are left to the next
    /// allocation, which refills synchronously and reports them.
    pub(crate) fn top_up_reserve(&self) {
        let (batch, ranges) = {
            let mut st = self.lock();
            if !st.meta.wants_top_up() {
                return;
            }
            match st.meta.start_top_up() {
                Ok(batch) => batch,
                Err(_) => return,
            }
        };
        let synced = self.barrier.sync_ranges(&*self.storage, &ranges).is_ok();
        self.lock().meta.finish_top_up(batch, synced);
    }

    /// The sector gate for a change of `[off, off + len)`: none in a plain image, shared for
    /// whole sectors, exclusive otherwise.
    fn sector_hold(&self, off: u64, len: u64) -> SectorHold<'_> {
        let mut hold = SectorHold {
            _shared: None,
            _exclusive: None,
        };
        if self.crypto.is_some() {
            if write::whole_sectors(off, len) {
                hold._shared = Some(self.sector_gate.read().recover());
            } else {
                hold._exclusive = Some(self.sector_gate.write().recover());
            }
        }
        hold
    }

    /// The cipher data reads and writes go through: `None` in a plain image; an error in an
    /// encrypted image opened without its passphrase.
    pub(crate) fn data_cipher(&self) -> Result<Option<&crate::crypto::Cipher>> {
        match &self.crypto {
            None => Ok(None),
            Some(enc) => enc.cipher.as_ref().map(Some).ok_or_else(|| {
                Error::arg("the image is encrypted and was opened without its passphrase")
            }),
        }
    }

    /// Shared hold on the I/O gate for one request's data I/O.
    fn io_shared(&self) -> InFlight<'_> {
        let gate = self.io_gate.read().recover();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            _gate: gate,
            count: &self.in_flight,
        }
    }

    /// Releases pending clusters (refcount decrements, punches) once no data I/O is in flight.
    fn release_pending(&self) -> Result<()> {
        let _exclusive = self.io_gate.write().recover();
        self.lock().meta.release_pending()
    }

    /// After a request: run a batch release if enough clusters are pending.
    fn release_if_due(&self) -> Result<()> {
        if self.release_due.swap(false, Ordering::Relaxed) {
            self.release_pending()
        } else {
            Ok(())
        }
    }

    /// Records, under the state lock, whether enough releases are pending for a batch; the
    /// request runs it once it has left the I/O gate (see [`Image::release_if_due`]).
    pub(crate) fn note_pending(&self, st: &State) {
        if st.meta.wants_release() {
            self.release_due.store(true, Ordering::Relaxed);
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size, subclusters and refcount width.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock().meta.header.clone()
    }

    /// The LUKS header of an encrypted image.
    pub fn luks_header(&self) -> Option<&crate::crypto::luks::Header> {
        self.crypto.as_ref().map(|e| &e.header)
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
        f(self.backing.as_ref())
    }

    /// L2 and refcount cache counters.
    pub fn cache_stats(&self) -> (CacheStats, CacheStats) {
        let st = self.lock();
        (st.meta.l2_cache.stats(), st.meta.rc_cache.stats())
    }

    /// Bytes the image file occupies on the host.
    pub fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage
            .allocated_bytes()
            .ctx(|| "reading the file size".to_string())
    }

    /// Length of the image file.
    pub fn file_len(&self) -> Result<u64> {
        self.storage
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

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::arg(format!(
                "range {off:#x}+{len:#x} is outside the image (size {size:#x})"
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
        self.check_range(off, buf.len() as u64)?;
        let _io = self.io_shared();
        self.read_inner(buf, GuestOffset(off))
    }

    /// Writes `buf` at guest offset `off`. On return the data and the metadata that finds it
    /// are in the OS (they survive a crash of this process); [`Image::flush`] makes them durable.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        {
            let _sectors = self.sector_hold(off, buf.len() as u64);
            let _io = self.io_shared();
            self.write_inner(buf, GuestOffset(off))?;
        }
        self.release_if_due()
    }

    /// Makes `[off, off + len)` read as zeros without writing zero data where the format can
    /// say "zero" instead. Frees host clusters unless `flags.no_hole`.
    pub fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let mode = zero::ZeroMode::Zero {
            unmap: !flags.no_hole,
        };
        {
            let _sectors = self.sector_hold(off, len);
            let _io = self.io_shared();
            self.zero_range(GuestOffset(off), len, mode)?;
        }
        self.release_if_due()
    }

    /// Deallocates `[off, off + len)`: whole clusters (subclusters with extended L2) are
    /// released and their host space punched; partial ones are zeroed. The range reads as
    /// zeros afterwards, never as backing data.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        {
            let _sectors = self.sector_hold(off, len);
            let _io = self.io_shared();
            self.zero_range(GuestOffset(off), len, zero::ZeroMode::Discard)?;
        }
        self.release_if_due()
    }

    /// Makes every completed write durable (`fdatasync`, shared with concurrent flushes), and
    /// releases the clusters that discards and overwrites freed since the last flush.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if let Some(df) = &self.data_file {
            // Data before the metadata that names it.
            self.data_barrier
                .sync(&*df.storage)
                .ctx(|| format!("flushing the data file {}", df.path.display()))?;
        }
        if !self.lock().meta.allocator.has_pending_releases() {
            self.barrier
                .sync(&*self.storage)
                .ctx(|| "flushing the image file".to_string())
        } else {
            self.release_pending()
        }
    }

    /// Grows the virtual size to `new_size` (rounded up to 512 bytes like qemu-img).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let _exclusive = self.io_gate.write().recover();
        let mut st = self.lock();
        st.resize(new_size)?;
        self.size.store(st.meta.header.size, Ordering::Release);
        Ok(())
    }

    /// Names another backing file in the header without touching any data (`qemu-img rebase
    /// -u`): only correct when the new backing file reads exactly as the old one (a flattened
    /// copy of it). The backing layer open now stays in use until the image is reopened. The
    /// new name must not be longer than the old one, so the header rewrite changes the
    /// name's bytes in place and nothing else moves.
    pub fn set_backing_file_unsafe(&self, name: &str, format: &str) -> Result<()> {
        self.check_writable()?;
        let _exclusive = self.io_gate.write().recover();
        let mut st = self.lock();
        let old = st.meta.header.backing_file.clone().unwrap_or_default();
        if name.is_empty() || name.len() > old.len() {
            return Err(Error::arg(format!(
                "a backing name of {} bytes cannot replace one of {} in place",
                name.len(),
                old.len()
            )));
        }
        let previous = st.meta.header.clone();
        st.meta.header.backing_file = Some(name.to_string());
        st.meta.header.backing_format = Some(format.to_string());
        if let Err(e) = st.meta.write_header().and_then(|()| st.meta.sync()) {
            st.meta.header = previous;
            return Err(e);
        }
        Ok(())
    }

    /// Allocation status of this layer only, from `off` for at most `len` bytes: returns the
    /// length of the run that shares one status.
    pub fn layer_status(&self, off: u64, len: u64) -> Result<(u64, LayerStatus)> {
        self.check_range(off, len)?;
        self.lock().layer_status(GuestOffset(off), len)
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
        // The data before the metadata marked clean.
        let data_synced = match &self.data_file {
            Some(df) => df
                .storage
                .flush()
                .ctx(|| format!("flushing the data file {}", df.path.display())),
            None => Ok(()),
        };
        let st = self.state.get_mut().recover();
        data_synced.and(st.meta.shutdown())
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
    match h.crypt_method {
        0 => {}
        1 => {
            return Err(Error::unsupported(
                "legacy AES encryption (encrypt.format=aes), which QEMU itself no longer opens \
                 for guests; convert the image with qemu-img",
            ));
        }
        2 if writable && !h.size.is_multiple_of(crate::crypto::luks::SECTOR) => {
            return Err(Error::invalid(format!(
                "an encrypted image of {} bytes: encrypted images are whole 512-byte sectors",
                h.size
            )));
        }
        2 => {}
        other => return Err(Error::invalid(format!("encryption method {other}"))),
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
