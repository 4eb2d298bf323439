//! L1 and L2 table entries, decoded into what they mean before anyone acts on them.

use crate::error::{Error, Result};
use crate::types::{Geometry, HostOffset};

/// Bit 63 of L1/L2 entries: the cluster's refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries: reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits 9..55 of L1 and uncompressed L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of L1 entries.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of standard (uncompressed) L2 entries.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// The refcount block a refcount table entry names (`None` for 0), refusing reserved bits and
/// misalignment.
pub fn refblock_offset(index: u64, entry: u64, g: &Geometry) -> Result<Option<HostOffset>> {
    let off = entry & OFFSET_MASK;
    if entry & 0x1ff != 0 || !g.is_aligned(off) {
        return Err(Error::corrupt(format!(
            "refcount table entry {index} is invalid ({entry:#x})"
        )));
    }
    Ok((off != 0).then_some(HostOffset(off)))
}

/// A raw L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Entry pointing at an L2 table we own.
    pub fn new(l2: HostOffset) -> Self {
        L1Entry(l2.0 | COPIED)
    }

    /// The L2 table, or `None` when no table is allocated. Validates reserved bits and alignment.
    pub fn l2_offset(self, g: &Geometry) -> Result<Option<HostOffset>> {
        if self.0 & L1_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "L1 entry {:#x} has reserved bits set",
                self.0
            )));
        }
        let off = self.0 & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !g.is_aligned(off) {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} is not cluster-aligned"
            )));
        }
        Ok(Some(HostOffset(off)))
    }
}

/// What one L2 entry says about a whole cluster (subcluster details are in the bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Nothing here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros. `prealloc` keeps a host cluster reserved (`ZERO_ALLOC` in QEMU).
    Zero {
        /// A host cluster still owned by this entry, reusable by the next write.
        prealloc: Option<HostOffset>,
    },
    /// Guest data at a host cluster.
    Data {
        /// Cluster-aligned host offset.
        host: HostOffset,
        /// Refcount is exactly one.
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Unaligned host offset of the compressed stream.
        host: HostOffset,
        /// 512-byte sectors the stream may occupy, counted from `host` rounded down to 512.
        sectors: u64,
    },
}

/// A raw (standard, 64-bit) L2 entry or the first word of an extended one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Decodes the entry. `extended` images have no zero flag in word 1 (zeros are in the bitmap).
    pub fn decode(self, g: &Geometry) -> Result<Mapping> {
        self.decode_in(g, false)
    }

    /// Decodes the entry of an image whose data is in an external data file (`data_file`),
    /// where host offset 0 is guest cluster 0's: with COPIED set (data-file clusters always
    /// have it) an offset of 0 is data, not unallocated.
    pub fn decode_in(self, g: &Geometry, data_file: bool) -> Result<Mapping> {
        let e = self.0;
        if let Some((host, sectors)) = self.compressed(g) {
            return Ok(Mapping::Compressed { host, sectors });
        }
        if e & L2_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {e:#x} has reserved bits set"
            )));
        }
        let off = e & OFFSET_MASK;
        if off != 0 && !g.is_aligned(off) {
            return Err(Error::corrupt(format!(
                "data cluster offset {off:#x} is not cluster-aligned"
            )));
        }
        let copied = e & COPIED != 0;
        if !g.extended_l2 && e & ZERO != 0 {
            return Ok(Mapping::Zero {
                prealloc: (off != 0).then_some(HostOffset(off)),
            });
        }
        if off == 0 && !(data_file && copied) {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host: HostOffset(off),
            copied,
        })
    }

    /// For a compressed entry: the (unaligned) host offset of the stream and the number of
    /// 512-byte sectors it may occupy.
    pub fn compressed(self, g: &Geometry) -> Option<(HostOffset, u64)> {
        let e = self.0;
        if e & COMPRESSED == 0 {
            return None;
        }
        let x = 62 - (g.cluster_bits - 8);
        let host = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
        Some((HostOffset(host), sectors))
    }

    /// Encodes a compressed cluster: its stream of `len` bytes at (unaligned) `host`.
    pub fn compressed_at(host: HostOffset, len: u64, g: &Geometry) -> Self {
        let x = 62 - (g.cluster_bits - 8);
        let extra = (host.0 + len - 1) / 512 - host.0 / 512;
        L2Entry(COMPRESSED | (extra << x) | host.0)
    }

    /// Encodes an uncompressed data cluster we own.
    pub fn data(host: HostOffset) -> Self {
        L2Entry(host.0 | COPIED)
    }
}

/// The second word of an extended L2 entry: 32 "allocated" bits then 32 "reads as zero" bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

/// What a single subcluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Read from backing, or zeros.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data in the host cluster.
    Data,
}

impl SubclusterBitmap {
    /// Mask of subclusters `[first, first + count)`.
    pub fn range_mask(first: u64, count: u64) -> u64 {
        debug_assert!(first + count <= 32);
        if count == 0 {
            return 0;
        }
        (((1u64 << count) - 1) << first) & 0xffff_ffff
    }

    /// Alloc bits.
    pub fn alloc(self) -> u64 {
        self.0 & 0xffff_ffff
    }

    /// Zero bits.
    pub fn zero(self) -> u64 {
        self.0 >> 32
    }

    /// Builds a bitmap from alloc and zero masks.
    pub fn from_masks(alloc: u64, zero: u64) -> Self {
        SubclusterBitmap((alloc & 0xffff_ffff) | ((zero & 0xffff_ffff) << 32))
    }

    /// The state of subcluster `i`, refusing the combinations the spec forbids.
    pub fn state(self, i: u64, has_host: bool) -> Result<SubclusterState> {
        let a = self.alloc() >> i & 1 != 0;
        let z = self.zero() >> i & 1 != 0;
        match (a, z) {
            (true, true) => Err(Error::corrupt(format!(
                "subcluster {i} is marked both allocated and zero"
            ))),
            (true, false) if !has_host => Err(Error::corrupt(
                "unallocated cluster has a non-zero subcluster allocation map",
            )),
            (true, false) => Ok(SubclusterState::Data),
            (false, true) => Ok(SubclusterState::Zero),
            (false, false) => Ok(SubclusterState::Unallocated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        refcount_order: 4,
    };

    #[test]
    fn decodes_standard_entries() {
        assert_eq!(L2Entry(0).decode(&G).unwrap(), Mapping::Unallocated);
        assert_eq!(
            L2Entry(1).decode(&G).unwrap(),
            Mapping::Zero { prealloc: None }
        );
        assert_eq!(
            L2Entry(0x5_0000 | COPIED | 1).decode(&G).unwrap(),
            Mapping::Zero {
                prealloc: Some(HostOffset(0x5_0000))
            }
        );
        assert_eq!(
            L2Entry::data(HostOffset(0x7_0000)).decode(&G).unwrap(),
            Mapping::Data {
                host: HostOffset(0x7_0000),
                copied: true
            }
        );
        assert!(
            L2Entry(0x7_0200).decode(&G).is_err(),
            "unaligned data offset"
        );
        assert!(L2Entry(0x7_0000 | 2).decode(&G).is_err(), "reserved bit");
    }

    #[test]
    fn compressed_entries_round_trip() {
        for cluster_bits in [9u32, 12, 16, 21] {
            let g = Geometry {
                cluster_bits,
                extended_l2: false,
                refcount_order: 4,
            };
            for (host, len) in [
                (0x1_0000u64, 1u64),
                (0x1_01ff, 2),
                (0x20_0100, 700),
                (0x7_0000, 511),
            ] {
                let e = L2Entry::compressed_at(HostOffset(host), len, &g);
                let (h, sectors) = e.compressed(&g).unwrap();
                assert_eq!(h.0, host);
                // The sectors cover the stream and no more than one sector past its start.
                assert!(sectors * 512 - (host & 511) >= len);
                assert_eq!(sectors, (host + len - 1) / 512 - host / 512 + 1);
            }
        }
    }

    #[test]
    fn decodes_compressed_descriptor_like_qemu() {
        // 64 KiB clusters: offset in bits 0..53, sector count - 1 in bits 54..61.
        let e = COMPRESSED | (3u64 << 54) | 0x12_3456;
        assert_eq!(
            L2Entry(e).decode(&G).unwrap(),
            Mapping::Compressed {
                host: HostOffset(0x12_3456),
                sectors: 4
            }
        );
    }

    #[test]
    fn subcluster_states_and_invalid_combinations() {
        let bm = SubclusterBitmap::from_masks(0b01, 0b10);
        assert_eq!(bm.state(0, true).unwrap(), SubclusterState::Data);
        assert_eq!(bm.state(1, true).unwrap(), SubclusterState::Zero);
        assert_eq!(bm.state(2, true).unwrap(), SubclusterState::Unallocated);
        assert!(bm.state(0, false).is_err());
        assert!(SubclusterBitmap::from_masks(1, 1).state(0, true).is_err());
        assert_eq!(SubclusterBitmap::range_mask(30, 2), 0xc000_0000);
        assert_eq!(SubclusterBitmap::range_mask(0, 32), 0xffff_ffff);
    }

    #[test]
    fn l1_entry_validation() {
        assert_eq!(L1Entry(0).l2_offset(&G).unwrap(), None);
        assert_eq!(
            L1Entry::new(HostOffset(0x40000)).l2_offset(&G).unwrap(),
            Some(HostOffset(0x40000))
        );
        assert!(L1Entry(0x40000 | 1).l2_offset(&G).is_err());
        assert!(L1Entry(0x40200).l2_offset(&G).is_err());
    }
}
