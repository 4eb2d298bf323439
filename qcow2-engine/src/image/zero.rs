//! Zeroing and discard. Whole allocation units change in the L2 entry, under the state lock,
//! once the cluster is not busy (so a change never interleaves with an allocation in flight);
//! partial units at the edges of a range get real zeros through the write path.

use super::{Image, State};
use crate::cache::Ticket;
use crate::error::{IoContext, Result};
use crate::format::entries::{COPIED, Mapping, SubclusterBitmap, SubclusterState, ZERO};
use crate::types::{GuestOffset, HostOffset};

/// One L2 entry a zeroing changed, to undo its release if the change never reaches storage.
#[derive(Debug)]
pub(crate) struct Changed {
    slot_at: HostOffset,
    old: (u64, u64),
    released: Option<Mapping>,
}

/// What [`Image::zero_range`] leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// Reads as zeros; `unmap` allows freeing host clusters.
    Zero { unmap: bool },
    /// Deallocate: unallocated where nothing lies below, zero where a backing file does.
    Discard,
}

impl ZeroMode {
    fn unmap(self) -> bool {
        match self {
            ZeroMode::Zero { unmap } => unmap,
            ZeroMode::Discard => true,
        }
    }
}

impl Image {
    /// Zeroes or discards a guest range, one cluster at a time. The caller holds the I/O gate.
    pub(crate) fn zero_range(&self, off: GuestOffset, len: u64, mode: ZeroMode) -> Result<()> {
        if let Some(df) = self.data_file.as_ref().filter(|d| d.raw) {
            // A raw data file must read as the image does: zeros go into it, and the L2
            // entries (which map each cluster to its own offset there) stay as they are.
            let (at, len) = (off.0, len);
            let done = if mode.unmap() {
                df.storage.punch_hole(at, len)
            } else {
                df.storage.write_zeroes(at, len)
            };
            return done.ctx(|| format!("zeroing {len} bytes at {at:#x} of the data file"));
        }
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let mut pos = off.0;
        let end = off.0 + len;
        let mut edges = Vec::new();
        let mut tickets = Vec::new();
        let mut undo = Vec::new();
        let mut changed = Ok(());
        while pos < end && changed.is_ok() {
            let n = (cs - pos % cs).min(end - pos);
            let mut st = self.wait_idle(self.lock(), pos >> cb);
            let mut out = (&mut edges, &mut tickets, &mut undo);
            changed = st.zero_in_cluster(GuestOffset(pos), n, mode, &mut out);
            self.note_pending(&st);
            pos += n;
        }
        let (mut st, written_back) = self.write_back_locked(self.lock(), &tickets);
        if written_back.is_err() {
            // A full disk, say: an entry still as it was on storage keeps its clusters.
            for c in &undo {
                if let Some(old) = c.released
                    && st.slot_on_storage(c.slot_at).ok() == Some(c.old)
                {
                    st.unrelease(old);
                }
            }
        }
        drop(st);
        changed.and(written_back)?;
        let longest = edges.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let zeros = vec![0u8; longest as usize];
        for (at, n) in edges {
            self.write_inner(&zeros[..n as usize], GuestOffset(at))?;
        }
        Ok(())
    }
}

/// What zeroing one cluster produces: ranges needing real zeros, slice tickets, and the
/// entries changed.
type Out<'a> = (
    &'a mut Vec<(u64, u64)>,
    &'a mut Vec<Ticket>,
    &'a mut Vec<Changed>,
);

impl State {
    /// Zeroes what the L2 entry can express; pushes the `(offset, len)` ranges that need real
    /// zeros written onto the edges of `out`.
    fn zero_in_cluster(
        &mut self,
        off: GuestOffset,
        len: u64,
        mode: ZeroMode,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let edges = &mut *out.0;
        let geo = self.meta.geo;
        let sc = geo.subcluster_size();
        let in_cluster = geo.offset_in_cluster(off.0);
        let base = GuestOffset(off.0 - in_cluster);
        let end = in_cluster + len;
        let first_full = in_cluster.div_ceil(sc);
        let full_end = end / sc;
        if first_full >= full_end {
            return self.zero_bytes(off, len, edges);
        }
        if in_cluster < first_full * sc {
            self.zero_bytes(off, first_full * sc - in_cluster, edges)?;
        }
        if full_end * sc < end {
            self.zero_bytes(base_plus(base, full_end * sc), end - full_end * sc, edges)?;
        }
        if geo.extended_l2 {
            self.zero_subclusters(base, first_full, full_end, mode, out)
        } else {
            self.zero_cluster(base, mode, out)
        }
    }

    /// Sets an entry for zeroing and releases what it owned when `release`, recording both.
    fn zero_slot(
        &mut self,
        slot: super::mapping::Slot,
        (word, bitmap): (u64, u64),
        release: Option<Mapping>,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let slot_at = slot
            .at
            .ok_or_else(|| crate::error::Error::corrupt("zeroing an L2 slot that has no table"))?;
        let old = (slot.word, slot.bitmap);
        if let (
            Some(data),
            Some(
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    prealloc: Some(host),
                },
            ),
        ) = (&self.meta.data_file, release)
        {
            // A data-file cluster is not refcounted: freeing it is punching it, done before
            // the entry changes (a crash in between reads zeros, which a zeroing or discard
            // allows) and while the cluster is not busy, so no write to it is in flight.
            let cs = self.meta.geo.cluster_size();
            data.punch_hole(host.0, cs)
                .ctx(|| format!("punching {host} of the data file"))?;
        }
        self.set_slot(slot, word, bitmap, out.1)?;
        if let Some(m) = release {
            self.release(m);
        }
        out.2.push(Changed {
            slot_at,
            old,
            released: release,
        });
        Ok(())
    }
    /// Zeroes a whole cluster of a standard-L2 image through its L2 entry.
    fn zero_cluster(&mut self, base: GuestOffset, mode: ZeroMode, out: &mut Out<'_>) -> Result<()> {
        let has_backing = self.backing_covers(base);
        let slot = self.slot(base)?;
        let mapping = slot.mapping(self)?;
        let v3 = self.meta.header.version >= 3;
        let want_unallocated = !has_backing && (mode == ZeroMode::Discard || !v3);
        if want_unallocated && mode.unmap() {
            if slot.at.is_none() || mapping == Mapping::Unallocated {
                return Ok(());
            }
            return self.zero_slot(slot, (0, 0), Some(mapping), out);
        }
        if !v3 {
            // No zero flag in v2: write zero data.
            let cs = self.meta.geo.cluster_size();
            out.0.push((base.0, cs));
            return Ok(());
        }
        let (word, keep) = match mapping {
            Mapping::Data { host, .. } if !mode.unmap() => (host.0 | COPIED | ZERO, true),
            Mapping::Zero {
                prealloc: Some(host),
            } if !mode.unmap() => (host.0 | COPIED | ZERO, true),
            Mapping::Zero { prealloc: None } => return Ok(()),
            Mapping::Unallocated if !has_backing => return Ok(()),
            _ => (ZERO, false),
        };
        let slot = self.slot_for_write(base)?;
        self.zero_slot(slot, (word, 0), (!keep).then_some(mapping), out)
    }

    /// Zeroes subclusters `[first, end)` of an extended-L2 cluster through its bitmap.
    fn zero_subclusters(
        &mut self,
        base: GuestOffset,
        first: u64,
        end: u64,
        mode: ZeroMode,
        out: &mut Out<'_>,
    ) -> Result<()> {
        let has_backing = self.backing_covers(base);
        let slot = self.slot(base)?;
        let mapping = slot.mapping(self)?;
        let mask = SubclusterBitmap::range_mask(first, end - first);
        if let Mapping::Compressed { .. } = mapping {
            // Compressed clusters have no subclusters: expand, then zero the part.
            if mask != SubclusterBitmap::range_mask(0, 32) {
                let sc = self.meta.geo.subcluster_size();
                out.0.push((base.0 + first * sc, (end - first) * sc));
                return Ok(());
            }
        }
        let old = SubclusterBitmap(slot.bitmap);
        let host = match mapping {
            Mapping::Data { host, .. } => Some(host),
            _ => None,
        };
        let zero_bits = if mode == ZeroMode::Discard && !has_backing {
            0
        } else {
            mask
        };
        let alloc = if host.is_some() {
            old.alloc() & !mask
        } else {
            0
        };
        let new = SubclusterBitmap::from_masks(alloc, (old.zero() & !mask) | zero_bits);
        let compressed = matches!(mapping, Mapping::Compressed { .. });
        // A compressed cluster cannot stay behind a zero bitmap: it is always released.
        let free_host = compressed || (mode.unmap() && alloc == 0 && host.is_some());
        let word = match host {
            Some(h) if !free_host => h.0 | COPIED,
            _ => 0,
        };
        if slot.at.is_none() && (new.0 == 0 || !has_backing) {
            return Ok(()); // no table: already unallocated, and zeros unless a backing file lies below
        }
        let slot = if slot.at.is_none() {
            self.slot_for_write(base)?
        } else {
            slot
        };
        self.zero_slot(slot, (word, new.0), free_host.then_some(mapping), out)
    }

    /// A range inside one cluster needs real zeros unless it already reads as zeros.
    fn zero_bytes(
        &mut self,
        off: GuestOffset,
        len: u64,
        edges: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if !self.reads_as_zero(off, len)? {
            edges.push((off.0, len));
        }
        Ok(())
    }

    /// Whether a range inside one cluster reads as zeros by metadata alone.
    fn reads_as_zero(&mut self, off: GuestOffset, len: u64) -> Result<bool> {
        let geo = self.meta.geo;
        let slot = self.slot(off)?;
        let backed = self.backing_covers(off);
        Ok(match slot.mapping(self)? {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated if !geo.extended_l2 => !backed,
            Mapping::Data { .. } if !geo.extended_l2 => false,
            Mapping::Compressed { .. } => false,
            mapping => {
                let has_host = matches!(mapping, Mapping::Data { .. });
                let sc = geo.subcluster_size();
                let in_cluster = geo.offset_in_cluster(off.0);
                let bitmap = SubclusterBitmap(slot.bitmap);
                let mut all = true;
                for i in in_cluster / sc..(in_cluster + len).div_ceil(sc) {
                    all &= match bitmap.state(i, has_host)? {
                        SubclusterState::Zero => true,
                        SubclusterState::Unallocated => !backed,
                        SubclusterState::Data => false,
                    };
                }
                all
            }
        })
    }
}

fn base_plus(base: GuestOffset, n: u64) -> GuestOffset {
    GuestOffset(base.0 + n)
}
