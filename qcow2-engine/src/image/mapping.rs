//! Guest → host lookups through L1/L2, and the updates that change a mapping.

use super::State;
use crate::cache::Ticket;
use crate::error::{Error, IoContext, Result};
use crate::format::entries::{COMPRESSED, L1Entry, L2Entry, Mapping};
use crate::meta::MetaKind;
use crate::types::{GuestOffset, HostOffset};

/// One L2 slot as stored: the descriptor word, the subcluster bitmap (0 for standard entries)
/// and where the slot lives (None when no L2 table covers the offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub word: u64,
    pub bitmap: u64,
    pub at: Option<HostOffset>,
    /// The guest offset of the cluster the slot maps.
    pub guest: GuestOffset,
}

impl Slot {
    /// The decoded entry, refused (as corruption) when its host cluster is metadata or lies
    /// beyond anything the refcount table can describe.
    pub fn mapping(&self, st: &mut State) -> Result<Mapping> {
        let data_file = st.meta.header.has_data_file();
        let m = L2Entry(self.word).decode_in(&st.meta.geo, data_file)?;
        if data_file {
            return st.meta.check_data_file_mapping(m, self.guest).map(|()| m);
        }
        let host = match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
            } => host.0,
            Mapping::Compressed { host, .. } => host.0 & !511,
            Mapping::Unallocated | Mapping::Zero { prealloc: None } => return Ok(m),
        };
        st.meta
            .check_data_cluster(host >> st.meta.geo.cluster_bits)?;
        Ok(m)
    }
}

/// `(where the slot is, (old word, old bitmap), (new word, new bitmap))`.
pub(crate) type SlotUpdate = (HostOffset, (u64, u64), (u64, u64));

impl State {
    /// The L2 slot of the cluster holding `off`.
    pub(crate) fn slot(&mut self, off: GuestOffset) -> Result<Slot> {
        let geo = self.meta.geo;
        let l1_index = geo.l1_index(off) as usize;
        let Some(&l1) = self.meta.l1.get(l1_index) else {
            return Err(Error::corrupt(format!("{off} is beyond the L1 table")));
        };
        let Some(table) = L1Entry(l1).l2_offset(&geo)? else {
            return Ok(Slot {
                word: 0,
                bitmap: 0,
                at: None,
                guest: GuestOffset(off.0 - geo.offset_in_cluster(off.0)),
            });
        };
        let guest = GuestOffset(off.0 - geo.offset_in_cluster(off.0));
        let at = HostOffset(table.0 + geo.l2_index(off) * geo.l2_entry_size());
        let storage = self.meta.storage.clone();
        let word = self.meta.l2_cache.read_u64(&*storage, at)?;
        let bitmap = if geo.extended_l2 {
            self.meta
                .l2_cache
                .read_u64(&*storage, HostOffset(at.0 + 8))?
        } else {
            0
        };
        Ok(Slot {
            word,
            bitmap,
            at: Some(at),
            guest,
        })
    }

    /// The L2 slot for `off`, allocating the L2 table first if there is none.
    pub(crate) fn slot_for_write(&mut self, off: GuestOffset) -> Result<Slot> {
        let slot = self.slot(off)?;
        if slot.at.is_some() {
            return Ok(slot);
        }
        let geo = self.meta.geo;
        let l1_index = geo.l1_index(off);
        // A reserved cluster already reads as zeros: the empty table needs no write, and the L1
        // entry needs no barrier before it.
        let table = self.meta.alloc_cluster()?;
        self.meta
            .map
            .insert(table.0 >> geo.cluster_bits, 1, MetaKind::L2)?;
        let zeros = vec![0u8; geo.cluster_size() as usize];
        self.meta.l2_cache.insert_table(table, &zeros);
        let entry = L1Entry::new(table).0;
        let at = HostOffset(self.meta.header.l1_table_offset + l1_index * 8);
        if let Err(e) = self.meta.write_meta(MetaKind::L1, at, &entry.to_be_bytes()) {
            // A full disk, say. What storage holds decides: an entry that landed anyway is
            // kept (memory follows it); otherwise the table goes back, so a failed write
            // leaks nothing.
            match self.on_storage(at) {
                Ok(now) if now == entry => self.meta.l1[l1_index as usize] = entry,
                Ok(_) => {
                    self.meta.l2_cache.forget(table, geo.cluster_size());
                    self.meta.free_range(table, 1);
                }
                Err(_) => {} // unknown: kept, a leak at worst
            }
            return Err(e);
        }
        self.meta.l1[l1_index as usize] = entry;
        self.slot(off)
    }

    /// The 8-byte big-endian word at `at` as storage holds it now (not the cache).
    pub(crate) fn on_storage(&self, at: HostOffset) -> Result<u64> {
        let mut word = [0u8; 8];
        self.meta
            .storage
            .read_at(&mut word, at.0)
            .ctx(|| format!("reading {at} back"))?;
        Ok(u64::from_be_bytes(word))
    }

    /// An L2 slot (word and, with extended L2, bitmap) as storage holds it now.
    pub(crate) fn slot_on_storage(&self, at: HostOffset) -> Result<(u64, u64)> {
        let word = self.on_storage(at)?;
        let bitmap = if self.meta.geo.extended_l2 {
            self.on_storage(HostOffset(at.0 + 8))?
        } else {
            0
        };
        Ok((word, bitmap))
    }

    /// Gives an existing slot a new value (see [`State::set_slots`]).
    pub(crate) fn set_slot(
        &mut self,
        slot: Slot,
        word: u64,
        bitmap: u64,
        tickets: &mut Vec<Ticket>,
    ) -> Result<()> {
        let at = slot
            .at
            .ok_or_else(|| Error::corrupt("updating an L2 slot that has no table"))?;
        self.set_slots(&[(at, (slot.word, slot.bitmap), (word, bitmap))], tickets)
    }

    /// Gives L2 slots new values in the cache, pinning their slices: the change reaches
    /// storage when the caller, after dropping the state lock, redeems the tickets pushed
    /// onto `tickets` with [`super::Image::write_back_locked`] (one write per slice, shared with
    /// concurrent requests). It must do so before its request returns, error or not.
    pub(crate) fn set_slots(
        &mut self,
        updates: &[SlotUpdate],
        tickets: &mut Vec<Ticket>,
    ) -> Result<()> {
        let entry = self.meta.geo.l2_entry_size();
        let storage = self.meta.storage.clone();
        for &(at, (old_word, old_bitmap), (word, bitmap)) in updates {
            if (old_word, old_bitmap) == (word, bitmap) {
                continue;
            }
            self.meta.prepare_meta_write(MetaKind::L2, at, entry)?;
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&word.to_be_bytes());
            bytes[8..].copy_from_slice(&bitmap.to_be_bytes());
            self.meta.l2_cache.slice_at(&*storage, at)?;
            tickets.push(
                self.meta
                    .l2_cache
                    .patch_pinned(at, &bytes[..entry as usize]),
            );
            // A rewritten compressed cluster must not be served from the decompression cache.
            if word & COMPRESSED == 0
                && self
                    .compressed
                    .as_ref()
                    .is_some_and(|(key, _)| *key == old_word)
            {
                self.compressed = None;
            }
        }
        Ok(())
    }

    /// Drops the host clusters a mapping owned, after the mapping was replaced. The release
    /// itself is deferred to a batch (see `alloc`).
    pub(crate) fn release(&mut self, old: Mapping) {
        if let Some((start, count)) = self.owned_by(old) {
            self.meta.free_range(start, count);
        }
    }

    /// Takes back a [`State::release`] whose new mapping never reached storage: the old one
    /// still references those clusters.
    pub(crate) fn unrelease(&mut self, old: Mapping) {
        if let Some((start, count)) = self.owned_by(old) {
            self.meta.unfree_range(start, count);
        }
    }

    /// The host clusters a mapping owns: the first and how many.
    fn owned_by(&self, m: Mapping) -> Option<(HostOffset, u64)> {
        if self.meta.header.has_data_file() {
            // Data-file clusters are not refcounted.
            return None;
        }
        let cb = self.meta.geo.cluster_bits;
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                prealloc: Some(host),
            } => Some((host, 1)),
            Mapping::Compressed { host, sectors } => {
                let start = host.0 & !511;
                let end = start + sectors * 512;
                let first = start >> cb;
                let last = (end - 1) >> cb;
                Some((HostOffset(first << cb), last - first + 1))
            }
            Mapping::Unallocated | Mapping::Zero { prealloc: None } => None,
        }
    }
}
