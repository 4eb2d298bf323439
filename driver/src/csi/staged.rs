//! Volumes staged on this node: what each holds (image, export, device, publish targets),
//! their records, and taking them back after a restart ([`NodeState::recover`]).

use qcow2_engine::sync::Recover;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use qcow2_engine::crypto::Passphrase;
use qcow2_engine::{BackingPolicy, Image, OpenOptions};

use super::capability::Checked;
use super::keys::KeyStore;
use super::live::LiveImage;
use super::mounts::{self, run};
use super::params::Params;
use super::staging::{self, Attachment, StageRecord, StageRecords};
use super::state::{State, VolumeRecord};
use crate::attach::{Attached, Attacher, Volume};
use crate::error::{Error, Result};
use crate::metrics::plugin::{PluginMetrics, Reason, Takeover};
use crate::nbd::qos::Qos;
use crate::nbd::{BlockDevice, Export, Limits, Server};

/// A staged volume: its export and device live as long as this does.
#[derive(Debug)]
pub struct Staged {
    pub volume_id: String,
    pub staging: PathBuf,
    pub cap: Checked,
    pub device: PathBuf,
    pub(super) attachment: Attachment,
    /// The open head layer (flushed at shutdown, grown by NodeExpandVolume); `None` when lost.
    pub(super) image: Option<Arc<LiveImage>>,
    pub(super) attached: Mutex<Option<Attached>>,
    /// Why the volume has no working device: a previous plugin process staged it and its
    /// device did not survive that process. Unpublish and unstage clear it up.
    pub(super) lost: Option<String>,
    pub(super) published: Mutex<BTreeSet<PathBuf>>,
    /// The boot it was staged in.
    pub(super) boot_id: String,
    /// Its export's QoS limits: ModifyVolume changes them here, live.
    pub(super) qos: Arc<Qos>,
    /// An encrypted volume's passphrase, for reopening its head (pivots, flattens); also
    /// kept in the key store for the next process ([`super::keys`]).
    pub(super) passphrase: Option<Passphrase>,
}

impl Staged {
    pub(super) fn record(&self) -> StageRecord {
        StageRecord {
            volume_id: self.volume_id.clone(),
            staging: self.staging.clone(),
            capability: self.cap.clone(),
            device: self.device.clone(),
            attachment: self.attachment,
            published: self.published().clone(),
            boot_id: self.boot_id.clone(),
        }
    }

    pub(super) fn published(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        self.published.lock().recover()
    }

    /// Publish targets still mounted (an unreadable mount table counts them all): what a
    /// CO unmounted behind our back does not hold the volume.
    pub(super) fn in_use(&self) -> Vec<PathBuf> {
        self.published()
            .iter()
            .filter(|t| mounts::is_mount_point(t).unwrap_or(true))
            .cloned()
            .collect()
    }

    /// Why the volume is not working now, if it is not: lost with a previous process,
    /// writes held by a full disk, or its device node gone.
    pub(super) fn condition(&self) -> Option<(Reason, String)> {
        if let Some(why) = &self.lost {
            return Some((Reason::Lost, why.clone()));
        }
        if let Some(paused) = self.image.as_ref().and_then(|i| i.paused()) {
            return Some((Reason::Full, paused));
        }
        if !self.device.exists() {
            let gone = format!("the block device {} is gone", self.device.display());
            return Some((Reason::DeviceGone, gone));
        }
        None
    }

    /// `Err(FAILED_PRECONDITION)` with the reason when the volume is lost.
    pub(super) fn check_live(&self) -> Result<()> {
        match &self.lost {
            Some(why) => Err(Error::FailedPrecondition(format!(
                "volume {}: {why}",
                self.volume_id
            ))),
            None => Ok(()),
        }
    }
}

/// What [`NodeState::recover`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Kernel devices taken over: their filesystems never noticed the restart.
    pub reattached: usize,
    /// Volumes whose device ended with the previous process (reported as abnormal until
    /// unstaged).
    pub lost: usize,
    /// Records of volumes that no longer exist, dropped.
    pub forgotten: usize,
    /// Records from an earlier boot, dropped: their devices and mounts went with it.
    pub previous_boot: usize,
    /// Devices handed over by a running plugin process and served on ([`super::handoff`]).
    pub adopted: Vec<String>,
    /// Devices handed over that could not be served.
    pub not_adopted: Vec<String>,
    /// Filesystems found frozen by a process that ended in the middle of a snapshot, and
    /// thawed.
    pub thawed: usize,
}

/// Volumes staged on this node.
#[derive(Debug)]
pub struct NodeState {
    staged: Mutex<HashMap<String, Arc<Staged>>>,
    /// Staging paths of stages in progress, and their volumes (locked after `staged`).
    claims: Mutex<HashMap<PathBuf, String>>,
    pub(super) records: StageRecords,
}

/// A staging path held for one stage in progress (`NodeState::claim`); released when
/// dropped (by then the staged volume, if any, holds it).
#[derive(Debug)]
pub struct PathClaim<'a> {
    node: &'a NodeState,
    path: PathBuf,
}

impl Drop for PathClaim<'_> {
    fn drop(&mut self) {
        self.node.claims.lock().recover().remove(&self.path);
    }
}

impl NodeState {
    pub fn new(state_dir: &Path) -> NodeState {
        NodeState {
            staged: Mutex::default(),
            claims: Mutex::default(),
            records: StageRecords::new(state_dir),
        }
    }

    /// FAILED_PRECONDITION (logged) when a volume other than `id` holds `path`: its
    /// staging path, one of its publish targets, or the staging path of a stage in progress.
    pub(super) fn check_free(&self, path: &Path, id: &str) -> Result<()> {
        let map = self.map();
        let claims = self.claims.lock().recover();
        Self::free_in(&map, &claims, path, id)
    }

    fn free_in(
        map: &HashMap<String, Arc<Staged>>,
        claims: &HashMap<PathBuf, String>,
        path: &Path,
        id: &str,
    ) -> Result<()> {
        let staged = map
            .values()
            .find(|s| s.volume_id != id && (s.staging == path || s.published().contains(path)));
        let holder = staged
            .map(|s| s.volume_id.clone())
            .or_else(|| claims.get(path).filter(|v| *v != id).cloned());
        let Some(other) = holder else {
            return Ok(());
        };
        tracing::warn!(volume = id, path = %path.display(), holder = %other, "refused a path another volume holds");
        Err(Error::FailedPrecondition(format!(
            "{} is in use by volume {other}",
            path.display()
        )))
    }

    /// Holds `path` as volume `id`'s staging path while it is staged: FAILED_PRECONDITION
    /// when another volume holds it (staging B there would unmount A's filesystem under A's
    /// pods, and a later publish of A would show B).
    pub(super) fn claim(&self, path: &Path, id: &str) -> Result<PathClaim<'_>> {
        let map = self.map();
        let mut claims = self.claims.lock().recover();
        Self::free_in(&map, &claims, path, id)?;
        claims.insert(path.to_path_buf(), id.to_string());
        Ok(PathClaim {
            node: self,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Staged>>> {
        self.staged.lock().recover()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Staged>> {
        self.map().get(id).cloned()
    }

    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Whether `id` is staged (the controller refuses to delete it then).
    pub fn is_staged(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Persists the record of `s` (its publish targets changed).
    pub(super) fn persist(&self, s: &Staged) -> Result<()> {
        self.records.save(&s.record())
    }

    /// Flushes every staged volume's image (at shutdown: what was written is durable even if
    /// the block devices die with this process).
    pub fn flush_all(&self) {
        let staged: Vec<(String, Arc<Staged>)> = self
            .map()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, s) in staged {
            let Some(image) = &s.image else { continue };
            match BlockDevice::flush(&**image) {
                Ok(()) => tracing::info!(volume = %id, "flushed"),
                Err(e) => tracing::error!(volume = %id, error = %e, "flush failed"),
            }
        }
    }

    /// Staged volumes whose device a new process could take over (kernel nbd via netlink).
    pub fn handable(&self) -> usize {
        self.map()
            .values()
            .filter(|s| {
                s.attached
                    .lock()
                    .recover()
                    .as_ref()
                    .is_some_and(|a| a.reattach_index().is_some())
            })
            .count()
    }

    /// Lets every staged volume's device outlive this process, which is about to exit: a
    /// kernel nbd device waits for the next process to take it over, and tearing down an
    /// nbdfuse one would only fail against the mounts pods still use. (Dropping an
    /// attachment tears it down.)
    pub fn leave_attached(&self) {
        for s in self.map().values() {
            if let Some(a) = s.attached.lock().recover().take() {
                tracing::info!(volume = %s.volume_id, device = %a.device().display(), "left attached");
                std::mem::forget(a);
            }
        }
    }

    /// Lets go of devices adopted in a handover that is being refused: stops serving them
    /// and closes their heads, so that the previous process can serve them again.
    pub(super) fn release(&self, ids: &[String]) {
        for id in ids {
            let Some(s) = self.map().remove(id) else {
                continue;
            };
            let attached = s.attached.lock().recover().take();
            if let Some(mut a) = attached
                && let Err(e) = a.pause()
            {
                tracing::error!(volume = %id, error = %e, "releasing an adopted device");
            }
            if let Some(image) = &s.image
                && let Err(e) = image.close()
            {
                tracing::error!(volume = %id, error = %e, "closing an adopted head");
            }
        }
    }

    /// Takes back what a previous process staged, from the stage records: a kernel nbd
    /// device set up through netlink is still there, waiting for a server, and gets one
    /// (RECONFIGURE with fresh sockets); a device that ended with that process (nbdfuse,
    /// ioctls), or one that cannot be taken over, is kept as *lost*: listed, reported
    /// abnormal, and cleared by unpublish and unstage. Records of deleted volumes are dropped.
    /// Devices in `incoming` (a handover) are served on the sockets given instead.
    pub fn recover(
        &self,
        state: &State,
        attacher: &Attacher,
        state_dir: &Path,
        keys: &KeyStore,
        mut incoming: Option<&mut HashMap<String, super::handoff::Incoming>>,
        metrics: &Arc<PluginMetrics>,
    ) -> Result<Recovered> {
        let mut found = Recovered::default();
        let boot = staging::boot_id();
        for rec in self.records.load()? {
            let id = rec.volume_id.clone();
            if rec.boot_id != boot {
                tracing::info!(volume = %id, "stage record from an earlier boot: dropped");
                self.records.remove(&id)?;
                found.previous_boot += 1;
                continue;
            }
            let work = attach_dir(state_dir, &id);
            let Some(volume) = state.volume(&id) else {
                tracing::warn!(volume = %id, "stage record of a volume that no longer exists");
                if let Err(e) = clear_leftovers(&rec.staging, &work, attacher, &id, Claim::Record) {
                    tracing::warn!(volume = %id, error = %e, "clearing its leftovers");
                }
                self.records.remove(&id)?;
                keys.remove(&id)?;
                found.forgotten += 1;
                continue;
            };
            let handed = incoming.as_deref_mut().and_then(|m| m.remove(&id)).filter(
                |h| matches!(rec.attachment, Attachment::Nbd { index } if index == h.index),
            );
            let adopting = handed.is_some();
            let qos = Arc::new(Qos::new(volume.limits()));
            let passphrase = kept_passphrase(keys, volume);
            let kept = passphrase.as_ref().ok().cloned().flatten();
            let taken = match rec.attachment {
                Attachment::Nbd { index } => passphrase
                    .and_then(|p| open_head(state, volume, &rec.capability, p, metrics))
                    .and_then(|image| {
                        let server = serve_image(&id, image.clone(), qos.clone(), metrics);
                        let volume = Volume {
                            id: &id,
                            server,
                            work_dir: &work,
                        };
                        match handed {
                            Some(h) => attacher.adopt(volume, index, h.sockets),
                            None => attacher.reattach(volume, index),
                        }
                        .map(|attached| (image, attached))
                    })
                    .map_err(|e| format!("could not take nbd{index} over ({e})")),
                Attachment::NbdIoctl => Err("a device set up through the nbd ioctls ends with \
                    the process that served it"
                    .to_string()),
                Attachment::Nbdfuse => Err("an nbdfuse-attached device ends with the process \
                    that served it"
                    .to_string()),
            }
            .map_err(|why| {
                format!(
                    "the plugin restarted and {why}; unpublish and unstage the volume (restart \
                     its pods) to stage it again"
                )
            });
            let (image, attached, lost) = match taken {
                Ok((image, attached)) => {
                    if adopting {
                        tracing::info!(volume = %id, device = %rec.device.display(), "took over from the previous process");
                        found.adopted.push(id.clone());
                        metrics.takeover(Takeover::Handover);
                    } else {
                        tracing::info!(volume = %id, device = %rec.device.display(), "reattached");
                        found.reattached += 1;
                        metrics.takeover(Takeover::Reattach);
                    }
                    if thaw_if_frozen(&work, &rec.staging) {
                        found.thawed += 1;
                    }
                    (Some(image), Some(attached), None)
                }
                Err(why) if adopting => {
                    tracing::error!(volume = %id, device = %rec.device.display(), "{why}");
                    found.not_adopted.push(id.clone());
                    continue;
                }
                Err(why) => {
                    tracing::error!(volume = %id, device = %rec.device.display(), "{why}");
                    found.lost += 1;
                    metrics.condition(&id, Some(Reason::Lost), &why);
                    (None, None, Some(why))
                }
            };
            self.map().insert(
                id.clone(),
                Arc::new(Staged {
                    volume_id: id,
                    staging: rec.staging,
                    cap: rec.capability,
                    device: rec.device,
                    attachment: rec.attachment,
                    image,
                    attached: Mutex::new(attached),
                    lost,
                    published: Mutex::new(rec.published),
                    boot_id: rec.boot_id,
                    qos,
                    passphrase: kept,
                }),
            );
        }
        Ok(found)
    }
}

/// The passphrase kept for volume `rec` if it is encrypted (`None` if it is not), or why
/// there is none.
pub(super) fn kept_passphrase(keys: &KeyStore, rec: &VolumeRecord) -> Result<Option<Passphrase>> {
    if !Params::from_canonical(&rec.parameters)?.encrypted {
        return Ok(None);
    }
    keys.get(&rec.id)?.map(Some).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume {} is encrypted and its passphrase is not in the key store {} (it is \
             kept only until the node reboots)",
            rec.id,
            keys.dir().display()
        ))
    })
}

/// Every second, takes back the kernel nbd devices of volumes reported lost whose device
/// still names them: a process that served them ended after this one loaded (an older
/// plugin without handovers beside this one during an upgrade, a handover that failed
/// halfway). Ends when this process hands its volumes over.
pub(super) fn start_healer(plugin: std::sync::Arc<super::Plugin>) {
    let spawned = std::thread::Builder::new()
        .name("heal".into())
        .spawn(move || {
            while !plugin.handoff.is_done() {
                std::thread::sleep(std::time::Duration::from_secs(1));
                heal(&plugin);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "lost volumes will not be taken back");
    }
}

/// One pass of [`start_healer`]; returns how many volumes it took back.
pub(super) fn heal(plugin: &super::Plugin) -> usize {
    let lost: Vec<(Arc<Staged>, u32)> = plugin
        .node
        .map()
        .values()
        .filter(|s| s.lost.is_some())
        .filter_map(|s| match s.attachment {
            Attachment::Nbd { index } => Some((s.clone(), index)),
            _ => None,
        })
        .collect();
    let mut healed = 0;
    for (s, index) in lost {
        let id = &s.volume_id;
        let backend = plugin
            .attacher
            .kernel
            .sysfs
            .join(format!("block/nbd{index}/backend"));
        if std::fs::read_to_string(&backend)
            .ok()
            .as_deref()
            .map(str::trim)
            != Some(id.as_str())
        {
            continue;
        }
        // Unpublish, unstage and snapshots hold it: try again next time.
        let Ok(_held) = plugin.locks.try_lock(id.clone()) else {
            continue;
        };
        let opened = (|| {
            let st = plugin.state()?;
            let rec = st
                .volume(id)
                .ok_or_else(|| Error::NotFound(format!("no volume {id:?}")))?;
            let passphrase = kept_passphrase(&plugin.keys, rec)?;
            let image = open_layer(
                id,
                st.layers_dir(),
                &st.layer_path(&rec.head),
                &s.cap,
                passphrase.clone(),
                &plugin.metrics,
            )?;
            Ok::<_, Error>((image, Arc::new(Qos::new(rec.limits())), passphrase))
        })();
        // Still held by the process that serves it: not lost after all, not yet.
        let Ok((image, qos, image_passphrase)) = opened else {
            continue;
        };
        let work = attach_dir(&plugin.config.state_dir, id);
        let volume = Volume {
            id,
            server: serve_image(id, image.clone(), qos.clone(), &plugin.metrics),
            work_dir: &work,
        };
        match plugin.attacher.reattach(volume, index) {
            Ok(attached) => {
                tracing::warn!(volume = %id, device = %s.device.display(), "took back a device whose server had gone");
                plugin.metrics.takeover(Takeover::Heal);
                plugin.metrics.clear_condition(id, Reason::Lost);
                thaw_if_frozen(&work, &s.staging);
                let healed_one = Staged {
                    volume_id: id.clone(),
                    staging: s.staging.clone(),
                    cap: s.cap.clone(),
                    device: s.device.clone(),
                    attachment: s.attachment,
                    image: Some(image),
                    attached: Mutex::new(Some(attached)),
                    lost: None,
                    published: Mutex::new(s.published().clone()),
                    boot_id: s.boot_id.clone(),
                    qos,
                    passphrase: image_passphrase.clone(),
                };
                plugin.node.map().insert(id.clone(), Arc::new(healed_one));
                healed += 1;
            }
            Err(e) => tracing::debug!(volume = %id, error = %e, "not taken back yet"),
        }
    }
    healed
}

/// The private directory of a staged volume's attachment (the nbdfuse socket and FUSE
/// mount): `STATE/attach/<vol-id>`.
pub(super) fn attach_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("attach").join(id)
}

/// Marks a staged volume's filesystem as being frozen (for a snapshot) until
/// [`thaw_if_frozen`] or [`unmark_frozen`]: a process that ends in between leaves the mark, and
/// the next one thaws the filesystem, which would otherwise block its writers for good.
pub(super) fn mark_frozen(work: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(work)?;
    std::fs::write(work.join(FROZEN), b"")
}

/// Whether the filesystem of the volume whose attachment directory is `work` is frozen
/// (for a snapshot) now.
pub(super) fn is_frozen(work: &Path) -> bool {
    work.join(FROZEN).exists()
}

pub(super) fn unmark_frozen(work: &Path) {
    let _ = std::fs::remove_file(work.join(FROZEN));
}

/// The mark [`mark_frozen`] leaves.
const FROZEN: &str = "frozen";

/// Thaws the filesystem at `staging` if a previous process froze it and ended before
/// thawing; true if it did.
fn thaw_if_frozen(work: &Path, staging: &Path) -> bool {
    if !work.join(FROZEN).exists() {
        return false;
    }
    let out = Command::new("fsfreeze").arg("-u").arg(staging).output();
    let thawed = out.as_ref().is_ok_and(|o| o.status.success());
    match &out {
        Ok(_) if thawed => {
            tracing::warn!(staging = %staging.display(), "thawed a filesystem a previous process left frozen");
        }
        // Not frozen after all (the process ended before freezing it).
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            tracing::info!(staging = %staging.display(), "fsfreeze -u: {}", why.trim());
        }
        Err(e) => tracing::error!(staging = %staging.display(), error = %e, "fsfreeze -u"),
    }
    unmark_frozen(work);
    thawed
}

/// Opens a volume's head layer for staging: writable unless the capability is read-only,
/// backing files confined to `layers/`.
pub(super) fn open_head(
    state: &State,
    rec: &VolumeRecord,
    cap: &Checked,
    passphrase: Option<Passphrase>,
    metrics: &Arc<PluginMetrics>,
) -> Result<Arc<LiveImage>> {
    open_layer(
        &rec.id,
        state.layers_dir(),
        &state.layer_path(&rec.head),
        cap,
        passphrase,
        metrics,
    )
}

/// How a staged volume's layers are opened (`passphrase`: an encrypted volume's).
pub(super) fn head_options(
    layers: PathBuf,
    cap: &Checked,
    passphrase: Option<Passphrase>,
) -> OpenOptions {
    OpenOptions {
        writable: !cap.read_only_mode,
        backing: BackingPolicy::ConfineTo(layers),
        passphrase,
        ..OpenOptions::default()
    }
}

/// Opens volume `id`'s head layer `head`.
pub(super) fn open_layer(
    id: &str,
    layers: PathBuf,
    head: &Path,
    cap: &Checked,
    passphrase: Option<Passphrase>,
    metrics: &Arc<PluginMetrics>,
) -> Result<Arc<LiveImage>> {
    Image::open(head, &head_options(layers, cap, passphrase))
        .map(|img| Arc::new(LiveImage::new(img).named(id).counted(metrics.clone())))
        .map_err(|e| Error::engine(format!("opening {}", head.display()), e))
}

/// An NBD server whose export 0 is `image`, held to `qos`, counting its requests when
/// metrics are on.
pub(super) fn serve_image(
    id: &str,
    image: Arc<LiveImage>,
    qos: Arc<Qos>,
    metrics: &PluginMetrics,
) -> Arc<Server> {
    let device: Arc<dyn BlockDevice> = image;
    let mut export = Export::new(id.to_string(), device);
    export.stats = metrics.io_of(id);
    export.qos = Some(qos);
    Arc::new(Server::new(
        vec![export],
        Limits {
            io_flusher: true,
            ..Limits::default()
        },
    ))
}

/// Who names the staging path whose leftovers are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// A stage record of this volume: whatever is mounted there was mounted by us.
    Record,
    /// A request: only a mount of a device provably this volume's is removed
    /// ([`Attacher::made_for`]); anything else there is refused and left alone.
    Request,
}

/// Unmounts what a previous run of the plugin may have left for this volume: the staging
/// mount, kernel nbd devices still naming the volume, loop devices on its FUSE file, the
/// FUSE mount itself (its nbdfuse lost its server with that run).
pub(super) fn clear_leftovers(
    staging: &Path,
    work: &Path,
    attacher: &Attacher,
    id: &str,
    claim: Claim,
) -> Result<()> {
    // Lazily: a filesystem on a device whose server is gone may block on I/O.
    mounts::unmount_lazily_checked(staging, |source| {
        if claim == Claim::Record || attacher.made_for(source, id, work) {
            return Ok(());
        }
        tracing::warn!(
            volume = id,
            staging = %staging.display(),
            source = %source.display(),
            "refused to unmount a mount that is not this volume's"
        );
        Err(Error::FailedPrecondition(format!(
            "{} has {} mounted, which is not volume {id}'s: left alone",
            staging.display(),
            source.display()
        )))
    })?;
    attacher.disconnect_stale(id)?;
    let disk = work.join("fuse/disk");
    if let Ok(list) = run(Command::new("losetup")
        .args(["-n", "-O", "NAME", "-j"])
        .arg(&disk))
    {
        for dev in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let _ = run(Command::new("losetup").arg("-d").arg(dev));
        }
    }
    let fuse = work.join("fuse");
    stop_stale_nbdfuse(&work.join("fuse.pid"), &fuse);
    if mounts::is_mount_point(&fuse)? {
        run(Command::new("umount").arg("-l").arg(&fuse))?;
    }
    Ok(())
}

/// Stops the nbdfuse a previous run left (its NBD connection died with that run, but it
/// keeps its FUSE mount until told): the pid from its pid file, if that process is an
/// nbdfuse serving `mountpoint`.
fn stop_stale_nbdfuse(pidfile: &Path, mountpoint: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let ours = args.first().is_some_and(|a| a.ends_with(b"nbdfuse"))
        && args
            .iter()
            .any(|a| a.starts_with(mountpoint.as_os_str().as_encoded_bytes()));
    if !ours {
        return;
    }
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        for _ in 0..200 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let _ = std::fs::remove_file(pidfile);
}
