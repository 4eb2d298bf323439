//! Typed offsets and the image geometry that converts between them.
//!
//! Guest offsets (what the user of the image addresses) and host offsets (positions in the
//! qcow2 file) are different address spaces; mixing them up is the classic engine bug, so they
//! are different types.

use std::fmt;

/// A byte offset in the guest (virtual disk) address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host offset {:#x}", self.0)
    }
}

/// Sizes derived from the header that every layer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Extended L2 entries (128 bits, 32 subclusters per cluster).
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
}

/// QEMU's limit on the active L1 table.
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u64 = 32;

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes covered by one L2 table (one L1 entry).
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// The granularity of allocation: a subcluster with extended L2, else a cluster.
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS_PER_CLUSTER
        } else {
            self.cluster_size()
        }
    }

    /// Subclusters per cluster (1 without extended L2).
    pub fn subclusters(&self) -> u64 {
        self.cluster_size() / self.subcluster_size()
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest storable refcount.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Refcount entries per refcount block (one cluster).
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// The largest virtual size this geometry can address: QEMU caps the L1 table at
    /// 32 MiB (a multiple of 512, as sizes are). Create and resize refuse anything above.
    pub fn max_virtual_size(&self) -> u64 {
        (MAX_L1_BYTES / 8).saturating_mul(self.l2_coverage()) & !511
    }

    /// L1 entries needed for a guest size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, off: GuestOffset) -> u64 {
        off.0 / self.l2_coverage()
    }

    /// L2 index (within its table) of a guest offset.
    pub fn l2_index(&self, off: GuestOffset) -> u64 {
        (off.0 >> self.cluster_bits) % self.l2_entries()
    }

    /// Offset of a guest byte inside its cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Cluster index of a host offset.
    pub fn host_cluster(&self, off: HostOffset) -> u64 {
        off.0 >> self.cluster_bits
    }

    /// Whether a host offset is cluster-aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// Rounds up to a cluster multiple.
    pub fn align_up(&self, n: u64) -> Option<u64> {
        n.checked_next_multiple_of(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_matches_the_spec_numbers() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for(4 << 40), 8192);
        let e = Geometry {
            extended_l2: true,
            ..g
        };
        assert_eq!(e.l2_entries(), 4096);
        assert_eq!(e.subcluster_size(), 2048);
        assert_eq!(e.l1_entries_for(4 << 40), 16384);
    }
}
