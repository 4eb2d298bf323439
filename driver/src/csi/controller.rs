//! The Controller service: volumes as qcow2 head layers in this node's state directory.

use std::sync::Arc;

use csi_proto::v1::controller_server::Controller;
use csi_proto::v1::controller_service_capability::{Rpc, Type as CapType, rpc};
use csi_proto::v1::*;
use qcow2_engine::crypto::Passphrase;
use qcow2_engine::{Image, OpenOptions};
use tonic::{Request, Response, Status};

use super::freeze::freeze_head;
use super::keys;
use super::params::{FsType, Params};
use super::snapshot::make_layer;
use super::state::{self, AccessType, Source, VolumeRecord};
use super::{Plugin, capability, rpclog};
use crate::error::{Error, Result};

/// Sizes are multiples of this: the kernel's nbd device uses 4 KiB blocks.
pub const SIZE_ALIGN: u64 = 4096;
/// Size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Longest volume or snapshot name accepted (the CSI spec's general string limit).
const MAX_NAME: usize = 128;

/// Controller: create, delete, list, validate, expand, capacity.
#[derive(Debug, Clone)]
pub struct ControllerService(pub Arc<Plugin>);

/// The size to provision for a capacity range: the required bytes (or the default) rounded
/// up to [`SIZE_ALIGN`], never above the limit.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Error::InvalidArgument(
            "capacity_range bytes must not be negative".into(),
        ));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim > 0 && req > lim {
        return Err(Error::InvalidArgument(format!(
            "required_bytes {req} exceeds limit_bytes {lim}"
        )));
    }
    let want = match (req, lim) {
        (0, 0) => DEFAULT_SIZE,
        (0, l) => DEFAULT_SIZE.min(l),
        (r, _) => r,
    };
    let size = want.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
    if lim > 0 && size > lim {
        return Err(Error::OutOfRange(format!(
            "sizes are multiples of {SIZE_ALIGN} bytes: none lies between {req} and {lim}"
        )));
    }
    Ok(size)
}

fn to_volume(plugin: &Plugin, rec: &VolumeRecord) -> Volume {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    Volume {
        capacity_bytes: i64::try_from(rec.size).unwrap_or(i64::MAX),
        volume_id: rec.id.clone(),
        volume_context: Default::default(),
        content_source: rec.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match s {
                Source::Snapshot(id) => Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                }),
                Source::Volume(id) => Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                }),
            }),
        }),
        accessible_topology: vec![plugin.topology()],
    }
}

/// A restore or clone whose source this node does not hold. Sources are node-local and
/// the scheduler does not know where they are: the pod must be placed on the source's node.
fn source_elsewhere(plugin: &Plugin, what: &str, id: &str) -> Error {
    Error::NotFound(format!(
        "no {what} {id:?} on node {}: restores and clones are made on the node that holds \
         their source, so schedule the pod there (node affinity on {})",
        plugin.config.node_id,
        super::TOPOLOGY_KEY
    ))
}

/// Whether `req` allows this node.
fn topology_allows(plugin: &Plugin, req: Option<&TopologyRequirement>) -> bool {
    let Some(req) = req else { return true };
    if req.requisite.is_empty() {
        return true;
    }
    let ours = plugin.topology();
    req.requisite
        .iter()
        .any(|t| t.segments.get(super::TOPOLOGY_KEY) == ours.segments.get(super::TOPOLOGY_KEY))
}

/// Bytes that can still be provisioned: free space of the state directory's filesystem times
/// the overcommit ratio.
fn available(plugin: &Plugin, ratio: f64) -> Result<u64> {
    let st = rustix::fs::statvfs(&plugin.config.state_dir).map_err(|e| {
        Error::io(
            format!("statvfs {}", plugin.config.state_dir.display()),
            e.into(),
        )
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    Ok((free as f64 * ratio) as u64)
}

/// The largest volume the engine can address with `params` (within an i64, for CSI).
pub fn max_size(params: &Params) -> u64 {
    let geo = qcow2_engine::Geometry {
        cluster_bits: params.cluster_size.trailing_zeros(),
        extended_l2: params.subclusters,
        refcount_order: 4,
    };
    geo.max_virtual_size()
        .min(i64::MAX as u64 & !(SIZE_ALIGN - 1))
}

/// Checks that a volume may become `size` bytes, from `current` (0: a new one): OUT_OF_RANGE
/// above what the engine can address with its parameters, RESOURCE_EXHAUSTED when the
/// growth exceeds what the node can still provision (CreateVolume and NodeExpandVolume
/// share this budget).
pub(super) fn check_size(plugin: &Plugin, params: &Params, size: u64, current: u64) -> Result<()> {
    let max = max_size(params);
    if size > max {
        return Err(Error::OutOfRange(format!(
            "{size} bytes asked; volumes with {} byte clusters hold at most {max}",
            params.cluster_size
        )));
    }
    let growth = size.saturating_sub(current);
    let room = available(plugin, params.overcommit_ratio)?;
    if growth > room {
        return Err(Error::ResourceExhausted(format!(
            "{growth} more bytes asked, {room} can be provisioned on node {}",
            plugin.config.node_id
        )));
    }
    Ok(())
}

/// A List call's paging, checked: `max_entries` (0: all) and `starting_token`, the last id
/// of the previous page (opaque to the CO, checked here: ABORTED unless `is_id` accepts it).
pub(super) struct Paging<'r> {
    limit: usize,
    after: &'r str,
}

impl<'r> Paging<'r> {
    pub(super) fn new(
        max_entries: i32,
        starting_token: &'r str,
        is_id: fn(&str) -> bool,
    ) -> Result<Self> {
        if max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        if !starting_token.is_empty() && !is_id(starting_token) {
            return Err(Error::Aborted(format!(
                "starting_token {starting_token:?} was not issued by this plugin"
            )));
        }
        let limit = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries as usize
        };
        Ok(Paging {
            limit,
            after: starting_token,
        })
    }

    /// The page of `items` (in id order) after the token, and the next page's token (empty
    /// on the last page).
    pub(super) fn page<'a, T>(
        &self,
        items: impl Iterator<Item = &'a T>,
        id: impl Fn(&T) -> &str,
    ) -> (Vec<&'a T>, String) {
        let mut rest = items.filter(|t| self.after.is_empty() || id(t) > self.after);
        let page: Vec<&T> = rest.by_ref().take(self.limit).collect();
        let next_token = match (rest.next(), page.last()) {
            (Some(_), Some(last)) => id(last).to_string(),
            _ => String::new(),
        };
        (page, next_token)
    }
}

/// A CreateVolume or CreateSnapshot name: required, at most [`MAX_NAME`] bytes.
pub(super) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("name is required".into()));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "name is longer than {MAX_NAME} bytes"
        )));
    }
    Ok(())
}

/// A restore or clone keeps its source's key (its layers are the new volume's base): the
/// class must agree with the source on encryption, and the request's passphrase must open
/// the source, since it is what will open the new volume. `layer` is the source's top layer.
fn check_source_key(
    plugin: &Plugin,
    layer: &str,
    params: &Params,
    passphrase: Option<&Passphrase>,
) -> Result<()> {
    let path = plugin.state()?.layer_path(layer);
    // The header and the key slots only; the source may be staged and written meanwhile.
    let peek = |passphrase: Option<Passphrase>| {
        Image::open(
            &path,
            &OpenOptions {
                skip_backing: true,
                force_share: true,
                passphrase,
                ..OpenOptions::default()
            },
        )
    };
    let encrypted = peek(None)
        .map(|img| img.luks_header().is_some())
        .map_err(|e| Error::engine(format!("reading {}", path.display()), e))?;
    match (encrypted, params.encrypted) {
        (false, false) => Ok(()),
        (true, false) => Err(Error::InvalidArgument(
            "the source is encrypted: restore or clone it with an encrypted StorageClass \
             (encrypted: \"true\") and the source's secret"
                .into(),
        )),
        (false, true) => Err(Error::InvalidArgument(
            "the source is not encrypted: an encrypted volume made from it would keep the \
             source's data in plaintext underneath; use an unencrypted StorageClass"
                .into(),
        )),
        (true, true) => peek(passphrase.cloned()).map(drop).map_err(|e| {
            tracing::warn!(layer, error = %e, "refused a restore or clone: the secret does not open its source");
            Error::engine(
                "the provisioner secret's passphrase does not open the source \
                 (a restore or clone keeps its source's key)",
                e,
            )
        }),
    }
}

impl ControllerService {
    pub(crate) fn create(&self, req: CreateVolumeRequest) -> Result<Volume> {
        let plugin = &*self.0;
        check_name(&req.name)?;
        let caps = capability::check_all(&req.volume_capabilities)?;
        let params = Params::parse(&req.parameters)?;
        let passphrase = params
            .encrypted
            .then(|| keys::from_secrets(&req.secrets, "provisioner"))
            .transpose()?;
        for cap in caps.iter().filter(|c| c.access == AccessType::Mount) {
            let fs = cap.fs_type.or(params.fs_type).unwrap_or(FsType::Ext4);
            super::options::check_mkfs(fs, &params.mkfs_options)?;
        }
        // The VolumeAttributesClass's parameters, over the StorageClass's limits.
        let limits = params.qos.modified(&req.mutable_parameters)?;
        let source = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => {
                Some(Source::Snapshot(s.snapshot_id.clone()))
            }
            Some(volume_content_source::Type::Volume(v)) => {
                Some(Source::Volume(v.volume_id.clone()))
            }
        };
        let requested = size_for(req.capacity_range.as_ref())?;
        if !topology_allows(plugin, req.accessibility_requirements.as_ref()) {
            return Err(Error::ResourceExhausted(format!(
                "volumes of this plugin live on node {}, which no requisite topology allows",
                plugin.config.node_id
            )));
        }
        let _held = plugin.locks.try_lock(format!("name {:?}", req.name))?;
        let mut access: Vec<AccessType> = caps.iter().map(|c| c.access).collect();
        access.sort_by_key(|a| *a as u8);
        access.dedup();
        if let Some(existing) = plugin.state()?.volume_by_name(&req.name) {
            let (r, l) = req
                .capacity_range
                .as_ref()
                .map_or((0, 0), |c| (c.required_bytes as u64, c.limit_bytes as u64));
            let fits = existing.size >= r && (l == 0 || existing.size <= l);
            if !fits || existing.parameters != params.canonical() || existing.source != source {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists as {} with {} bytes, parameters {:?} and source {:?}",
                    req.name, existing.id, existing.size, existing.parameters, existing.source
                )));
            }
            return Ok(to_volume(plugin, existing));
        }
        // The source, held still while the new head is made on top of it: its lock first, then
        // its size and top layer (a snapshot's frozen layer, a volume's head), read once under
        // the lock.
        let (_source_lock, source_size, source_layer) = match &source {
            None => (None, None, None),
            Some(Source::Snapshot(id)) => {
                let lock = plugin.locks.try_lock(id.clone())?;
                let (size, layer) = plugin
                    .state()?
                    .snapshot(id)
                    .map(|s| (s.size, s.layer.clone()))
                    .ok_or_else(|| source_elsewhere(plugin, "snapshot", id))?;
                (Some(lock), Some(size), Some(layer))
            }
            Some(Source::Volume(id)) => {
                let lock = plugin.locks.try_lock(id.clone())?;
                let (size, head) = plugin
                    .state()?
                    .volume(id)
                    .map(|v| (v.size, v.head.clone()))
                    .ok_or_else(|| source_elsewhere(plugin, "volume", id))?;
                (Some(lock), Some(size), Some(head))
            }
        };
        let size = match (source_size, req.capacity_range.as_ref()) {
            // A restore or clone without a size has its source's.
            (Some(src), None) => src,
            (Some(src), Some(r)) if r.required_bytes == 0 && r.limit_bytes == 0 => src,
            (Some(src), Some(r)) if requested < src => {
                if r.limit_bytes > 0 && (r.limit_bytes as u64) < src {
                    return Err(Error::OutOfRange(format!(
                        "the source has {src} bytes, more than limit_bytes {}",
                        r.limit_bytes
                    )));
                }
                src
            }
            _ => requested,
        };
        check_size(plugin, &params, size, 0)?;
        if let Some(layer) = &source_layer {
            check_source_key(plugin, layer, &params, passphrase.as_ref())?;
        }
        let id = state::new_id("vol-");
        let head = plugin.pending_layer();
        match &source {
            // A restore: the new head on top of the snapshot's layer.
            None | Some(Source::Snapshot(_)) => {
                make_layer(
                    plugin,
                    &head.name,
                    source_layer.as_deref(),
                    size,
                    &params,
                    passphrase.as_ref(),
                )?;
            }
            Some(Source::Volume(src)) => {
                // A clone: an implicit snapshot (a frozen layer nothing lists), restored.
                let (frozen, _) = freeze_head(plugin, src)?;
                make_layer(plugin, &head.name, Some(&frozen), size, &params, None)?;
            }
        }
        super::failpoint("create-after-layer");
        let rec = VolumeRecord {
            id,
            name: req.name,
            size,
            head: head.name.clone(),
            parameters: params.canonical(),
            qos: limits.canonical(),
            access,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source,
            claim: state::ClaimRef::from_parameters(&req.parameters),
        };
        let volume = to_volume(plugin, &rec);
        // The commit point: before it, a crash leaves an orphan layer for the next load.
        plugin.state()?.put_volume(rec)?;
        super::failpoint("create-after-record");
        tracing::info!(volume = %volume.volume_id, size, "created");
        Ok(volume)
    }

    pub(crate) fn delete(&self, req: DeleteVolumeRequest) -> Result<()> {
        let plugin = &*self.0;
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if !state::is_volume_id(&req.volume_id) {
            return Ok(()); // names no volume of ours: already gone
        }
        let _held = plugin.locks.try_lock(req.volume_id.clone())?;
        if plugin.node.is_staged(&req.volume_id) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged on this node; unstage it first",
                req.volume_id
            )));
        }
        let removed = plugin.state()?.remove_volume(&req.volume_id)?;
        if let Some(rec) = removed {
            super::failpoint("delete-after-record");
            // After the commit point: its head, and frozen layers only it reached, go. A
            // crash here leaves them to the next load's collection.
            plugin.metrics.forget_volume(&rec.id);
            let collected = plugin.collect_garbage()?;
            tracing::info!(volume = %rec.id, layers = collected, "deleted");
        }
        Ok(())
    }

    fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let rec = self.0.volume_record(&req.volume_id)?;
        let unsupported = req
            .volume_capabilities
            .iter()
            .find_map(|c| capability::check(c).err());
        let params_differ = !req.parameters.is_empty()
            && Params::parse(&req.parameters)
                .map(|p| p.canonical())
                .ok()
                .as_ref()
                != Some(&rec.parameters);
        let message = match (unsupported, params_differ) {
            (Some(e), _) => e.to_string(),
            (None, true) => "the parameters differ from the volume's".into(),
            (None, false) => {
                return Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: Default::default(),
                    }),
                    message: String::new(),
                });
            }
        };
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        })
    }

    fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse> {
        let paging = Paging::new(req.max_entries, &req.starting_token, state::is_volume_id)?;
        let st = self.0.state()?;
        let (page, next_token) = paging.page(st.volumes(), |v| &v.id);
        Ok(ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(to_volume(&self.0, v)),
                    status: None,
                })
                .collect(),
            next_token,
        })
    }

    fn capacity(&self, req: GetCapacityRequest) -> Result<i64> {
        let params = Params::parse(&req.parameters)?;
        for c in &req.volume_capabilities {
            capability::check(c)?;
        }
        if let Some(t) = &req.accessible_topology
            && t.segments.get(super::TOPOLOGY_KEY) != Some(&self.0.config.node_id)
        {
            return Ok(0);
        }
        Ok(available(&self.0, params.overcommit_ratio)?.min(i64::MAX as u64) as i64)
    }
}

fn caps() -> Vec<ControllerServiceCapability> {
    [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::ListVolumes,
        rpc::Type::GetCapacity,
        rpc::Type::GetVolume,
        rpc::Type::SingleNodeMultiWriter,
        rpc::Type::CreateDeleteSnapshot,
        rpc::Type::ListSnapshots,
        rpc::Type::CloneVolume,
        rpc::Type::GetSnapshot,
        rpc::Type::ModifyVolume,
    ]
    .into_iter()
    .map(|t| ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    })
    .collect()
}

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Error::Unimplemented(format!("{what} is not offered by this plugin")).into())
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        let volume = self
            .0
            .blocking(move || {
                let volume = this.create(req.into_inner())?;
                // A restore or clone may be deep, and a clone deepened its source.
                let source = volume
                    .content_source
                    .as_ref()
                    .and_then(|s| s.r#type.as_ref());
                if let Some(src) = source {
                    super::flatten::check(&this.0, &volume.volume_id);
                    if let volume_content_source::Type::Volume(v) = src {
                        super::flatten::check(&this.0, &v.volume_id);
                    }
                }
                Ok(volume)
            })
            .await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        self.0
            .blocking(move || this.delete(req.into_inner()))
            .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        rpclog::subject(&req);
        Ok(Response::new(self.validate(req.into_inner())?))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(self.list(req.into_inner())?))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(GetCapacityResponse {
            available_capacity: self.capacity(req.into_inner())?,
            maximum_volume_size: None,
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: caps(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        let snapshot = self
            .0
            .blocking(move || {
                let snapshot = this.create_snapshot(req.into_inner())?;
                super::flatten::check(&this.0, &snapshot.source_volume_id);
                Ok(snapshot)
            })
            .await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        self.0
            .blocking(move || this.delete_snapshot(req.into_inner()))
            .await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list_snapshots(req.into_inner())?))
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        rpclog::subject(&req);
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(self.get_snapshot(req.into_inner())?),
        }))
    }

    /// Not offered: a cluster-wide csi-resizer would send it to whichever node's plugin won
    /// its leader election, not to the node holding the volume. Growth is NodeExpandVolume's
    /// job (the resizer's node-only mode), on the volume's own node.
    async fn controller_expand_volume(
        &self,
        _: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        unimplemented("ControllerExpandVolume (volumes grow through NodeExpandVolume)")
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        rpclog::subject(&req);
        let id = req.into_inner().volume_id;
        let rec = self.0.volume_record(&id)?;
        let problem = {
            let st = self.0.state()?;
            if !st.layer_path(&rec.head).exists() {
                Some(format!("the head layer {} is missing", rec.head))
            } else {
                st.damage(&id)
                    .map(|why| format!("the layer chain cannot be read: {why}"))
            }
        };
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(to_volume(&self.0, &rec)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(VolumeCondition {
                    abnormal: problem.is_some(),
                    message: problem.unwrap_or_default(),
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        rpclog::subject(&req);
        let req = req.into_inner();
        let plugin = self.0.clone();
        self.0
            .blocking(move || {
                super::modify::controller_modify(&plugin, &req.volume_id, &req.mutable_parameters)
            })
            .await?;
        Ok(Response::new(ControllerModifyVolumeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        }
    }

    #[test]
    fn sizes_follow_the_capacity_range_rules() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(0, 0))).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(0, 8192))).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(1 << 30, 1 << 30))).unwrap(), 1 << 30);
        assert_eq!(size_for(Some(&range(5000, 0))).unwrap(), 8192);
        assert!(matches!(
            size_for(Some(&range(5000, 6000))),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(-1, 0))),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            size_for(Some(&range(10, 5))),
            Err(Error::InvalidArgument(_))
        ));
    }
}
