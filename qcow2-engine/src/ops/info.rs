//! `info`: the keys `qemu-img info --output=json` uses, plus chain and metadata details.

use std::path::Path;

use serde::Serialize;

use crate::cache::CacheStats;
use crate::error::Result;
use crate::format::CompressionType;
use crate::format::header::{compat, incompat};
use crate::image::resolve_backing_name;
use crate::image::{Backing, BackingPolicy, Image, OpenOptions};

/// Image information; serialises to qemu-img's JSON keys.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Virtual size.
    pub virtual_size: u64,
    /// The path as given.
    pub filename: String,
    /// Always "qcow2".
    pub format: &'static str,
    /// Cluster size.
    pub cluster_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Dirty bit.
    pub dirty_flag: bool,
    /// Backing name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Backing name resolved against the image's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// qcow2 specifics.
    pub format_specific: FormatSpecific,
    /// Encrypted (LUKS or legacy AES).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// `--detail`: the backing chain, top first (this image excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<ChainLayer>>,
    /// `--detail`: metadata statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataStats>,
}

/// `format-specific`.
#[derive(Debug, Clone, Serialize)]
pub struct FormatSpecific {
    /// "qcow2".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The qcow2 fields.
    pub data: Qcow2Specific,
}

/// `format-specific.data`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    /// "1.1" (v3) or "0.10" (v2).
    pub compat: &'static str,
    /// "zlib" or "zstd" (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<&'static str>,
    /// Lazy refcounts (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u64,
    /// The external data file's name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Whether the external data file is a consistent raw image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// The LUKS header of an encrypted image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<EncryptInfo>,
}

/// `format-specific.data.encrypt`, as qemu-img names it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EncryptInfo {
    /// "luks".
    pub format: &'static str,
    /// "aes-128" or "aes-256".
    pub cipher_alg: String,
    /// "xts".
    pub cipher_mode: String,
    /// "plain64" or "plain".
    pub ivgen_alg: String,
    /// "sha1", "sha256" or "sha512".
    pub hash_alg: String,
    pub uuid: String,
    /// Bytes.
    pub payload_offset: u64,
    pub master_key_iters: u32,
    /// The header lives in the image, never detached, in qcow2.
    pub detached_header: bool,
    pub slots: Vec<SlotInfo>,
}

/// One key slot of [`EncryptInfo`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotInfo {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    /// Bytes from the start of the encryption header.
    pub key_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
}

impl EncryptInfo {
    fn of(h: &crate::crypto::luks::Header) -> EncryptInfo {
        use crate::crypto::luks::SECTOR;
        let (mode, ivgen) = h
            .cipher_mode
            .split_once('-')
            .unwrap_or((h.cipher_mode.as_str(), ""));
        // XTS keys are two cipher keys.
        let bits = if mode == "xts" {
            h.key_bytes * 4
        } else {
            h.key_bytes * 8
        };
        EncryptInfo {
            format: "luks",
            cipher_alg: format!("{}-{bits}", h.cipher_name),
            cipher_mode: mode.to_string(),
            ivgen_alg: ivgen.to_string(),
            hash_alg: format!("{:?}", h.hash).to_lowercase(),
            uuid: h.uuid.clone(),
            payload_offset: u64::from(h.payload_sector) * SECTOR,
            master_key_iters: h.digest_iterations,
            detached_header: false,
            slots: h
                .slots
                .iter()
                .map(|s| SlotInfo {
                    active: s.active,
                    iters: s.active.then_some(s.iterations),
                    key_offset: u64::from(s.material_sector) * SECTOR,
                    stripes: s.active.then_some(s.stripes),
                })
                .collect(),
        }
    }
}

/// One layer below the image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainLayer {
    /// Depth (1 = the image's backing file).
    pub depth: usize,
    /// Resolved path.
    pub filename: String,
    /// "qcow2" or "raw".
    pub format: &'static str,
    /// Virtual size.
    pub virtual_size: u64,
}

/// Metadata statistics for `--detail`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetadataStats {
    /// L1 entries.
    pub l1_entries: u32,
    /// L2 tables allocated.
    pub l2_tables: usize,
    /// Length of the image file.
    pub file_length: u64,
    /// Bytes of guest data allocated in this layer (data and preallocated zero clusters).
    pub allocated_bytes: u64,
    /// L2 cache counters after the walk.
    pub l2_cache: CacheStats,
    /// Refcount cache counters after the walk.
    pub refcount_cache: CacheStats,
}

/// Gathers info for the image at `path`. `detail` also opens the backing chain and walks the
/// metadata (an encrypted image needs its `passphrase` then). `force_share` reads an image
/// another process holds (no locks, like `-U`).
pub fn info(
    path: &Path,
    detail: bool,
    force_share: bool,
    passphrase: Option<&crate::crypto::Passphrase>,
) -> Result<ImageInfo> {
    let opts = OpenOptions {
        skip_backing: !detail,
        backing: BackingPolicy::Allow,
        force_share,
        passphrase: passphrase.cloned(),
        ..OpenOptions::default()
    };
    let img = Image::open(path, &opts)?;
    let h = img.header();
    let v3 = h.version >= 3;
    let full_backing = h
        .backing_file
        .as_deref()
        .and_then(|n| resolve_backing_name(n, Some(path)).ok())
        .map(|p| p.display().to_string());
    let mut info = ImageInfo {
        virtual_size: h.size,
        filename: path.display().to_string(),
        format: "qcow2",
        cluster_size: h.cluster_size(),
        actual_size: img.allocated_bytes()?.unwrap_or(0),
        dirty_flag: h.incompatible_features & incompat::DIRTY != 0,
        backing_filename: h.backing_file.clone(),
        backing_filename_format: h.backing_format.clone(),
        full_backing_filename: full_backing,
        format_specific: FormatSpecific {
            kind: "qcow2",
            data: Qcow2Specific {
                compat: if v3 { "1.1" } else { "0.10" },
                compression_type: v3.then_some(match h.compression_type {
                    CompressionType::Zlib => "zlib",
                    CompressionType::Zstd => "zstd",
                }),
                lazy_refcounts: h.compatible_features & compat::LAZY_REFCOUNTS != 0,
                refcount_bits: h.geometry().refcount_bits(),
                data_file: h.data_file_name()?,
                data_file_raw: h.has_data_file().then_some(h.data_file_raw()),
                corrupt: h.incompatible_features & incompat::CORRUPT != 0,
                extended_l2: h.geometry().extended_l2,
                encrypt: img.luks_header().map(EncryptInfo::of),
            },
        },
        encrypted: h.crypt_method != 0,
        chain: None,
        metadata: None,
    };
    if detail {
        let mut chain = Vec::new();
        collect_chain(&img, 1, &mut chain);
        info.chain = Some(chain);
        let mut allocated = 0;
        let mut off = 0;
        while off < h.size {
            let (n, status) = img.layer_status(off, h.size - off)?;
            if !matches!(
                status,
                crate::image::LayerStatus::Unallocated
                    | crate::image::LayerStatus::Zero { host: None }
            ) {
                allocated += n;
            }
            off += n;
        }
        let (l2_cache, refcount_cache) = img.cache_stats();
        info.metadata = Some(MetadataStats {
            l1_entries: h.l1_size,
            l2_tables: img.l2_tables(),
            file_length: img.file_len()?,
            allocated_bytes: allocated,
            l2_cache,
            refcount_cache,
        });
    }
    Ok(info)
}

fn collect_chain(img: &Image, depth: usize, out: &mut Vec<ChainLayer>) {
    img.with_backing(|b| {
        if let Some(b) = b {
            out.push(ChainLayer {
                depth,
                filename: b
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                format: b.format(),
                virtual_size: b.size(),
            });
            if let Backing::Qcow2(inner) = b {
                collect_chain(inner, depth + 1, out);
            }
        }
    });
}
