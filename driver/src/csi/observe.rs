//! What a metrics scrape reads from the plugin: the state directory's filesystem, every
//! volume's size, chain and footprint, and each staged volume's attachment and condition.
//!
//! The state lock is held only to copy the records; layer headers and file sizes are read
//! after it is released, so a scrape never holds up an RPC. A volume's condition seen here
//! is tracked like one NodeGetVolumeStats reports: a change to abnormal is logged and
//! counted even when kubelet does not ask.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Plugin;
use super::staged::{attach_dir, is_frozen};
use super::staging::Attachment;
use super::state::{self, ClaimRef};
use crate::metrics::scrape::{NodeView, Scrape, StagedView, VolumeLabels, VolumeView};

/// Bytes a file occupies on its filesystem (what `qemu-img info` calls disk size); 0 for
/// one that cannot be read.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn labels(id: &str, claim: Option<&ClaimRef>) -> VolumeLabels {
    VolumeLabels {
        volume: id.to_string(),
        pvc_namespace: claim.map(|c| c.namespace.clone()).unwrap_or_default(),
        pvc_name: claim.map(|c| c.name.clone()).unwrap_or_default(),
    }
}

/// The attachment mode's label.
fn mode(a: Attachment) -> &'static str {
    match a {
        Attachment::Nbd { .. } => "nbd",
        Attachment::NbdIoctl => "nbd_ioctl",
        Attachment::Nbdfuse => "nbdfuse",
    }
}

/// One scrape of `plugin`.
pub fn scrape(plugin: &Plugin) -> Scrape {
    let mut node = NodeView {
        max_chain_depth: plugin.config.max_chain_depth,
        ..NodeView::default()
    };
    let copied = plugin.state().ok().map(|st| {
        let volumes: Vec<(String, u64, String, Option<ClaimRef>)> = st
            .volumes()
            .map(|v| (v.id.clone(), v.size, v.head.clone(), v.claim.clone()))
            .collect();
        (volumes, st.snapshots().count(), st.layers_dir())
    });
    let Some((volumes, snapshots, layers_dir)) = copied else {
        return Scrape {
            node: Some(node),
            io: Vec::new(),
        };
    };
    node.ready = true;
    node.snapshots = snapshots;
    if let Ok(fs) = rustix::fs::statvfs(&plugin.config.state_dir) {
        node.fs_size = Some(fs.f_blocks * fs.f_frsize);
        node.fs_free = Some(fs.f_bavail * fs.f_frsize);
    }
    let mut sizes: HashMap<String, u64> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(&layers_dir) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if state::is_layer_name(&name) {
                let bytes = entry.metadata().map_or(0, |m| m.blocks() * 512);
                node.layers += 1;
                node.layers_allocated += bytes;
                sizes.insert(name, bytes);
            }
        }
    }
    let size_of = |layer: &str| {
        sizes
            .get(layer)
            .copied()
            .unwrap_or_else(|| allocated(&layers_dir.join(layer)))
    };
    let mut io_labels = HashMap::new();
    for (id, size, head, claim) in volumes {
        let labels = labels(&id, claim.as_ref());
        let chain = state::chain(&layers_dir, &head);
        let staged = plugin.node.get(&id).map(|s| {
            let condition = s.condition();
            let (reason, message) = match &condition {
                Some((r, m)) => (Some(*r), m.as_str()),
                None => (None, ""),
            };
            plugin.metrics.polled(&id, reason, message);
            let state = if s.lost.is_some() {
                "lost"
            } else if is_frozen(&attach_dir(&plugin.config.state_dir, &id)) {
                "frozen"
            } else {
                "attached"
            };
            StagedView {
                mode: mode(s.attachment),
                state,
                paused_writes: s.image.as_ref().map_or(0, |i| i.paused_writes() as u64),
            }
        });
        io_labels.insert(id.clone(), labels.clone());
        node.volumes.push(VolumeView {
            labels,
            size,
            head_allocated: size_of(&head),
            chain_allocated: chain
                .as_ref()
                .map_or_else(|_| size_of(&head), |c| c.iter().map(|l| size_of(l)).sum()),
            depth: chain.ok().map(|c| c.len()),
            staged,
        });
    }
    let io = plugin
        .metrics
        .io()
        .into_iter()
        .filter_map(|(id, stats)| io_labels.remove(&id).map(|l| (l, stats)))
        .collect();
    Scrape {
        node: Some(node),
        io,
    }
}

/// The registry a plugin's `/metrics` endpoint serves: its counters, what a scrape reads
/// ([`scrape`]), and the build.
pub fn registry(plugin: &std::sync::Arc<Plugin>) -> prometheus_client::registry::Registry {
    let mut registry = prometheus_client::registry::Registry::default();
    crate::metrics::register_build_info(&mut registry);
    plugin.metrics.register(&mut registry);
    let plugin = plugin.clone();
    registry.register_collector(Box::new(crate::metrics::scrape::ViewCollector::new(
        move || scrape(&plugin),
    )));
    registry
}
