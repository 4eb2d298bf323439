//! The state directory: the layer graph and the records that point into it.
//!
//! ```text
//! STATE/
//!   layers/<layer>.qcow2     qcow2 files: a volume's writable head, or (later) frozen layers
//!   volumes/<volume id>.json one record per volume, written atomically
//! ```
//!
//! A record is the commit point of every operation: CreateVolume makes the layer first and
//! writes the record last; DeleteVolume removes the record first and the layer after. So a
//! crash at any step leaves either a complete volume or files no record points at, which
//! [`State::load`] deletes (`.tmp` records, `.creating-*` images, unreferenced layers).
//! Backing names inside qcow2 headers are relative to `layers/`, and images are opened with
//! their backing files confined there.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a volume is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessType {
    Block,
    Mount,
}

/// One volume, as persisted in `volumes/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The CSI volume id (`vol-` + 32 hex digits).
    pub id: String,
    /// The CreateVolume name, for idempotency.
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// File name of the head layer in `layers/`.
    pub head: String,
    /// The StorageClass parameters as validated (canonical key order).
    pub parameters: BTreeMap<String, String>,
    /// Access types the volume was created for.
    pub access: Vec<AccessType>,
    /// Seconds since the epoch.
    pub created: u64,
}

/// A volume id: `vol-` and 32 lower-case hex digits. Anything else names no volume.
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix("vol-").is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A fresh random id with `prefix`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

/// The state directory, loaded.
#[derive(Debug)]
pub struct State {
    root: PathBuf,
    volumes: BTreeMap<String, VolumeRecord>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync,
/// rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("records live in a directory");
    let name = path
        .file_name()
        .expect("records have a name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))?;
    sync_dir(dir)
}

/// Removes `path` (if present) and syncs its directory.
pub fn remove_durably(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
    }
    sync_dir(path.parent().expect("files live in a directory"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", dir.display())))
}

/// What [`State::load`] cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleanup {
    /// Unfinished records and images (`.tmp`, `.creating-*`).
    pub partial_files: usize,
    /// Layers no record points at.
    pub orphan_layers: usize,
}

impl State {
    /// Opens (creating if needed) the state directory, reads every record, and deletes what an
    /// interrupted operation left behind.
    pub fn load(root: &Path) -> Result<(State, Cleanup)> {
        for sub in ["layers", "volumes"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let mut cleanup = Cleanup::default();
        let mut volumes = BTreeMap::new();
        let vdir = root.join("volumes");
        for entry in read_dir(&vdir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".tmp") {
                remove_durably(&path)?;
                cleanup.partial_files += 1;
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let text =
                std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
            let rec: VolumeRecord = serde_json::from_slice(&text).map_err(|e| {
                Error::Internal(format!("{} is not a volume record: {e}", path.display()))
            })?;
            if rec.id != id || !is_volume_id(id) {
                return Err(Error::Internal(format!(
                    "{} names volume {:?}",
                    path.display(),
                    rec.id
                )));
            }
            volumes.insert(rec.id.clone(), rec);
        }
        let state = State {
            root: root.to_path_buf(),
            volumes,
        };
        let referenced: std::collections::HashSet<&str> =
            state.volumes.values().map(|v| v.head.as_str()).collect();
        for entry in read_dir(&state.layers_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".creating-") {
                remove_durably(&entry.path())?;
                cleanup.partial_files += 1;
            } else if name.ends_with(".qcow2") && !referenced.contains(name.as_str()) {
                remove_durably(&entry.path())?;
                cleanup.orphan_layers += 1;
            }
        }
        Ok((state, cleanup))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// The path of a layer file.
    pub fn layer_path(&self, layer: &str) -> PathBuf {
        self.layers_dir().join(layer)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.json"))
    }

    pub fn volume(&self, id: &str) -> Option<&VolumeRecord> {
        self.volumes.get(id)
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// Volumes in id order.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.volumes.values()
    }

    /// Persists a volume record (the commit point of a create or an update).
    pub fn put_volume(&mut self, rec: VolumeRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialise");
        write_atomic(&self.record_path(&rec.id), &bytes)?;
        self.volumes.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Forgets a volume (the commit point of a delete); returns its record. The caller then
    /// removes its head layer; a crash in between leaves an orphan that the next load removes.
    pub fn remove_volume(&mut self, id: &str) -> Result<Option<VolumeRecord>> {
        if !self.volumes.contains_key(id) {
            return Ok(None);
        }
        remove_durably(&self.record_path(id))?;
        Ok(self.volumes.remove(id))
    }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .and_then(|it| it.collect::<std::io::Result<Vec<_>>>())
        .map_err(io_err(format!("listing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, head: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: format!("pvc-{id}"),
            size: 1 << 30,
            head: head.into(),
            parameters: BTreeMap::new(),
            access: vec![AccessType::Mount],
            created: 1,
        }
    }

    #[test]
    fn ids_have_one_shape() {
        let id = new_id("vol-");
        assert!(is_volume_id(&id), "{id}");
        for bad in [
            "",
            "vol-",
            "fake-vol-id",
            "vol-XYZ",
            &format!("{id}0"),
            "vol-../../etc",
        ] {
            assert!(!is_volume_id(bad), "{bad}");
        }
    }

    #[test]
    fn records_survive_a_reload_and_leftovers_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, clean) = State::load(dir.path()).unwrap();
        assert_eq!(clean, Cleanup::default());
        let id = new_id("vol-");
        std::fs::write(st.layer_path("a.qcow2"), b"layer").unwrap();
        st.put_volume(record(&id, "a.qcow2")).unwrap();
        // What crashes leave: an orphan layer, a half-created image, a half-written record.
        std::fs::write(st.layer_path("orphan.qcow2"), b"x").unwrap();
        std::fs::write(st.layer_path(".b.qcow2.creating-12"), b"x").unwrap();
        std::fs::write(dir.path().join("volumes/.vol-x.json.tmp"), b"{").unwrap();
        let (st, clean) = State::load(dir.path()).unwrap();
        assert_eq!(
            clean,
            Cleanup {
                partial_files: 2,
                orphan_layers: 1
            }
        );
        assert_eq!(st.volume(&id), Some(&record(&id, "a.qcow2")));
        assert!(st.layer_path("a.qcow2").exists());
        assert!(!st.layer_path("orphan.qcow2").exists());
    }

    #[test]
    fn a_removed_volume_is_gone_after_reload_and_its_layer_collected() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = State::load(dir.path()).unwrap();
        let id = new_id("vol-");
        std::fs::write(st.layer_path("a.qcow2"), b"layer").unwrap();
        st.put_volume(record(&id, "a.qcow2")).unwrap();
        assert!(st.remove_volume(&id).unwrap().is_some());
        assert!(st.remove_volume(&id).unwrap().is_none());
        // Crash before the layer was removed: the reload collects it.
        let (st, clean) = State::load(dir.path()).unwrap();
        assert!(st.volume(&id).is_none());
        assert_eq!(clean.orphan_layers, 1);
    }

    #[test]
    fn a_corrupt_record_stops_the_load_instead_of_losing_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        State::load(dir.path()).unwrap();
        std::fs::write(dir.path().join("volumes/vol-1.json"), b"not json").unwrap();
        let e = State::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a volume record"), "{e}");
    }
}
