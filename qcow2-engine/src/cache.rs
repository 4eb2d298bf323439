//! Metadata caches with a byte budget.
//!
//! L2 tables and refcount blocks are cached in slices (at most 4 KiB each), lazily loaded, least
//! recently used first out. Memory therefore follows the working set, not the virtual size.
//!
//! Changes reach storage before the request that made them returns, so a process crash never
//! loses an acknowledged write. Most metadata is written through (write, then patch the cached
//! copy). L2 slices changed by the data path are instead *written back with group commit*:
//! a request patches the cached slice under the state lock, which pins it (it cannot be
//! evicted while newer than the disk) and gives the request a [`Ticket`]; after dropping the
//! lock it waits until a write of the whole slice that started after its patch has completed,
//! running that write itself when none is running. Concurrent requests that change entries
//! of the same slice share one write, and the write is an aligned 4 KiB write that can bypass
//! the page cache (`O_DIRECT`) without taking the file's exclusive lock.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::error::{IoContext, Result};
use crate::storage::Storage;
use crate::types::{Geometry, HostOffset};

/// Largest slice: QEMU's default L2 slice size, small enough that a random working set does
/// not drag whole 64 KiB tables (or 2 MiB ones) into memory.
pub const MAX_SLICE: u64 = 4096;
/// A cache never holds fewer slices than this, whatever the budget says.
pub const MIN_SLICES: usize = 8;

/// Hit and miss counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that read from storage.
    pub misses: u64,
    /// Slices currently held.
    pub slices: usize,
    /// Bytes currently held.
    pub bytes: usize,
    /// Budget in bytes.
    pub budget: usize,
}

/// An LRU cache of metadata slices keyed by host offset.
#[derive(Debug)]
pub struct SliceCache {
    name: &'static str,
    slice: u64,
    lru: LruCache<u64, Box<[u8]>>,
    /// Slices newer than the disk, out of the LRU until written (see the module docs).
    dirty: HashMap<u64, Dirty>,
    hits: u64,
    misses: u64,
}

/// A pinned slice and the progress of its writes (generation numbers, as in the barrier).
#[derive(Debug)]
struct Dirty {
    bytes: Box<[u8]>,
    started: u64,
    completed: u64,
    running: bool,
    /// Tickets not yet redeemed.
    tickets: usize,
    failed: Option<WriteFailure>,
}

/// Why a slice write failed: the OS error code when there was one (so a full disk stays
/// `ENOSPC` for the caller), and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    pub os_error: Option<i32>,
    pub message: String,
}

impl WriteFailure {
    fn other(message: &str) -> Self {
        Self {
            os_error: None,
            message: message.into(),
        }
    }

    /// An I/O error equivalent to the one that failed the write.
    pub fn to_io(&self) -> std::io::Error {
        match self.os_error {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::other(self.message.clone()),
        }
    }
}

impl From<&std::io::Error> for WriteFailure {
    fn from(e: &std::io::Error) -> Self {
        Self {
            os_error: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

/// A claim on a slice write: redeemed once a write that started after the patch completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Host offset of the slice.
    pub slice: u64,
    need: u64,
}

/// What a ticket holder does next.
#[derive(Debug)]
pub enum Writeback {
    /// The patch is on storage (in the OS at least).
    Done,
    /// The write that carried the patch failed.
    Failed(WriteFailure),
    /// Another thread is writing the slice; wait and ask again.
    Wait,
    /// Write these bytes at the slice offset, then report with [`SliceCache::writeback_done`].
    Write {
        /// Generation of this write.
        generation: u64,
        /// The slice as it is now.
        bytes: Vec<u8>,
    },
}

impl SliceCache {
    /// A cache of `budget` bytes in slices of `min(cluster_size, 4 KiB)`.
    pub fn new(name: &'static str, cluster_size: u64, budget: u64) -> Self {
        let slice = cluster_size.min(MAX_SLICE);
        let slices = ((budget / slice) as usize).max(MIN_SLICES);
        Self {
            name,
            slice,
            lru: LruCache::new(NonZeroUsize::new(slices).expect("at least MIN_SLICES")),
            dirty: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Slice size in bytes.
    pub fn slice_size(&self) -> u64 {
        self.slice
    }

    /// Returns the slice holding `offset`, loading it on a miss, and the offset inside it.
    pub fn slice_at(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
    ) -> Result<(&mut [u8], usize)> {
        let start = offset.0 - offset.0 % self.slice;
        let within = (offset.0 - start) as usize;
        if self.dirty.contains_key(&start) {
            self.hits += 1;
            let d = self.dirty.get_mut(&start).expect("just checked");
            return Ok((&mut d.bytes, within));
        }
        if self.lru.contains(&start) {
            self.hits += 1;
        } else {
            self.misses += 1;
            let mut buf = vec![0u8; self.slice as usize].into_boxed_slice();
            let name = self.name;
            storage
                .read_at(&mut buf, start)
                .ctx(|| format!("reading {name} at {start:#x}"))?;
            self.lru.put(start, buf);
        }
        let slice = self.lru.get_mut(&start).expect("just inserted");
        Ok((slice, within))
    }

    /// Reads a big-endian u64 at `offset`.
    pub fn read_u64(&mut self, storage: &dyn Storage, offset: HostOffset) -> Result<u64> {
        let (slice, at) = self.slice_at(storage, offset)?;
        Ok(u64::from_be_bytes(
            slice[at..at + 8].try_into().expect("8 bytes"),
        ))
    }

    /// Patches cached bytes after the same bytes were written to storage.
    pub fn patch(&mut self, offset: HostOffset, bytes: &[u8]) {
        let mut off = offset.0;
        let mut rest = bytes;
        while !rest.is_empty() {
            let start = off - off % self.slice;
            let within = (off - start) as usize;
            let n = rest.len().min(self.slice as usize - within);
            let slice = match self.dirty.get_mut(&start) {
                Some(d) => Some(&mut d.bytes),
                None => self.lru.peek_mut(&start),
            };
            if let Some(slice) = slice {
                slice[within..within + n].copy_from_slice(&rest[..n]);
            }
            off += n as u64;
            rest = &rest[n..];
        }
    }

    /// Installs a whole freshly written table (one cluster) so the first use does not re-read it.
    pub fn insert_table(&mut self, offset: HostOffset, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(self.slice as usize).enumerate() {
            self.lru.put(
                offset.0 + i as u64 * self.slice,
                chunk.to_vec().into_boxed_slice(),
            );
        }
    }

    /// Drops cached slices of `[offset, offset + len)` (the clusters were freed).
    pub fn forget(&mut self, offset: HostOffset, len: u64) {
        let mut off = offset.0 - offset.0 % self.slice;
        while off < offset.0 + len {
            self.lru.pop(&off);
            if let Some(d) = self.dirty.get_mut(&off) {
                // Still being written or waited for: it leaves when its last ticket does.
                d.failed
                    .get_or_insert_with(|| WriteFailure::other("the cluster was freed"));
            }
            off += self.slice;
        }
    }

    /// Patches bytes at `offset` in memory only (the slice must be cached) and pins the slice
    /// until a write covers the patch: the returned ticket says when (see the module docs).
    pub fn patch_pinned(&mut self, offset: HostOffset, bytes: &[u8]) -> Ticket {
        let start = offset.0 - offset.0 % self.slice;
        assert!(
            (offset.0 - start) as usize + bytes.len() <= self.slice as usize,
            "a pinned patch stays inside one slice"
        );
        if !self.dirty.contains_key(&start) {
            let bytes = self
                .lru
                .pop(&start)
                .expect("a slice is cached before it is patched");
            self.dirty.insert(
                start,
                Dirty {
                    bytes,
                    started: 0,
                    completed: 0,
                    running: false,
                    tickets: 0,
                    failed: None,
                },
            );
        }
        let within = (offset.0 - start) as usize;
        let d = self.dirty.get_mut(&start).expect("just inserted");
        d.bytes[within..within + bytes.len()].copy_from_slice(bytes);
        d.tickets += 1;
        Ticket {
            slice: start,
            need: d.started + 1,
        }
    }

    /// The next step for a ticket holder. `Done` and `Failed` redeem the ticket: ask once
    /// more after either and the answer is meaningless.
    pub fn writeback(&mut self, t: Ticket) -> Writeback {
        let d = self
            .dirty
            .get_mut(&t.slice)
            .expect("a ticket pins its slice");
        let step = if d.completed >= t.need {
            Writeback::Done
        } else if let Some(why) = &d.failed {
            Writeback::Failed(why.clone())
        } else if d.running {
            return Writeback::Wait;
        } else {
            d.running = true;
            d.started += 1;
            return Writeback::Write {
                generation: d.started,
                bytes: d.bytes.to_vec(),
            };
        };
        d.tickets -= 1;
        self.unpin_if_idle(t.slice);
        step
    }

    /// Reports the end of a write that [`SliceCache::writeback`] asked for.
    pub fn writeback_done(
        &mut self,
        slice: u64,
        generation: u64,
        result: Result<(), WriteFailure>,
    ) {
        let d = self
            .dirty
            .get_mut(&slice)
            .expect("a running write pins its slice");
        d.running = false;
        match result {
            Ok(()) => d.completed = generation,
            Err(e) => {
                d.failed.get_or_insert(e);
            }
        }
        self.unpin_if_idle(slice);
    }

    /// A pinned slice with no tickets and no write running goes back to the LRU, or, if a
    /// write failed (memory and disk may differ) or its cluster was freed, is dropped.
    fn unpin_if_idle(&mut self, slice: u64) {
        let idle = self
            .dirty
            .get(&slice)
            .is_some_and(|d| d.tickets == 0 && !d.running);
        if idle {
            let d = self.dirty.remove(&slice).expect("just checked");
            if d.failed.is_none() {
                self.lru.put(slice, d.bytes);
            }
        }
    }

    /// Counters for `info --detail`.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            slices: self.lru.len() + self.dirty.len(),
            bytes: (self.lru.len() + self.dirty.len()) * self.slice as usize,
            budget: self.lru.cap().get() * self.slice as usize,
        }
    }
}

/// Budget rule: enough L2 cache to map the whole virtual disk (one entry, 8 or 16 bytes, per
/// cluster), capped, never below a floor. Memory is only used as the working set grows.
pub fn default_l2_budget(virtual_size: u64, geo: &Geometry) -> u64 {
    (virtual_size / geo.cluster_size())
        .saturating_mul(geo.l2_entry_size())
        .clamp(DEFAULT_MIN_BUDGET, DEFAULT_L2_MAX)
}

/// Enough refcount cache to cover as many host clusters as the virtual disk has, capped at
/// half the L2 cap.
pub fn default_refcount_budget(virtual_size: u64, geo: &Geometry) -> u64 {
    (virtual_size / geo.cluster_size())
        .saturating_mul(geo.refcount_bits())
        .div_ceil(8)
        .clamp(DEFAULT_MIN_BUDGET, DEFAULT_L2_MAX / 2)
}

/// Cap of the default L2 budget: QEMU's default maximum (covers 256 GiB at 64 KiB clusters).
pub const DEFAULT_L2_MAX: u64 = 32 << 20;
const DEFAULT_MIN_BUDGET: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    #[test]
    fn lazily_loads_patches_and_respects_the_budget() {
        let s = MemoryStorage::from_bytes((0..=255u8).cycle().take(1 << 20).collect());
        let mut c = SliceCache::new("test", 65536, 8 * 4096);
        assert_eq!(
            c.read_u64(&s, HostOffset(8)).unwrap(),
            u64::from_be_bytes([8, 9, 10, 11, 12, 13, 14, 15])
        );
        assert_eq!(c.stats().misses, 1);
        c.read_u64(&s, HostOffset(16)).unwrap();
        assert_eq!(c.stats().hits, 1);
        c.patch(HostOffset(8), &[0xff; 8]);
        assert_eq!(c.read_u64(&s, HostOffset(8)).unwrap(), u64::MAX);
        for i in 0..100 {
            c.read_u64(&s, HostOffset(i * 4096)).unwrap();
        }
        assert_eq!(
            c.stats().slices,
            8,
            "never more slices than the budget allows"
        );
    }

    #[test]
    fn pinned_patches_share_one_write_and_survive_eviction() {
        let s = MemoryStorage::from_bytes(vec![0; 1 << 20]);
        let mut c = SliceCache::new("test", 65536, 8 * 4096);
        c.read_u64(&s, HostOffset(4096)).unwrap();
        let a = c.patch_pinned(HostOffset(4096), &[1; 8]);
        let b = c.patch_pinned(HostOffset(4104), &[2; 8]);
        for i in 10..100 {
            c.read_u64(&s, HostOffset(i * 4096)).unwrap(); // would evict an unpinned slice
        }
        assert_eq!(
            c.read_u64(&s, HostOffset(4104)).unwrap(),
            0x0202020202020202
        );
        let Writeback::Write { generation, bytes } = c.writeback(a) else {
            panic!("the first holder writes");
        };
        assert_eq!(&bytes[..16], &[[1u8; 8], [2u8; 8]].concat()[..]);
        assert!(matches!(c.writeback(b), Writeback::Wait));
        // A patch made while the write runs needs a later write.
        let late = c.patch_pinned(HostOffset(4112), &[3; 8]);
        c.writeback_done(4096, generation, Ok(()));
        assert!(matches!(c.writeback(a), Writeback::Done));
        assert!(
            matches!(c.writeback(b), Writeback::Done),
            "covered by the same write"
        );
        let Writeback::Write { generation, .. } = c.writeback(late) else {
            panic!("the late patch needs its own write");
        };
        c.writeback_done(4096, generation, Err(WriteFailure::other("EIO")));
        assert!(matches!(c.writeback(late), Writeback::Failed(_)));
        assert!(c.dirty.is_empty(), "unpinned once every ticket is redeemed");
        // A failed slice is dropped, so the next lookup reads the disk again.
        let misses = c.stats().misses;
        c.read_u64(&s, HostOffset(4096)).unwrap();
        assert_eq!(c.stats().misses, misses + 1);
    }

    #[test]
    fn default_budget_follows_the_rule() {
        let standard = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        };
        let extended = Geometry {
            extended_l2: true,
            ..standard
        };
        assert_eq!(default_l2_budget(1 << 30, &standard), 128 << 10);
        assert_eq!(default_l2_budget(1 << 30, &extended), 256 << 10);
        assert_eq!(default_l2_budget(1 << 40, &standard), 32 << 20);
        assert_eq!(default_refcount_budget(1 << 30, &standard), 64 << 10);
        assert_eq!(default_refcount_budget(4 << 40, &standard), 16 << 20);
    }
}
