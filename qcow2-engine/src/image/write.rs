//! The write path: in-place overwrites, allocation with copy-on-write at the allocation unit
//! (a cluster, or the touched subclusters with extended L2), zeroing and discard.
//!
//! Order of every allocating write: refcount of the new cluster (durable already: it comes from
//! the reserve) → guest data, with the COW bytes around it (synced when there are any) → L2
//! entry → release of what the entry pointed at before (deferred to a batch; see `alloc`).

use super::State;
use crate::error::Result;
use crate::format::entries::{COPIED, Mapping, SubclusterBitmap, SubclusterState, ZERO};
use crate::types::{GuestOffset, HostOffset};

/// What [`State::zero_range`] leaves behind.
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

impl State {
    /// Writes guest bytes, one cluster at a time.
    pub(crate) fn write(&mut self, data: &[u8], off: GuestOffset) -> Result<()> {
        let cs = self.meta.geo.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let pos = off.0 + done as u64;
            let n = ((cs - pos % cs) as usize).min(data.len() - done);
            self.write_in_cluster(&data[done..done + n], GuestOffset(pos))?;
            done += n;
        }
        Ok(())
    }

    fn write_in_cluster(&mut self, data: &[u8], off: GuestOffset) -> Result<()> {
        let geo = self.meta.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let in_cluster = geo.offset_in_cluster(off.0);
        let base = GuestOffset(off.0 - in_cluster);
        let end = in_cluster + data.len() as u64;
        let slot = self.slot_for_write(off)?;
        let mapping = slot.mapping(self)?;
        let first_sub = in_cluster / sc;
        let sub_end = end.div_ceil(sc);
        let mask = SubclusterBitmap::range_mask(first_sub, sub_end - first_sub);

        if let Mapping::Data { host, .. } = mapping {
            let bitmap = SubclusterBitmap(slot.bitmap);
            if !geo.extended_l2 || bitmap.alloc() & mask == mask {
                return self.meta.write_data(HostOffset(host.0 + in_cluster), data);
            }
            // Some touched subclusters are not allocated yet: fill them, then mark them.
            let unit = (first_sub * sc, sub_end * sc);
            self.write_unit(base, host, unit, in_cluster, data, false)?;
            let bitmap = SubclusterBitmap::from_masks(bitmap.alloc() | mask, bitmap.zero() & !mask);
            return self.set_slot(slot, host.0 | COPIED, bitmap.0);
        }

        let (unit, reuse) = match mapping {
            Mapping::Unallocated if geo.extended_l2 => ((first_sub * sc, sub_end * sc), None),
            Mapping::Zero {
                prealloc: Some(host),
            } => ((0, cs), Some(host)),
            _ => ((0, cs), None),
        };
        let host = match reuse {
            Some(h) => h,
            None => self.meta.alloc_cluster()?,
        };
        self.write_unit(base, host, unit, in_cluster, data, reuse.is_none())?;
        let bitmap = if geo.extended_l2 {
            if matches!(mapping, Mapping::Compressed { .. }) {
                SubclusterBitmap::from_masks(u64::MAX, 0)
            } else {
                let old = SubclusterBitmap(slot.bitmap);
                SubclusterBitmap::from_masks(mask, old.zero() & !mask)
            }
        } else {
            SubclusterBitmap(0)
        };
        self.set_slot(slot, host.0 | COPIED, bitmap.0)?;
        if reuse.is_none() {
            self.release(mapping)?;
        }
        Ok(())
    }

    /// Writes the allocation unit `[unit.0, unit.1)` of the cluster at `base` to `host`: the
    /// guest data at `in_cluster`, and the current guest content around it (copy-on-write).
    ///
    /// `fresh`: `host` came from the reserve and durably reads as zeros, so zero COW bytes
    /// need no write. COW bytes that are written are synced before the caller links the
    /// cluster into the L2 table: otherwise a power loss could keep the new L2 entry but not
    /// the copied bytes, and lose data that was flushed before this write.
    fn write_unit(
        &mut self,
        base: GuestOffset,
        host: HostOffset,
        unit: (u64, u64),
        in_cluster: u64,
        data: &[u8],
        fresh: bool,
    ) -> Result<()> {
        let (start, end) = unit;
        let mut buf = vec![0u8; (end - start) as usize];
        let head = (in_cluster - start) as usize;
        let tail = head + data.len();
        if head > 0 {
            self.read_in_cluster(&mut buf[..head], base_plus(base, start))?;
        }
        if tail < buf.len() {
            self.read_in_cluster(
                &mut buf[tail..],
                base_plus(base, in_cluster + data.len() as u64),
            )?;
        }
        if tail - head == buf.len() {
            return self.meta.write_data(HostOffset(host.0 + start), data);
        }
        if fresh && buf.iter().all(|&b| b == 0) {
            return self.meta.write_data(HostOffset(host.0 + in_cluster), data);
        }
        buf[head..tail].copy_from_slice(data);
        self.meta.write_data(HostOffset(host.0 + start), &buf)?;
        self.meta.sync()
    }

    /// Zeroes or discards a guest range, one cluster at a time.
    pub(crate) fn zero_range(&mut self, off: GuestOffset, len: u64, mode: ZeroMode) -> Result<()> {
        let cs = self.meta.geo.cluster_size();
        let mut pos = off.0;
        let end = off.0 + len;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            self.zero_in_cluster(GuestOffset(pos), n, mode)?;
            pos += n;
        }
        Ok(())
    }

    fn zero_in_cluster(&mut self, off: GuestOffset, len: u64, mode: ZeroMode) -> Result<()> {
        let geo = self.meta.geo;
        let sc = geo.subcluster_size();
        let in_cluster = geo.offset_in_cluster(off.0);
        let base = GuestOffset(off.0 - in_cluster);
        let end = in_cluster + len;
        // Whole allocation units inside the range are handled in the L2 entry; the partial
        // ones at either edge get real zeros through the write path.
        let first_full = in_cluster.div_ceil(sc);
        let full_end = end / sc;
        if first_full >= full_end {
            return self.write_zero_bytes(off, len);
        }
        if in_cluster < first_full * sc {
            self.write_zero_bytes(off, first_full * sc - in_cluster)?;
        }
        if full_end * sc < end {
            self.write_zero_bytes(base_plus(base, full_end * sc), end - full_end * sc)?;
        }
        if geo.extended_l2 {
            self.zero_subclusters(base, first_full, full_end, mode)
        } else {
            self.zero_cluster(base, mode)
        }
    }

    /// Zeroes a whole cluster of a standard-L2 image through its L2 entry.
    fn zero_cluster(&mut self, base: GuestOffset, mode: ZeroMode) -> Result<()> {
        let has_backing = self.backing_covers(base);
        let slot = self.slot(base)?;
        let mapping = slot.mapping(self)?;
        let v3 = self.meta.header.version >= 3;
        let want_unallocated = !has_backing && (mode == ZeroMode::Discard || !v3);
        if want_unallocated && mode.unmap() {
            if slot.at.is_none() || mapping == Mapping::Unallocated {
                return Ok(());
            }
            self.set_slot(slot, 0, 0)?;
            return self.release(mapping);
        }
        if !v3 {
            // No zero flag in v2: write zero data.
            let cs = self.meta.geo.cluster_size();
            return self.write_zero_bytes(base, cs);
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
        self.set_slot(slot, word, 0)?;
        if !keep { self.release(mapping) } else { Ok(()) }
    }

    /// Zeroes subclusters `[first, end)` of an extended-L2 cluster through its bitmap.
    fn zero_subclusters(
        &mut self,
        base: GuestOffset,
        first: u64,
        end: u64,
        mode: ZeroMode,
    ) -> Result<()> {
        let has_backing = self.backing_covers(base);
        let slot = self.slot(base)?;
        let mapping = slot.mapping(self)?;
        let mask = SubclusterBitmap::range_mask(first, end - first);
        if let Mapping::Compressed { .. } = mapping {
            // Compressed clusters have no subclusters: expand, then zero the part.
            if mask != SubclusterBitmap::range_mask(0, 32) {
                let sc = self.meta.geo.subcluster_size();
                return self.write_zero_bytes(base_plus(base, first * sc), (end - first) * sc);
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
        self.set_slot(slot, word, new.0)?;
        if free_host {
            self.release(mapping)
        } else {
            Ok(())
        }
    }

    /// Writes real zeros over a range inside one cluster, unless it already reads as zeros.
    fn write_zero_bytes(&mut self, off: GuestOffset, len: u64) -> Result<()> {
        if self.reads_as_zero(off, len)? {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        self.write_in_cluster(&zeros, off)
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
