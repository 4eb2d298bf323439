//! The Node service: stage (open the head layer, export it, attach a block device, make and
//! mount a filesystem), publish (bind mounts), and their inverses.

use qcow2_engine::sync::Recover;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use csi_proto::v1::node_server::Node;
use csi_proto::v1::node_service_capability::{Rpc, Type as CapType, rpc};
use csi_proto::v1::*;
use tonic::{Request, Response, Status};

use super::capability;
use super::params::{FsType, Params};
use super::staged::{Claim, Staged, attach_dir, clear_leftovers, open_layer, serve_image};
use super::staging::{self, Attachment};
use super::state::AccessType;
use super::{Plugin, failpoint};
use super::{keys, options, paths, rpclog};
use crate::attach::{self, Volume};
use crate::error::{Error, Result};
use crate::nbd::BlockDevice;
use crate::nbd::qos::Qos;

/// Node: stage, publish, stats, info.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

fn required(v: &str, what: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    Ok(())
}

impl NodeService {
    fn plugin(&self) -> &Plugin {
        &self.0
    }

    /// A staging or target path from a request, resolved and confined to the kubelet
    /// directory ([`paths::confine`]).
    fn confine(&self, raw: &str, what: &str) -> Result<PathBuf> {
        paths::confine(raw, what, &self.0.config.kubelet_dir)
    }

    fn stage(&self, req: NodeStageVolumeRequest) -> Result<()> {
        let plugin = self.plugin();
        required(&req.volume_id, "volume_id")?;
        let staging = self.confine(&req.staging_target_path, "staging_target_path")?;
        let cap = capability::check(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?,
        )?;
        let encrypted =
            Params::from_canonical(&plugin.volume_record(&req.volume_id)?.parameters)?.encrypted;
        let passphrase = encrypted
            .then(|| keys::from_secrets(&req.secrets, "node-stage"))
            .transpose()?;
        failpoint("node-before-lock");
        let _held = plugin.locks.try_lock(req.volume_id.clone())?;
        // Read under the lock: a snapshot taken meanwhile changed the head.
        let rec = plugin.volume_record(&req.volume_id)?;
        if !rec.access.is_empty() && !rec.access.contains(&cap.access) {
            // A block volume's bytes are the tenant's: the host kernel must not parse
            // them as a filesystem.
            tracing::warn!(volume = %rec.id, access = ?cap.access, "refused an access type the volume was not created for");
            return Err(Error::InvalidArgument(format!(
                "volume {} was created for {:?} access, not {:?}",
                rec.id, rec.access, cap.access
            )));
        }
        let _claim = plugin.node.claim(&staging, &rec.id)?;
        let work = attach_dir(&plugin.config.state_dir, &rec.id);
        if let Some(s) = plugin.node.get(&req.volume_id) {
            if let Some(why) = &s.lost {
                // Lost at a restart: stage it afresh, unless pods still use the dead mount.
                // Targets no longer mounted (the CO cleaned them up) do not count.
                if let Some(target) = s.in_use().first() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {}: {why} (still published at {})",
                        req.volume_id,
                        target.display()
                    )));
                }
                self.release(&s, &work)?;
            } else if s.staging == staging
                && s.cap.access == cap.access
                && s.cap.read_only_mode == cap.read_only_mode
            {
                // A repeat; with an encrypted volume, only with the passphrase it opened with.
                let same = match (&s.passphrase, &passphrase) {
                    (Some(a), Some(b)) => a.as_bytes() == b.as_bytes(),
                    _ => true,
                };
                if !same {
                    tracing::warn!(volume = %req.volume_id, "refused a repeated stage with another passphrase");
                    return Err(Error::InvalidArgument(format!(
                        "volume {} is staged, unlocked by another passphrase than this \
                         request's",
                        req.volume_id
                    )));
                }
                return Ok(());
            } else {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} with another capability",
                    req.volume_id,
                    s.staging.display()
                )));
            }
        }
        let max = plugin.config.max_volumes;
        if max > 0 && plugin.node.count() as i64 >= max {
            return Err(Error::ResourceExhausted(format!(
                "this node stages at most {max} volumes"
            )));
        }
        let params = Params::from_canonical(&rec.parameters)?;
        let fs = cap.fs_type.or(params.fs_type).unwrap_or(FsType::Ext4);
        if cap.access == AccessType::Mount {
            options::check_mkfs(fs, &params.mkfs_options)?;
        }
        clear_leftovers(&staging, &work, &plugin.attacher, &rec.id, Claim::Request)?;
        let (layers, head) = {
            let st = plugin.state()?;
            (st.layers_dir(), st.layer_path(&rec.head))
        };
        // A wrong passphrase ends the stage here, before anything is attached or kept.
        let image = open_layer(
            &rec.id,
            layers,
            &head,
            &cap,
            passphrase.clone(),
            &plugin.metrics,
        )?;
        // Kept before the device exists, for whichever process serves it next.
        let kept = passphrase
            .as_ref()
            .map(|p| plugin.keys.keep(&rec.id, p))
            .transpose()?;
        // The record is authoritative for the size: an image behind it grows to it now.
        if image.size() < rec.size && !cap.read_only_mode {
            image.resize(rec.size)?;
        }
        let qos = Arc::new(Qos::new(rec.limits()));
        let attached = plugin.attacher.attach(Volume {
            id: &rec.id,
            server: serve_image(&rec.id, image.clone(), qos.clone(), &plugin.metrics),
            work_dir: &work,
        })?;
        failpoint("stage-after-attach");
        let dev = attached.device().to_path_buf();
        let finish = || -> Result<()> {
            if cap.access == AccessType::Mount {
                // The filesystem on the device once this is done: found, or made.
                let host = &plugin.host;
                let on_disk = match host.fs_on(&dev)? {
                    None if cap.read_only_mode => {
                        return Err(Error::FailedPrecondition(
                            "a blank volume cannot be formatted read-only".into(),
                        ));
                    }
                    None => {
                        host.mkfs(fs, &params.mkfs_options, &dev)?;
                        failpoint("stage-after-mkfs");
                        fs.as_str().to_string()
                    }
                    Some(t) if t == fs.as_str() || cap.fs_type.is_none() => {
                        // Only the filesystems this plugin makes are handed to the kernel.
                        let Ok(Some(found)) = FsType::parse(&t) else {
                            return Err(Error::FailedPrecondition(format!(
                                "the volume holds {t}, which this plugin does not mount \
                                 (ext4 or xfs)"
                            )));
                        };
                        // After an expansion the device is larger than the filesystem.
                        if found == FsType::Ext4
                            && !cap.read_only_mode
                            && host.ext4_smaller_than_device(&dev)?
                        {
                            host.grow_ext4_offline(&dev)?;
                        }
                        found.as_str().to_string()
                    }
                    Some(t) => {
                        return Err(Error::FailedPrecondition(format!(
                            "the volume holds {t}, not {}",
                            fs.as_str()
                        )));
                    }
                };
                std::fs::create_dir_all(&staging)
                    .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
                let mut opts = cap.mount_flags.clone();
                if cap.read_only_mode {
                    opts.push("ro".into());
                }
                host.mount(&dev, &staging, &on_disk, &opts)?;
                failpoint("stage-after-mount");
                if !cap.read_only_mode && on_disk == "xfs" {
                    // xfs grows only mounted (a no-op when it already fills the device).
                    host.grow_mounted(&dev, &staging)?;
                }
            }
            Ok(())
        };
        let staged = finish().map(|()| Staged {
            volume_id: rec.id.clone(),
            staging: staging.clone(),
            device: dev,
            attachment: match attached.reattach_index() {
                Some(index) => Attachment::Nbd { index },
                None if attached.mode() == attach::Mode::NbdIoctl => Attachment::NbdIoctl,
                None => Attachment::Nbdfuse,
            },
            cap,
            image: Some(image),
            attached: Mutex::new(None),
            lost: None,
            published: Mutex::new(BTreeSet::new()),
            boot_id: staging::boot_id(),
            qos,
            passphrase,
        });
        // The record is the commit point: without it, a restart would not know the volume.
        let staged = staged.and_then(|s| plugin.node.persist(&s).map(|()| s));
        let staged = match staged {
            Ok(s) => s,
            Err(e) => {
                // Undo in reverse: a mount made before the failing step, then the device.
                let _ = plugin.host.unmount_if_mounted(&staging);
                let _ = attached.detach();
                return Err(e);
            }
        };
        *staged.attached.lock().recover() = Some(attached);
        if let Some(kept) = kept {
            kept.commit();
        }
        let (device, attachment) = (staged.device.clone(), staged.attachment);
        plugin.node.map().insert(rec.id.clone(), Arc::new(staged));
        tracing::info!(volume = %rec.id, device = %device.display(), ?attachment, "staged");
        if encrypted {
            // A flatten of an encrypted volume needs its passphrase: it waited for this.
            super::flatten::check(&self.0, &rec.id);
        }
        Ok(())
    }

    /// Tears down what staged `s` (unmount, detach or clear a lost device's leftovers) and
    /// forgets it. The caller holds the volume's lock and checked it is not published.
    fn release(&self, s: &Staged, work: &Path) -> Result<()> {
        let plugin = self.plugin();
        if s.lost.is_some() {
            clear_leftovers(
                &s.staging,
                work,
                &plugin.attacher,
                &s.volume_id,
                Claim::Record,
            )?;
        } else {
            // Writes held by a full disk fail now: the unmount would wait for them forever.
            if let Some(image) = &s.image {
                image.end_pauses();
            }
            if s.cap.access == AccessType::Mount {
                plugin.host.unmount_if_mounted(&s.staging)?;
            }
            if let Some(a) = s.attached.lock().recover().take() {
                a.detach()?;
            }
        }
        plugin.node.records.remove(&s.volume_id)?;
        plugin.keys.remove(&s.volume_id)?;
        plugin.node.map().remove(&s.volume_id);
        plugin.metrics.unstaged(&s.volume_id);
        Ok(())
    }

    fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<()> {
        let plugin = self.plugin();
        required(&req.volume_id, "volume_id")?;
        let staging = self.confine(&req.staging_target_path, "staging_target_path")?;
        let _held = plugin.locks.try_lock(req.volume_id.clone())?;
        let work = attach_dir(&plugin.config.state_dir, &req.volume_id);
        let Some(s) = plugin.node.get(&req.volume_id) else {
            // Not staged by this process: clear what a previous one may have left, if it
            // is provably this volume's, and nothing another volume holds.
            plugin.node.check_free(&staging, &req.volume_id)?;
            if crate::csi::state::is_volume_id(&req.volume_id) {
                clear_leftovers(
                    &staging,
                    &work,
                    &plugin.attacher,
                    &req.volume_id,
                    Claim::Request,
                )?;
                plugin.keys.remove(&req.volume_id)?;
            }
            return Ok(());
        };
        if s.staging != staging {
            tracing::warn!(volume = %req.volume_id, asked = %staging.display(), staged = %s.staging.display(), "unstage names another path: releasing the recorded one");
        }
        if let Some(target) = s.in_use().first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is still published at {}",
                req.volume_id,
                target.display()
            )));
        }
        self.release(&s, &work)?;
        tracing::info!(volume = %req.volume_id, "unstaged");
        Ok(())
    }

    fn publish(&self, req: NodePublishVolumeRequest) -> Result<()> {
        required(&req.volume_id, "volume_id")?;
        let staging = self.confine(&req.staging_target_path, "staging_target_path")?;
        let target = self.confine(&req.target_path, "target_path")?;
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
        if target == s.staging {
            return Err(Error::InvalidArgument(format!(
                "target_path {} is the volume's staging path",
                target.display()
            )));
        }
        self.0.node.check_free(&target, &req.volume_id)?;
        let repeat = s.published().contains(&target);
        if !repeat {
            s.check_live()?;
        }
        if cap.single_writer {
            let published = s.published();
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
                    .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
                s.staging.clone()
            }
            AccessType::Block => {
                if !target.exists() {
                    std::fs::File::create(&target)
                        .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
                }
                s.device.clone()
            }
        };
        // Recorded before it is mounted: a restart must know every mount that may exist.
        if !repeat {
            s.published().insert(target.clone());
            if let Err(e) = self.0.node.persist(&s) {
                s.published().remove(&target);
                return Err(e);
            }
        }
        let host = &self.0.host;
        let mounted = (|| {
            if !host.is_mount_point(&target)? {
                host.bind(&source, &target, req.readonly || cap.read_only_mode)?;
            }
            Ok(())
        })();
        if let Err(e) = mounted {
            let _ = host.unmount_if_mounted(&target);
            if !repeat {
                s.published().remove(&target);
                let _ = self.0.node.persist(&s);
            }
            return Err(e);
        }
        if !repeat {
            // kubelet names the pod when the CSIDriver has podInfoOnMount.
            let pod = |key: &str| {
                req.volume_context
                    .get(&format!("csi.storage.k8s.io/pod.{key}"))
                    .map_or("", String::as_str)
                    .to_string()
            };
            tracing::info!(
                volume = %req.volume_id,
                target = %target.display(),
                pod = %pod("name"),
                namespace = %pod("namespace"),
                "published"
            );
        }
        Ok(())
    }

    fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<()> {
        required(&req.volume_id, "volume_id")?;
        let target = self.confine(&req.target_path, "target_path")?;
        let _held = self.0.locks.try_lock(req.volume_id.clone())?;
        // Only what this volume's record names is unmounted and removed: anything else at
        // that path (another volume's mount, a file) is not ours to touch.
        let Some(s) = (self.0.node.get(&req.volume_id)).filter(|s| s.published().contains(&target))
        else {
            tracing::info!(volume = %req.volume_id, target = %target.display(), "not published there: nothing to undo");
            return Ok(());
        };
        if s.lost.is_some() {
            // Its device no longer answers: the last unmount must not wait for it.
            self.0.host.unmount_lazily(&target)?;
        } else {
            self.0.host.unmount_if_mounted(&target)?;
        }
        // We created the target: a directory (mount) or a file (block).
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(md) if md.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::io(format!("removing {}", target.display()), e))?;
        s.published().remove(&target);
        self.0.node.persist(&s)
    }

    /// Grows a staged volume online: the image, the block device, the filesystem. Checks
    /// that the device can grow before changing anything.
    fn expand(&self, req: NodeExpandVolumeRequest) -> Result<u64> {
        required(&req.volume_id, "volume_id")?;
        self.0.volume_record(&req.volume_id)?;
        let path = self.confine(&req.volume_path, "volume_path")?;
        failpoint("node-before-lock");
        let _held = self.0.locks.try_lock(req.volume_id.clone())?;
        // Read under the lock: a snapshot taken meanwhile changed the head.
        let rec = self.0.volume_record(&req.volume_id)?;
        let s = self.0.node.get(&req.volume_id).ok_or_else(|| {
            Error::NotFound(format!("volume {} is not staged here", req.volume_id))
        })?;
        let published = s.published().contains(&path);
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
        if size > rec.size {
            let params = Params::from_canonical(&rec.parameters)?;
            super::controller::check_size(&self.0, &params, size, rec.size)?;
        }
        // The volume record follows the size asked for (never down), written over the
        // record as it is now (under the state lock), not as it was read.
        let record_size = || -> Result<()> {
            let mut st = self.0.state()?;
            let Some(mut now) = st.volume(&req.volume_id).cloned() else {
                return Err(Error::NotFound(format!("no volume {:?}", req.volume_id)));
            };
            if size > now.size {
                now.size = size;
                st.put_volume(now)?;
            }
            Ok(())
        };
        s.check_live()?;
        let mut attached = s.attached.lock().recover();
        let (Some(attached), Some(image)) = (attached.as_mut(), &s.image) else {
            return Err(Error::FailedPrecondition(
                "the volume is being unstaged".into(),
            ));
        };
        if size > image.size() {
            let refusal = if !attached.can_resize() {
                Some(format!(
                    "{} was set up with the nbd ioctls and cannot change size while in use; \
                     the volume grows at the next stage",
                    s.device.display()
                ))
            } else if s.cap.access == AccessType::Mount
                && self.0.host.fs_on(&s.device)?.as_deref() == Some("ext4")
                && !self.0.host.can_grow_mounted_ext4()
            {
                Some(
                    "growing a mounted ext4 needs CAP_SYS_RESOURCE, which this plugin lacks; \
                     the filesystem grows at the next stage"
                        .to_string(),
                )
            } else {
                None
            };
            if let Some(why) = refusal {
                // Nothing changes now; the record keeps the size for the next NodeStage,
                // which grows image and filesystem before anything mounts them.
                record_size()?;
                return Err(Error::FailedPrecondition(why));
            }
            image.resize(size)?;
            attached.resize(size)?;
        }
        if s.cap.access == AccessType::Mount {
            self.0.host.grow_mounted(&s.device, &s.staging)?;
        }
        record_size()?;
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
        let known = s.staging == path || s.published().contains(&path);
        if !known {
            return Err(Error::NotFound(format!(
                "volume {} is not at {}",
                req.volume_id,
                path.display()
            )));
        }
        let (reason, message) = match s.condition() {
            Some((reason, message)) => (Some(reason), message),
            None => (None, String::new()),
        };
        self.0.metrics.polled(&req.volume_id, reason, &message);
        let condition = VolumeCondition {
            abnormal: reason.is_some(),
            message,
        };
        if s.lost.is_some() {
            // statvfs of a filesystem whose device no longer answers may block.
            return Ok(NodeGetVolumeStatsResponse {
                usage: Vec::new(),
                volume_condition: Some(condition),
            });
        }
        let usage = match s.cap.access {
            AccessType::Block => vec![VolumeUsage {
                available: 0,
                total: i64::try_from(rec.size).unwrap_or(i64::MAX),
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }],
            AccessType::Mount => {
                let st = rustix::fs::statvfs(&path)
                    .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
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
            volume_condition: Some(condition),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        rpclog::subject(&req);
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
        rpclog::subject(&req);
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
        rpclog::subject(&req);
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
        rpclog::subject(&req);
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
        rpclog::subject(&req);
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
        rpclog::subject(&req);
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

#[cfg(test)]
mod tests {
    //! Restart recovery against a simulated kernel nbd driver (`attach::sim`): the plugin
    //! stages a block volume on "nbd5", dies, and a new plugin takes the device over.

    use super::*;
    use crate::attach::sim::{FakeKernel, Sim, request};
    use crate::attach::{Attacher, KernelOptions};
    use crate::csi::Config;
    use crate::csi::controller::ControllerService;
    use crate::csi::staged::Recovered;
    use crate::csi::staging::StageRecords;
    use crate::nbd::proto::cmd;
    use csi_proto::v1::volume_capability::access_mode::Mode as AccessMode;
    use qcow2_engine::{Image, OpenOptions};

    struct Host {
        dir: tempfile::TempDir,
        sim: Arc<Mutex<Sim>>,
        kernel: KernelOptions,
    }

    fn block_cap() -> VolumeCapability {
        VolumeCapability {
            access_type: Some(volume_capability::AccessType::Block(
                volume_capability::BlockVolume {},
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: AccessMode::SingleNodeWriter as i32,
            }),
        }
    }

    impl Host {
        fn new() -> Host {
            let dir = tempfile::tempdir().unwrap();
            let kernel = KernelOptions {
                sysfs: dir.path().join("sys"),
                dev: dir.path().join("dev"),
                device_wait: std::time::Duration::from_secs(2),
                ..KernelOptions::default()
            };
            std::fs::create_dir_all(kernel.sysfs.join("block/nbd5")).unwrap();
            std::fs::create_dir_all(&kernel.dev).unwrap();
            std::fs::write(kernel.dev.join("nbd5"), "").unwrap();
            Host {
                dir,
                sim: Arc::default(),
                kernel,
            }
        }

        /// A plugin process on this host, loaded.
        fn start(&self) -> (Arc<Plugin>, super::super::Loaded) {
            self.start_with(Arc::new(crate::csi::host::SystemTools))
        }

        /// A plugin process on this host running `tools`, loaded.
        fn start_with(
            &self,
            tools: Arc<dyn crate::csi::host::HostTools>,
        ) -> (Arc<Plugin>, super::super::Loaded) {
            let config = Config {
                driver_name: crate::csi::DRIVER_NAME.into(),
                node_id: "n1".into(),
                state_dir: self.dir.path().join("state"),
                max_volumes: 0,
                attach: attach::Mode::Nbd,
                max_chain_depth: 0,
                handoff_wait: std::time::Duration::ZERO,
                kubelet_dir: self.dir.path().to_path_buf(),
                watch_volume_attributes: false,
                label_snapshot_contents: false,
                metrics: true,
                key_dir: self.dir.path().join("keys"),
            };
            let attacher = Attacher::with_kernel(self.kernel.clone(), FakeKernel::door(&self.sim));
            let plugin = Arc::new(Plugin::with_host(config, attacher, tools));
            let loaded = plugin.load().unwrap();
            (plugin, loaded)
        }

        /// The kernel names the volume as nbd5's backend (it does at CONNECT).
        fn set_backend(&self, id: &str) {
            std::fs::write(
                self.kernel.sysfs.join("block/nbd5/backend"),
                format!("{id}\n"),
            )
            .unwrap();
        }

        /// The plugin process dies: its ends of the sockets close. The kernel keeps its
        /// own (dead) ones, here dropped so the serving threads see the hang-up.
        /// Returns once its images are closed (their locks released), as at a process exit.
        fn kill(&self, plugin: Arc<Plugin>) {
            let heads: Vec<PathBuf> = {
                let st = plugin.state().unwrap();
                st.volumes().map(|v| st.layer_path(&v.head)).collect()
            };
            self.sim.lock().unwrap().held.clear();
            drop(plugin);
            // The serving threads drop their references as they see the hang-up; the last
            // one closes the file. Its lock going away is what a restart needs.
            let writable = OpenOptions {
                writable: true,
                ..OpenOptions::default()
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            for head in heads {
                while let Err(e) = Image::open(&head, &writable) {
                    assert!(std::time::Instant::now() < deadline, "still open: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }

        fn kernel_socket(&self) -> std::os::unix::net::UnixStream {
            self.sim
                .lock()
                .unwrap()
                .held
                .last()
                .unwrap()
                .try_clone()
                .unwrap()
        }

        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging/vol")
        }

        fn stage(&self, plugin: &Arc<Plugin>, id: &str) -> Result<()> {
            Self::stage_at(plugin, id, &self.staging(), block_cap())
        }

        fn stage_at(
            plugin: &Arc<Plugin>,
            id: &str,
            staging: &Path,
            cap: VolumeCapability,
        ) -> Result<()> {
            NodeService(plugin.clone()).stage(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
                volume_capability: Some(cap),
                ..Default::default()
            })
        }

        fn unstage(&self, plugin: &Arc<Plugin>, id: &str) -> Result<()> {
            NodeService(plugin.clone()).unstage(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: self.staging().to_string_lossy().into_owned(),
            })
        }

        fn stats(&self, plugin: &Arc<Plugin>, id: &str) -> VolumeCondition {
            NodeService(plugin.clone())
                .stats(NodeGetVolumeStatsRequest {
                    volume_id: id.into(),
                    volume_path: self.staging().to_string_lossy().into_owned(),
                    staging_target_path: String::new(),
                })
                .unwrap()
                .volume_condition
                .unwrap()
        }

        fn sent(&self, command: u8) -> Vec<Vec<u8>> {
            self.sim
                .lock()
                .unwrap()
                .sent
                .iter()
                .filter(|m| {
                    m.len() > 16
                        && u16::from_ne_bytes([m[4], m[5]]) == crate::attach::sim::FAMILY
                        && m[16] == command
                })
                .cloned()
                .collect()
        }
    }

    fn create(plugin: &Arc<Plugin>) -> String {
        create_named(plugin, "pvc-1")
    }

    fn create_named(plugin: &Arc<Plugin>, name: &str) -> String {
        ControllerService(plugin.clone())
            .create(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_cap()],
                ..Default::default()
            })
            .unwrap()
            .volume_id
    }

    #[test]
    fn a_restarted_plugin_takes_its_kernel_device_over_and_the_data_path_continues() {
        use crate::attach::netlink::nbd;
        let host = Host::new();
        let (p1, loaded) = host.start();
        assert_eq!(loaded.recovered, Recovered::default());
        let id = create(&p1);
        host.stage(&p1, &id).unwrap();
        host.set_backend(&id);
        let rec = &StageRecords::new(&p1.config.state_dir).load().unwrap()[0];
        assert_eq!(rec.attachment, Attachment::Nbd { index: 5 });
        assert_eq!(rec.device, host.kernel.dev.join("nbd5"));

        let sock = host.kernel_socket();
        request(&sock, cmd::WRITE, 8192, &[0xab; 4096], 0);
        drop(sock);
        host.kill(p1);

        // A new process: nbd5 is handed a fresh socket, and serves what was written.
        host.sim.lock().unwrap().take_on_reconfigure = true;
        let (p2, loaded) = host.start();
        assert_eq!(
            loaded.recovered,
            Recovered {
                reattached: 1,
                ..Recovered::default()
            },
            "{:?}",
            p2.node.get(&id).and_then(|s| s.lost.clone())
        );
        let reconf = host.sent(nbd::CMD_RECONFIGURE);
        assert_eq!(reconf.len(), 1);
        assert!(reconf[0].windows(id.len()).any(|w| w == id.as_bytes()));
        let sock = host.kernel_socket();
        assert_eq!(request(&sock, cmd::READ, 8192, &[], 4096), vec![0xab; 4096]);
        request(&sock, cmd::WRITE, 0, &[0xcd; 512], 0);
        request(&sock, cmd::FLUSH, 0, &[], 0);
        assert!(!host.stats(&p2, &id).abnormal);
        // A repeated NodeStage is still a repeat; the controller still sees the volume staged.
        host.stage(&p2, &id).unwrap();
        assert_eq!(host.sent(nbd::CMD_CONNECT).len(), 1, "no second device");
        let del = ControllerService(p2.clone()).delete(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        });
        assert!(matches!(del, Err(Error::FailedPrecondition(_))), "{del:?}");

        host.unstage(&p2, &id).unwrap();
        assert_eq!(host.sent(nbd::CMD_DISCONNECT).len(), 1);
        assert!(
            StageRecords::new(&p2.config.state_dir)
                .load()
                .unwrap()
                .is_empty()
        );
        // The data reached the layer.
        let st = p2.state().unwrap();
        let head = st.layer_path(&st.volume(&id).unwrap().head);
        drop(st);
        let img = Image::open(&head, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 512];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0xcd; 512]);
        img.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, vec![0xab; 512]);
    }

    #[test]
    fn a_device_that_cannot_be_taken_over_is_reported_lost_until_unstaged() {
        use crate::attach::netlink::nbd;
        let host = Host::new();
        let (p1, _) = host.start();
        let id = create(&p1);
        host.stage(&p1, &id).unwrap();
        // While the plugin was down, the device was recycled for another volume, and the
        // CO unmounted the pod's publish target behind the plugin's back.
        host.set_backend("vol-someone-else");
        host.kill(p1);
        let records = StageRecords::new(&host.dir.path().join("state"));
        let mut rec = records.load().unwrap().remove(0);
        rec.published.insert(host.dir.path().join("pods/gone"));
        records.save(&rec).unwrap();

        let (p2, loaded) = host.start();
        assert_eq!(loaded.recovered.lost, 1);
        assert!(
            host.sent(nbd::CMD_RECONFIGURE).is_empty(),
            "nbd5 is not ours"
        );
        let cond = host.stats(&p2, &id);
        assert!(cond.abnormal);
        assert!(
            cond.message.contains("could not take nbd5 over"),
            "{}",
            cond.message
        );
        let del = ControllerService(p2.clone()).delete(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        });
        assert!(matches!(del, Err(Error::FailedPrecondition(_))), "{del:?}");

        // The pod's target is no longer mounted, so NodeStage clears the lost attachment
        // (without touching the other volume's device) and stages afresh on a new one.
        host.stage(&p2, &id).unwrap();
        assert!(host.sent(nbd::CMD_DISCONNECT).is_empty());
        assert_eq!(host.sent(nbd::CMD_CONNECT).len(), 2);
        assert!(!host.stats(&p2, &id).abnormal);
        let rec = &StageRecords::new(&p2.config.state_dir).load().unwrap()[0];
        assert!(rec.published.is_empty(), "{rec:?}");
        host.set_backend(&id);
        host.unstage(&p2, &id).unwrap();
        assert_eq!(host.sent(nbd::CMD_DISCONNECT).len(), 1);
        assert!(!p2.node.is_staged(&id));
        assert!(
            StageRecords::new(&p2.config.state_dir)
                .load()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_retried_stage_disconnects_the_device_an_interrupted_one_left() {
        use crate::attach::netlink::nbd;
        let host = Host::new();
        let (p1, _) = host.start();
        let id = create(&p1);
        // A crash after CONNECT and before the stage record: only the kernel knows nbd5.
        host.set_backend(&id);
        host.stage(&p1, &id).unwrap_or_else(|e| panic!("{e}"));
        NodeService(p1.clone())
            .release(&p1.node.get(&id).unwrap(), Path::new("/nonexistent"))
            .unwrap();
        host.sim.lock().unwrap().sent.clear();
        host.set_backend(&id);
        host.kill(p1);
        let (p2, loaded) = host.start();
        assert_eq!(
            loaded.recovered,
            Recovered::default(),
            "no record, nothing recovered"
        );
        host.stage(&p2, &id).unwrap();
        let disc = host.sent(nbd::CMD_DISCONNECT);
        assert_eq!(
            disc.len(),
            1,
            "the stale nbd5 is disconnected before a new CONNECT"
        );
        assert_eq!(&disc[0][20..], [8, 0, 1, 0, 5, 0, 0, 0]);
        assert_eq!(host.sent(nbd::CMD_CONNECT).len(), 1);
    }

    #[test]
    fn records_from_an_earlier_boot_are_dropped_at_load() {
        use crate::attach::netlink::nbd;
        let host = Host::new();
        let (p1, _) = host.start();
        let id = create(&p1);
        host.stage(&p1, &id).unwrap();
        host.set_backend(&id);
        host.kill(p1);
        let records = StageRecords::new(&host.dir.path().join("state"));
        let mut rec = records.load().unwrap().remove(0);
        assert_eq!(rec.boot_id, staging::boot_id());
        rec.boot_id = "an-earlier-boot".into();
        records.save(&rec).unwrap();
        host.sim.lock().unwrap().take_on_reconfigure = true;
        let (p2, loaded) = host.start();
        assert_eq!(loaded.recovered.previous_boot, 1);
        assert_eq!(loaded.recovered.reattached, 0);
        assert!(host.sent(nbd::CMD_RECONFIGURE).is_empty());
        assert!(!p2.node.is_staged(&id));
        assert!(records.load().unwrap().is_empty());
    }

    #[test]
    fn records_of_deleted_volumes_are_dropped_at_load() {
        let host = Host::new();
        let (p1, _) = host.start();
        let id = create(&p1);
        host.stage(&p1, &id).unwrap();
        host.kill(p1);
        // The volume's record vanished behind the plugin's back.
        std::fs::remove_file(host.dir.path().join(format!("state/volumes/{id}.json"))).unwrap();
        let (p2, loaded) = host.start();
        assert_eq!(loaded.recovered.forgotten, 1);
        assert!(!p2.node.is_staged(&id));
        assert!(
            StageRecords::new(&p2.config.state_dir)
                .load()
                .unwrap()
                .is_empty()
        );
    }
    fn mount_cap() -> VolumeCapability {
        VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                },
            )),
            access_mode: block_cap().access_mode,
        }
    }

    fn expand(plugin: &Arc<Plugin>, host: &Host, id: &str, bytes: i64) -> Result<u64> {
        NodeService(plugin.clone()).expand(NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: host.staging().to_string_lossy().into_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
    }

    #[test]
    fn node_expand_refuses_sizes_past_the_engine_and_the_budget_and_records_nothing() {
        let host = Host::new();
        let (p, _) = host.start();
        let id = create(&p);
        host.stage(&p, &id).unwrap();
        host.set_backend(&id);
        for (bytes, out_of_range) in [(i64::MAX, true), (1 << 50, false)] {
            let e = expand(&p, &host, &id, bytes).unwrap_err();
            match (&e, out_of_range) {
                (Error::OutOfRange(_), true) | (Error::ResourceExhausted(_), false) => {}
                _ => panic!("{bytes}: {e:?}"),
            }
            assert_eq!(
                p.volume_record(&id).unwrap().size,
                1 << 20,
                "nothing recorded"
            );
        }
        assert_eq!(expand(&p, &host, &id, 2 << 20).unwrap(), 2 << 20);
        assert_eq!(p.volume_record(&id).unwrap().size, 2 << 20);
        // Unstaged and staged again: the image follows the record.
        host.unstage(&p, &id).unwrap();
        host.stage(&p, &id).unwrap();
    }

    #[test]
    fn node_expand_of_an_unknown_volume_is_not_found_whatever_its_path() {
        // csi-sanity: "NodeExpandVolume should fail when volume is not found".
        let host = Host::new();
        let (p, _) = host.start();
        for path in ["/elsewhere/mnt", "relative", ""] {
            let e = NodeService(p.clone())
                .expand(NodeExpandVolumeRequest {
                    volume_id: "vol-0123456789abcdef0123456789abcdef".into(),
                    volume_path: path.into(),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(matches!(e, Error::NotFound(_)), "{path:?}: {e:?}");
        }
    }

    #[test]
    fn unpublish_removes_only_what_the_volumes_record_names() {
        let host = Host::new();
        let (p, _) = host.start();
        let id = create(&p);
        let other = create_named(&p, "pvc-2");
        host.stage(&p, &id).unwrap();
        let node = NodeService(p.clone());
        // The state directory lies under the kubelet directory here: only the record rule
        // keeps the volume record, a foreign file and another volume's record in place.
        let foreign = host.dir.path().join("pods/foreign");
        std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
        std::fs::write(&foreign, "not the plugin's").unwrap();
        let records = [
            p.config.state_dir.join(format!("volumes/{id}.json")),
            p.config.state_dir.join(format!("volumes/{other}.json")),
        ];
        for (vol, target) in [
            (&id, &records[0]),
            (&other, &records[1]),
            (&id, &foreign),
            (&other, &foreign),
            (
                &"vol-0123456789abcdef0123456789abcdef".to_string(),
                &foreign,
            ),
        ] {
            node.unpublish(NodeUnpublishVolumeRequest {
                volume_id: vol.to_string(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .unwrap();
            assert!(target.exists(), "{vol} {}", target.display());
        }
        assert!(p.volume_record(&other).is_ok());
        // A reload still finds both volumes.
        drop(node);
        host.set_backend(&id);
        host.unstage(&p, &id).unwrap();
        host.kill(p);
        let (p2, loaded) = host.start();
        assert_eq!(loaded.cleanup.orphan_layers, 0);
        assert!(p2.volume_record(&id).is_ok() && p2.volume_record(&other).is_ok());
    }

    #[test]
    fn paths_outside_the_kubelet_directory_and_escapes_are_refused() {
        let host = Host::new();
        let (p, _) = host.start();
        let id = create(&p);
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), host.dir.path().join("escape")).unwrap();
        let node = NodeService(p.clone());
        let bad = [
            outside.path().join("staging"),
            host.dir.path().join("escape/staging"),
            host.dir
                .path()
                .join("staging/../../..")
                .join(outside.path().strip_prefix("/").unwrap()),
        ];
        for staging in &bad {
            let e = Host::stage_at(&p, &id, staging, block_cap()).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "{}: {e:?}",
                staging.display()
            );
        }
        assert!(
            host.sent(crate::attach::netlink::nbd::CMD_CONNECT)
                .is_empty()
        );
        host.stage(&p, &id).unwrap();
        for target in &bad {
            let e = node
                .publish(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: host.staging().to_string_lossy().into_owned(),
                    target_path: target.join("t").to_string_lossy().into_owned(),
                    volume_capability: Some(block_cap()),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument(_)),
                "{}: {e:?}",
                target.display()
            );
        }
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing made outside"
        );
        host.set_backend(&id);
        host.unstage(&p, &id).unwrap();
    }

    #[test]
    fn another_volumes_staging_path_is_refused_and_left_staged() {
        let host = Host::new();
        let (p, _) = host.start();
        let a = create(&p);
        let b = create_named(&p, "pvc-2");
        host.stage(&p, &a).unwrap();
        let e = host.stage(&p, &b).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        assert!(e.to_string().contains(&a), "{e}");
        // Nor may B's unstage touch it.
        let e = host.unstage(&p, &b).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        assert_eq!(host.sent(crate::attach::netlink::nbd::CMD_CONNECT).len(), 1);
        assert!(
            host.sent(crate::attach::netlink::nbd::CMD_DISCONNECT)
                .is_empty()
        );
        assert!(p.node.is_staged(&a) && !p.node.is_staged(&b));
        host.set_backend(&a);
        host.unstage(&p, &a).unwrap();
        host.stage(&p, &b).unwrap();
    }

    #[test]
    fn a_block_volume_is_never_staged_as_a_filesystem() {
        let host = Host::new();
        let (p, _) = host.start();
        let id = create(&p);
        let e = Host::stage_at(&p, &id, &host.staging(), mount_cap()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(
            host.sent(crate::attach::netlink::nbd::CMD_CONNECT)
                .is_empty()
        );
    }

    #[test]
    fn layers_records_and_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let host = Host::new();
        let (p, _) = host.start();
        let id = create(&p);
        host.stage(&p, &id).unwrap();
        let state = &p.config.state_dir.clone();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        for dir in ["", "layers", "volumes", "snapshots", "staged"] {
            assert_eq!(mode(&state.join(dir)), 0o700, "{dir}");
        }
        let head = state
            .join("layers")
            .join(&p.volume_record(&id).unwrap().head);
        for file in [
            head,
            state.join(format!("volumes/{id}.json")),
            state.join(format!("staged/{id}.json")),
        ] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        // An older install's modes are tightened at load.
        host.set_backend(&id);
        host.unstage(&p, &id).unwrap();
        let record = state.join(format!("volumes/{id}.json"));
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o755)).unwrap();
        host.kill(p);
        let (_p2, _) = host.start();
        assert_eq!(mode(&record), 0o600);
        assert_eq!(mode(state), 0o700);
    }

    /// A mount capability for `fs`, read-only or not.
    fn fs_cap(fs: &str, read_only: bool) -> VolumeCapability {
        let mode = if read_only {
            AccessMode::SingleNodeReaderOnly
        } else {
            AccessMode::SingleNodeWriter
        };
        VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: fs.into(),
                    mount_flags: Vec::new(),
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    fn create_mount(plugin: &Arc<Plugin>, name: &str) -> String {
        ControllerService(plugin.clone())
            .create(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![fs_cap("ext4", false), fs_cap("ext4", true)],
                ..Default::default()
            })
            .unwrap()
            .volume_id
    }

    fn publish_at(
        plugin: &Arc<Plugin>,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<()> {
        NodeService(plugin.clone()).publish(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        })
    }

    fn unpublish_at(plugin: &Arc<Plugin>, id: &str, target: &Path) -> Result<()> {
        NodeService(plugin.clone()).unpublish(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into_owned(),
        })
    }

    #[test]
    fn mount_volumes_stage_publish_and_undo_idempotently_with_the_host_tools_modelled() {
        use crate::csi::host::FakeTools;
        let host = Host::new();
        let tools = Arc::new(FakeTools::default());
        let (p, _) = host.start_with(tools.clone());
        let id = create_mount(&p, "pvc-m");
        host.set_backend(&id); // as the kernel does at CONNECT
        let cap = fs_cap("ext4", false);
        let staging = host.staging();
        let dev = host.kernel.dev.join("nbd5");
        Host::stage_at(&p, &id, &staging, cap.clone()).unwrap();
        let made = [
            format!("mkfs.ext4 [] {}", dev.display()),
            format!("mount -t ext4 [] {} {}", dev.display(), staging.display()),
        ];
        assert_eq!(tools.calls(), made);
        // A repeat changes nothing: no second mkfs, no second mount.
        Host::stage_at(&p, &id, &staging, cap.clone()).unwrap();
        assert_eq!(tools.calls(), made);

        let rw = host.dir.path().join("pods/a/vol");
        let ro = host.dir.path().join("pods/b/vol");
        publish_at(&p, &id, &staging, &rw, cap.clone(), false).unwrap();
        publish_at(&p, &id, &staging, &rw, cap.clone(), false).unwrap();
        publish_at(&p, &id, &staging, &ro, cap.clone(), true).unwrap();
        assert_eq!(tools.mounted(&rw), Some((staging.clone(), false)));
        assert_eq!(tools.mounted(&ro), Some((staging.clone(), true)));
        assert_eq!(
            tools.calls().len(),
            4,
            "one bind per target: {:?}",
            tools.calls()
        );

        for target in [&rw, &ro] {
            unpublish_at(&p, &id, target).unwrap();
            unpublish_at(&p, &id, target).unwrap();
            assert_eq!(tools.mounted(target), None);
            assert!(!target.exists(), "the target is removed");
        }
        host.unstage(&p, &id).unwrap();
        host.unstage(&p, &id).unwrap();
        let calls = tools.calls();
        assert_eq!(
            calls[4..],
            [
                format!("umount {}", rw.display()),
                format!("umount {}", ro.display()),
                format!("umount {}", staging.display()),
            ],
            "each mount undone once"
        );

        // Staged again: the filesystem is found, not made again.
        Host::stage_at(&p, &id, &staging, cap).unwrap();
        assert!(
            !tools.calls()[7..].iter().any(|c| c.starts_with("mkfs")),
            "{:?}",
            tools.calls()
        );
        host.unstage(&p, &id).unwrap();
        drop(p);
    }

    #[test]
    fn stage_refuses_a_foreign_filesystem_and_formatting_read_only_and_undoes_a_failed_mount() {
        use crate::csi::host::FakeTools;
        let host = Host::new();
        let tools = Arc::new(FakeTools::default());
        let (p, _) = host.start_with(tools.clone());
        let id = create_mount(&p, "pvc-r");
        host.set_backend(&id);
        let staging = host.staging();
        let dev = host.kernel.dev.join("nbd5");

        // A blank volume staged read-only: nothing to mount, and formatting would write.
        let e = Host::stage_at(&p, &id, &staging, fs_cap("ext4", true)).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(tools.calls().is_empty(), "{:?}", tools.calls());
        assert!(p.node.get(&id).is_none());

        // A filesystem this plugin does not mount is never handed to the kernel.
        tools.format(&dev, "btrfs");
        let e = Host::stage_at(&p, &id, &staging, fs_cap("ext4", false)).unwrap_err();
        assert!(e.to_string().contains("holds btrfs"), "{e}");
        assert!(tools.calls().is_empty(), "{:?}", tools.calls());

        // A mount that fails leaves nothing staged, and the next stage works.
        tools.format(&dev, "ext4");
        tools.fail_next("mount");
        Host::stage_at(&p, &id, &staging, fs_cap("ext4", false)).unwrap_err();
        assert!(p.node.get(&id).is_none());
        assert!(
            StageRecords::new(&p.config.state_dir)
                .load()
                .unwrap()
                .is_empty()
        );
        Host::stage_at(&p, &id, &staging, fs_cap("ext4", false)).unwrap();
        assert_eq!(tools.mounted(&staging), Some((dev.clone(), false)));
        assert!(!tools.calls().iter().any(|c| c.starts_with("mkfs")));
        host.unstage(&p, &id).unwrap();
        drop(p);
    }

    #[test]
    fn growing_a_mounted_ext4_needs_cap_sys_resource_and_is_otherwise_left_to_the_next_stage() {
        use crate::csi::host::FakeTools;
        let host = Host::new();
        let tools = Arc::new(FakeTools::default());
        let (p, _) = host.start_with(tools.clone());
        let id = create_mount(&p, "pvc-g");
        host.set_backend(&id);
        let staging = host.staging();
        Host::stage_at(&p, &id, &staging, fs_cap("ext4", false)).unwrap();
        let before = tools.calls().len();

        let e = expand(&p, &host, &id, 2 << 20).unwrap_err();
        assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}");
        assert_eq!(tools.calls().len(), before, "nothing grown");
        assert_eq!(
            p.volume_record(&id).unwrap().size,
            2 << 20,
            "kept for the next stage"
        );

        tools.set_cap_sys_resource(true);
        assert_eq!(expand(&p, &host, &id, 4 << 20).unwrap(), 4 << 20);
        let dev = host.kernel.dev.join("nbd5");
        assert_eq!(
            tools.calls()[before..],
            [format!("grow {} {}", dev.display(), staging.display())]
        );
        host.unstage(&p, &id).unwrap();
        drop(p);
    }
}
