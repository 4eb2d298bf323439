//! External data files (incompatible bit 2, the name in header extension `0x44415441`).
//!
//! The image file keeps the metadata; guest data lives in the data file at host offset =
//! guest offset, so an L2 entry names its own guest cluster and data clusters are not
//! refcounted (the spec's rules). With `data_file_raw` (autoclear bit 1) the data file is
//! also a consistent raw image on its own: zeroing and discarding write zeros into it
//! rather than only changing L2 entries.
//!
//! The name is as untrusted as a backing name: it resolves against the image's directory
//! under the same [`BackingPolicy`], and a data file that is the image itself or another
//! layer of its chain is refused (writes at guest offsets would overwrite metadata). A
//! metadata-only open (`skip_backing`) does not open it (CVE-2024-4467: `qemu-img info` must
//! not read files an image names).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::OpenOptions;
use super::backing::{Chain, refuse, resolve_named};
use crate::error::{Error, Result};
use crate::format::Header;
use crate::storage::{FileStorage, Storage};

/// An open external data file.
#[derive(Debug, Clone)]
pub struct DataFile {
    pub(crate) storage: Arc<dyn Storage>,
    /// Where it was found.
    pub path: PathBuf,
    /// The name as stored in the image.
    pub name: String,
    /// `data_file_raw`: the file is a consistent raw image.
    pub raw: bool,
}

/// Opens the external data file `header` names, if it has one. `Ok(None)` for images
/// without one, and for metadata-only opens (whose reads of data then fail).
pub(super) fn open(
    header: &Header,
    image_path: Option<&Path>,
    opts: &OpenOptions,
    chain: &Chain,
    given: Option<Arc<dyn Storage>>,
) -> Result<Option<DataFile>> {
    if !header.has_data_file() {
        return Ok(None);
    }
    if header.crypt_method != 0 {
        return Err(Error::unsupported(
            "an encrypted image with an external data file",
        ));
    }
    let name = header.data_file_name()?.ok_or_else(|| {
        Error::invalid("the external data file bit is set but the image names no data file")
    })?;
    if let Some(storage) = given {
        return Ok(Some(DataFile {
            storage,
            path: PathBuf::from(&name),
            raw: header.data_file_raw(),
            name,
        }));
    }
    if opts.skip_backing {
        return Ok(None);
    }
    let path = resolve_named(&name, image_path, &opts.backing, "data").map_err(|e| match e {
        Error::Backing { path, reason } => Error::Backing {
            path,
            reason: format!("the external data file: {reason}"),
        },
        e => e,
    })?;
    let cannot =
        |e: std::io::Error| refuse(&path, format!("cannot open the external data file: {e}"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(opts.writable && !opts.force_share)
        .open(&path)
        .map_err(cannot)?;
    // The file opened, checked before it is locked (the image's own lock would hide the
    // cause): never the image itself or a layer of its chain.
    let md = file.metadata().map_err(cannot)?;
    let id = (md.dev(), md.ino());
    let is_image =
        image_path.is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id));
    if is_image || chain.files.contains(&id) {
        return Err(refuse(
            &path,
            "the external data file is the image itself or a layer of its chain",
        ));
    }
    if !opts.force_share {
        crate::storage::lock::lock(&file, opts.writable).map_err(cannot)?;
    }
    let mut storage = FileStorage::from_file(file);
    storage
        .set_cache_mode(opts.cache)
        .map_err(|e| refuse(&path, e.to_string()))?;
    Ok(Some(DataFile {
        storage: Arc::new(storage),
        path,
        name,
        raw: header.data_file_raw(),
    }))
}
