//! The Node service: stage (open the head layer, export it, attach a block device, make and
//! mount a filesystem), publish (bind mounts), and their inverses.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use csi_proto::v1::node_server::Node;
use csi_proto::v1::node_service_capability::{Rpc, Type as CapType, rpc};
use csi_proto::v1::*;
use qcow2_engine::{BackingPolicy, Image, OpenOptions};
use tonic::{Request, Response, Status};

use super::capability::{self, Checked};
use super::mounts::{self, run};
use super::params::{FsType, Params};
use super::state::AccessType;
use super::{Plugin, failpoint};
use crate::attach::{self, Attached, KernelOptions, Volume};
use crate::error::{Error, Result};
use crate::nbd::{BlockDevice, Export, Limits, Server};

/// A staged volume: its export and device live as long as this does.
#[derive(Debug)]
pub struct Staged {
    pub staging: PathBuf,
    pub cap: Checked,
    pub device: PathBuf,
    /// The open head layer (flushed at shutdown, grown by NodeExpandVolume).
    image: Arc<Image>,
    attached: Mutex<Option<Attached>>,
    published: Mutex<BTreeSet<PathBuf>>,
}

/// Volumes staged on this node.
#[derive(Debug, Default)]
pub struct NodeState {
    staged: Mutex<HashMap<String, Arc<Staged>>>,
}

impl NodeState {
    pub fn get(&self, id: &str) -> Option<Arc<Staged>> {
        self.staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn count(&self) -> usize {
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether `id` is staged (the controller refuses to delete it then).
    pub fn is_staged(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Flushes every staged volume's image (at shutdown: what was written is durable even if
    /// the block devices die with this process).
    pub fn flush_all(&self) {
        let staged: Vec<(String, Arc<Staged>)> = self
            .staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, s) in staged {
            match s.image.flush() {
                Ok(()) => tracing::info!(volume = %id, "flushed"),
                Err(e) => tracing::error!(volume = %id, error = %e, "flush failed"),
            }
        }
    }
}

/// Node: stage, publish, stats, info.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

fn required(v: &str, what: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

fn absolute(p: &str, what: &str) -> Result<PathBuf> {
    required(p, what)?;
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!("{what} must be absolute")));
    }
    Ok(path)
}

/// Unmounts what a previous run of the plugin may have left for this volume: the staging
/// mount, loop devices on its FUSE file, the FUSE mount itself (its nbdfuse died with us).
fn clear_leftovers(staging: &Path, work: &Path) -> Result<()> {
    if mounts::is_mount_point(staging)? {
        run(Command::new("umount").arg("-l").arg(staging))?;
    }
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

/// Whether the ext4 filesystem on `device` is smaller than the device (after an expansion).
fn ext4_smaller_than_device(device: &Path) -> Result<bool> {
    let header = run(Command::new("dumpe2fs").arg("-h").arg(device))?;
    let field = |name: &str| -> Option<u64> {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let (Some(blocks), Some(block)) = (field("Block count:"), field("Block size:")) else {
        return Err(Error::Internal(format!(
            "dumpe2fs {}: no block count or size",
            device.display()
        )));
    };
    let dev_size: u64 = run(Command::new("blockdev").arg("--getsize64").arg(device))?
        .parse()
        .map_err(|e| Error::Internal(format!("blockdev --getsize64: {e}")))?;
    Ok(blocks.saturating_mul(block) + block <= dev_size)
}

/// Grows an unmounted ext4 filesystem to its device (offline resize needs a clean check
/// first; it also needs no CAP_SYS_RESOURCE, unlike an online one).
fn grow_ext4_offline(device: &Path) -> Result<()> {
    let fsck = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .output()
        .map_err(|e| Error::Internal(format!("e2fsck: {e}")))?;
    // 0: clean, 1: errors corrected; anything else needs a human.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(Error::FailedPrecondition(format!(
            "e2fsck {} before growing it: {}",
            device.display(),
            String::from_utf8_lossy(&fsck.stdout).trim()
        )));
    }
    run(Command::new("resize2fs").arg(device)).map(drop)
}

/// Grows the filesystem mounted at `mountpoint` from `device` to the device's size (a no-op
/// when it already fills it).
fn grow_fs(device: &Path, mountpoint: &Path) -> Result<()> {
    match mounts::fs_on(device)?.as_deref() {
        Some("ext4") => run(Command::new("resize2fs").arg(device)).map(drop),
        Some("xfs") => run(Command::new("xfs_growfs").arg(mountpoint)).map(drop),
        _ => Ok(()),
    }
}

impl NodeService {
    fn plugin(&self) -> &Plugin {
        &self.0
    }

    fn stage(&self, req: NodeStageVolumeRequest) -> Result<()> {
        let plugin = self.plugin();
        required(&req.volume_id, "volume_id")?;
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let cap = capability::check(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let rec = plugin.volume_record(&req.volume_id)?;
        let _held = plugin.locks.try_lock(req.volume_id.clone())?;
        if let Some(s) = plugin.node.get(&req.volume_id) {
            if s.staging == staging
                && s.cap.access == cap.access
                && s.cap.read_only_mode == cap.read_only_mode
            {
                return Ok(()); // a repeat
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} is staged at {} with another capability",
                req.volume_id,
                s.staging.display()
            )));
        }
        let max = plugin.config.max_volumes;
        if max > 0 && plugin.node.count() as i64 >= max {
            return Err(Error::ResourceExhausted(format!(
                "this node stages at most {max} volumes"
            )));
        }
        let params = Params::from_canonical(&rec.parameters)?;
        let fs = cap.fs_type.or(params.fs_type).unwrap_or(FsType::Ext4);
        let work = plugin.config.state_dir.join("attach").join(&rec.id);
        clear_leftovers(&staging, &work)?;
        let layers = plugin.state()?.layers_dir();
        let head = plugin.state()?.layer_path(&rec.head);
        let image = Image::open(
            &head,
            &OpenOptions {
                writable: !cap.read_only_mode,
                backing: BackingPolicy::ConfineTo(layers),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| Error::Internal(format!("opening {}: {e}", head.display())))?;
        // ControllerExpandVolume of a staged volume only recorded the size: grow to it now.
        if image.size() < rec.size && !cap.read_only_mode {
            image
                .resize(rec.size)
                .and_then(|()| image.flush())
                .map_err(|e| Error::Internal(format!("growing {}: {e}", head.display())))?;
        }
        let image = Arc::new(image);
        let device: Arc<dyn BlockDevice> = image.clone();
        let server = Arc::new(Server::new(
            vec![Export::new(rec.id.clone(), device)],
            Limits {
                io_flusher: true,
                ..Limits::default()
            },
        ));
        let attached = attach::attach(
            plugin.config.attach,
            Volume {
                id: &rec.id,
                server,
                work_dir: &work,
            },
            &KernelOptions::default(),
        )?;
        failpoint("stage-after-attach");
        let dev = attached.device().to_path_buf();
        let finish = || -> Result<()> {
            if cap.access == AccessType::Mount {
                // The filesystem on the device once this is done: found, or made.
                let on_disk = match mounts::fs_on(&dev)? {
                    None if cap.read_only_mode => {
                        return Err(Error::FailedPrecondition(
                            "a blank volume cannot be formatted read-only".into(),
                        ));
                    }
                    None => {
                        let mut mkfs = Command::new(format!("mkfs.{}", fs.as_str()));
                        mkfs.arg("-q").args(&params.mkfs_options).arg(&dev);
                        run(&mut mkfs)?;
                        failpoint("stage-after-mkfs");
                        fs.as_str().to_string()
                    }
                    Some(t) if t == fs.as_str() || cap.fs_type.is_none() => {
                        // After an expansion the device is larger than the filesystem.
                        if t == "ext4" && !cap.read_only_mode && ext4_smaller_than_device(&dev)? {
                            grow_ext4_offline(&dev)?;
                        }
                        t
                    }
                    Some(t) => {
                        return Err(Error::FailedPrecondition(format!(
                            "the volume holds {t}, not {}",
                            fs.as_str()
                        )));
                    }
                };
                std::fs::create_dir_all(&staging)
                    .map_err(|e| Error::Internal(format!("creating {}: {e}", staging.display())))?;
                let mut opts = cap.mount_flags.clone();
                if cap.read_only_mode {
                    opts.push("ro".into());
                }
                let mut mount = Command::new("mount");
                if !opts.is_empty() {
                    mount.arg("-o").arg(opts.join(","));
                }
                run(mount.arg(&dev).arg(&staging))?;
                failpoint("stage-after-mount");
                if !cap.read_only_mode && on_disk == "xfs" {
                    // xfs grows only mounted (a no-op when it already fills the device).
                    run(Command::new("xfs_growfs").arg(&staging))?;
                }
            }
            Ok(())
        };
        if let Err(e) = finish() {
            // Undo in reverse: a mount made before the failing step, then the device.
            let _ = mounts::unmount_if_mounted(&staging);
            let _ = attached.detach();
            return Err(e);
        }
        plugin
            .node
            .staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                rec.id.clone(),
                Arc::new(Staged {
                    staging,
                    cap,
                    device: dev,
                    image,
                    attached: Mutex::new(Some(attached)),
                    published: Mutex::new(BTreeSet::new()),
                }),
            );
        tracing::info!(volume = %rec.id, "staged");
        Ok(())
    }

    fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<()> {
        let plugin = self.plugin();
        required(&req.volume_id, "volume_id")?;
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let _held = plugin.locks.try_lock(req.volume_id.clone())?;
        let Some(s) = plugin.node.get(&req.volume_id) else {
            // Not staged by this process: clear what a previous one may have left.
            if crate::csi::state::is_volume_id(&req.volume_id) {
                let work = plugin.config.state_dir.join("attach").join(&req.volume_id);
                clear_leftovers(&staging, &work)?;
            }
            return Ok(());
        };
        if !s
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is still published",
                req.volume_id
            )));
        }
        if s.cap.access == AccessType::Mount {
            mounts::unmount_if_mounted(&s.staging)?;
        }
        if let Some(a) = s.attached.lock().unwrap_or_else(|e| e.into_inner()).take() {
            a.detach()?;
        }
        plugin
            .node
            .staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.volume_id);
        tracing::info!(volume = %req.volume_id, "unstaged");
        Ok(())
    }

    fn publish(&self, req: NodePublishVolumeRequest) -> Result<()> {
        required(&req.volume_id, "volume_id")?;
        let staging = absolute(&req.staging_target_path, "staging_target_path")?;
        let target = absolute(&req.target_path, "target_path")?;
        let cap = capability::check(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let _held = self.0.locks.try_lock(req.volume_id.clone())?;
        let s = self.0.node.get(&req.volume_id).ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {} is not staged", req.volume_id))
        })?;
        if s.staging != staging {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged at {}, not {}",
                req.volume_id,
                s.staging.display(),
                staging.display()
            )));
        }
        if s.cap.access != cap.access {
            return Err(Error::FailedPrecondition(
                "the publish access type differs from the staged one".into(),
            ));
        }
        if cap.single_writer {
            let published = s.published.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(other) = published.iter().find(|t| **t != target) {
                return Err(Error::FailedPrecondition(format!(
                    "SINGLE_NODE_SINGLE_WRITER: volume {} is already published at {}",
                    req.volume_id,
                    other.display()
                )));
            }
        }
        let source = match cap.access {
            AccessType::Mount => {
                std::fs::create_dir_all(&target)
                    .map_err(|e| Error::Internal(format!("creating {}: {e}", target.display())))?;
                s.staging.clone()
            }
            AccessType::Block => {
                if !target.exists() {
                    std::fs::File::create(&target).map_err(|e| {
                        Error::Internal(format!("creating {}: {e}", target.display()))
                    })?;
                }
                s.device.clone()
            }
        };
        if !mounts::is_mount_point(&target)? {
            run(Command::new("mount")
                .arg("--bind")
                .arg(&source)
                .arg(&target))?;
            if req.readonly || cap.read_only_mode {
                run(Command::new("mount")
                    .args(["-o", "remount,bind,ro"])
                    .arg(&target))?;
            }
        }
        s.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target);
        Ok(())
    }

    fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<()> {
        required(&req.volume_id, "volume_id")?;
        let target = absolute(&req.target_path, "target_path")?;
        let _held = self.0.locks.try_lock(req.volume_id.clone())?;
        mounts::unmount_if_mounted(&target)?;
        // We created the target: a directory (mount) or a file (block).
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(md) if md.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::Internal(format!("removing {}: {e}", target.display())))?;
        if let Some(s) = self.0.node.get(&req.volume_id) {
            s.published
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&target);
        }
        Ok(())
    }

    /// Grows a staged volume online: the image, the block device, the filesystem. Checks
    /// that the device can grow before changing anything.
    fn expand(&self, req: NodeExpandVolumeRequest) -> Result<u64> {
        required(&req.volume_id, "volume_id")?;
        let path = absolute(&req.volume_path, "volume_path")?;
        let mut rec = self.0.volume_record(&req.volume_id)?;
        let _held = self.0.locks.try_lock(req.volume_id.clone())?;
        let s = self.0.node.get(&req.volume_id).ok_or_else(|| {
            Error::NotFound(format!("volume {} is not staged here", req.volume_id))
        })?;
        let published = s
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&path);
        if s.staging != path && !published {
            return Err(Error::NotFound(format!(
                "volume {} is not at {}",
                req.volume_id,
                path.display()
            )));
        }
        let size = match &req.capacity_range {
            Some(r) if r.required_bytes > 0 || r.limit_bytes > 0 => {
                super::controller::size_for(Some(r))?.max(rec.size)
            }
            _ => rec.size,
        };
        let mut attached = s.attached.lock().unwrap_or_else(|e| e.into_inner());
        let attached = attached
            .as_mut()
            .ok_or_else(|| Error::FailedPrecondition("the volume is being unstaged".into()))?;
        if size > s.image.size() {
            if !attached.can_resize() {
                return attached.resize(size).map(|()| size); // the explanation
            }
            s.image
                .resize(size)
                .and_then(|()| s.image.flush())
                .map_err(|e| Error::Internal(format!("growing the image: {e}")))?;
            attached.resize(size)?;
        }
        if s.cap.access == AccessType::Mount {
            grow_fs(&s.device, &s.staging)?;
        }
        if size > rec.size {
            rec.size = size;
            self.0.state()?.put_volume(rec)?;
        }
        tracing::info!(volume = %req.volume_id, size, "expanded on the node");
        Ok(size)
    }

    fn stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let path = PathBuf::from(&req.volume_path);
        let rec = self.0.volume_record(&req.volume_id)?;
        let s = self.0.node.get(&req.volume_id).ok_or_else(|| {
            Error::NotFound(format!("volume {} is not staged here", req.volume_id))
        })?;
        let known = s.staging == path
            || s.published
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&path);
        if !known {
            return Err(Error::NotFound(format!(
                "volume {} is not at {}",
                req.volume_id,
                path.display()
            )));
        }
        let device_present = s.device.exists();
        let usage = match s.cap.access {
            AccessType::Block => vec![VolumeUsage {
                available: 0,
                total: rec.size as i64,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }],
            AccessType::Mount => {
                let st = rustix::fs::statvfs(&path)
                    .map_err(|e| Error::Internal(format!("statvfs {}: {e}", path.display())))?;
                let f = st.f_frsize;
                vec![
                    VolumeUsage {
                        available: (st.f_bavail * f) as i64,
                        total: (st.f_blocks * f) as i64,
                        used: (st.f_blocks.saturating_sub(st.f_bfree) * f) as i64,
                        unit: volume_usage::Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: st.f_favail as i64,
                        total: st.f_files as i64,
                        used: st.f_files.saturating_sub(st.f_ffree) as i64,
                        unit: volume_usage::Unit::Inodes as i32,
                    },
                ]
            }
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: !device_present,
                message: if device_present {
                    String::new()
                } else {
                    format!("the block device {} is gone", s.device.display())
                },
            }),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let this = self.clone();
        self.0
            .blocking(move || this.stage(req.into_inner()))
            .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let this = self.clone();
        self.0
            .blocking(move || this.unstage(req.into_inner()))
            .await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let this = self.clone();
        self.0
            .blocking(move || this.publish(req.into_inner()))
            .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let this = self.clone();
        self.0
            .blocking(move || this.unpublish(req.into_inner()))
            .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let this = self.clone();
        Ok(Response::new(
            self.0
                .blocking(move || this.stats(req.into_inner()))
                .await?,
        ))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let this = self.clone();
        let size = self
            .0
            .blocking(move || this.expand(req.into_inner()))
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.config.node_id.clone(),
            max_volumes_per_node: self.0.config.max_volumes,
            accessible_topology: Some(self.0.topology()),
        }))
    }
}
