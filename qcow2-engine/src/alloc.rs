//! Cluster allocation with refcounts.
//!
//! Rules that keep the image valid (and `qemu-img check` silent):
//! - a cluster is free exactly when its refcount is 0; every metadata cluster (header, L1,
//!   refcount table and blocks, L2 tables) is refcounted, so free clusters are never metadata;
//! - a refcount is written before anything points at the cluster, and a reference is removed
//!   before the refcount drops;
//! - a new refcount block always lies inside the range it describes and counts itself, so
//!   creating one never recurses;
//! - the refcount table grows by writing a bigger copy (with the blocks describing the new area)
//!   at the end of the image, syncing, switching the header, then freeing the old table.

use crate::error::{Error, IoContext, Result};
use crate::format::refcount;
use crate::meta::{Meta, MetaKind};
use crate::types::HostOffset;

impl Meta {
    fn refblock_entries(&self) -> u64 {
        self.geo.refblock_entries()
    }

    /// Host offset of refcount block `index`, if it exists.
    fn refblock(&self, index: u64) -> Result<Option<HostOffset>> {
        let Some(&entry) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let off = entry & crate::format::entries::OFFSET_MASK;
        if entry & 0x1ff != 0 || !self.geo.is_aligned(off) {
            return Err(Error::corrupt(format!(
                "refcount table entry {index} is invalid ({entry:#x})"
            )));
        }
        if off == 0 {
            return Ok(None);
        }
        Ok(Some(HostOffset(off)))
    }

    /// Byte position of a cluster's refcount: (block, byte offset of the entry's slice, index
    /// of the entry inside that slice).
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

    /// Sets the refcount of a cluster whose refcount block exists.
    fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        if value > self.geo.refcount_max() {
            return Err(Error::unsupported(format!(
                "refcount of cluster {cluster} would overflow {} bits",
                self.geo.refcount_bits()
            )));
        }
        let block = self
            .refblock(cluster / self.refblock_entries())?
            .ok_or_else(|| Error::corrupt(format!("no refcount block covers cluster {cluster}")))?;
        let (slice_off, index) = self.refcount_slot(block, cluster);
        let order = self.geo.refcount_order;
        let storage = self.storage.clone();
        let (slice, _) = self.rc_cache.slice_at(&*storage, slice_off)?;
        let range = refcount::set(slice, order, index, value);
        let bytes = slice[range.clone()].to_vec();
        self.write_meta(
            MetaKind::RefBlock,
            HostOffset(slice_off.0 + range.start as u64),
            &bytes,
        )
    }

    /// Allocates one cluster (reusing freed ones first) and sets its refcount to 1.
    pub fn alloc_cluster(&mut self) -> Result<HostOffset> {
        let mut c = self.free_hint;
        while c < self.end_cluster {
            let group = c / self.refblock_entries();
            if self.refblock(group)?.is_none() {
                if (group as usize) < self.reftable.len() {
                    // A whole group with no block: every cluster in it is free. Put the block in
                    // its first free cluster (this one) and keep looking.
                    self.create_refblock_at(group, c)?;
                    c += 1;
                    continue;
                }
                break; // beyond the refcount table: allocate at the end instead
            }
            if self.refcount(c)? == 0 {
                self.set_refcount(c, 1)?;
                self.free_hint = c + 1;
                return Ok(HostOffset(c << self.geo.cluster_bits));
            }
            c += 1;
        }
        self.free_hint = self.end_cluster;
        self.alloc_at_end(1)
    }

    /// Allocates `count` contiguous clusters at the end of the image.
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
                self.install_refblock(group, at)?;
            }
            for c in start..area_end {
                if !new_blocks
                    .iter()
                    .any(|&(g, _)| g == c / self.refblock_entries())
                {
                    self.set_refcount(c, 1)?;
                }
            }
            self.end_cluster = area_end;
            return Ok(HostOffset(start << self.geo.cluster_bits));
        }
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
        self.write_new_refblock(group, cluster, cluster, cluster + 1)?;
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
        for c in start..area_end {
            if !blocks.iter().any(|&(g, _)| g == c / per) {
                self.set_refcount(c, 1)?;
            }
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let new_off = HostOffset(start << self.geo.cluster_bits);
        self.write_meta(MetaKind::RefTable, new_off, &bytes)?;
        self.sync()?;
        let old_off = self.header.refcount_table_offset;
        self.header.refcount_table_offset = new_off.0;
        self.header.refcount_table_clusters = clusters as u32;
        self.write_header()?;
        self.sync()?;
        self.reftable = table;
        self.end_cluster = area_end;
        self.free_range(HostOffset(old_off), old_clusters)?;
        Ok(())
    }

    /// Drops one reference to each of `count` clusters from `start`; clusters that become free
    /// are punched out of the host file. The caller has already removed the reference.
    pub fn free_range(&mut self, start: HostOffset, count: u64) -> Result<()> {
        let first = start.0 >> self.geo.cluster_bits;
        for c in first..first + count {
            let rc = self.refcount(c)?;
            if rc == 0 {
                return Err(Error::corrupt(format!(
                    "freeing cluster {c} whose refcount is already 0"
                )));
            }
            self.set_refcount(c, rc - 1)?;
            if rc == 1 {
                self.free_hint = self.free_hint.min(c);
                let off = c << self.geo.cluster_bits;
                let cs = self.geo.cluster_size();
                self.l2_cache.forget(HostOffset(off), cs);
                self.storage
                    .punch_hole(off, cs)
                    .ctx(|| format!("punching freed cluster at {off:#x}"))?;
            }
        }
        Ok(())
    }
}
