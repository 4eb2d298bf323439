//! Backing files: which may be opened, how names resolve, and reading through them.
//!
//! Formats are never probed: the backing format comes from the image's backing-format
//! extension. Relative names resolve against the directory of the image that names them (QEMU
//! semantics), never the working directory. Chains are bounded in depth and loops are detected
//! by (device, inode).

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::error::{Error, IoContext, Result};
use crate::format::Header;
use crate::storage::{FileStorage, Storage};

/// Which backing files an image may open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Never open backing files: an image with one fails to open.
    Deny,
    /// Only files inside this directory (after resolving `..` and symlinks).
    ConfineTo(PathBuf),
    /// Any file the process can open.
    #[default]
    Allow,
}

/// (device, inode) of an opened file, for loop detection.
pub(crate) type FileId = (u64, u64);

/// What opening a chain keeps from layer to layer.
#[derive(Default)]
pub(crate) struct Chain {
    /// The files opened so far, to refuse loops.
    pub files: Vec<FileId>,
    /// Master keys unlocked so far: a layer with the same encryption header reuses one.
    pub keys: crate::crypto::Keyring,
    /// The top image's external data file, opened by the caller
    /// ([`Image::open_storage_with_data_file`]); taken by the top image's open.
    pub given_data: Option<Arc<dyn Storage>>,
}

/// A raw backing file.
#[derive(Debug)]
pub struct RawBacking {
    storage: Arc<dyn Storage>,
    size: u64,
    path: PathBuf,
}

impl RawBacking {
    /// Path of the raw file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The layer below an overlay.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 image (itself possibly with a backing file).
    Qcow2(Box<Image>),
    /// A raw file.
    Raw(RawBacking),
}

impl Backing {
    /// Virtual size of the backing layer.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.size(),
            Backing::Raw(raw) => raw.size,
        }
    }

    /// Format name.
    pub fn format(&self) -> &'static str {
        match self {
            Backing::Qcow2(_) => "qcow2",
            Backing::Raw(_) => "raw",
        }
    }

    /// Path of the backing file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Backing::Qcow2(img) => img.path(),
            Backing::Raw(raw) => Some(&raw.path),
        }
    }

    /// Reads at `off`; bytes past the backing file's size read as zeros (an overlay may be
    /// larger than its base).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
        let (inside, outside) = buf.split_at_mut(avail);
        outside.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(img) => img.read_at(inside, off),
            Backing::Raw(raw) => raw
                .storage
                .read_data(inside, off)
                .ctx(|| format!("reading backing file {}", raw.path.display())),
        }
    }
}

pub(super) fn refuse(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
    Error::Backing {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Names that QEMU would interpret as a protocol or a JSON description rather than a file.
fn is_protocol_name(name: &str) -> bool {
    if name.starts_with("json:") {
        return true;
    }
    match name.split_once(':') {
        Some((prefix, _)) => {
            !prefix.is_empty()
                && !prefix.contains('/')
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// Resolves a backing name against the directory of the image naming it.
pub fn resolve_backing_name(name: &str, image_path: Option<&Path>) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(refuse(name, "empty backing file name"));
    }
    if is_protocol_name(name) {
        return Err(refuse(
            name,
            "protocol and json: backing names are not supported",
        ));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match image_path.and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => Ok(dir.join(p)),
        Some(_) => Ok(p.to_path_buf()),
        None => Err(refuse(
            name,
            "relative backing name but the image has no path",
        )),
    }
}

fn confine(path: &Path, dir: &Path) -> Result<PathBuf> {
    let real = path
        .canonicalize()
        .map_err(|e| refuse(path, format!("cannot resolve: {e}")))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| refuse(dir, format!("cannot resolve the allowed directory: {e}")))?;
    if !real.starts_with(&dir) || real.components().any(|c| c == Component::ParentDir) {
        return Err(refuse(
            path,
            format!("outside the allowed directory {}", dir.display()),
        ));
    }
    Ok(real)
}

/// The file an image names (a backing file, `what` = "backing", or an external data file),
/// resolved against the image's directory and held to the policy: the names an image holds
/// are as untrusted as the image.
pub(super) fn resolve_named(
    name: &str,
    image_path: Option<&Path>,
    policy: &BackingPolicy,
    what: &str,
) -> Result<PathBuf> {
    let path = resolve_backing_name(name, image_path)?;
    Ok(match policy {
        BackingPolicy::Deny => {
            return Err(refuse(&path, format!("{what} files are not allowed here")));
        }
        BackingPolicy::ConfineTo(dir) => {
            // An untrusted image names its files relative to itself, plainly.
            let named = Path::new(name);
            if named.is_absolute() {
                return Err(refuse(
                    &path,
                    format!("absolute {what} names are not allowed here"),
                ));
            }
            if named.components().any(|c| c == Component::ParentDir) {
                return Err(refuse(
                    &path,
                    format!("{what} names with '..' are not allowed here"),
                ));
            }
            confine(&path, dir)?
        }
        BackingPolicy::Allow => path,
    })
}

pub(super) fn open_backing(
    header: &Header,
    name: &str,
    image_path: Option<&Path>,
    opts: &OpenOptions,
    chain: &mut Chain,
) -> Result<Backing> {
    let path = resolve_named(name, image_path, &opts.backing, "backing")?;
    if chain.files.len() >= opts.max_chain_depth {
        return Err(refuse(
            &path,
            format!("backing chain is deeper than {}", opts.max_chain_depth),
        ));
    }
    let file =
        std::fs::File::open(&path).map_err(|e| refuse(&path, format!("cannot open: {e}")))?;
    if !opts.force_share {
        crate::storage::lock::lock(&file, false).map_err(|e| refuse(&path, e.to_string()))?;
    }
    let format = match header.backing_format.as_deref() {
        Some(f) => f,
        None if opts.probe_backing_format => probe(&file, &path)?,
        None => {
            return Err(refuse(
                &path,
                "the image does not record the backing format, and formats are not probed unless the caller allows it",
            ));
        }
    };
    let md = file.metadata().map_err(|e| refuse(&path, e.to_string()))?;
    let id = (md.dev(), md.ino());
    if image_path.is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id))
        || chain.files.contains(&id)
    {
        return Err(refuse(&path, "backing chain loops"));
    }
    chain.files.push(id);
    let mut file = FileStorage::from_file(file);
    file.set_cache_mode(opts.cache)
        .map_err(|e| refuse(&path, e.to_string()))?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    match format {
        "qcow2" => {
            let ro = OpenOptions {
                writable: false,
                ..opts.clone()
            };
            let img = Image::open_with_chain(storage, Some(&path), &ro, chain)
                .map_err(|e| refuse(&path, e.to_string()))?;
            Ok(Backing::Qcow2(Box::new(img)))
        }
        "raw" => {
            let size = storage.len().ctx(|| format!("sizing {}", path.display()))?;
            Ok(Backing::Raw(RawBacking {
                storage,
                size,
                path,
            }))
        }
        other => Err(refuse(
            &path,
            format!("unsupported backing format {other:?}"),
        )),
    }
}

/// The format of a backing file whose image does not name it: qcow2 if it starts with the
/// qcow2 magic, else raw. Only on the caller's explicit request (a raw file an untrusted guest
/// wrote a qcow2 header into would be misread: CVE-2008-2004).
fn probe(file: &std::fs::File, path: &Path) -> Result<&'static str> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| refuse(path, format!("cannot probe: {e}")))?;
    Ok(
        if n == 4 && u32::from_be_bytes(magic) == crate::format::header::MAGIC {
            "qcow2"
        } else {
            "raw"
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_directory() {
        let p =
            resolve_backing_name("base.qcow2", Some(Path::new("/data/layers/top.qcow2"))).unwrap();
        assert_eq!(p, Path::new("/data/layers/base.qcow2"));
        let p = resolve_backing_name("/abs/base", Some(Path::new("/x/top"))).unwrap();
        assert_eq!(p, Path::new("/abs/base"));
    }

    #[test]
    fn protocol_names_are_refused() {
        for name in [
            "json:{\"file\":1}",
            "nbd://host/x",
            "http://x/y",
            "file:base.qcow2",
        ] {
            assert!(
                resolve_backing_name(name, Some(Path::new("/a/b"))).is_err(),
                "{name}"
            );
        }
        assert!(resolve_backing_name("dir/with:colon", Some(Path::new("/a/b"))).is_ok());
    }
}
