//! The state directory: the layer graph and the records that point into it.
//!
//! ```text
//! STATE/
//!   layers/<layer>.qcow2         qcow2 files: a volume's writable head, or a frozen layer
//!   volumes/<volume id>.json     one record per volume (its head layer), written atomically
//!   snapshots/<snapshot id>.json one record per snapshot (its frozen layer)
//!   groups/<group id>.json       one record per group snapshot (its member snapshots)
//! ```
//!
//! The layer graph: a volume's head and a snapshot's layer are roots; each layer's qcow2
//! header names its backing layer (a file name in `layers/`). A layer no volume uses as its
//! head is frozen and never written again. A layer lives while a root reaches it.
//!
//! A record is the commit point of every operation: CreateVolume makes the layer first and
//! writes the record last; DeleteVolume removes the record first and then collects the
//! layers nothing reaches any more. So a crash at any step leaves either a complete object
//! or files no root reaches, which [`State::load`] deletes (`.tmp` records, `.creating-*`
//! images, unreachable layers). Images are opened with their backing files confined to
//! `layers/`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    /// The QoS limits in force (canonical form): the StorageClass's, changed by the
    /// VolumeAttributesClass at creation and by every ModifyVolume since. Empty: no limit.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub qos: BTreeMap<String, String>,
    /// Access types the volume was created for.
    pub access: Vec<AccessType>,
    /// Seconds since the epoch.
    pub created: u64,
    /// What it was made from (restores and clones); `None` for an empty volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The claim it was made for, when the provisioner said (`--extra-create-metadata`):
    /// the metrics label the volume with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimRef>,
}

/// A PersistentVolumeClaim's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRef {
    pub namespace: String,
    pub name: String,
}

impl VolumeRecord {
    /// The QoS limits in force. A record this plugin wrote always parses; one that does not
    /// (edited by hand) is logged and leaves the volume unlimited rather than unusable.
    pub fn limits(&self) -> crate::nbd::qos::Limits {
        crate::nbd::qos::Limits::from_canonical(&self.qos).unwrap_or_else(|e| {
            tracing::warn!(volume = %self.id, error = %e, "QoS limits in the record ignored");
            Default::default()
        })
    }
}

impl ClaimRef {
    /// The claim CreateVolume's parameters name (the keys the external provisioner adds
    /// with `--extra-create-metadata`), if they name one that Kubernetes could have made.
    pub fn from_parameters(p: &std::collections::HashMap<String, String>) -> Option<ClaimRef> {
        let namespace = p.get("csi.storage.k8s.io/pvc/namespace")?;
        let name = p.get("csi.storage.k8s.io/pvc/name")?;
        // DNS-1123 names: at most 253 lower-case alphanumerics, '-' and '.'.
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        };
        if !valid(namespace) || !valid(name) {
            tracing::warn!("ignored a claim name or namespace that is not a Kubernetes name");
            return None;
        }
        Some(ClaimRef {
            namespace: namespace.clone(),
            name: name.clone(),
        })
    }
}

/// A volume's content source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

/// One snapshot, as persisted in `snapshots/<id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The CSI snapshot id (`snap-` + 32 hex digits).
    pub id: String,
    /// The CreateSnapshot name, for idempotency.
    pub name: String,
    /// The volume it was taken of (which may since have been deleted).
    pub source_volume_id: String,
    /// File name of its frozen layer in `layers/`.
    pub layer: String,
    /// Virtual size in bytes when taken.
    pub size: u64,
    /// Seconds and nanoseconds since the epoch.
    pub created: (u64, u32),
    /// The group snapshot it was taken in, if any. A member whose group record is missing
    /// (a crash before the group's commit point) is removed at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// One group snapshot, as persisted in `groups/<id>.json`: the commit point of
/// CreateVolumeGroupSnapshot, written after its members' snapshot records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The CSI group snapshot id (`group-` + 32 hex digits).
    pub id: String,
    /// The CreateVolumeGroupSnapshot name, for idempotency.
    pub name: String,
    /// The volumes it was taken of, sorted.
    pub source_volume_ids: Vec<String>,
    /// Its member snapshots, in the order of `source_volume_ids`.
    pub snapshot_ids: Vec<String>,
    /// Seconds and nanoseconds since the epoch.
    pub created: (u64, u32),
}

fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A volume id: `vol-` and 32 lower-case hex digits. Anything else names no volume.
pub fn is_volume_id(id: &str) -> bool {
    is_id(id, "vol-")
}

/// A snapshot id: `snap-` and 32 lower-case hex digits.
pub fn is_snapshot_id(id: &str) -> bool {
    is_id(id, "snap-")
}

/// A group snapshot id: `group-` and 32 lower-case hex digits.
pub fn is_group_id(id: &str) -> bool {
    is_id(id, "group-")
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
    snapshots: BTreeMap<String, SnapshotRecord>,
    groups: BTreeMap<String, GroupRecord>,
    /// Records written since load ([`State::generation`]).
    generation: u64,
    /// Volumes whose chain the last walk could not read, and why.
    damaged: BTreeMap<String, String>,
}

/// The roots of the layer graph at one moment ([`State::roots`]).
#[derive(Debug, Clone)]
pub struct Roots {
    /// Each volume's id and head layer.
    pub volumes: Vec<(String, String)>,
    /// Each snapshot's layer.
    pub snapshots: Vec<String>,
    /// [`State::generation`] when taken.
    pub generation: u64,
}

/// What a [`walk`] of the layer graph found.
#[derive(Debug, Default)]
pub struct Reach {
    /// Layers some root reaches.
    pub live: BTreeSet<String>,
    /// Layers whose header could not be read, and why.
    pub unreadable: BTreeMap<String, String>,
    /// Volumes whose chain holds an unreadable layer, and why.
    pub damaged: BTreeMap<String, String>,
}

/// Follows every root's backing chain through the layer headers in `layers_dir` (only
/// the first cluster of each is read). Needs no lock: run it on [`Roots`] taken under
/// the state lock, and check [`State::generation`] before acting on it.
pub fn walk(layers_dir: &Path, roots: &Roots) -> Reach {
    let mut reach = Reach::default();
    let mut parents: HashMap<String, std::result::Result<Option<String>, String>> = HashMap::new();
    let starts = roots
        .volumes
        .iter()
        .map(|(id, head)| (Some(id), head))
        .chain(roots.snapshots.iter().map(|l| (None, l)));
    for (volume, start) in starts {
        let mut layer = start.clone();
        // This chain's own layers: a cycle of backing names ends it.
        let mut chain = HashSet::new();
        while chain.insert(layer.clone()) {
            reach.live.insert(layer.clone());
            let parent = parents
                .entry(layer.clone())
                .or_insert_with(|| header_backing(layers_dir, &layer));
            match parent {
                Ok(Some(p)) => layer = p.clone(),
                Ok(None) => break,
                Err(why) => {
                    let why = why.clone();
                    if let Some(id) = volume {
                        reach
                            .damaged
                            .insert(id.clone(), format!("layer {layer}: {why}"));
                    }
                    reach.unreadable.insert(layer, why);
                    break;
                }
            }
        }
    }
    reach
}

/// The layers of the chain from `head` down, head first, read from their headers without
/// a lock (like [`walk`]); ends at a layer without backing, an unreadable one (`Err` with
/// why) or a cycle.
pub fn chain(layers_dir: &Path, head: &str) -> std::result::Result<Vec<String>, String> {
    let mut layers = vec![head.to_string()];
    while let Some(parent) = header_backing(layers_dir, layers.last().expect("not empty"))? {
        if layers.contains(&parent) {
            break;
        }
        layers.push(parent);
    }
    Ok(layers)
}

/// The backing layer named in `layer`'s header, read from its first cluster only (the
/// header says how large a cluster is; a short file reads as zeros past its end).
fn header_backing(layers_dir: &Path, layer: &str) -> std::result::Result<Option<String>, String> {
    use qcow2_engine::format::Header;
    use std::io::Read;
    let path = layers_dir.join(layer);
    let read_err = |e: std::io::Error| format!("reading {}: {e}", path.display());
    let bad = |e: qcow2_engine::Error| format!("{}: {e}", path.display());
    let mut file = File::open(&path).map_err(read_err)?;
    let mut buf = Vec::new();
    (&mut file)
        .take(HEADER_PEEK)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    let cluster = 1u64 << Header::peek_cluster_bits(&buf).map_err(bad)?;
    file.take(cluster.saturating_sub(buf.len() as u64))
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    buf.resize(cluster as usize, 0);
    let header = Header::parse(&buf).map_err(bad)?;
    match header.backing_file {
        None => Ok(None),
        Some(name) if is_layer_name(&name) => Ok(Some(name)),
        Some(name) => Err(format!(
            "{} is backed by {name:?}, which is not a layer of this state directory",
            path.display()
        )),
    }
}

/// Enough of a layer to learn its cluster size (a version 2 header is 72 bytes).
const HEADER_PEEK: u64 = 512;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
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
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)
        .map_err(io_err(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))?;
    sync_dir(dir)
}

/// Mode of the files the plugin writes (layers hold tenants' data; records name them).
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of the directories it makes.
pub const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` (and its parents) and makes it [`PRIVATE_DIR`], even if it existed with
/// another mode (an older install's).
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR)))
        .map_err(io_err(format!("creating {}", dir.display())))
}

/// Makes `file` [`PRIVATE_FILE`].
pub fn private_file(file: &Path) -> Result<()> {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(PRIVATE_FILE))
        .map_err(io_err(format!("chmod {}", file.display())))
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
    /// Snapshot records of a group snapshot that was never committed.
    pub orphan_members: usize,
}

impl State {
    /// Opens (creating if needed) the state directory, reads every record, and deletes what an
    /// interrupted operation left behind.
    pub fn load(root: &Path) -> Result<(State, Cleanup)> {
        private_dir(root)?;
        for sub in ["layers", "volumes", "snapshots", "groups"] {
            let d = root.join(sub);
            private_dir(&d)?;
            // What an older install wrote with the default mode.
            for entry in read_dir(&d)? {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    private_file(&entry.path())?;
                }
            }
        }
        let mut cleanup = Cleanup::default();
        let volumes = read_records(
            &root.join("volumes"),
            &RecordKind {
                name: "volume record",
                names: "volume",
                is_id: is_volume_id,
                id_of: |r: &VolumeRecord| &r.id,
            },
            &mut cleanup,
        )?;
        let snapshots = read_records(
            &root.join("snapshots"),
            &RecordKind {
                name: "snapshot record",
                names: "snapshot",
                is_id: is_snapshot_id,
                id_of: |r: &SnapshotRecord| &r.id,
            },
            &mut cleanup,
        )?;
        let groups = read_records(
            &root.join("groups"),
            &RecordKind {
                name: "group snapshot record",
                names: "group snapshot",
                is_id: is_group_id,
                id_of: |r: &GroupRecord| &r.id,
            },
            &mut cleanup,
        )?;
        let mut state = State {
            root: root.to_path_buf(),
            volumes,
            snapshots,
            groups,
            generation: 0,
            damaged: BTreeMap::new(),
        };
        // Members of a group that never reached its commit point (its record), or whose
        // group was being deleted: the snapshots nobody was told about.
        let orphans: Vec<String> = state
            .snapshots
            .values()
            .filter(|s| {
                s.group
                    .as_ref()
                    .is_some_and(|g| !state.groups.contains_key(g))
            })
            .map(|s| s.id.clone())
            .collect();
        for id in orphans {
            tracing::info!(snapshot = %id, "removing a member of an unfinished group snapshot");
            state.remove_snapshot(&id)?;
            cleanup.orphan_members += 1;
        }
        for entry in read_dir(&state.layers_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".creating-") {
                remove_durably(&entry.path())?;
                cleanup.partial_files += 1;
            }
        }
        // Unreadable layers do not stop the load: their volumes are reported damaged and
        // every other volume stays usable.
        cleanup.orphan_layers = match state.collect_garbage(&HashSet::new()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "collecting unreachable layers at load");
                0
            }
        };
        Ok((state, cleanup))
    }

    /// The roots of the layer graph as of now: volumes' heads and snapshots' layers.
    pub fn roots(&self) -> Roots {
        Roots {
            volumes: self
                .volumes
                .values()
                .map(|v| (v.id.clone(), v.head.clone()))
                .collect(),
            snapshots: self.snapshots.values().map(|s| s.layer.clone()).collect(),
            generation: self.generation,
        }
    }

    /// Bumped by every record written: a walk of older [`Roots`] may miss a new root.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The layer `layer` is backed by (its header's backing name, a file in `layers/`).
    pub fn backing_of(&self, layer: &str) -> Result<Option<String>> {
        header_backing(&self.layers_dir(), layer).map_err(Error::Internal)
    }

    /// Why volume `id`'s chain cannot be read, if the last walk found it so.
    pub fn damage(&self, id: &str) -> Option<&str> {
        self.damaged.get(id).map(String::as_str)
    }

    /// Deletes the layers no root reaches, except `pending` ones (being made by an operation
    /// that has not written its record yet); returns how many.
    pub fn collect_garbage(&mut self, pending: &HashSet<String>) -> Result<usize> {
        let reach = walk(&self.layers_dir(), &self.roots());
        self.collect(&reach, pending)
    }

    /// Deletes what `reach` (a walk of the current roots) proves unreachable, except
    /// `pending` layers, and remembers which volumes it found damaged. A layer that could
    /// not be read may be backed by any other: then nothing is provably unreachable and
    /// nothing is deleted.
    pub fn collect(&mut self, reach: &Reach, pending: &HashSet<String>) -> Result<usize> {
        for (id, why) in &reach.damaged {
            if self.damaged.get(id) != Some(why) {
                tracing::error!(volume = %id, reason = %why, "the volume's layer chain cannot be read");
            }
        }
        self.damaged = reach.damaged.clone();
        if !reach.unreadable.is_empty() {
            tracing::warn!(
                unreadable = ?reach.unreadable.keys().collect::<Vec<_>>(),
                "layers cannot be read: no layer is collected until they can"
            );
            return Ok(0);
        }
        let mut removed = 0;
        for entry in read_dir(&self.layers_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_layer_name(&name) && !reach.live.contains(&name) && !pending.contains(&name) {
                remove_durably(&entry.path())?;
                tracing::info!(layer = %name, "collected an unreachable layer");
                removed += 1;
            }
        }
        Ok(removed)
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

    pub fn snapshot(&self, id: &str) -> Option<&SnapshotRecord> {
        self.snapshots.get(id)
    }

    pub fn snapshot_by_name(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.values().find(|s| s.name == name)
    }

    /// Snapshots in id order.
    pub fn snapshots(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots.values()
    }

    /// Persists a snapshot record (the commit point of CreateSnapshot).
    pub fn put_snapshot(&mut self, rec: SnapshotRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialise");
        let path = self.root.join("snapshots").join(format!("{}.json", rec.id));
        write_atomic(&path, &bytes)?;
        self.generation += 1;
        self.snapshots.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Forgets a snapshot (the commit point of DeleteSnapshot); its layer stays while
    /// anything reaches it ([`State::collect_garbage`]).
    pub fn remove_snapshot(&mut self, id: &str) -> Result<Option<SnapshotRecord>> {
        if !self.snapshots.contains_key(id) {
            return Ok(None);
        }
        remove_durably(&self.root.join("snapshots").join(format!("{id}.json")))?;
        Ok(self.snapshots.remove(id))
    }

    pub fn group(&self, id: &str) -> Option<&GroupRecord> {
        self.groups.get(id)
    }

    pub fn group_by_name(&self, name: &str) -> Option<&GroupRecord> {
        self.groups.values().find(|g| g.name == name)
    }

    /// Persists a group snapshot record (the commit point of CreateVolumeGroupSnapshot).
    pub fn put_group(&mut self, rec: GroupRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialise");
        let path = self.root.join("groups").join(format!("{}.json", rec.id));
        write_atomic(&path, &bytes)?;
        self.generation += 1;
        self.groups.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Forgets a group snapshot (the commit point of DeleteVolumeGroupSnapshot): its members
    /// go next, or at the next load.
    pub fn remove_group(&mut self, id: &str) -> Result<Option<GroupRecord>> {
        if !self.groups.contains_key(id) {
            return Ok(None);
        }
        remove_durably(&self.root.join("groups").join(format!("{id}.json")))?;
        Ok(self.groups.remove(id))
    }

    /// Volumes in id order.
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.volumes.values()
    }

    /// Persists a volume record (the commit point of a create or an update).
    pub fn put_volume(&mut self, rec: VolumeRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&rec).expect("records serialise");
        write_atomic(&self.record_path(&rec.id), &bytes)?;
        self.generation += 1;
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

/// A layer file name as this plugin makes them: `layer-` + 32 hex digits + `.qcow2`.
pub fn is_layer_name(name: &str) -> bool {
    name.strip_suffix(".qcow2")
        .is_some_and(|id| is_id(id, "layer-"))
}

/// How [`read_records`] reads one kind of record.
pub(super) struct RecordKind<R> {
    /// For errors: "volume record".
    pub name: &'static str,
    /// For errors: what the id names, "volume".
    pub names: &'static str,
    pub is_id: fn(&str) -> bool,
    pub id_of: fn(&R) -> &String,
}

/// Every record in `dir` by id, deleting half-written ones (`.tmp`) and counting them in
/// `cleanup`. A record that does not parse, whose file name is not an id, or that names
/// another id than its file's stops the load: guessing could lose an object.
pub(super) fn read_records<R: serde::de::DeserializeOwned>(
    dir: &Path,
    kind: &RecordKind<R>,
    cleanup: &mut Cleanup,
) -> Result<BTreeMap<String, R>> {
    let mut out = BTreeMap::new();
    for entry in read_dir(dir)? {
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
        if !(kind.is_id)(id) {
            return Err(Error::Internal(format!(
                "{} is not named after an id",
                path.display()
            )));
        }
        let text = std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let rec: R = serde_json::from_slice(&text).map_err(|e| {
            Error::Internal(format!("{} is not a {}: {e}", path.display(), kind.name))
        })?;
        if (kind.id_of)(&rec) != id {
            return Err(Error::Internal(format!(
                "{} names {} {:?}",
                path.display(),
                kind.names,
                (kind.id_of)(&rec)
            )));
        }
        out.insert(id.to_string(), rec);
    }
    Ok(out)
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
            qos: BTreeMap::new(),
            access: vec![AccessType::Mount],
            created: 1,
            source: None,
            claim: None,
        }
    }

    /// A real (empty) layer, optionally backed by another.
    fn layer(st: &State, backing: Option<&str>) -> String {
        let name = format!("{}.qcow2", new_id("layer-"));
        qcow2_engine::create(
            &st.layer_path(&name),
            &qcow2_engine::CreateOptions {
                size: Some(1 << 20),
                backing: backing.map(|b| (b.to_string(), qcow2_engine::BackingFormat::Qcow2)),
                ..qcow2_engine::CreateOptions::default()
            },
        )
        .unwrap();
        name
    }

    #[test]
    fn ids_have_one_shape() {
        let id = new_id("vol-");
        assert!(is_volume_id(&id), "{id}");
        assert!(is_snapshot_id(&new_id("snap-")));
        assert!(!is_snapshot_id(&id));
        assert!(is_layer_name(&format!("{}.qcow2", new_id("layer-"))));
        assert!(!is_layer_name("../x.qcow2"));
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
        let a = layer(&st, None);
        st.put_volume(record(&id, &a)).unwrap();
        // What crashes leave: an orphan layer, a half-created image, a half-written record.
        layer(&st, None);
        std::fs::write(st.layer_path(".b.qcow2.creating-12"), b"x").unwrap();
        std::fs::write(dir.path().join("volumes/.vol-x.json.tmp"), b"{").unwrap();
        let (st, clean) = State::load(dir.path()).unwrap();
        assert_eq!(
            clean,
            Cleanup {
                partial_files: 2,
                orphan_layers: 1,
                orphan_members: 0,
            }
        );
        assert_eq!(st.volume(&id), Some(&record(&id, &a)));
        assert_eq!(std::fs::read_dir(st.layers_dir()).unwrap().count(), 1);
    }

    #[test]
    fn layers_live_while_a_volume_or_snapshot_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = State::load(dir.path()).unwrap();
        // base <- snap <- head (the volume), and a snapshot record on `snap`.
        let base = layer(&st, None);
        let snap = layer(&st, Some(&base));
        let head = layer(&st, Some(&snap));
        let vol = new_id("vol-");
        st.put_volume(record(&vol, &head)).unwrap();
        let sid = new_id("snap-");
        st.put_snapshot(SnapshotRecord {
            id: sid.clone(),
            name: "s".into(),
            source_volume_id: vol.clone(),
            layer: snap.clone(),
            size: 1 << 20,
            created: (1, 2),
            group: None,
        })
        .unwrap();
        assert_eq!(st.collect_garbage(&Default::default()).unwrap(), 0);
        // The volume goes: the snapshot still reaches snap and base; head is collected.
        st.remove_volume(&vol).unwrap();
        assert_eq!(st.collect_garbage(&Default::default()).unwrap(), 1);
        assert!(!st.layer_path(&head).exists());
        let (st2, _) = State::load(dir.path()).unwrap();
        assert_eq!(st2.snapshot(&sid).unwrap().layer, snap);
        let reach = walk(&st2.layers_dir(), &st2.roots());
        assert!(reach.unreadable.is_empty(), "{:?}", reach.unreadable);
        assert_eq!(reach.live, [base.clone(), snap.clone()].into());
        // The snapshot goes too: everything is collected.
        let mut st = st2;
        st.remove_snapshot(&sid).unwrap();
        assert!(st.remove_snapshot(&sid).unwrap().is_none());
        assert_eq!(st.collect_garbage(&Default::default()).unwrap(), 2);
    }

    #[test]
    fn a_backing_name_outside_the_layers_stops_collection() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = State::load(dir.path()).unwrap();
        qcow2_engine::create(
            &dir.path().join("base.qcow2"),
            &qcow2_engine::CreateOptions {
                size: Some(1 << 20),
                ..qcow2_engine::CreateOptions::default()
            },
        )
        .unwrap();
        let head = layer(&st, Some("../base.qcow2"));
        let id = new_id("vol-");
        st.put_volume(record(&id, &head)).unwrap();
        let other = layer(&st, None);
        assert_eq!(st.collect_garbage(&Default::default()).unwrap(), 0);
        assert!(
            st.layer_path(&other).exists(),
            "nothing collected without the whole graph"
        );
        let why = st.damage(&id).expect("the volume is reported damaged");
        assert!(why.contains("not a layer"), "{why}");
    }

    #[test]
    fn an_unreadable_layer_marks_its_volumes_damaged_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = State::load(dir.path()).unwrap();
        let base = layer(&st, None);
        let (a, b, c) = (new_id("vol-"), new_id("vol-"), new_id("vol-"));
        let head_a = layer(&st, Some(&base));
        st.put_volume(record(&a, &head_a)).unwrap();
        st.put_volume(record(&b, &layer(&st, Some(&base)))).unwrap();
        st.put_volume(record(&c, &layer(&st, None))).unwrap();
        let orphan = layer(&st, None);
        // A's head is overwritten with garbage; the base both share stays readable.
        std::fs::write(st.layer_path(&head_a), vec![0xa5u8; 4096]).unwrap();
        drop(st);
        let (st, cleanup) = State::load(dir.path()).expect("one bad layer does not stop the load");
        assert!(
            st.damage(&a).is_some_and(|w| w.contains(&head_a)),
            "{:?}",
            st.damage(&a)
        );
        assert_eq!((st.damage(&b), st.damage(&c)), (None, None));
        assert_eq!(cleanup.orphan_layers, 0);
        assert!(
            st.layer_path(&orphan).exists(),
            "A's head may have been backed by it"
        );
        assert!(st.layer_path(&base).exists());
        assert!(st.volume(&b).is_some() && st.volume(&c).is_some());
        // Repaired (here: A deleted), collection resumes.
        let mut st = st;
        st.remove_volume(&a).unwrap();
        std::fs::remove_file(st.layer_path(&head_a)).unwrap();
        assert_eq!(st.collect_garbage(&Default::default()).unwrap(), 1);
        assert!(!st.layer_path(&orphan).exists());
        assert_eq!(st.damage(&a), None);
    }

    #[test]
    fn a_corrupt_record_stops_the_load_instead_of_losing_a_volume() {
        let dir = tempfile::tempdir().unwrap();
        State::load(dir.path()).unwrap();
        let id = new_id("vol-");
        std::fs::write(dir.path().join(format!("volumes/{id}.json")), b"not json").unwrap();
        let e = State::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a volume record"), "{e}");
        std::fs::remove_file(dir.path().join(format!("volumes/{id}.json"))).unwrap();
        std::fs::write(dir.path().join("snapshots/snap-1.json"), b"{}").unwrap();
        let e = State::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not named after an id"), "{e}");
    }
}
