//! The qcow2 header (cluster 0): fixed fields, header extensions and the backing file name.
//!
//! Parsing validates everything QEMU validates at open (`qcow2_do_open`) with checked
//! arithmetic and before any table is allocated. Serialising writes the layout qemu-img writes
//! (header_length 112, backing-format extension, feature-name table, end marker, backing name)
//! and keeps unknown header fields and unknown extensions.

use crate::error::{Error, Result};
use crate::types::Geometry;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the v3 header without the compression type byte.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Size of the v3 header qemu-img writes.
pub const V3_HEADER_LEN: u32 = 112;

/// Extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts in use, or an unclean shutdown).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type byte is not zlib.
    pub const COMPRESSION: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Bits this engine understands (dirty and corrupt restrict how the image may be opened).
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a raw image.
    pub const RAW_DATA: u64 = 1 << 1;
}

/// Compressed cluster encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (the default).
    Zlib,
    /// Zstandard (incompatible bit 3).
    Zstd,
}

/// One entry of the feature name table (48 bytes on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// A header extension this engine does not interpret; kept verbatim on header rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderExtension {
    /// Extension type magic.
    pub kind: u32,
    /// Payload (unpadded).
    pub data: Vec<u8>,
}

/// The decoded header of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Length of the fixed header (v3); 72 for v2.
    pub header_length: u32,
    /// Compression type (header byte 104).
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (112..header_length), preserved.
    pub unknown_fields: Vec<u8>,
    /// Backing file name as stored (relative names are relative to the image's directory).
    pub backing_file: Option<String>,
    /// Backing file format from the extension.
    pub backing_format: Option<String>,
    /// Feature name table entries found in the image.
    pub feature_names: Vec<FeatureName>,
    /// Extensions we do not interpret, preserved in order.
    pub unknown_extensions: Vec<HeaderExtension>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

use crate::types::MAX_L1_BYTES;
/// QEMU's limit on the refcount table (the L1 table's is [`MAX_L1_BYTES`]).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u32 = 65536;
/// Largest host offset an L1/L2 entry can hold (bits 9..55).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

impl Header {
    /// The geometry this header describes.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & incompat::EXTENDED_L2 != 0,
            refcount_order: self.refcount_order,
        }
    }

    /// Whether guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is kept a consistent raw image (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & autoclear::RAW_DATA != 0
    }

    /// The external data file name as stored (relative names are relative to the image's
    /// directory), from its header extension.
    pub fn data_file_name(&self) -> Result<Option<String>> {
        let Some(ext) = self
            .unknown_extensions
            .iter()
            .find(|e| e.kind == EXT_DATA_FILE)
        else {
            return Ok(None);
        };
        let name = ext.data.strip_suffix(b"\0").unwrap_or(&ext.data);
        if name.is_empty() || name.len() > 1023 || name.contains(&0) {
            return Err(Error::invalid(format!(
                "external data file name of {} bytes",
                name.len()
            )));
        }
        String::from_utf8(name.to_vec())
            .map(Some)
            .map_err(|_| Error::unsupported("external data file name is not valid UTF-8"))
    }

    /// Names an external data file (`name` as stored), replacing any named before.
    pub fn set_data_file_name(&mut self, name: &str) {
        self.unknown_extensions.retain(|e| e.kind != EXT_DATA_FILE);
        self.unknown_extensions.push(HeaderExtension {
            kind: EXT_DATA_FILE,
            data: name.as_bytes().to_vec(),
        });
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads the cluster size from the first bytes so the caller knows how much to read.
    pub fn peek_cluster_bits(first: &[u8]) -> Result<u32> {
        if first.len() < V2_HEADER_LEN as usize {
            return Err(Error::invalid("file too short for a qcow2 header"));
        }
        if be32(first, 0) != MAGIC {
            return Err(Error::invalid("not a qcow2 image (bad magic)"));
        }
        let bits = be32(first, 20);
        if !(9..=21).contains(&bits) {
            return Err(Error::invalid(format!(
                "cluster size 2^{bits} out of range (must be 512 B to 2 MiB)"
            )));
        }
        Ok(bits)
    }

    /// Parses and validates cluster 0. `cluster0` must hold the whole first cluster (zero-padded
    /// if the file is shorter).
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        let cluster_bits = Self::peek_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        if (cluster0.len() as u64) < cluster_size {
            return Err(Error::invalid("short read of the header cluster"));
        }
        let b = &cluster0[..cluster_size as usize];
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version}")));
        }
        let backing_file_offset = be64(b, 8);
        let backing_file_size = be32(b, 16);
        let size = be64(b, 24);
        let crypt_method = be32(b, 32);
        let l1_size = be32(b, 36);
        let l1_table_offset = be64(b, 40);
        let refcount_table_offset = be64(b, 48);
        let refcount_table_clusters = be32(b, 56);
        let nb_snapshots = be32(b, 60);
        let snapshots_offset = be64(b, 64);

        let (incompatible_features, compatible_features, autoclear_features, refcount_order) =
            if version == 3 {
                (be64(b, 72), be64(b, 80), be64(b, 88), be32(b, 96))
            } else {
                (0, 0, 0, 4)
            };
        let header_length = if version == 3 {
            be32(b, 100)
        } else {
            V2_HEADER_LEN
        };
        if version == 3 {
            if header_length < V3_MIN_HEADER_LEN {
                return Err(Error::invalid(format!(
                    "header_length {header_length} is below 104"
                )));
            }
            if header_length % 8 != 0 {
                return Err(Error::invalid(format!(
                    "header_length {header_length} is not a multiple of 8"
                )));
            }
            if u64::from(header_length) > cluster_size {
                return Err(Error::invalid(format!(
                    "header_length {header_length} exceeds the cluster size"
                )));
            }
        }
        let compression_type = if header_length > V3_MIN_HEADER_LEN {
            match b[104] {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => {
                    return Err(Error::unsupported(format!(
                        "unknown compression type {other}"
                    )));
                }
            }
        } else {
            CompressionType::Zlib
        };
        let has_compression_bit = incompatible_features & incompat::COMPRESSION != 0;
        if (compression_type != CompressionType::Zlib) != has_compression_bit {
            return Err(Error::invalid(
                "compression type and the compression-type feature bit disagree",
            ));
        }
        let unknown_fields = if header_length > V3_HEADER_LEN {
            b[V3_HEADER_LEN as usize..header_length as usize].to_vec()
        } else {
            Vec::new()
        };
        if refcount_order > 6 {
            return Err(Error::invalid(format!(
                "refcount_order {refcount_order} is above 6"
            )));
        }
        if backing_file_offset > cluster_size {
            return Err(Error::invalid(
                "backing file name lies outside the header cluster",
            ));
        }

        // Extensions: from the end of the fixed header to the backing name (or the cluster end).
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        };
        let mut backing_format = None;
        let mut feature_names = Vec::new();
        let mut unknown_extensions = Vec::new();
        let mut off = u64::from(header_length);
        while off + 8 <= ext_end {
            let kind = be32(b, off as usize);
            let len = u64::from(be32(b, off as usize + 4));
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > ext_end - off {
                return Err(Error::invalid(format!(
                    "header extension {kind:#x} of {len} bytes runs past the header area"
                )));
            }
            let data = &b[off as usize..(off + len) as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string();
                    backing_format = Some(name);
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let raw = &entry[2..];
                        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                        feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                        });
                    }
                }
                EXT_DATA_FILE
                    if unknown_extensions
                        .iter()
                        .any(|e: &HeaderExtension| e.kind == kind) =>
                {
                    return Err(Error::invalid("two external data file names"));
                }
                _ => unknown_extensions.push(HeaderExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off += len.next_multiple_of(8);
        }
        if autoclear_features & autoclear::RAW_DATA != 0
            && incompatible_features & incompat::DATA_FILE == 0
        {
            return Err(Error::invalid(
                "the raw external data bit is set without the external data file bit",
            ));
        }

        let backing_file = if backing_file_offset != 0 {
            let len = u64::from(backing_file_size);
            if len > 1023 || len > cluster_size - backing_file_offset {
                return Err(Error::invalid("backing file name too long"));
            }
            let start = backing_file_offset as usize;
            let name = &b[start..start + len as usize];
            Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| Error::unsupported("backing file name is not valid UTF-8"))?,
            )
        } else {
            None
        };

        let header = Header {
            version,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            unknown_fields,
            backing_file,
            backing_format,
            feature_names,
            unknown_extensions,
        };
        header.validate_tables()?;
        Ok(header)
    }

    /// Bounds of the tables the header points at, checked before anything is allocated.
    fn validate_tables(&self) -> Result<()> {
        let g = self.geometry();
        let cs = self.cluster_size();
        if g.extended_l2 && self.cluster_bits < 14 {
            return Err(Error::invalid(
                "extended L2 needs clusters of at least 16 KiB",
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::invalid(
                "image does not contain a reference count table",
            ));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) * cs;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::invalid("reference count table too large"));
        }
        check_table(
            "reference count table",
            self.refcount_table_offset,
            reftable_bytes,
            cs,
        )?;
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::invalid("active L1 table too large"));
        }
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs)?;
        }
        let needed = g.l1_entries_for(self.size);
        if u64::from(self.l1_size) < needed {
            return Err(Error::invalid(format!(
                "L1 table is too small ({} entries, the virtual size needs {needed})",
                self.l1_size
            )));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid("too many internal snapshots"));
        }
        if self.nb_snapshots > 0 {
            check_table("snapshot table", self.snapshots_offset, 1, cs)?;
        }
        Ok(())
    }

    /// Names of the unknown incompatible bits that are set, using the feature table.
    pub fn unknown_incompatible(&self) -> Vec<String> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        (0..64)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| {
                self.feature_names
                    .iter()
                    .find(|f| f.kind == 0 && u64::from(f.bit) == bit)
                    .map(|f| f.name.clone())
                    .unwrap_or_else(|| format!("bit {bit}"))
            })
            .collect()
    }

    /// The feature name table qemu-img writes.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }

    /// Encodes cluster 0. Fails if the extensions and backing name do not fit.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            let header_length = V3_HEADER_LEN as usize + self.unknown_fields.len();
            put32(&mut b, 100, header_length as u32);
            b[104] = match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            };
            b[V3_HEADER_LEN as usize..header_length].copy_from_slice(&self.unknown_fields);
            header_length
        } else {
            V2_HEADER_LEN as usize
        };

        let overflow = || Error::arg("header extensions and backing name do not fit in cluster 0");
        let push_ext = |b: &mut [u8], off: &mut usize, kind: u32, data: &[u8]| -> Result<()> {
            let padded = data.len().next_multiple_of(8);
            if *off + 8 + padded > cs {
                return Err(overflow());
            }
            put32(b, *off, kind);
            put32(b, *off + 4, data.len() as u32);
            b[*off + 8..*off + 8 + data.len()].copy_from_slice(data);
            *off += 8 + padded;
            Ok(())
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, &mut off, EXT_BACKING_FORMAT, fmt.as_bytes())?;
        }
        // QEMU's order: the encryption header pointer and the data file name come before
        // the feature table, anything else after it.
        let early = |e: &&HeaderExtension| {
            e.kind == crate::crypto::luks::EXT_CRYPTO_HEADER || e.kind == EXT_DATA_FILE
        };
        for ext in self.unknown_extensions.iter().filter(early) {
            push_ext(&mut b, &mut off, ext.kind, &ext.data)?;
        }
        if !self.feature_names.is_empty() {
            let mut table = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut entry = [0u8; 48];
                entry[0] = f.kind;
                entry[1] = f.bit;
                let name = f.name.as_bytes();
                let n = name.len().min(46);
                entry[2..2 + n].copy_from_slice(&name[..n]);
                table.extend_from_slice(&entry);
            }
            push_ext(&mut b, &mut off, EXT_FEATURE_TABLE, &table)?;
        }
        for ext in self.unknown_extensions.iter().filter(|e| !early(e)) {
            push_ext(&mut b, &mut off, ext.kind, &ext.data)?;
        }
        push_ext(&mut b, &mut off, EXT_END, &[])?;
        if let Some(name) = &self.backing_file {
            let name = name.as_bytes();
            if name.len() > 1023 || off + name.len() > cs {
                return Err(overflow());
            }
            b[off..off + name.len()].copy_from_slice(name);
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, name.len() as u32);
        }
        Ok(b)
    }
}

fn check_table(what: &str, offset: u64, bytes: u64, cluster_size: u64) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::invalid(format!(
            "{what} offset {offset:#x} is not cluster-aligned"
        )));
    }
    if offset == 0 {
        return Err(Error::invalid(format!("{what} overlaps the header")));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= i64::MAX as u64 && end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(Error::invalid(format!(
            "{what} offset {offset:#x} is out of range"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: CompressionType::Zlib,
            unknown_fields: Vec::new(),
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            feature_names: Header::qemu_feature_table(),
            unknown_extensions: vec![HeaderExtension {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn round_trips_with_unknown_extension_and_backing_name() {
        let h = sample();
        let bytes = h.to_bytes().unwrap();
        let back = Header::parse(&bytes).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn backing_name_lands_where_qemu_img_puts_it() {
        let mut h = sample();
        h.unknown_extensions.clear();
        let bytes = h.to_bytes().unwrap();
        // 112 + (8 + 8 "qcow2" padded) + (8 + 384 feature table) + 8 end marker = 528.
        assert_eq!(be64(&bytes, 8), 528);
        assert_eq!(be32(&bytes, 16), 10);
    }

    #[test]
    fn unknown_incompatible_bits_are_named_from_the_table() {
        let mut h = sample();
        h.incompatible_features = 1 << 5 | 1 << 9;
        h.feature_names.push(FeatureName {
            kind: 0,
            bit: 5,
            name: "shiny".into(),
        });
        assert_eq!(
            h.unknown_incompatible(),
            vec!["shiny".to_string(), "bit 9".to_string()]
        );
    }

    #[test]
    fn huge_extension_length_is_rejected() {
        let mut bytes = sample().to_bytes().unwrap();
        bytes[116..120].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(Header::parse(&bytes), Err(Error::InvalidImage(_))));
    }

    #[test]
    fn huge_l1_and_reftable_are_rejected_before_allocation() {
        let mut h = sample();
        h.l1_size = 0x7fff_ffff;
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
        let mut h = sample();
        h.refcount_table_clusters = 0x7fff_ffff;
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
        let mut h = sample();
        h.refcount_table_clusters = 0;
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
    }

    #[test]
    fn l1_too_small_for_size_is_rejected() {
        let mut h = sample();
        h.size = 2 << 30;
        assert!(Header::parse(&h.to_bytes().unwrap()).is_err());
    }
}
