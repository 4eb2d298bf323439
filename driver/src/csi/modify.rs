//! Changing a volume's mutable parameters (its QoS limits) while it is in use: what
//! ControllerModifyVolume does, and what the node applies when it sees a PersistentVolume
//! move to another VolumeAttributesClass ([`super::attributes`]).
//!
//! The record is written first and the live export changed after: a crash in between leaves
//! the record, and the next staging (or the restart's takeover) serves the volume with it.

use std::collections::HashMap;
use std::time::Instant;

use super::Plugin;
use super::state::is_volume_id;
use crate::error::{Error, Result};
use crate::nbd::qos::Limits;

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The record holds the new limits; `live` says whether a staged export took them too.
    Changed { limits: Limits, live: bool },
    /// The volume already had these limits.
    Unchanged,
    /// No volume of this node has the id.
    NotHere,
}

/// Applies mutable parameters `raw` to volume `id` of this node: validated first (only the
/// QoS keys, typed), then the record, then the staged export, live. Holds the volume's lock
/// (ABORTED while another operation on it runs).
pub fn apply(plugin: &Plugin, id: &str, raw: &HashMap<String, String>) -> Result<Applied> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("volume_id is required".into()));
    }
    // Validated before anything is looked up: a bad class is refused wherever it is sent.
    Limits::default().modified(raw)?;
    if !is_volume_id(id) {
        return Ok(Applied::NotHere);
    }
    let _held = plugin.locks.try_lock(id.to_string())?;
    let mut rec = match plugin.state()?.volume(id) {
        Some(rec) => rec.clone(),
        None => return Ok(Applied::NotHere),
    };
    let old = rec.limits();
    let limits = old.modified(raw)?;
    if limits == old {
        return Ok(Applied::Unchanged);
    }
    rec.qos = limits.canonical();
    plugin.state()?.put_volume(rec)?;
    super::failpoint("modify-after-record");
    let live = match plugin.node.get(id) {
        Some(staged) => {
            staged.qos.set(limits, Instant::now());
            true
        }
        None => false,
    };
    tracing::info!(volume = %id, ?limits, live, "QoS limits changed");
    Ok(Applied::Changed { limits, live })
}

/// ControllerModifyVolume. The csi-resizer sends it to the plugin of whichever node leads
/// its election, not to the volume's own node. A volume of this node is changed here and
/// now. One this node does not have is, with `--watch-volume-attributes`, another node's:
/// the parameters are validated and accepted, and that node applies them when the resizer
/// has moved the PersistentVolume to the new class. Without it (one node, csi-sanity) an
/// unknown volume is NOT_FOUND.
pub fn controller_modify(
    plugin: &Plugin,
    id: &str,
    raw: &HashMap<String, String>,
) -> Result<Applied> {
    let applied = apply(plugin, id, raw)?;
    if applied == Applied::NotHere {
        if plugin.config.watch_volume_attributes && is_volume_id(id) {
            tracing::info!(
                volume = %id,
                "not a volume of this node: validated; its node applies the class"
            );
        } else {
            return Err(Error::NotFound(format!("no volume {id:?}")));
        }
    }
    Ok(applied)
}
