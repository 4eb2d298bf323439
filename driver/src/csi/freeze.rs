//! Freezing heads, for a snapshot of one volume and for a group snapshot of several at one
//! instant: each volume gets a new empty head on top of its current one, which becomes the
//! frozen layer.
//!
//! Order (the crash rules of `snapshot.rs` and `group.rs`): the new heads are made first
//! (pending, so collection leaves them; a crash leaves orphans); then every volume's record
//! names its new head (the commit point: a crash leaves heads on top of the old ones, the
//! same data, and a reattached device serves them); then the staged volumes pivot. Those
//! are frozen together: every filesystem frozen (fsfreeze), every export quiesced, every
//! head pivoted, then all resume and thaw, so no write reaches any member between the
//! first freeze and the last pivot. If a step fails, every volume is put back as it was:
//! members pivoted already pivot back before anything resumes, records are restored and
//! the new heads removed.

use std::path::PathBuf;
use std::sync::Arc;

use super::live::LiveImage;
use super::params::Params;
use super::snapshot::make_layer;
use super::staged::{Staged, attach_dir, head_options, mark_frozen, unmark_frozen};
use super::state::{self, AccessType, VolumeRecord};
use super::{PendingLayer, Plugin, failpoint};
use crate::error::Result;

/// Where a freeze can be made to crash (`QCOW2_CSI_FAILPOINT`): a single snapshot's points
/// and a group's have their own names, so the crash tests aim at either.
#[derive(Debug)]
pub(super) struct Failpoints {
    /// The new heads are made; no record names them.
    pub after_layers: &'static str,
    /// After each volume's record names its new head.
    pub after_record: &'static str,
    /// The staged volumes' filesystems are frozen (only when some volume is staged).
    pub while_frozen: &'static str,
    /// After each staged volume's pivot.
    pub after_pivot: &'static str,
}

/// A CreateSnapshot's freeze.
pub(super) const SNAPSHOT: Failpoints = Failpoints {
    after_layers: "freeze-after-layer",
    after_record: "freeze-after-record",
    while_frozen: "snapshot-while-frozen",
    after_pivot: "snapshot-after-pivot",
};

/// A CreateVolumeGroupSnapshot's freeze.
pub(super) const GROUP: Failpoints = Failpoints {
    after_layers: "group-after-layers",
    after_record: "group-after-record",
    while_frozen: "group-while-frozen",
    after_pivot: "group-after-pivot",
};

/// Freezes volume `id`'s head (the caller holds the volume's lock): returns the frozen
/// layer and the volume's new record.
pub(super) fn freeze_head(plugin: &Plugin, id: &str) -> Result<(String, VolumeRecord)> {
    let mut one = freeze_heads(plugin, &[id.to_string()], &SNAPSHOT)?;
    Ok(one.pop().expect("one volume, one frozen head"))
}

/// Freezes the heads of volumes `ids` (locked by the caller, in a fixed order) at one
/// instant: returns each volume's frozen layer and new record, in the order of `ids`.
pub(super) fn freeze_heads(
    plugin: &Plugin,
    ids: &[String],
    points: &Failpoints,
) -> Result<Vec<(String, VolumeRecord)>> {
    let recs = ids
        .iter()
        .map(|id| plugin.volume_record(id))
        .collect::<Result<Vec<_>>>()?;
    // New heads, each on top of its volume's current head (an encrypted one with its key).
    let mut pending: Vec<PendingLayer<'_>> = Vec::with_capacity(recs.len());
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
            remove_layers(plugin, pending.iter().map(|p| &p.name));
            return Err(e);
        }
        pending.push(layer);
    }
    failpoint(points.after_layers);
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
                tracing::error!(volume = %rec.id, error = %e, "putting a volume's record back after a failed freeze");
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
        failpoint(points.after_record);
    }
    if let Err(e) = pivot_staged(plugin, &recs, &nexts, points) {
        undo(recs.len());
        return Err(e);
    }
    let group = ids.len() > 1;
    for (rec, next) in recs.iter().zip(&nexts) {
        tracing::info!(volume = %rec.id, frozen = %rec.head, head = %next.head, group, "froze the head");
    }
    Ok(recs.into_iter().map(|r| r.head).zip(nexts).collect())
}

/// The staged volumes among `recs`: filesystems frozen, exports quiesced, all pivoted onto
/// their new heads, then resumed and thawed. On a failure the volumes pivoted already are
/// pivoted back before anything resumes, so no write reaches a new head that is about to
/// go.
fn pivot_staged(
    plugin: &Plugin,
    recs: &[VolumeRecord],
    nexts: &[VolumeRecord],
    points: &Failpoints,
) -> Result<()> {
    struct Member<'a> {
        id: &'a str,
        live: Arc<LiveImage>,
        staged: Arc<Staged>,
        old: PathBuf,
        new: PathBuf,
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
    if members.is_empty() {
        return Ok(());
    }
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
    failpoint(points.while_frozen);
    let mut quiesced: Vec<_> = members.iter().map(|m| m.live.quiesce()).collect();
    let opts =
        |m: &Member<'_>| head_options(layers.clone(), &m.staged.cap, m.staged.passphrase.clone());
    let mut failed = None;
    let mut pivoted = 0;
    for (q, m) in quiesced.iter_mut().zip(&members) {
        if let Err(e) = q.pivot(&m.old, &m.new, &opts(m)) {
            failed = Some(e.context(format!("volume {}", m.id)));
            break;
        }
        pivoted += 1;
        failpoint(points.after_pivot);
    }
    if failed.is_some() {
        for (q, m) in quiesced.iter_mut().zip(&members).take(pivoted) {
            if let Err(e) = q.pivot(&m.new, &m.old, &opts(m)) {
                tracing::error!(volume = %m.id, error = %e, "pivoting a volume back after a failed freeze");
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

/// Removes new heads that no record names (a failed freeze).
fn remove_layers<'a>(plugin: &Plugin, names: impl Iterator<Item = &'a String>) {
    for name in names {
        if let Ok(path) = plugin.state().map(|st| st.layer_path(name)) {
            let _ = state::remove_durably(&path);
        }
    }
}
