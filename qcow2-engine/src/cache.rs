//! Metadata caches with a byte budget.
//!
//! L2 tables and refcount blocks are cached in slices (at most 4 KiB each), lazily loaded, least
//! recently used first out. Memory therefore follows the working set, not the virtual size.
//! The cache is write-through: the engine writes every metadata change to storage in dependency
//! order (refcount → data → L2 → L1) before the guest write returns, and patches the cached copy,
//! so a process crash never loses an acknowledged write and nothing is ever dirty here.

use std::num::NonZeroUsize;

use lru::LruCache;

use crate::error::{IoContext, Result};
use crate::storage::Storage;
use crate::types::HostOffset;

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
    hits: u64,
    misses: u64,
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
            if let Some(slice) = self.lru.peek_mut(&start) {
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
            off += self.slice;
        }
    }

    /// Counters for `info --detail`.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            slices: self.lru.len(),
            bytes: self.lru.len() * self.slice as usize,
            budget: self.lru.cap().get() * self.slice as usize,
        }
    }
}

/// Budget rule: 8 bytes of L2 cache per 64 KiB of virtual size (enough to map the whole disk at
/// the default cluster size), capped, never below a floor.
pub fn default_l2_budget(virtual_size: u64) -> u64 {
    (virtual_size / 8192).clamp(DEFAULT_MIN_BUDGET, DEFAULT_L2_MAX)
}

/// The refcount cache gets half the L2 budget.
pub fn default_refcount_budget(virtual_size: u64) -> u64 {
    (default_l2_budget(virtual_size) / 2).max(DEFAULT_MIN_BUDGET)
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
    fn default_budget_follows_the_rule() {
        assert_eq!(default_l2_budget(1 << 30), 128 << 10);
        assert_eq!(default_l2_budget(1 << 40), 32 << 20);
        assert_eq!(default_refcount_budget(1 << 30), 64 << 10);
    }
}
