//! The metadata state of an open image and the single place every write goes through.
//!
//! [`Meta`] holds the header, the L1 table (always in memory: at most 32 MiB by validation, 64 KiB
//! for 4 TiB), the refcount table, the two slice caches and the map of metadata clusters.
//! [`Meta::write_meta`] is the only path by which metadata reaches the image file, and every
//! guest data write is planned through [`Meta::check_data_write`] (under the state lock, before
//! the I/O runs without it), so the overlap check guards every write: a write that would land
//! on metadata of another kind marks the image corrupt and fails instead of damaging it.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use crate::barrier::Barrier;
use crate::cache::SliceCache;
use crate::error::{Error, IoContext, Result};
use crate::format::Header;
use crate::format::entries::{L1Entry, refblock_offset};
use crate::format::header::incompat;
use crate::storage::Storage;
use crate::types::{Geometry, HostOffset};

/// What a metadata cluster holds, for overlap checks and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    L1,
    L2,
    RefTable,
    RefBlock,
    /// Internal snapshot table and snapshot L1 tables (read-only images only).
    Snapshot,
    /// The LUKS header and key slots of an encrypted image (never written by this engine
    /// once created).
    Encryption,
}

impl MetaKind {
    pub fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "header",
            MetaKind::L1 => "L1 table",
            MetaKind::L2 => "L2 table",
            MetaKind::RefTable => "refcount table",
            MetaKind::RefBlock => "refcount block",
            MetaKind::Snapshot => "snapshot metadata",
            MetaKind::Encryption => "encryption header",
        }
    }
}

/// Every metadata cluster of the image and what it holds.
///
/// Compact, because a hostile header may describe millions of tables: the runs found at open
/// (header, L1, refcount table, snapshot table) as ranges, the single-cluster tables found at
/// open (L2 tables, refcount blocks) as sorted arrays of 8 bytes each, and the changes since
/// open in small hash sets.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    runs: Vec<(u64, u64, MetaKind)>,
    l2: ClusterSet,
    refblocks: ClusterSet,
    added: HashMap<u64, MetaKind>,
    removed: HashSet<u64>,
}

impl MetaMap {
    /// Records `count` clusters from `first` as `kind`; fails if one already holds other metadata.
    pub fn insert(&mut self, first: u64, count: u64, kind: MetaKind) -> Result<()> {
        for c in first..first + count {
            match self.get(c) {
                Some(old) if old != kind => {
                    return Err(Error::corrupt(format!(
                        "{} overlaps the {} at cluster {c}",
                        kind.name(),
                        old.name()
                    )));
                }
                Some(_) if kind == MetaKind::L2 => {
                    return Err(Error::corrupt(format!(
                        "two L1 entries share the L2 table at cluster {c}"
                    )));
                }
                _ => {}
            }
            self.removed.remove(&c);
            self.added.insert(c, kind);
        }
        Ok(())
    }

    pub fn remove(&mut self, cluster: u64) {
        self.added.remove(&cluster);
        if self.base(cluster).is_some() {
            self.removed.insert(cluster);
        }
    }

    /// What the cluster held when the image was opened.
    fn base(&self, c: u64) -> Option<MetaKind> {
        if let Some(&(_, _, kind)) = self.runs.iter().find(|&&(f, n, _)| c >= f && c - f < n) {
            return Some(kind);
        }
        if self.l2.contains(c) {
            return Some(MetaKind::L2);
        }
        if self.refblocks.contains(c) {
            return Some(MetaKind::RefBlock);
        }
        None
    }

    pub fn get(&self, cluster: u64) -> Option<MetaKind> {
        if let Some(&k) = self.added.get(&cluster) {
            return Some(k);
        }
        if self.removed.contains(&cluster) {
            return None;
        }
        self.base(cluster)
    }

    /// Every metadata cluster, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, MetaKind)> + '_ {
        let runs = self
            .runs
            .iter()
            .flat_map(|&(f, n, k)| (f..f + n).map(move |c| (c, k)));
        let l2 = self.l2.iter().map(|c| (c, MetaKind::L2));
        let rb = self.refblocks.iter().map(|c| (c, MetaKind::RefBlock));
        runs.chain(l2)
            .chain(rb)
            .filter(|(c, _)| !self.removed.contains(c) && !self.added.contains_key(c))
            .chain(self.added.iter().map(|(&c, &k)| (c, k)))
    }

    /// Adds a run found at open, refusing overlaps with the runs before it.
    fn add_run(&mut self, first: u64, count: u64, kind: MetaKind) -> Result<()> {
        for &(f, n, old) in &self.runs {
            if first < f + n && f < first + count {
                return Err(Error::corrupt(format!(
                    "{} overlaps the {} at cluster {}",
                    kind.name(),
                    old.name(),
                    first.max(f)
                )));
            }
        }
        self.runs.push((first, count, kind));
        Ok(())
    }

    /// Sorts single-cluster tables found at open and refuses clusters claimed twice.
    fn seal(&mut self) -> Result<()> {
        if let Some(c) = self.l2.seal() {
            return Err(Error::corrupt(format!(
                "two L1 entries share the L2 table at cluster {c}"
            )));
        }
        if let Some(c) = self.refblocks.seal() {
            return Err(Error::corrupt(format!(
                "two refcount table entries share the refcount block at cluster {c}"
            )));
        }
        for c in self.l2.iter() {
            if let Some(&(_, _, kind)) = self.runs.iter().find(|&&(f, n, _)| c >= f && c - f < n) {
                return Err(Error::corrupt(format!(
                    "L2 table overlaps the {} at cluster {c}",
                    kind.name()
                )));
            }
            if self.refblocks.contains(c) {
                return Err(Error::corrupt(format!(
                    "L2 table overlaps the refcount block at cluster {c}"
                )));
            }
        }
        for c in self.refblocks.iter() {
            if let Some(&(_, _, kind)) = self.runs.iter().find(|&&(f, n, _)| c >= f && c - f < n) {
                return Err(Error::corrupt(format!(
                    "refcount block overlaps the {} at cluster {c}",
                    kind.name()
                )));
            }
        }
        Ok(())
    }

    /// The map of an image's active metadata, validating every table offset on the way.
    pub fn build(header: &Header, l1: &[u64], reftable: &[u64]) -> Result<MetaMap> {
        let geo = header.geometry();
        let cb = geo.cluster_bits;
        let cs = geo.cluster_size();
        let mut map = MetaMap::default();
        map.add_run(0, 1, MetaKind::Header)?;
        let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs);
        map.add_run(header.l1_table_offset >> cb, l1_clusters, MetaKind::L1)?;
        map.add_run(
            header.refcount_table_offset >> cb,
            u64::from(header.refcount_table_clusters),
            MetaKind::RefTable,
        )?;
        if header.nb_snapshots > 0 {
            // Snapshot metadata is never written by this engine; a write there is an overlap.
            map.add_run(header.snapshots_offset >> cb, 1, MetaKind::Snapshot)?;
        }
        if header.crypt_method != 0
            && let Some((offset, len)) = crate::crypto::region(header)?
        {
            map.add_run(offset >> cb, len.div_ceil(cs), MetaKind::Encryption)?;
        }
        for (i, &e) in reftable.iter().enumerate() {
            if let Some(block) = refblock_offset(i as u64, e, &geo)? {
                map.refblocks.push(block.0 >> cb);
            }
        }
        let coverage = (reftable.len() as u64).saturating_mul(geo.refblock_entries());
        for &e in l1 {
            if let Some(table) = L1Entry(e).l2_offset(&geo)? {
                if table.0 >> cb >= coverage {
                    return Err(Error::corrupt(format!(
                        "L2 table at {table} is beyond what the refcount table can describe"
                    )));
                }
                map.l2.push(table.0 >> cb);
            }
        }
        map.seal()?;
        Ok(map)
    }
}

/// A sorted set of cluster numbers: 4 bytes each below 2^32 (every cluster of a file up to
/// 2 TiB even with 512-byte clusters), 8 above.
#[derive(Debug, Default)]
struct ClusterSet {
    near: Vec<u32>,
    far: Vec<u64>,
}

impl ClusterSet {
    fn push(&mut self, c: u64) {
        match u32::try_from(c) {
            Ok(n) => self.near.push(n),
            Err(_) => self.far.push(c),
        }
    }

    /// Sorts; returns a cluster that was pushed twice, if any.
    fn seal(&mut self) -> Option<u64> {
        self.near.sort_unstable();
        self.far.sort_unstable();
        let near = self
            .near
            .windows(2)
            .find(|w| w[0] == w[1])
            .map(|w| u64::from(w[0]));
        near.or_else(|| self.far.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]))
    }

    fn contains(&self, c: u64) -> bool {
        match u32::try_from(c) {
            Ok(n) => self.near.binary_search(&n).is_ok(),
            Err(_) => self.far.binary_search(&c).is_ok(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.near
            .iter()
            .map(|&n| u64::from(n))
            .chain(self.far.iter().copied())
    }
}

/// Metadata of an open image. See the module docs.
#[derive(Debug)]
pub(crate) struct Meta {
    pub storage: Arc<dyn Storage>,
    /// The external data file, for images with one (opened): discards punch it.
    pub data_file: Option<Arc<dyn Storage>>,
    /// Shared with the data path: metadata barriers and copy-on-write barriers group-commit.
    pub barrier: Arc<Barrier>,
    pub header: Header,
    pub geo: Geometry,
    pub l1: Vec<u64>,
    pub l2_cache: SliceCache,
    pub rc_cache: SliceCache,
    pub reftable: Vec<u64>,
    /// One past the last cluster that may be in use (file length rounded up, or more).
    pub end_cluster: u64,
    /// Metadata clusters: every write is checked against it, every data cluster an L2 entry
    /// names too.
    pub map: MetaMap,
    /// Opened for writing (a detected corruption is then recorded in the image).
    pub writable: bool,
    /// Free-cluster search, reserve and pending releases (private to `alloc`).
    pub allocator: crate::alloc::Allocator,
    /// The dirty bit is set on disk (we set it before our first metadata change).
    pub dirty: bool,
    /// A corruption was detected: every later write fails.
    pub corrupt: Option<String>,
    /// Ranges of storage changed while [`Meta::recording`] runs (only it sets this).
    pub recorded: Option<Vec<Range<u64>>>,
}

impl Meta {
    /// Writes metadata bytes to storage. Every metadata write of the engine comes here (or,
    /// for L2 slices written back with group commit, through [`Meta::prepare_meta_write`]).
    pub fn write_meta(&mut self, kind: MetaKind, offset: HostOffset, bytes: &[u8]) -> Result<()> {
        self.prepare_meta_write(kind, offset, bytes.len() as u64)?;
        self.note_changed(offset.0, bytes.len() as u64);
        self.storage
            .write_at(bytes, offset.0)
            .ctx(|| format!("writing {} at {offset}", kind.name()))
    }

    /// Runs `f` and returns, with its result, the ranges of storage it wrote, zeroed or
    /// punched through [`Meta::write_meta`] or [`Meta::note_changed`] (in no order; the
    /// barrier sorts and merges them): what a range sync must cover to make `f`'s changes
    /// durable.
    pub fn recording<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<(T, Vec<Range<u64>>)> {
        let outer = self.recorded.replace(Vec::new());
        let result = f(self);
        let ranges = std::mem::replace(&mut self.recorded, outer).unwrap_or_default();
        if let Some(outer) = &mut self.recorded {
            outer.extend(ranges.iter().cloned());
        }
        Ok((result?, ranges))
    }

    /// Records a change of storage made other than through [`Meta::write_meta`] (a punch).
    pub fn note_changed(&mut self, offset: u64, len: u64) {
        if let Some(r) = &mut self.recorded
            && len > 0
        {
            r.push(offset..offset + len);
        }
    }

    /// Everything that must hold before metadata bytes change: the image is usable, the
    /// bytes land on metadata of that kind, and the dirty bit is durable.
    pub fn prepare_meta_write(
        &mut self,
        kind: MetaKind,
        offset: HostOffset,
        len: u64,
    ) -> Result<()> {
        self.check_usable()?;
        self.check_overlap(Some(kind), offset, len)?;
        if kind != MetaKind::Header {
            self.mark_dirty()?;
        }
        Ok(())
    }

    /// Clears a guest data write of `len` bytes at `offset` before it runs (outside the state
    /// lock): the image must not be marked corrupt and the bytes must land on data clusters.
    /// The verdict holds until the write completes, because a data cluster only becomes
    /// metadata after it is released, and releases wait for in-flight data I/O.
    pub fn check_data_write(&mut self, offset: HostOffset, len: u64) -> Result<()> {
        self.check_usable()?;
        if self.header.has_data_file() {
            // Data goes to the data file, where no metadata lives.
            return Ok(());
        }
        self.check_overlap(None, offset, len)
    }

    /// In an image with an external data file: refuses an entry whose host offset is not its
    /// own guest offset (the spec's rule), and compressed clusters (which cannot be there).
    /// A writable image is marked corrupt.
    pub fn check_data_file_mapping(
        &mut self,
        m: crate::format::entries::Mapping,
        guest: crate::types::GuestOffset,
    ) -> Result<()> {
        use crate::format::entries::Mapping;
        let why = match m {
            Mapping::Compressed { .. } => {
                format!("a compressed cluster at {guest} in an image with an external data file")
            }
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
            } if host.0 != guest.0 => format!(
                "the L2 entry of {guest} points at {host} of the external data file, not at its own offset"
            ),
            _ => return Ok(()),
        };
        Err(if self.writable {
            self.signal_corruption(why)
        } else {
            Error::corrupt(why)
        })
    }

    /// Refuses a data cluster named by an L2 entry that is metadata, or beyond the clusters the
    /// refcount table can describe (no valid image has one there). A writable image is marked
    /// corrupt.
    pub fn check_data_cluster(&mut self, cluster: u64) -> Result<()> {
        let why = if let Some(kind) = self.map.get(cluster) {
            format!(
                "an L2 entry points at cluster {cluster}, which holds the {}",
                kind.name()
            )
        } else {
            let coverage = (self.reftable.len() as u64).saturating_mul(self.geo.refblock_entries());
            if cluster < coverage {
                return Ok(());
            }
            format!(
                "an L2 entry points at cluster {cluster}, beyond the {coverage} clusters the refcount table can describe"
            )
        };
        Err(if self.writable {
            self.signal_corruption(why)
        } else {
            Error::corrupt(why)
        })
    }

    /// Before the first write: every metadata cluster must have a refcount, or the allocator
    /// would hand it out (a lost refcount block, say) and overwrite it.
    pub fn verify_metadata_refcounts(&mut self) -> Result<()> {
        let mut clusters: Vec<(u64, MetaKind)> = self.map.iter().collect();
        clusters.sort_unstable_by_key(|&(c, _)| c);
        for (c, kind) in clusters {
            if self.refcount(c)? == 0 {
                return Err(Error::corrupt(format!(
                    "cluster {c} holds the {} but its refcount is 0; repair the image (check -r all) before writing",
                    kind.name()
                )));
            }
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        match &self.corrupt {
            Some(why) => Err(Error::corrupt(format!(
                "the image was marked corrupt ({why}); no further writes"
            ))),
            None => Ok(()),
        }
    }

    /// Refuses (and marks the image corrupt) a write that would land on metadata of another
    /// kind, or data beyond every cluster the image can own.
    fn check_overlap(
        &mut self,
        kind: Option<MetaKind>,
        offset: HostOffset,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cb = self.geo.cluster_bits;
        let first = offset.0 >> cb;
        let last = (offset.0 + len - 1) >> cb;
        if kind.is_none() && last >= self.end_cluster {
            return Err(self.signal_corruption(format!(
                "data write at {offset} is beyond the end of the image"
            )));
        }
        for c in first..=last {
            let found = self.map.get(c);
            if found != kind {
                let what = kind.map_or("guest data", MetaKind::name);
                let there = found.map_or("a data cluster", MetaKind::name);
                return Err(self.signal_corruption(format!(
                    "refusing to write {what} at {offset}: cluster {c} is {there}"
                )));
            }
        }
        Ok(())
    }

    /// Marks the image corrupt on disk (v3) and refuses every later write. Returns the error
    /// to give the caller.
    pub fn signal_corruption(&mut self, why: String) -> Error {
        if self.corrupt.is_none() {
            self.corrupt = Some(why.clone());
            if self.header.version >= 3 {
                self.header.incompatible_features |= incompat::CORRUPT;
                // Best effort: the write itself may be what is failing.
                if let Ok(bytes) = self.header.to_bytes() {
                    let _ = self.storage.write_at(&bytes, 0);
                    let _ = self.storage.flush();
                }
            }
        }
        Error::corrupt(why)
    }

    /// Sets the dirty bit (v3) and makes it durable before the first metadata change, so that
    /// an image left behind by a crash is known to need a refcount repair.
    fn mark_dirty(&mut self) -> Result<()> {
        if self.dirty || self.header.version < 3 {
            return Ok(());
        }
        self.header.incompatible_features |= incompat::DIRTY;
        self.dirty = true;
        self.write_header()?;
        self.sync()
    }

    /// Clears the dirty bit after everything else is durable (clean close).
    pub fn mark_clean(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.sync()?;
        self.header.incompatible_features &= !incompat::DIRTY;
        self.write_header()?;
        self.sync()?;
        self.dirty = false;
        Ok(())
    }

    /// Rewrites cluster 0 from `self.header`.
    pub fn write_header(&mut self) -> Result<()> {
        let bytes = self.header.to_bytes()?;
        // Only the bytes up to the end of the extension area matter, but qemu-img writes the
        // header cluster whole; so do we, in one write.
        self.write_meta(MetaKind::Header, HostOffset(0), &bytes)
    }

    /// `fdatasync` the image file: the barrier between dependent writes, and the flush. Shares
    /// the sync with other threads that need one at the same time (see `barrier`).
    pub fn sync(&self) -> Result<()> {
        self.barrier
            .sync(&*self.storage)
            .ctx(|| "flushing the image file".to_string())
    }

    /// A barrier for `ranges` only (see [`Meta::recording`]).
    pub fn sync_ranges(&self, ranges: &[Range<u64>]) -> Result<()> {
        self.barrier
            .sync_ranges(&*self.storage, ranges)
            .ctx(|| "flushing metadata of the image file".to_string())
    }
}
