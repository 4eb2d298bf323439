//! Cluster allocation with refcounts, and the barriers that make it crash-safe.
//!
//! Rules that keep the image valid (and `qemu-img check` silent) after a crash or power loss:
//! - a cluster is free exactly when its refcount is 0; every metadata cluster is refcounted,
//!   so free clusters are never metadata (and the overlap map double-checks it);
//! - **refcount before use, amortised**: clusters are taken from a *reserve*. A refill sets the
//!   refcounts of a batch of clusters to 1, zeroes reused ones (punch), extends the file over
//!   new ones, then syncs what it changed (a range sync: the refcount slices, the punched
//!   clusters and the file length, not the guest data dirty in the page cache, which under
//!   buffered writes made each refill write back everything written since the last one).
//!   Every cluster handed out afterwards already has a durable
//!   refcount and durably reads as zeros, so a new L2 table needs no write and no barrier
//!   before the L1 entry, and a write into a new cluster needs no zero padding. A crash leaks
//!   at most the unused reserve; the dirty bit makes the next read-write open reclaim it;
//! - **unlink before decrement, amortised**: a cluster released by an L2 update goes to a
//!   pending list; a batch release syncs (the unlinks become durable), then drops the
//!   refcounts and punches what became free. A crash in between only leaks;
//! - a new refcount block lies inside the range it describes and counts itself, and is
//!   durable before the refcount table points at it;
//! - the refcount table grows by writing a bigger copy (with the blocks describing the new area)
//!   at the end of the image, syncing, switching the header, then releasing the old table.

use std::collections::VecDeque;
use std::ops::Range;

use crate::error::{Error, IoContext, Result};
use crate::format::entries::refblock_offset;
use crate::format::refcount;
use crate::meta::{Meta, MetaKind};
use crate::types::HostOffset;

/// First reserve refill, in clusters; refills double up to [`MAX_RESERVE_BYTES`].
const FIRST_RESERVE: u64 = 16;
/// Largest reserve: what a crash can leak until the next repair (reserved clusters are holes,
/// so only refcounts leak, not disk space) and how far the file length may run ahead of its
/// content while the image is open. Larger means fewer barriers on long sequential writes.
const MAX_RESERVE_BYTES: u64 = 256 << 20;
/// Pending releases that trigger a batch release without waiting for a flush.
pub(crate) const PENDING_LIMIT: usize = 1024;

/// The allocator's state, kept in [`Meta`] and changed only by the allocation code of this
/// module, which keeps its invariants: every reserved cluster has a durable refcount of 1
/// and durably reads as zeros; every pending cluster is unlinked from every table and still
/// counted; no cluster below `free_hint` is free.
#[derive(Debug)]
pub struct Allocator {
    /// No cluster below this index is free.
    free_hint: u64,
    /// Clusters ready to hand out with no barrier (refcount 1 and zeros, both durable).
    reserve: VecDeque<u64>,
    /// How many clusters the next reserve refill takes.
    reserve_batch: u64,
    /// A top-up batch is waiting for its barrier outside the state lock.
    topping_up: bool,
    /// Clusters unlinked from every table whose refcount is not decremented yet; released
    /// in batches after a barrier.
    pending_free: Vec<u64>,
}

impl Default for Allocator {
    fn default() -> Self {
        Self {
            free_hint: 0,
            reserve: VecDeque::new(),
            reserve_batch: FIRST_RESERVE,
            topping_up: false,
            pending_free: Vec::new(),
        }
    }
}

impl Allocator {
    /// Whether some released clusters wait for a batch release.
    pub fn has_pending_releases(&self) -> bool {
        !self.pending_free.is_empty()
    }
}

impl Meta {
    fn refblock_entries(&self) -> u64 {
        self.geo.refblock_entries()
    }

    /// Host offset of refcount block `index`, if it exists.
    fn refblock(&self, index: u64) -> Result<Option<HostOffset>> {
        match self.reftable.get(index as usize) {
            Some(&entry) => refblock_offset(index, entry, &self.geo),
            None => Ok(None),
        }
    }

    /// Where a cluster's refcount lives: (offset of its cache slice, index inside the slice).
    fn refcount_slot(&self, block: HostOffset, cluster: u64) -> (HostOffset, usize) {
        let index = cluster % self.refblock_entries();
        let bit = index * self.geo.refcount_bits();
        let slice = self.rc_cache.slice_size();
        let byte = bit / 8;
        let slice_start = byte - byte % slice;
        let entries_per_slice = slice * 8 / self.geo.refcount_bits();
        (
            HostOffset(block.0 + slice_start),
            (index % entries_per_slice) as usize,
        )
    }

    /// The refcount of a host cluster (0 when no refcount block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let Some(block) = self.refblock(cluster / self.refblock_entries())? else {
            return Ok(0);
        };
        let (slice_off, index) = self.refcount_slot(block, cluster);
        let order = self.geo.refcount_order;
        let storage = self.storage.clone();
        let (slice, _) = self.rc_cache.slice_at(&*storage, slice_off)?;
        Ok(refcount::get(slice, order, index))
    }

    /// Sets refcounts, `(cluster, value)` sorted by cluster, writing each touched slice of a
    /// refcount block once. Every cluster must be covered by an existing block.
    fn update_refcounts(&mut self, changes: &[(u64, u64)]) -> Result<()> {
        let order = self.geo.refcount_order;
        let mut i = 0;
        while i < changes.len() {
            let (c, _) = changes[i];
            let block = self
                .refblock(c / self.refblock_entries())?
                .ok_or_else(|| Error::corrupt(format!("no refcount block covers cluster {c}")))?;
            let (slice_off, _) = self.refcount_slot(block, c);
            let mut slots = Vec::new();
            while let Some(&(c2, value)) = changes.get(i) {
                if value > self.geo.refcount_max() {
                    return Err(Error::unsupported(format!(
                        "refcount of cluster {c2} would overflow {} bits",
                        self.geo.refcount_bits()
                    )));
                }
                let same_block = c2 / self.refblock_entries() == c / self.refblock_entries();
                let (off2, index) = self.refcount_slot(block, c2);
                if !same_block || off2 != slice_off {
                    break;
                }
                slots.push((index, value));
                i += 1;
            }
            let storage = self.storage.clone();
            let (slice, _) = self.rc_cache.slice_at(&*storage, slice_off)?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for (index, value) in slots {
                let r = refcount::set(slice, order, index, value);
                lo = lo.min(r.start);
                hi = hi.max(r.end);
            }
            let bytes = slice[lo..hi].to_vec();
            let at = HostOffset(slice_off.0 + lo as u64);
            if let Err(e) = self.write_meta(MetaKind::RefBlock, at, &bytes) {
                // The cached slice no longer matches the disk.
                self.rc_cache.forget(slice_off, 1);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Hands out one cluster whose refcount (1) is durable and which reads as zeros.
    pub fn alloc_cluster(&mut self) -> Result<HostOffset> {
        if self.allocator.reserve.is_empty() {
            // The slow path: a barrier under the state lock. Normally a top-up (below) keeps
            // the reserve from running dry.
            let (batch, changed) = self.recording(Self::prepare_batch)?;
            self.sync_ranges(&changed)?;
            self.allocator.reserve.extend(batch);
        }
        let c = self
            .allocator
            .reserve
            .pop_front()
            .expect("a refill reserves at least one cluster");
        Ok(HostOffset(c << self.geo.cluster_bits))
    }

    /// Whether the reserve is low enough to start a top-up: under half the last batch, and no
    /// top-up running.
    pub fn wants_top_up(&self) -> bool {
        !self.allocator.topping_up
            && (self.allocator.reserve.len() as u64) < self.allocator.reserve_batch / 4
    }

    /// Starts a top-up: the next batch, refcounts written but not yet durable, and the ranges
    /// of storage it changed. The caller drops the state lock, syncs those ranges, and hands
    /// the batch to [`Meta::finish_top_up`], so requests keep allocating from what is left
    /// of the reserve during the barrier.
    pub fn start_top_up(&mut self) -> Result<(Vec<u64>, Vec<Range<u64>>)> {
        self.allocator.topping_up = true;
        let batch = self.recording(Self::prepare_batch);
        if batch.is_err() {
            self.allocator.topping_up = false;
        }
        batch
    }

    /// Ends a top-up: the batch joins the reserve once the barrier succeeded (otherwise its
    /// clusters leak until the next repair; the refcounts may not be durable).
    pub fn finish_top_up(&mut self, batch: Vec<u64>, synced: bool) {
        self.allocator.topping_up = false;
        if synced {
            self.allocator.reserve.extend(batch);
        }
    }

    /// The next batch of clusters for the reserve: reuses free ones (zeroed first), takes the
    /// rest at the end of the image. Their refcounts are written, not synced: they may only
    /// be handed out after a barrier.
    fn prepare_batch(&mut self) -> Result<Vec<u64>> {
        let want = self.allocator.reserve_batch.max(1);
        let mut got = Vec::new();
        let mut c = self.allocator.free_hint;
        while c < self.end_cluster && (got.len() as u64) < want {
            let group = c / self.refblock_entries();
            if self.refblock(group)?.is_none() {
                if (group as usize) < self.reftable.len() {
                    // A whole group with no block: every cluster in it is free. Put the block in
                    // its first cluster (this one) and keep looking.
                    self.create_refblock_at(group, c)?;
                    c += 1;
                    continue;
                }
                break; // beyond the refcount table: allocate at the end instead
            }
            if self.refcount(c)? == 0 {
                if let Some(kind) = self.map.get(c) {
                    return Err(self.signal_corruption(format!(
                        "cluster {c} holds the {} but its refcount is 0",
                        kind.name()
                    )));
                }
                got.push(c);
            }
            c += 1;
        }
        self.allocator.free_hint = c;
        // A reused cluster may still hold old bytes: it must read as zeros before it is used.
        self.punch_runs(&got)?;
        for (off, len) in byte_runs(&got, self.geo.cluster_bits) {
            self.note_changed(off, len);
        }
        let changes: Vec<(u64, u64)> = got.iter().map(|&c| (c, 1)).collect();
        self.update_refcounts(&changes)?;
        let rest = want - got.len() as u64;
        if rest > 0 {
            let start = self.alloc_at_end(rest)?.0 >> self.geo.cluster_bits;
            got.extend(start..start + rest);
        }
        self.preallocate_runs(&got)?;
        let max = (MAX_RESERVE_BYTES >> self.geo.cluster_bits).max(1);
        self.allocator.reserve_batch = (want * 2).min(max);
        Ok(got)
    }

    /// Allocates `count` contiguous clusters at the end of the image (refcounts set, not yet
    /// synced; the file is extended over them so they read as zeros).
    pub fn alloc_at_end(&mut self, count: u64) -> Result<HostOffset> {
        loop {
            let start = self.end_cluster;
            let (area_end, new_blocks) = self.plan_area(start, count);
            if let Some(&(group, _)) = new_blocks
                .iter()
                .find(|(g, _)| *g as usize >= self.reftable.len())
            {
                self.grow_reftable(group + 1)?;
                continue;
            }
            // Refcounts first: new blocks describe their own group's share of the area.
            for &(group, at) in &new_blocks {
                self.write_new_refblock(group, at, start, area_end)?;
            }
            if !new_blocks.is_empty() {
                self.sync()?; // blocks durable before the refcount table points at them
            }
            for &(group, at) in &new_blocks {
                self.install_refblock(group, at)?;
            }
            let changes: Vec<(u64, u64)> = (start..area_end)
                .filter(|&c| {
                    !new_blocks
                        .iter()
                        .any(|&(g, _)| g == c / self.refblock_entries())
                })
                .map(|c| (c, 1))
                .collect();
            self.update_refcounts(&changes)?;
            self.end_cluster = area_end;
            self.extend_file(area_end)?;
            return Ok(HostOffset(start << self.geo.cluster_bits));
        }
    }

    /// Makes the file at least `clusters` clusters long, so that every refcounted cluster lies
    /// inside it (qemu-img check wants that) and reads as zeros until written.
    fn extend_file(&mut self, clusters: u64) -> Result<()> {
        let want = clusters << self.geo.cluster_bits;
        let len = self.storage.len().ctx(|| "sizing the image".to_string())?;
        if len < want {
            self.storage
                .set_len(want)
                .ctx(|| format!("extending the image to {want} bytes"))?;
        }
        Ok(())
    }

    /// For an area of `count` clusters at `start`, the refcount blocks it needs: returns the end
    /// of the area including the new blocks (placed right after) and `(group, cluster)` pairs.
    fn plan_area(&self, start: u64, count: u64) -> (u64, Vec<(u64, u64)>) {
        let per = self.refblock_entries();
        let mut extra = 0;
        loop {
            let end = start + count + extra;
            let missing: Vec<u64> = (start / per..=(end - 1) / per)
                .filter(|&g| !matches!(self.refblock(g), Ok(Some(_))))
                .collect();
            if missing.len() as u64 == extra {
                let blocks = missing
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| (g, start + count + i as u64));
                return (end, blocks.collect());
            }
            extra = missing.len() as u64;
        }
    }

    /// Writes a new refcount block for `group` at cluster `at`, counting the clusters of
    /// `[area_start, area_end)` that fall in the group (the block itself among them).
    fn write_new_refblock(
        &mut self,
        group: u64,
        at: u64,
        area_start: u64,
        area_end: u64,
    ) -> Result<()> {
        let per = self.refblock_entries();
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        let first = (group * per).max(area_start);
        let last = ((group + 1) * per).min(area_end);
        for c in first..last {
            refcount::set(&mut block, self.geo.refcount_order, (c % per) as usize, 1);
        }
        self.map.insert(at, 1, MetaKind::RefBlock)?;
        let off = HostOffset(at << self.geo.cluster_bits);
        self.write_meta(MetaKind::RefBlock, off, &block)?;
        self.rc_cache.insert_table(off, &block);
        Ok(())
    }

    /// Points refcount table entry `group` at the block at cluster `at`.
    fn install_refblock(&mut self, group: u64, at: u64) -> Result<()> {
        let entry = at << self.geo.cluster_bits;
        self.reftable[group as usize] = entry;
        let off = HostOffset(self.header.refcount_table_offset + group * 8);
        self.write_meta(MetaKind::RefTable, off, &entry.to_be_bytes())
    }

    fn create_refblock_at(&mut self, group: u64, cluster: u64) -> Result<()> {
        // A group without a block is entirely free: if it holds metadata, the refcount table
        // lost a block, and allocating here would overwrite live metadata (the header, for
        // group 0).
        let per = self.refblock_entries();
        if let Some(c) = (group * per..(group + 1) * per).find(|&c| self.map.get(c).is_some()) {
            return Err(self.signal_corruption(format!(
                "refcount block {group} is missing but cluster {c} holds the {}",
                self.map.get(c).map_or("", MetaKind::name)
            )));
        }
        self.storage
            .punch_hole(cluster << self.geo.cluster_bits, self.geo.cluster_size())
            .ctx(|| format!("clearing cluster {cluster}"))?;
        self.write_new_refblock(group, cluster, cluster, cluster + 1)?;
        self.sync()?;
        self.install_refblock(group, cluster)?;
        self.end_cluster = self.end_cluster.max(cluster + 1);
        Ok(())
    }

    /// Replaces the refcount table with one of at least `min_entries` entries.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let entries_per_cluster = cs / 8;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        let mut clusters = (min_entries.div_ceil(entries_per_cluster)).max(old_clusters * 2);
        let per = self.refblock_entries();
        let start = self.end_cluster;
        // The new table and the blocks describing its own area, all at the end of the image.
        let (area_end, blocks) = loop {
            let (end, blocks) = self.plan_area(start, clusters);
            let needed = blocks
                .iter()
                .map(|(g, _)| g + 1)
                .max()
                .unwrap_or(0)
                .max(min_entries);
            if needed <= clusters * entries_per_cluster {
                break (end, blocks);
            }
            clusters = needed.div_ceil(entries_per_cluster);
        };
        if clusters * cs > 8 << 20 {
            return Err(Error::unsupported("refcount table would exceed 8 MiB"));
        }
        let mut table = self.reftable.clone();
        table.resize((clusters * entries_per_cluster) as usize, 0);
        for &(group, at) in &blocks {
            self.write_new_refblock(group, at, start, area_end)?;
            table[group as usize] = at << self.geo.cluster_bits;
        }
        // Clusters of the area in groups that already had a block.
        let changes: Vec<(u64, u64)> = (start..area_end)
            .filter(|&c| !blocks.iter().any(|&(g, _)| g == c / per))
            .map(|c| (c, 1))
            .collect();
        self.update_refcounts(&changes)?;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let new_off = HostOffset(start << self.geo.cluster_bits);
        self.map.insert(start, clusters, MetaKind::RefTable)?;
        self.write_meta(MetaKind::RefTable, new_off, &bytes)?;
        self.sync()?;
        let old_off = self.header.refcount_table_offset;
        self.header.refcount_table_offset = new_off.0;
        self.header.refcount_table_clusters = clusters as u32;
        self.write_header()?;
        self.sync()?;
        self.reftable = table;
        self.end_cluster = area_end;
        self.free_range(HostOffset(old_off), old_clusters);
        Ok(())
    }

    /// Drops one reference to each of `count` clusters from `start`, whose reference the caller
    /// has already removed. The refcounts drop in the next batch release (see module docs),
    /// which the image runs at a flush or once [`Meta::wants_release`] says so: only when no
    /// data I/O is in flight, because a request may still be reading or writing a cluster it
    /// looked up before the cluster was unlinked, and a released cluster can be reused.
    /// One more reference to cluster `c`, which is in use (counted) already: a compressed
    /// cluster packed beside others. `Ok(false)`, changing nothing, when the refcount width
    /// has no room for it.
    pub fn add_reference(&mut self, c: u64) -> Result<bool> {
        let n = self.refcount(c)?;
        let max = refcount::max_value(self.geo.refcount_order);
        if n == 0 {
            return Err(self.signal_corruption(format!("cluster {c} was to be shared but is free")));
        }
        if n >= max {
            return Ok(false);
        }
        self.update_refcounts(&[(c, n + 1)])?;
        Ok(true)
    }

    pub fn free_range(&mut self, start: HostOffset, count: u64) {
        let first = start.0 >> self.geo.cluster_bits;
        self.allocator.pending_free.extend(first..first + count);
    }

    /// Takes back one pending release of each cluster of the range (see
    /// `State::unrelease`).
    pub fn unfree_range(&mut self, start: HostOffset, count: u64) {
        let first = start.0 >> self.geo.cluster_bits;
        for c in first..first + count {
            if let Some(i) = self.allocator.pending_free.iter().rposition(|&p| p == c) {
                self.allocator.pending_free.swap_remove(i);
            }
        }
    }

    /// Enough releases are pending to run a batch without waiting for a flush.
    pub fn wants_release(&self) -> bool {
        self.allocator.pending_free.len() >= PENDING_LIMIT
    }

    /// Syncs (every unlink becomes durable), then drops the pending references; clusters that
    /// become free are punched out of the host file and may be reused.
    pub fn release_pending(&mut self) -> Result<()> {
        if self.allocator.pending_free.is_empty() {
            return Ok(());
        }
        self.sync()?;
        let mut pending = std::mem::take(&mut self.allocator.pending_free);
        pending.sort_unstable();
        let mut changes = Vec::new();
        let mut before = Vec::new();
        let mut freed = Vec::new();
        for run in pending.chunk_by(|a, b| a == b) {
            let c = run[0];
            let drop = run.len() as u64;
            let rc = match self.refcount(c) {
                Ok(rc) => rc,
                Err(e) => {
                    self.allocator.pending_free = pending;
                    return Err(e);
                }
            };
            if rc < drop {
                return Err(self.signal_corruption(format!(
                    "releasing cluster {c} more often than its refcount {rc}"
                )));
            }
            changes.push((c, rc - drop));
            before.push(rc);
            if rc == drop {
                freed.push(c);
            }
        }
        if let Err(e) = self.update_refcounts(&changes) {
            // A full disk, say, part way through. Storage decides, cluster by cluster: a
            // refcount still as it was is pending again (the next batch retries it); one that
            // reached its new value is released. Unknown ones are kept: a leak at worst.
            freed.clear();
            for (&(c, after), &rc) in changes.iter().zip(&before) {
                match self.refcount(c) {
                    Ok(now) if now == rc => self
                        .allocator
                        .pending_free
                        .extend(std::iter::repeat_n(c, (rc - after) as usize)),
                    Ok(now) if now == after && after == 0 => freed.push(c),
                    _ => {}
                }
            }
            self.forget_freed(&freed);
            return Err(e);
        }
        self.forget_freed(&freed);
        self.punch_runs(&freed)
    }

    /// Drops what memory knows of clusters whose refcount reached 0.
    fn forget_freed(&mut self, freed: &[u64]) {
        let cs = self.geo.cluster_size();
        for &c in freed {
            self.map.remove(c);
            self.l2_cache
                .forget(HostOffset(c << self.geo.cluster_bits), cs);
            self.allocator.free_hint = self.allocator.free_hint.min(c);
        }
    }

    /// Punches sorted clusters out of the host file, one call per contiguous run.
    fn punch_runs(&self, clusters: &[u64]) -> Result<()> {
        for (off, len) in byte_runs(clusters, self.geo.cluster_bits) {
            self.storage
                .punch_hole(off, len)
                .ctx(|| format!("punching {len} bytes at {off:#x}"))?;
        }
        Ok(())
    }

    /// Preallocates reserved clusters (see [`crate::storage::Storage::preallocate`]).
    fn preallocate_runs(&self, clusters: &[u64]) -> Result<()> {
        for (off, len) in byte_runs(clusters, self.geo.cluster_bits) {
            self.storage
                .preallocate(off, len)
                .ctx(|| format!("preallocating {len} bytes at {off:#x}"))?;
        }
        Ok(())
    }

    /// Clean shutdown: release what is pending, give the unused reserve back, trim the file
    /// tail it occupied, and clear the dirty bit once all of it is durable.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.corrupt.is_some() {
            return Ok(()); // leave the corrupt (and dirty) bits for the next check
        }
        self.release_pending()?;
        if !self.allocator.reserve.is_empty() {
            let mut back: Vec<u64> = self.allocator.reserve.drain(..).collect();
            back.sort_unstable();
            let changes: Vec<(u64, u64)> = back.iter().map(|&c| (c, 0)).collect();
            self.update_refcounts(&changes)?;
            self.allocator.free_hint = self.allocator.free_hint.min(back[0]);
            self.trim_tail(back.len() as u64)?;
        }
        self.mark_clean()
    }

    /// Truncates free clusters (at most `limit`) off the end of the file.
    fn trim_tail(&mut self, limit: u64) -> Result<()> {
        let mut end = self.end_cluster;
        let floor = self.end_cluster.saturating_sub(limit);
        while end > floor
            && end > 1
            && self.map.get(end - 1).is_none()
            && self.refcount(end - 1)? == 0
        {
            end -= 1;
        }
        let len = self.storage.len().ctx(|| "sizing the image".to_string())?;
        let want = end << self.geo.cluster_bits;
        if want < len {
            self.storage
                .set_len(want)
                .ctx(|| format!("trimming the image to {want} bytes"))?;
        }
        self.end_cluster = end;
        Ok(())
    }
}

/// Sorted cluster numbers as `(byte offset, byte length)` runs of contiguous clusters.
fn byte_runs(clusters: &[u64], cluster_bits: u32) -> impl Iterator<Item = (u64, u64)> + '_ {
    clusters
        .chunk_by(|a, b| *a + 1 == *b)
        .map(move |run| (run[0] << cluster_bits, (run.len() as u64) << cluster_bits))
}
