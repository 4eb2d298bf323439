//! Creating images with the layout qemu-img writes: header, refcount table, refcount block(s),
//! L1 table, and the file ending right after the L1 entries.

use std::path::Path;
use std::sync::Arc;

use crate::crypto::{Passphrase, luks};
use crate::error::{Error, IoContext, Result};
use crate::format::entries::COPIED;
use crate::format::header::{V3_HEADER_LEN, incompat};
use crate::format::{CompressionType, Header, refcount};
use crate::image::{BackingPolicy, Image, OpenOptions, resolve_backing_name};
use crate::storage::{FileStorage, Storage};
use crate::types::Geometry;

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// qcow2.
    Qcow2,
    /// Raw.
    Raw,
}

impl BackingFormat {
    /// The name stored in the backing-format extension.
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

impl std::str::FromStr for BackingFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "qcow2" => Ok(BackingFormat::Qcow2),
            "raw" => Ok(BackingFormat::Raw),
            other => Err(Error::arg(format!(
                "unknown format {other:?} (qcow2 or raw)"
            ))),
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing file's size. Rounded up to 512 bytes.
    pub size: Option<u64>,
    /// Cluster size, a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Extended L2 entries (32 subclusters per cluster; clusters of at least 16 KiB).
    pub extended_l2: bool,
    /// Refcount width: 1, 2, 4, 8, 16, 32 or 64 bits.
    pub refcount_bits: u32,
    /// Backing file name as stored (relative names are relative to the new image's directory)
    /// and its format.
    pub backing: Option<(String, BackingFormat)>,
    /// Encrypt the image's data (QEMU's `encrypt.format=luks`).
    pub encryption: Option<NewEncryption>,
    /// How compressed clusters are compressed (`compression_type`; zstd sets the
    /// incompatible compression bit, as qemu-img does).
    pub compression: CompressionType,
    /// Keep guest data in an external data file (QEMU's `data_file`).
    pub data_file: Option<NewDataFile>,
}

/// The external data file of a new image.
#[derive(Debug, Clone)]
pub struct NewDataFile {
    /// Its name as stored (relative names are relative to the new image's directory).
    /// [`create`] makes the file, as large as the image, and never over an existing one.
    pub name: String,
    /// `data_file_raw`: keep it a consistent raw image of the guest disk.
    pub raw: bool,
}

/// The encryption of a new image.
#[derive(Debug, Clone)]
pub enum NewEncryption {
    /// A new LUKS header: a random master key, one key slot opened by the passphrase.
    New {
        passphrase: Passphrase,
        params: luks::NewHeader,
    },
    /// A copy of another image's encryption header region: the same master key and key
    /// slots, so one passphrase opens both, and a chain of such layers is unlocked once
    /// (see [`crate::image::Image::open`]). The region is taken as it is: nothing here
    /// checks a passphrase.
    SameKeyAs(std::path::PathBuf),
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: None,
            cluster_size: 64 << 10,
            extended_l2: false,
            refcount_bits: 16,
            backing: None,
            encryption: None,
            compression: CompressionType::Zlib,
            data_file: None,
        }
    }
}

/// Creates a new image file at `path`, refusing to overwrite an existing file.
///
/// Atomic: the image is written and synced under a temporary name in the same directory, then
/// renamed into place without replacing anything, and the directory is synced. A crash leaves
/// either no image or a complete one (plus, at worst, a `.NAME.creating-*` file to delete).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let exists = || {
        Error::io(
            format!("creating {}", path.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        )
    };
    if path.symlink_metadata().is_ok() {
        return Err(exists());
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::arg(format!("{} is not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.creating-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // The data file first, new and empty: it is removed again if the image is not made.
    let data_file = match &opts.data_file {
        Some(df) => Some(new_data_file(&df.name, path, opts)?),
        None => None,
    };
    let remove_data_file = || {
        if let Some(p) = &data_file {
            let _ = std::fs::remove_file(p);
        }
    };
    let storage = match FileStorage::create_new(&tmp) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            remove_data_file();
            return Err(Error::io(format!("creating {}", tmp.display()), e));
        }
    };
    let result = create_on(storage.clone(), Some(path), opts)
        .and_then(|()| storage.flush().ctx(|| format!("syncing {}", tmp.display())))
        .and_then(|()| {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &tmp,
                rustix::fs::CWD,
                path,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(|e| {
                if e == rustix::io::Errno::EXIST {
                    exists()
                } else {
                    Error::io(format!("renaming into {}", path.display()), e.into())
                }
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        remove_data_file();
        return result;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// Makes the new, empty data file named `name` (resolved like a backing name against
/// `image`'s directory), as long as the image's virtual size; returns its path.
fn new_data_file(name: &str, image: &Path, opts: &CreateOptions) -> Result<std::path::PathBuf> {
    let path = resolve_backing_name(name, Some(image))?;
    let size = opts
        .size
        .ok_or_else(|| Error::arg("an image with a data file needs a size"))?
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::arg("size overflows"))?;
    let file = FileStorage::create_new(&path)
        .ctx(|| format!("creating the data file {}", path.display()))?;
    let sized = file
        .set_len(size)
        .and_then(|()| file.flush())
        .ctx(|| format!("sizing the data file {}", path.display()));
    if let Err(e) = sized {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Writes a new image into empty `storage`. `path` locates relative backing names.
pub fn create_on(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    opts: &CreateOptions,
) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::arg(format!(
            "cluster size {cs} must be a power of two from 512 to 2M"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.extended_l2 && cs < 16 << 10 {
        return Err(Error::arg(
            "extended L2 needs a cluster size of at least 16K",
        ));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::arg(format!(
            "refcount width {} must be a power of two up to 64",
            opts.refcount_bits
        )));
    }
    let geo = Geometry {
        cluster_bits,
        extended_l2: opts.extended_l2,
        refcount_order: opts.refcount_bits.trailing_zeros(),
    };
    // Like qemu-img, check that the backing file opens (and take its size if none was given).
    let backing_size = match &opts.backing {
        Some((name, fmt)) => Some(backing_size(name, *fmt, path)?),
        None => None,
    };
    let size = opts
        .size
        .or(backing_size)
        .ok_or_else(|| Error::arg("a size is needed when there is no backing file"))?;
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::arg("size overflows"))?;
    let l1_entries = geo.l1_entries_for(size);
    if size > geo.max_virtual_size() {
        return Err(Error::arg(format!(
            "size {size} is too large for cluster size {cs}"
        )));
    }

    // The encryption header region, which QEMU places after the L1 table.
    let crypto_region = match &opts.encryption {
        None => None,
        Some(NewEncryption::New { passphrase, params }) => {
            Some(luks::Header::create(params, passphrase.as_bytes())?.0)
        }
        Some(NewEncryption::SameKeyAs(other)) => Some(crate::crypto::read_region(other)?),
    };
    let crypto_clusters = crypto_region
        .as_ref()
        .map_or(0, |r| (r.len() as u64).div_ceil(cs));

    // Header, refcount table, refcount blocks, L1 (and the encryption header): solve for the
    // table sizes that cover it all.
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    // A raw data file's L2 tables are preallocated, every cluster mapped to itself, as
    // qemu-img does (its metadata preallocation): then the image reads as the data file from
    // the start, and writes land in place.
    let l2_tables = match &opts.data_file {
        Some(df) if df.raw => l1_entries,
        _ => 0,
    };
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters + crypto_clusters + l2_tables;
        let need_rb = total.div_ceil(geo.refblock_entries());
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb && need_rt == rt {
            break;
        }
        (rt, rb) = (need_rt.max(rt), need_rb.max(rb));
    }
    let l1_cluster = 1 + rt + rb;
    let crypto_cluster = l1_cluster + l1_clusters;
    let l2_cluster = crypto_cluster + crypto_clusters;
    let total = l2_cluster + l2_tables;
    let mut extensions = Vec::new();
    if let Some(region) = &crypto_region {
        let mut data = (crypto_cluster * cs).to_be_bytes().to_vec();
        data.extend_from_slice(&(region.len() as u64).to_be_bytes());
        extensions.push(crate::format::header::HeaderExtension {
            kind: luks::EXT_CRYPTO_HEADER,
            data,
        });
    }

    let mut incompatible = 0;
    let mut autoclear = 0;
    if let Some(df) = &opts.data_file {
        if opts.encryption.is_some() {
            return Err(Error::unsupported(
                "an encrypted image with an external data file",
            ));
        }
        if df.raw && opts.backing.is_some() {
            return Err(Error::arg(
                "a raw data file cannot have a backing file under it (the data file alone \
                 would not be the guest disk)",
            ));
        }
        if df.name.is_empty() || df.name.len() > 1023 || df.name.contains('\0') {
            return Err(Error::arg("a data file name of 1 to 1023 bytes"));
        }
        incompatible |= incompat::DATA_FILE;
        if df.raw {
            autoclear |= crate::format::header::autoclear::RAW_DATA;
        }
    }
    if opts.extended_l2 {
        incompatible |= incompat::EXTENDED_L2;
    }
    if opts.compression == CompressionType::Zstd {
        incompatible |= incompat::COMPRESSION;
    }
    let mut header = Header {
        version: 3,
        cluster_bits,
        size,
        crypt_method: if crypto_region.is_some() { 2 } else { 0 },
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries > 0 { l1_cluster * cs } else { 0 },
        refcount_table_offset: cs,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: 0,
        autoclear_features: autoclear,
        refcount_order: geo.refcount_order,
        header_length: V3_HEADER_LEN,
        compression_type: opts.compression,
        unknown_fields: Vec::new(),
        backing_file: opts.backing.as_ref().map(|(n, _)| n.clone()),
        backing_format: opts.backing.as_ref().map(|(_, f)| f.name().to_string()),
        // qemu-img leaves the table out for clusters of 4 KiB and less.
        feature_names: if cs > 4096 {
            Header::qemu_feature_table()
        } else {
            Vec::new()
        },
        unknown_extensions: extensions,
    };
    if let Some(df) = &opts.data_file {
        header.set_data_file_name(&df.name);
    }
    let w = |bytes: &[u8], at: u64| {
        storage
            .write_at(bytes, at)
            .ctx(|| "writing the new image".to_string())
    };
    w(&header.to_bytes()?, 0)?;
    let mut reftable = vec![0u8; (rt * cs) as usize];
    for i in 0..rb {
        let entry = (1 + rt + i) * cs;
        reftable[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
    }
    w(&reftable, cs)?;
    let mut blocks = vec![0u8; (rb * cs) as usize];
    let per = geo.refblock_entries() as usize;
    for c in 0..total as usize {
        let block = &mut blocks[(c / per) * cs as usize..(c / per + 1) * cs as usize];
        refcount::set(block, geo.refcount_order, c % per, 1);
    }
    w(&blocks, (1 + rt) * cs)?;
    if l1_entries > 0 {
        let l1: Vec<u8> = (0..l1_entries)
            .flat_map(|i| match i < l2_tables {
                true => (((l2_cluster + i) * cs) | COPIED).to_be_bytes(),
                false => [0u8; 8],
            })
            .collect();
        w(&l1, l1_cluster * cs)?;
    }
    let per_table = geo.l2_entries();
    let mut table = vec![0u8; cs as usize];
    for i in 0..l2_tables {
        table.fill(0);
        for j in 0..per_table {
            let guest = (i * per_table + j) * cs;
            if guest >= size {
                break;
            }
            let at = (j * geo.l2_entry_size()) as usize;
            // Extended L2: the bitmap stays 0 (mapped, subclusters unallocated: zeros).
            table[at..at + 8].copy_from_slice(&(guest | COPIED).to_be_bytes());
        }
        w(&table, (l2_cluster + i) * cs)?;
    }
    if let Some(region) = &crypto_region {
        // The whole of its last cluster, as QEMU allocates it.
        let mut bytes = region.clone();
        bytes.resize((crypto_clusters * cs) as usize, 0);
        w(&bytes, crypto_cluster * cs)?;
    }
    storage
        .flush()
        .ctx(|| "syncing the new image".to_string())?;
    Ok(())
}

fn backing_size(name: &str, fmt: BackingFormat, path: Option<&Path>) -> Result<u64> {
    let resolved = resolve_backing_name(name, path)?;
    match fmt {
        BackingFormat::Raw => Ok(std::fs::metadata(&resolved)
            .ctx(|| format!("reading backing file {}", resolved.display()))?
            .len()),
        BackingFormat::Qcow2 => {
            // Only the header is read, so no lock is taken: the backing file may be in use by
            // a writer (a live volume being snapshotted, whose writes stop before the pivot).
            let opts = OpenOptions {
                backing: BackingPolicy::Allow,
                skip_backing: true,
                force_share: true,
                ..OpenOptions::default()
            };
            Ok(Image::open(&resolved, &opts)?.size())
        }
    }
}
