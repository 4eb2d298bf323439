//! Snapshots as frozen layers: CreateSnapshot freezes the volume's head (it becomes the
//! snapshot's layer) and gives the volume a new empty head on top, O(1) in the volume's size.
//! A staged volume pivots in-process (its filesystem frozen around the swap). Restores and
//! clones are new heads on top of a frozen layer. Deleting a snapshot or a volume only drops
//! its record: a layer lives while a volume or snapshot reaches it (`state.rs`).
//!
//! Order of a freeze: the new head is made (pending, so collection leaves it), then the
//! volume's record names it (the commit point), then a staged volume pivots onto it. A crash
//! before the record leaves an orphan; after it, the volume's head is the new layer on top of
//! everything written so far (a reattached device serves it). The snapshot record comes last:
//! a crash before it leaves a frozen layer that nothing lists, and the retry freezes again.
//! The freeze itself is `freeze.rs`, shared with group snapshots.

use csi_proto::Timestamp;
use csi_proto::v1::*;
use qcow2_engine::crypto::Passphrase;
use qcow2_engine::crypto::luks::NewHeader;
use qcow2_engine::ops::create::{BackingFormat, CreateOptions, NewEncryption, create};

use super::controller::{ControllerService, Paging, check_name};
use super::freeze::freeze_head;
use super::params::Params;
use super::state::{self, SnapshotRecord};
use super::{Plugin, failpoint};
use crate::error::{Error, Result};

pub(super) fn to_snapshot(rec: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: rec.size as i64,
        snapshot_id: rec.id.clone(),
        source_volume_id: rec.source_volume_id.clone(),
        creation_time: Some(Timestamp {
            seconds: rec.created.0 as i64,
            nanos: rec.created.1 as i32,
        }),
        ready_to_use: true,
        group_snapshot_id: rec.group.clone().unwrap_or_default(),
    }
}

/// Makes a new empty layer of `size` bytes, standalone or on top of `backing` (a layer file
/// name), with the cluster layout of `params`. The caller holds `name` pending.
///
/// An encrypted volume's layers share one key: a layer on top of another copies its LUKS
/// header (no passphrase needed, and a chain unlocks once); a standalone one gets a new key
/// opened by `passphrase`.
pub(super) fn make_layer(
    plugin: &Plugin,
    name: &str,
    backing: Option<&str>,
    size: u64,
    params: &Params,
    passphrase: Option<&Passphrase>,
) -> Result<()> {
    let (path, backing_path) = {
        let st = plugin.state()?;
        (st.layer_path(name), backing.map(|b| st.layer_path(b)))
    };
    let encryption = match (params.encrypted, backing_path, passphrase) {
        (false, _, _) => None,
        (true, Some(base), _) => Some(NewEncryption::SameKeyAs(base)),
        (true, None, Some(p)) => Some(NewEncryption::New {
            passphrase: p.clone(),
            params: NewHeader {
                iter_time_ms: params.encryption_iter_time_ms,
                ..NewHeader::default()
            },
        }),
        (true, None, None) => {
            return Err(Error::Internal(
                "a new encrypted volume needs its passphrase".into(),
            ));
        }
    };
    create(
        &path,
        &CreateOptions {
            size: Some(size),
            cluster_size: params.cluster_size,
            extended_l2: params.subclusters,
            backing: backing.map(|b| (b.to_string(), BackingFormat::Qcow2)),
            encryption,
            ..CreateOptions::default()
        },
    )
    .map_err(|e| Error::engine(format!("creating {}", path.display()), e))?;
    state::private_file(&path)
}

/// Snapshot parameters: only the keys the external snapshotter adds.
pub(super) fn check_parameters(params: &std::collections::HashMap<String, String>) -> Result<()> {
    match params
        .keys()
        .find(|k| !k.starts_with("csi.storage.k8s.io/"))
    {
        Some(k) => Err(Error::InvalidArgument(format!(
            "snapshot parameter {k:?} is not supported (snapshots take none)"
        ))),
        None => Ok(()),
    }
}

impl ControllerService {
    pub(crate) fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<Snapshot> {
        let plugin = &*self.0;
        check_name(&req.name)?;
        if req.source_volume_id.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_id is required".into(),
            ));
        }
        check_parameters(&req.parameters)?;
        let _name = plugin
            .locks
            .try_lock(format!("snapshot name {:?}", req.name))?;
        if let Some(existing) = plugin.state()?.snapshot_by_name(&req.name) {
            if existing.source_volume_id == req.source_volume_id {
                return Ok(to_snapshot(existing));
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {:?} exists as {} of volume {}",
                req.name, existing.id, existing.source_volume_id
            )));
        }
        plugin.volume_record(&req.source_volume_id)?;
        let _volume = plugin.locks.try_lock(req.source_volume_id.clone())?;
        let (frozen, volume) = freeze_head(plugin, &req.source_volume_id)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let rec = SnapshotRecord {
            id: state::new_id("snap-"),
            name: req.name,
            source_volume_id: volume.id,
            layer: frozen,
            size: volume.size,
            created: (now.as_secs(), now.subsec_nanos()),
            group: None,
        };
        plugin.state()?.put_snapshot(rec.clone())?;
        failpoint("snapshot-after-record");
        tracing::info!(snapshot = %rec.id, volume = %rec.source_volume_id, "snapshot taken");
        Ok(to_snapshot(&rec))
    }

    pub(crate) fn delete_snapshot(&self, req: DeleteSnapshotRequest) -> Result<()> {
        let plugin = &*self.0;
        if req.snapshot_id.is_empty() {
            return Err(Error::InvalidArgument("snapshot_id is required".into()));
        }
        if !state::is_snapshot_id(&req.snapshot_id) {
            return Ok(()); // names no snapshot of ours: already gone
        }
        let _held = plugin.locks.try_lock(req.snapshot_id.clone())?;
        let removed = plugin.state()?.remove_snapshot(&req.snapshot_id)?;
        if removed.is_some() {
            failpoint("delete-snapshot-after-record");
            let collected = plugin.collect_garbage()?;
            tracing::info!(snapshot = %req.snapshot_id, layers = collected, "snapshot deleted");
        }
        Ok(())
    }

    pub(crate) fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse> {
        let paging = Paging::new(req.max_entries, &req.starting_token, state::is_snapshot_id)?;
        let st = self.0.state()?;
        let matching = st.snapshots().filter(|s| {
            (req.snapshot_id.is_empty() || s.id == req.snapshot_id)
                && (req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id)
        });
        let (page, next_token) = paging.page(matching, |s| &s.id);
        Ok(ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(to_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    pub(crate) fn get_snapshot(&self, req: GetSnapshotRequest) -> Result<Snapshot> {
        if req.snapshot_id.is_empty() {
            return Err(Error::InvalidArgument("snapshot_id is required".into()));
        }
        self.0
            .state()?
            .snapshot(&req.snapshot_id)
            .map(to_snapshot)
            .ok_or_else(|| Error::NotFound(format!("no snapshot {:?}", req.snapshot_id)))
    }
}
