//! Group snapshots (the GroupController service): several volumes of this node snapshotted
//! at one point in time.
//!
//! The members are frozen together: every member's filesystem is frozen (fsfreeze), then
//! every member's export is quiesced, then every head is pivoted onto a new empty layer,
//! then all resume and thaw. No write reaches any member between the first freeze and the
//! last pivot, so the frozen layers hold one instant of all of them. If any step fails,
//! every member is put back as it was.
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
use super::live::LiveImage;
use super::params::Params;
use super::snapshot::{check_parameters, make_layer, to_snapshot};
use super::staged::{attach_dir, head_options, mark_frozen, unmark_frozen};
use super::state::{self, AccessType, GroupRecord, SnapshotRecord, VolumeRecord};
use super::{Plugin, failpoint, rpclog};
use crate::error::{Error, Result};

/// The GroupController service.
#[derive(Debug, Clone)]
pub struct GroupControllerService(pub Arc<Plugin>);

/// Freezes the heads of volumes `ids` (sorted, locked by the caller) at one instant: returns
/// each member's frozen layer and new record, in the order of `ids`.
fn freeze_heads(plugin: &Plugin, ids: &[String]) -> Result<Vec<(String, VolumeRecord)>> {
    let recs = ids
        .iter()
        .map(|id| plugin.volume_record(id))
        .collect::<Result<Vec<_>>>()?;
    // New heads, each on top of its volume's current head.
    let mut pending = Vec::with_capacity(recs.len());
    for rec in &recs {
        let layer = plugin.pending_layer();
        let made = Params::from_canonical(&rec.parameters).and_then(|params| {
            make_layer(
                plugin,
                &layer.name,
                Some(&rec.head),
                rec.size,
                &params,
                None,
            )
        });
        if let Err(e) = made {
            remove_layers(
                plugin,
                pending.iter().map(|p: &super::PendingLayer<'_>| &p.name),
            );
            return Err(e);
        }
        pending.push(layer);
    }
    failpoint("group-after-layers");
    let nexts: Vec<VolumeRecord> = recs
        .iter()
        .zip(&pending)
        .map(|(rec, layer)| VolumeRecord {
            head: layer.name.clone(),
            ..rec.clone()
        })
        .collect();
    let undo = |written: usize| {
        for rec in &recs[..written] {
            if let Err(e) = plugin.state().and_then(|mut st| st.put_volume(rec.clone())) {
                tracing::error!(volume = %rec.id, error = %e, "putting a group member's record back");
            }
        }
        remove_layers(plugin, pending.iter().map(|p| &p.name));
    };
    // Records first: from here a crash leaves heads on top of the old ones (the same data).
    for (written, next) in nexts.iter().enumerate() {
        if let Err(e) = plugin
            .state()
            .and_then(|mut st| st.put_volume(next.clone()))
        {
            undo(written);
            return Err(e);
        }
        failpoint("group-after-record");
    }
    if let Err(e) = pivot_live(plugin, &recs, &nexts) {
        undo(recs.len());
        return Err(e);
    }
    for (rec, next) in recs.iter().zip(&nexts) {
        tracing::info!(volume = %rec.id, frozen = %rec.head, head = %next.head, "froze the head (group)");
    }
    Ok(recs.into_iter().map(|r| r.head).zip(nexts).collect())
}

/// The staged members: filesystems frozen, exports quiesced, all pivoted, then resumed and
/// thawed. On a failure the members pivoted already are pivoted back before anything
/// resumes, so no write reaches a new head that is about to go.
fn pivot_live(plugin: &Plugin, recs: &[VolumeRecord], nexts: &[VolumeRecord]) -> Result<()> {
    struct Member<'a> {
        id: &'a str,
        live: Arc<LiveImage>,
        staged: Arc<super::staged::Staged>,
        old: std::path::PathBuf,
        new: std::path::PathBuf,
    }
    let (layers, members) = {
        let st = plugin.state()?;
        let members: Vec<Member<'_>> = recs
            .iter()
            .zip(nexts)
            .filter_map(|(rec, next)| {
                let staged = plugin.node.get(&rec.id)?;
                let live = staged.image.clone()?;
                Some(Member {
                    id: &rec.id,
                    live,
                    staged,
                    old: st.layer_path(&rec.head),
                    new: st.layer_path(&next.head),
                })
            })
            .collect();
        (st.layers_dir(), members)
    };
    // Every filesystem first (each flushes and then holds its writes), then every export.
    let mut frozen = Vec::new();
    for m in &members {
        let cap = &m.staged.cap;
        if cap.access == AccessType::Mount && !cap.read_only_mode {
            let work = attach_dir(&plugin.config.state_dir, m.id);
            // The mark lets the next process thaw the filesystem if this one ends frozen.
            if mark_frozen(&work).is_ok() && plugin.host.freeze(&m.staged.staging, true) {
                frozen.push((m, work));
            } else {
                unmark_frozen(&work);
            }
        }
    }
    failpoint("group-while-frozen");
    let mut quiesced: Vec<_> = members.iter().map(|m| m.live.quiesce()).collect();
    let mut failed = None;
    let mut pivoted = 0;
    for (q, m) in quiesced.iter_mut().zip(&members) {
        let opts = head_options(layers.clone(), &m.staged.cap, m.staged.passphrase.clone());
        if let Err(e) = q.pivot(&m.old, &m.new, &opts) {
            failed = Some(Error::Internal(format!("volume {}: {e}", m.id)));
            break;
        }
        pivoted += 1;
        failpoint("group-after-pivot");
    }
    if failed.is_some() {
        for (q, m) in quiesced.iter_mut().zip(&members).take(pivoted) {
            let opts = head_options(layers.clone(), &m.staged.cap, m.staged.passphrase.clone());
            if let Err(e) = q.pivot(&m.new, &m.old, &opts) {
                tracing::error!(volume = %m.id, error = %e, "pivoting a group member back");
            }
        }
    }
    drop(quiesced);
    for (m, work) in frozen {
        if !plugin.host.freeze(&m.staged.staging, false) {
            tracing::error!(volume = %m.id, "fsfreeze -u failed: the filesystem stays frozen");
        }
        unmark_frozen(&work);
    }
    failed.map_or(Ok(()), Err)
}

fn remove_layers<'a>(plugin: &Plugin, names: impl Iterator<Item = &'a String>) {
    for name in names {
        if let Ok(path) = plugin.state().map(|st| st.layer_path(name)) {
            let _ = state::remove_durably(&path);
        }
    }
}

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
        let frozen = freeze_heads(plugin, &ids)?;
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
