//! `--label-snapshot-contents`: the node claims the snapshot contents of its own volumes
//! for its own csi-snapshotter.
//!
//! With distributed snapshotting, each node's csi-snapshotter (`--node-deployment`) only
//! sees the contents labelled `snapshot.storage.kubernetes.io/managed-by: <its node>`. The
//! snapshot-controller (through v8.6 and on its main branch as of 2026-08) labels the
//! VolumeSnapshotContents it makes for single snapshots, but neither the
//! VolumeGroupSnapshotContents nor the member VolumeSnapshotContents of a group snapshot:
//! no node's sidecar would ever take a group snapshot. So each node plugin watches both
//! kinds and labels those of this driver whose volumes (or snapshots) are its own. It
//! patches nothing else, and never a content that carries the label already.

use std::sync::Arc;

use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tokio_stream::StreamExt;

use super::Plugin;
use super::state::State;

/// The label the csi-snapshotter's `--node-deployment` mode selects contents by.
pub const MANAGED_BY: &str = "snapshot.storage.kubernetes.io/managed-by";

/// The kinds labelled: group contents (the version every snapshot-controller from v8.2 on
/// serves) and snapshot contents.
const KINDS: [(&str, &str, &str); 2] = [
    (
        "groupsnapshot.storage.k8s.io",
        "v1beta2",
        "VolumeGroupSnapshotContent",
    ),
    ("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
];

/// Whether `content` (either kind) is this driver's, unlabelled, and of this node's volumes
/// or snapshots: every volume handle it names is a volume here, or its snapshot handle is a
/// snapshot here.
pub fn is_ours_to_label(content: &serde_json::Value, driver: &str, st: &State) -> bool {
    let spec = &content["spec"];
    if spec["driver"].as_str() != Some(driver)
        || content["metadata"]["labels"][MANAGED_BY].is_string()
    {
        return false;
    }
    let source = &spec["source"];
    // A group content names its volumes in a list, a snapshot content names one.
    let mut volumes: Vec<&str> = source["volumeHandles"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    volumes.extend(source["volumeHandle"].as_str());
    if !volumes.is_empty() {
        return volumes.iter().all(|v| st.volume(v).is_some());
    }
    source["snapshotHandle"]
        .as_str()
        .is_some_and(|s| st.snapshot(s).is_some())
}

/// Watches both kinds until the process exits, from when the state directory has loaded,
/// labelling what [`is_ours_to_label`] picks.
pub async fn watch(plugin: Arc<Plugin>) {
    if !plugin.loaded().await {
        tracing::error!("not labelling snapshot contents: the state directory failed to load");
        return;
    }
    let client = super::attributes::api_client("--label-snapshot-contents").await;
    let mut tasks = Vec::new();
    for (group, version, kind) in KINDS {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        tasks.push(tokio::spawn(label(plugin.clone(), api, kind)));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn label(plugin: Arc<Plugin>, api: Api<DynamicObject>, kind: &'static str) {
    tracing::info!(
        kind,
        "labelling this node's snapshot contents for its csi-snapshotter"
    );
    let node = plugin.config.node_id.clone();
    let patch = serde_json::json!({"metadata": {"labels": {MANAGED_BY: node}}});
    let mut events = std::pin::pin!(super::attributes::applied(api.clone(), kind));
    while let Some(content) = events.next().await {
        let Some(name) = content.metadata.name.clone() else {
            continue;
        };
        let value = serde_json::to_value(&content).unwrap_or_default();
        let ours = plugin
            .state()
            .map(|st| is_ours_to_label(&value, &plugin.config.driver_name, &st))
            .unwrap_or(false);
        if !ours {
            continue;
        }
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(kind, content = %name, node = %node, "labelled for this node's csi-snapshotter");
            }
            Err(e) => {
                tracing::warn!(kind, content = %name, error = %e, "labelling a snapshot content");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::state::{AccessType, VolumeRecord};
    use std::collections::BTreeMap;

    #[test]
    fn only_unlabelled_contents_of_this_drivers_local_volumes_are_picked() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, _) = State::load(dir.path()).unwrap();
        let here = state_volume(&mut st, "vol-00000000000000000000000000000001");
        let elsewhere = "vol-00000000000000000000000000000002";
        let group = |handles: &[&str], labels: serde_json::Value| {
            serde_json::json!({
                "metadata": {"name": "c", "labels": labels},
                "spec": {"driver": "qcow2.csi.dev", "source": {"volumeHandles": handles}},
            })
        };
        let none = serde_json::json!({});
        assert!(is_ours_to_label(
            &group(&[&here], none.clone()),
            "qcow2.csi.dev",
            &st
        ));
        assert!(!is_ours_to_label(
            &group(&[&here, elsewhere], none.clone()),
            "qcow2.csi.dev",
            &st
        ));
        assert!(!is_ours_to_label(
            &group(&[&here], none.clone()),
            "other.csi",
            &st
        ));
        let labelled = serde_json::json!({MANAGED_BY: "node-1"});
        assert!(!is_ours_to_label(
            &group(&[&here], labelled),
            "qcow2.csi.dev",
            &st
        ));
        let member = serde_json::json!({
            "metadata": {"name": "m"},
            "spec": {"driver": "qcow2.csi.dev", "source": {"volumeHandle": here}},
        });
        assert!(is_ours_to_label(&member, "qcow2.csi.dev", &st));
        let static_content = serde_json::json!({
            "metadata": {"name": "s"},
            "spec": {"driver": "qcow2.csi.dev", "source": {"snapshotHandle": "snap-x"}},
        });
        assert!(!is_ours_to_label(&static_content, "qcow2.csi.dev", &st));
    }

    fn state_volume(st: &mut State, id: &str) -> String {
        st.put_volume(VolumeRecord {
            id: id.into(),
            name: "pvc".into(),
            size: 1 << 20,
            head: "layer-x.qcow2".into(),
            parameters: BTreeMap::new(),
            qos: BTreeMap::new(),
            access: vec![AccessType::Block],
            created: 0,
            source: None,
            claim: None,
        })
        .unwrap();
        id.to_string()
    }
}
