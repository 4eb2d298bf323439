//! Group snapshots (the GroupController service): several volumes of this node snapshotted
//! at one point in time.
//!
//! The members are frozen together: every member's filesystem is frozen (fsfreeze), then
//! every member's export is quiesced, then every head is pivoted onto a new empty layer,
//! then all resume and thaw. No write reaches any member between the first freeze and the
//! last pivot, so the frozen layers hold one instant of all of them. If any step fails,
//! every member is put back as it was. A single snapshot's freeze is the same code with one
//! member (`freeze.rs`).
//!
//! Crash safety follows the single snapshot's rules (`snapshot.rs`): new head layers are
//! made first (orphans until a record names them); every member's volume record is written
//! before its export pivots, so no member is ever pivoted without its record; then the
//! member snapshot records, each naming the group; the group record last is the commit
//! point. A member whose group record is missing is removed at load
//! ([`super::state::State::load`]), so a crash at any step leaves no snapshot nobody was
//! told about, and the heads on top of the old layers read the same data.

use std::sync::Arc;

use csi_proto::Timestamp;
use csi_proto::v1::group_controller_server::GroupController;
use csi_proto::v1::group_controller_service_capability::rpc::Type as RpcType;
use csi_proto::v1::group_controller_service_capability::{Rpc, Type as CapType};
use csi_proto::v1::*;
use tonic::{Request, Response, Status};

use super::controller::check_name;
use super::freeze::{GROUP, freeze_heads};
use super::snapshot::{check_parameters, to_snapshot};
use super::state::{self, GroupRecord, SnapshotRecord};
use super::{Plugin, failpoint, rpclog};
use crate::error::{Error, Result};

/// The GroupController service.
#[derive(Debug, Clone)]
pub struct GroupControllerService(pub Arc<Plugin>);

fn to_group(st: &state::State, g: &GroupRecord) -> VolumeGroupSnapshot {
    VolumeGroupSnapshot {
        group_snapshot_id: g.id.clone(),
        snapshots: g
            .snapshot_ids
            .iter()
            .filter_map(|id| st.snapshot(id))
            .map(to_snapshot)
            .collect(),
        creation_time: Some(Timestamp {
            seconds: g.created.0 as i64,
            nanos: g.created.1 as i32,
        }),
        ready_to_use: true,
    }
}

/// INVALID_ARGUMENT when `asked` (if given) is not the group's members: every member still
/// there must be named, and nothing else.
fn check_members(st: &state::State, g: &GroupRecord, asked: &[String]) -> Result<()> {
    if asked.is_empty() {
        return Ok(());
    }
    let stray = asked.iter().find(|id| !g.snapshot_ids.contains(id));
    let missing = g
        .snapshot_ids
        .iter()
        .find(|id| st.snapshot(id).is_some() && !asked.contains(id));
    match (stray, missing) {
        (Some(id), _) => Err(Error::InvalidArgument(format!(
            "snapshot {id:?} is not a member of group snapshot {}",
            g.id
        ))),
        (_, Some(id)) => Err(Error::InvalidArgument(format!(
            "snapshot_ids leave out member {id} of group snapshot {}",
            g.id
        ))),
        _ => Ok(()),
    }
}

impl GroupControllerService {
    pub(crate) fn create(
        &self,
        req: CreateVolumeGroupSnapshotRequest,
    ) -> Result<VolumeGroupSnapshot> {
        let plugin = &*self.0;
        check_name(&req.name)?;
        check_parameters(&req.parameters)?;
        if req.source_volume_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_ids is required".into(),
            ));
        }
        let mut ids = req.source_volume_ids.clone();
        ids.sort();
        ids.dedup();
        if ids.len() != req.source_volume_ids.len() || ids.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument(
                "source_volume_ids must name distinct volumes".into(),
            ));
        }
        let _name = plugin
            .locks
            .try_lock(format!("group snapshot name {:?}", req.name))?;
        {
            let st = plugin.state()?;
            if let Some(g) = st.group_by_name(&req.name) {
                if g.source_volume_ids == ids {
                    return Ok(to_group(&st, g));
                }
                return Err(Error::AlreadyExists(format!(
                    "group snapshot {:?} exists as {} of volumes {:?}",
                    req.name, g.id, g.source_volume_ids
                )));
            }
            for id in &ids {
                if st.volume(id).is_some() {
                    continue;
                }
                if !state::is_volume_id(id) {
                    return Err(Error::NotFound(format!("no volume {id:?}")));
                }
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is not on node {}: the volumes of a group snapshot must all \
                     live on one node (volumes are node-local)",
                    plugin.config.node_id
                )));
            }
        }
        // Sorted order: two groups sharing members cannot hold each other's locks.
        let _members = ids
            .iter()
            .map(|id| plugin.locks.try_lock(id.clone()))
            .collect::<Result<Vec<_>>>()?;
        let frozen = freeze_heads(plugin, &ids, &GROUP)?;
        let gid = state::new_id("group-");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let created = (now.as_secs(), now.subsec_nanos());
        let mut snapshot_ids = Vec::with_capacity(frozen.len());
        for (layer, volume) in frozen {
            let rec = SnapshotRecord {
                id: state::new_id("snap-"),
                name: format!("{}#{}", req.name, volume.id),
                source_volume_id: volume.id,
                layer,
                size: volume.size,
                created,
                group: Some(gid.clone()),
            };
            snapshot_ids.push(rec.id.clone());
            plugin.state()?.put_snapshot(rec)?;
            failpoint("group-after-member");
        }
        let group = GroupRecord {
            id: gid,
            name: req.name,
            source_volume_ids: ids,
            snapshot_ids,
            created,
        };
        let mut st = plugin.state()?;
        st.put_group(group.clone())?;
        tracing::info!(group = %group.id, members = group.snapshot_ids.len(), "group snapshot taken");
        Ok(to_group(&st, &group))
    }

    pub(crate) fn delete(&self, req: DeleteVolumeGroupSnapshotRequest) -> Result<()> {
        let plugin = &*self.0;
        if req.group_snapshot_id.is_empty() {
            return Err(Error::InvalidArgument(
                "group_snapshot_id is required".into(),
            ));
        }
        if !state::is_group_id(&req.group_snapshot_id) {
            return Ok(()); // names no group snapshot of ours: already gone
        }
        let _held = plugin.locks.try_lock(req.group_snapshot_id.clone())?;
        let removed = {
            let mut st = plugin.state()?;
            let Some(g) = st.group(&req.group_snapshot_id).cloned() else {
                return Ok(());
            };
            check_members(&st, &g, &req.snapshot_ids)?;
            // The commit point: members left by a crash after it go at the next load.
            st.remove_group(&g.id)?;
            failpoint("delete-group-after-record");
            for id in &g.snapshot_ids {
                st.remove_snapshot(id)?;
            }
            g
        };
        let collected = plugin.collect_garbage()?;
        tracing::info!(group = %removed.id, layers = collected, "group snapshot deleted");
        Ok(())
    }

    pub(crate) fn get(&self, req: GetVolumeGroupSnapshotRequest) -> Result<VolumeGroupSnapshot> {
        if req.group_snapshot_id.is_empty() {
            return Err(Error::InvalidArgument(
                "group_snapshot_id is required".into(),
            ));
        }
        let st = self.0.state()?;
        let g = st.group(&req.group_snapshot_id).ok_or_else(|| {
            Error::NotFound(format!("no group snapshot {:?}", req.group_snapshot_id))
        })?;
        check_members(&st, g, &req.snapshot_ids)?;
        Ok(to_group(&st, g))
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(CapType::Rpc(Rpc {
                    r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<CreateVolumeGroupSnapshotResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        let group = self
            .0
            .blocking(move || this.create(req.into_inner()))
            .await?;
        Ok(Response::new(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeGroupSnapshotResponse>, Status> {
        rpclog::subject(&req);
        let this = self.clone();
        self.0
            .blocking(move || this.delete(req.into_inner()))
            .await?;
        Ok(Response::new(DeleteVolumeGroupSnapshotResponse {}))
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<GetVolumeGroupSnapshotResponse>, Status> {
        rpclog::subject(&req);
        let group = self.get(req.into_inner())?;
        Ok(Response::new(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group),
        }))
    }
}
