//! Node service conformance as root, through the attacher this host has (nbdfuse + loop on
//! machines without kernel nbd): stage and publish mount (ext4, xfs) and block volumes,
//! idempotent repeats, data across unstage/stage, the argument and state rules, and no
//! leaked mounts, loop devices or processes.

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)] // each test binary uses part of the helpers
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use csi::{NODE, Plugin, block_cap, code, mount_cap};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;
use support::sh;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// Whether this host can run node tests (CI has everything).
fn runnable() -> bool {
    support::runnable(
        "node tests",
        support::root_attach_missing(&[
            "nbdfuse",
            "losetup",
            "mkfs.ext4",
            "mkfs.xfs",
            "blkid",
            "qemu-img",
        ]),
    )
}

async fn create(p: &Plugin, name: &str, size: i64, cap: VolumeCapability) -> String {
    p.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

fn stage_req(id: &str, staging: &Path, cap: &VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: &VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

/// Stages volume `id` at `DIR/staging` (made here); returns that path.
async fn stage(
    p: &Plugin,
    node: &mut csi_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
    id: &str,
    cap: &VolumeCapability,
) -> PathBuf {
    let staging = p.kubelet.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    node.node_stage_volume(stage_req(id, &staging, cap))
        .await
        .unwrap();
    staging
}

/// Stages volume `id` at `DIR/staging` and publishes it at `DIR/pods/<target>` (a
/// directory for mount volumes, a file for block ones, made by the plugin); returns the
/// staging and target paths.
async fn stage_and_publish(
    p: &Plugin,
    node: &mut csi_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
    id: &str,
    cap: &VolumeCapability,
    target: &str,
) -> (PathBuf, PathBuf) {
    let staging = stage(p, node, id, cap).await;
    let target = p.kubelet.join("pods").join(target);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    node.node_publish_volume(publish_req(id, &staging, &target, cap))
        .await
        .unwrap();
    (staging, target)
}

fn unstage_req(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

/// NodeExpandVolume of `id` at `path` (staging or publish target) to `size` bytes.
fn expand_req(id: &str, path: &Path, size: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    }
}

/// Mounts, loop devices and nbdfuse processes that mention `dir`.
fn leaks(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    out.extend(mounts.lines().filter(|l| l.contains(&d)).map(String::from));
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    out.extend(
        String::from_utf8_lossy(&loops.stdout)
            .lines()
            .filter(|l| l.contains(&d))
            .map(String::from),
    );
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    out.extend(
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .filter(|l| l.starts_with("nbdfuse") && l.contains(&d))
            .map(String::from),
    );
    out
}

fn head_layer(p: &Plugin) -> PathBuf {
    let layers = p.layers();
    assert_eq!(layers.len(), 1, "{layers:?}");
    layers[0].clone()
}

async fn mount_flow(fs: &str, size: i64) {
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, fs);
    let id = create(&p, &format!("pvc-{fs}"), size, cap.clone()).await;
    let staging = p.kubelet.join("staging");
    let target = p.kubelet.join("pods/target");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut node = p.node().await;
    for _ in 0..10 {
        node.node_stage_volume(stage_req(&id, &staging, &cap))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        node.node_publish_volume(publish_req(&id, &staging, &target, &cap))
            .await
            .unwrap();
    }
    // What a staged and published volume holds (and what must all be gone at the end): the
    // staging and target mounts, the FUSE mount, the loop device, nbdfuse.
    let held = leaks(p.dir.path());
    assert!(held.len() >= 4, "{held:?}");
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(target.join("data.bin"), &payload).unwrap();
    std::fs::create_dir(target.join("dir")).unwrap();
    std::fs::write(target.join("dir/hello"), "hello").unwrap();
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit() == volume_usage::Unit::Bytes)
        .unwrap();
    assert!(bytes.total > size / 2 && bytes.total <= size, "{bytes:?}");
    assert!(bytes.used >= 2_000_000, "{bytes:?}");
    assert!(
        stats
            .usage
            .iter()
            .any(|u| u.unit() == volume_usage::Unit::Inodes && u.used > 0)
    );
    assert!(!stats.volume_condition.unwrap().abnormal);
    // Deleting a staged volume is refused.
    let del = DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: HashMap::new(),
    };
    assert_eq!(
        code(p.controller().await.delete_volume(del.clone()).await),
        Code::FailedPrecondition
    );
    // Unstage while published is refused too.
    assert_eq!(
        code(node.node_unstage_volume(unstage_req(&id, &staging)).await),
        Code::FailedPrecondition
    );
    for _ in 0..3 {
        node.node_unpublish_volume(unpublish_req(&id, &target))
            .await
            .unwrap();
    }
    assert!(!target.exists(), "the target is removed on unpublish");
    for _ in 0..3 {
        node.node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap();
    }
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    qemu::check_clean(&head_layer(&p));

    // Stage again: the filesystem is found, not remade, and the files are there.
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&id, &staging, &target, &cap))
        .await
        .unwrap();
    assert!(std::fs::read(target.join("data.bin")).unwrap() == payload);
    assert_eq!(
        std::fs::read_to_string(target.join("dir/hello")).unwrap(),
        "hello"
    );
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    qemu::check_clean(&head_layer(&p));
    p.controller().await.delete_volume(del).await.unwrap();
    assert!(p.layers().is_empty());
}

#[tokio::test]
async fn ext4_volumes_stage_publish_and_keep_their_data() {
    if runnable() {
        mount_flow("ext4", 64 * MIB).await;
    }
}

#[tokio::test]
async fn xfs_volumes_stage_publish_and_keep_their_data() {
    if runnable() {
        mount_flow("xfs", 512 * MIB).await;
    }
}

#[tokio::test]
async fn block_volumes_publish_the_device_as_a_file() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = create(&p, "blk", 16 * MIB, cap.clone()).await;
    let target = p.kubelet.join("dev-target");
    let mut node = p.node().await;
    let staging = stage(&p, &mut node, &id, &cap).await;
    for _ in 0..3 {
        node.node_publish_volume(publish_req(&id, &staging, &target, &cap))
            .await
            .unwrap();
    }
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
    let dd = |args: &[&str]| {
        let out = Command::new("dd").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let src = p.dir.path().join("pattern");
    std::fs::write(&src, &pattern).unwrap();
    dd(&[
        &format!("if={}", src.display()),
        &format!("of={}", target.display()),
        "bs=64k",
        "seek=4",
        "oflag=direct",
        "conv=notrunc",
    ]);
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    let head = head_layer(&p);
    qemu::check_clean(&head);
    let raw = p.dir.path().join("head.raw");
    qemu::to_raw(&head, &raw);
    let data = std::fs::read(&raw).unwrap();
    assert!(data[256 << 10..(256 << 10) + (1 << 20)] == pattern[..]);
    assert!(data[..256 << 10].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn node_requests_follow_the_argument_and_state_rules() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "");
    let id = create(&p, "rules", 16 * MIB, cap.clone()).await;
    let staging = p.kubelet.join("staging");
    let target = p.kubelet.join("target");
    std::fs::create_dir_all(&staging).unwrap();
    let mut node = p.node().await;
    let mut no_cap = stage_req(&id, &staging, &cap);
    no_cap.volume_capability = None;
    assert_eq!(
        code(node.node_stage_volume(no_cap).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_stage_volume(stage_req("", &staging, &cap)).await),
        Code::InvalidArgument
    );
    let mut no_path = stage_req(&id, &staging, &cap);
    no_path.staging_target_path.clear();
    assert_eq!(
        code(node.node_stage_volume(no_path).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage_req("fake-vol-id", &staging, &cap))
                .await
        ),
        Code::NotFound
    );
    // Publish before stage.
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&id, &staging, &target, &cap))
                .await
        ),
        Code::FailedPrecondition
    );
    let mut no_target = publish_req(&id, &staging, &target, &cap);
    no_target.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(no_target).await),
        Code::InvalidArgument
    );
    // Unpublish and unstage of what was never there: OK.
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert_eq!(
        code(node.node_unstage_volume(unstage_req("", &staging)).await),
        Code::InvalidArgument
    );
    // Stats: unknown volume, unstaged volume and wrong path are NOT_FOUND.
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(node.node_get_volume_stats(stats("", "/x")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_get_volume_stats(stats(&id, "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node_get_volume_stats(stats("fake-vol-id", "/x")).await),
        Code::NotFound
    );
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    assert_eq!(
        code(node.node_get_volume_stats(stats(&id, "/some/path")).await),
        Code::NotFound
    );
    // Staged elsewhere: a second staging path is refused.
    let other = p.kubelet.join("staging2");
    std::fs::create_dir_all(&other).unwrap();
    assert_eq!(
        code(node.node_stage_volume(stage_req(&id, &other, &cap)).await),
        Code::AlreadyExists
    );
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.qcow2.csi.dev/node"],
        NODE
    );
}

/// Kills the plugin at `point` during the first NodeStage of a fresh ext4 volume, restarts
/// it, and checks the retry stages a working filesystem and unstages without leaks.
async fn crash_during_stage(point: &str) {
    let mut p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let id = create(&p, "crash", 64 * MIB, cap.clone()).await;
    let staging = p.kubelet.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
    assert!(
        p.node()
            .await
            .node_stage_volume(stage_req(&id, &staging, &cap))
            .await
            .is_err()
    );
    assert!(p.wait_crash(), "the failpoint {point} fired");
    p.restart_with(&[]).await;
    let mut node = p.node().await;
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    std::fs::write(staging.join("after-crash"), "ok").unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(
        leaks(p.dir.path()).is_empty(),
        "{point}: {:?}",
        leaks(p.dir.path())
    );
    qemu::check_clean(&head_layer(&p));
    // The file written after the crash is there on the next stage.
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(staging.join("after-crash")).unwrap(),
        "ok"
    );
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_crash_after_attach_during_stage_can_be_retried_after_restart() {
    if runnable() {
        crash_during_stage("stage-after-attach").await;
    }
}

#[tokio::test]
async fn a_crash_after_mkfs_during_stage_can_be_retried_after_restart() {
    if runnable() {
        crash_during_stage("stage-after-mkfs").await;
    }
}

#[tokio::test]
async fn a_crash_after_mount_during_stage_can_be_retried_after_restart() {
    if runnable() {
        crash_during_stage("stage-after-mount").await;
    }
}

#[tokio::test]
async fn xfs_expanded_while_unstaged_grows_after_the_next_stage() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "xfs");
    let id = create(&p, "xfs-grow", 320 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let staging = stage(&p, &mut node, &id, &cap).await;
    std::fs::write(staging.join("keep"), "kept").unwrap();
    let before = bytes_total(&mut node, &id, &staging).await;
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    // Expanded while unstaged: the resizer only updates the PV; kubelet stages the volume
    // again and then asks the node to grow it, on the staging path.
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    let grown = node
        .node_expand_volume(NodeExpandVolumeRequest {
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..expand_req(&id, &staging, 640 * MIB)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 640 * MIB);
    let after = bytes_total(&mut node, &id, &staging).await;
    assert!(after > before + 256 * MIB, "{before} -> {after}");
    assert_eq!(
        std::fs::read_to_string(staging.join("keep")).unwrap(),
        "kept"
    );
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    qemu::check_clean(&head_layer(&p));
}

async fn bytes_total(
    node: &mut csi_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
    id: &str,
    path: &Path,
) -> i64 {
    node.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .usage
    .into_iter()
    .find(|u| u.unit() == volume_usage::Unit::Bytes)
    .unwrap()
    .total
}

/// ext4 grows online where the plugin has CAP_SYS_RESOURCE (a privileged pod). Without it
/// NodeExpandVolume is refused before anything changes, but the size is recorded and the
/// next stage grows image and filesystem offline (e2fsck, resize2fs).
#[tokio::test]
async fn ext4_expansion_online_or_at_the_next_stage_through_nbdfuse() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let id = create(&p, "grow", 64 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let staging = stage(&p, &mut node, &id, &cap).await;
    std::fs::write(staging.join("keep"), "kept").unwrap();
    let before = bytes_total(&mut node, &id, &staging).await;
    assert!(before <= 64 * MIB);
    let node_expand = |size: i64| expand_req(&id, &staging, size);
    use qcow2_csi::csi::host::{HostTools, SystemTools};
    if SystemTools.can_grow_mounted_ext4() {
        // Online: image, loop size limit, resize2fs.
        let r = node
            .node_expand_volume(node_expand(128 * MIB))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 128 * MIB);
        assert!(bytes_total(&mut node, &id, &staging).await > before + 48 * MIB);
    } else {
        // Growing a mounted ext4 needs CAP_SYS_RESOURCE: refused before anything changes.
        eprintln!("no CAP_SYS_RESOURCE: checking the refusal, not online ext4 growth");
        let s = node
            .node_expand_volume(node_expand(128 * MIB))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("CAP_SYS_RESOURCE"), "{s:?}");
        assert_eq!(bytes_total(&mut node, &id, &staging).await, before);
        assert_eq!(qemu::info_shared(&head_layer(&p))["virtual-size"], 64 * MIB);
    }
    // The next stage finds image, device and filesystem at the size (growing them if needed).
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    let after = bytes_total(&mut node, &id, &staging).await;
    assert!(after > before + 48 * MIB, "{before} -> {after}");
    assert_eq!(
        qemu::info_shared(&head_layer(&p))["virtual-size"],
        128 * MIB
    );
    assert_eq!(
        std::fs::read_to_string(staging.join("keep")).unwrap(),
        "kept"
    );
    // NodeExpandVolume at the size it already has (kubelet's retry): nothing to do, OK.
    let done = node
        .node_expand_volume(node_expand(128 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.capacity_bytes, 128 * MIB);
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    qemu::check_clean(&head_layer(&p));
    // Unknown volumes and paths.
    let mut bad = node_expand(MIB);
    bad.volume_id = "fake-vol-id".into();
    assert_eq!(code(node.node_expand_volume(bad).await), Code::NotFound);
    let mut nopath = node_expand(MIB);
    nopath.volume_path.clear();
    assert_eq!(
        code(node.node_expand_volume(nopath).await),
        Code::InvalidArgument
    );
}

/// A published xfs volume grows online through nbdfuse (the loop device's size limit rises
/// within the FUSE file's headroom): the pod sees the new size at once and can fill it.
#[tokio::test]
async fn xfs_grows_online_through_nbdfuse_while_published() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "xfs");
    let id = create(&p, "grow-online", 320 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let (staging, target) = stage_and_publish(&p, &mut node, &id, &cap, "target").await;
    let first: Vec<u8> = (0..200 * MIB as u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(target.join("first"), &first).unwrap();
    let before = bytes_total(&mut node, &id, &target).await;
    // A second file as large does not fit yet.
    assert!(before < 400 * MIB);
    let r = node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_capability: Some(cap.clone()),
            ..expand_req(&id, &target, 640 * MIB)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 640 * MIB);
    let after = bytes_total(&mut node, &id, &target).await;
    assert!(after > before + 300 * MIB, "{before} -> {after}");
    assert_eq!(
        qemu::info_shared(&head_layer(&p))["virtual-size"],
        640 * MIB
    );
    std::fs::write(target.join("second"), &first).unwrap();
    assert!(std::fs::read(target.join("first")).unwrap() == first);
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    qemu::check_clean(&head_layer(&p));
    // Both files are there at the next stage.
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    assert!(std::fs::read(staging.join("second")).unwrap() == first);
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
}

#[tokio::test]
async fn single_writer_volumes_publish_once_and_max_volumes_is_enforced() {
    if !runnable() {
        return;
    }
    let p = Plugin::start_with_args(&["--max-volumes", "1"]).await;
    let info = p
        .node()
        .await
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 1);
    let cap = mount_cap(Mode::SingleNodeSingleWriter, "ext4");
    let a = create(&p, "a", 32 * MIB, cap.clone()).await;
    let b = create(&p, "b", 32 * MIB, cap.clone()).await;
    let (sa, sb) = (p.kubelet.join("sa"), p.kubelet.join("sb"));
    let (t1, t2) = (p.kubelet.join("t1"), p.kubelet.join("t2"));
    for d in [&sa, &sb] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut node = p.node().await;
    node.node_stage_volume(stage_req(&a, &sa, &cap))
        .await
        .unwrap();
    assert_eq!(
        code(node.node_stage_volume(stage_req(&b, &sb, &cap)).await),
        Code::ResourceExhausted
    );
    node.node_publish_volume(publish_req(&a, &sa, &t1, &cap))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&a, &sa, &t1, &cap))
        .await
        .unwrap();
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&a, &sa, &t2, &cap))
                .await
        ),
        Code::FailedPrecondition
    );
    node.node_unpublish_volume(unpublish_req(&a, &t1))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&a, &sa, &t2, &cap))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req(&a, &t2))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&a, &sa))
        .await
        .unwrap();
    node.node_stage_volume(stage_req(&b, &sb, &cap))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&b, &sb))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
}

/// How the plugin process ends while a volume is staged and published.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Kill9,
    Sigterm,
}

/// The plugin ends while an nbdfuse volume is staged and published (nbdfuse cannot
/// reconnect, so the device dies with the process). The restarted plugin knows the volume
/// from its stage record: it reports it abnormal, refuses to delete it or to publish it
/// anew, refuses a NodeStage while pods still use the dead mount, and once unpublished it
/// stages afresh with the synced data there. Nothing leaks.
async fn restart_while_staged(ending: Ending) {
    let mut p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let id = create(&p, "restart", 64 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let (staging, target) = stage_and_publish(&p, &mut node, &id, &cap, "target").await;
    let record = p.state.join(format!("staged/{id}.json"));
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains(r#""kind": "nbdfuse""#), "{text}");
    assert!(text.contains(&target.display().to_string()), "{text}");
    {
        let f = std::fs::File::create(target.join("synced")).unwrap();
        std::io::Write::write_all(&mut &f, b"before the restart").unwrap();
        f.sync_all().unwrap();
    }
    match ending {
        Ending::Kill9 => p.kill9(),
        Ending::Sigterm => {
            // Promptly: the device is left for the pods, not torn down under them.
            p.terminate();
            let status = p.exited_within(std::time::Duration::from_secs(5));
            assert!(status.is_some_and(|s| s.success()), "{status:?}");
        }
    }
    p.restart_with(&[]).await;
    let mut node = p.node().await;

    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "{ending:?}");
    assert!(cond.message.contains("nbdfuse"), "{}", cond.message);
    let del = DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: HashMap::new(),
    };
    assert_eq!(
        code(p.controller().await.delete_volume(del.clone()).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(node.node_stage_volume(stage_req(&id, &staging, &cap)).await),
        Code::FailedPrecondition,
        "pods still use the dead mount"
    );
    let other = p.kubelet.join("pods/other");
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&id, &staging, &other, &cap))
                .await
        ),
        Code::FailedPrecondition
    );

    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(!text.contains(&target.display().to_string()), "{text}");
    // Unpublished: the next NodeStage clears the dead attachment and stages afresh.
    node.node_stage_volume(stage_req(&id, &staging, &cap))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(staging.join("synced")).unwrap(),
        "before the restart"
    );
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!record.exists());
    assert!(
        leaks(p.dir.path()).is_empty(),
        "{ending:?}: {:?}",
        leaks(p.dir.path())
    );
    qemu::check_clean(&head_layer(&p));
    p.controller().await.delete_volume(del).await.unwrap();
}

#[tokio::test]
async fn a_kill9_while_staged_leaves_a_lost_volume_that_restages_once_unpublished() {
    if runnable() {
        restart_while_staged(Ending::Kill9).await;
    }
}

#[tokio::test]
async fn a_sigterm_while_staged_leaves_a_lost_volume_that_restages_once_unpublished() {
    if runnable() {
        restart_while_staged(Ending::Sigterm).await;
    }
}

/// A lost volume that is unstaged (the pods went away) is cleared up completely.
#[tokio::test]
async fn a_lost_volume_unstages_cleanly_after_a_restart() {
    if !runnable() {
        return;
    }
    let mut p = Plugin::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = create(&p, "lost-block", 16 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let (staging, target) = stage_and_publish(&p, &mut node, &id, &cap, "dev").await;
    assert!(leaks(p.dir.path()).len() >= 3);
    p.kill9();
    p.restart_with(&[]).await;
    let mut node = p.node().await;
    for _ in 0..3 {
        node.node_unpublish_volume(unpublish_req(&id, &target))
            .await
            .unwrap();
    }
    assert!(!target.exists());
    for _ in 0..3 {
        node.node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap();
    }
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    assert!(!p.state.join(format!("staged/{id}.json")).exists());
    p.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: id,
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    assert!(p.layers().is_empty());
}

/// A writer thread making numbered files in a directory until stopped: file k holds
/// [`FileWriter::content`], written and fsynced; [`FileWriter::done`] counts completed files.
struct FileWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl FileWriter {
    fn start(dir: &Path, lines: usize) -> FileWriter {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, done, dir) = (stop.clone(), done.clone(), dir.to_path_buf());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut k = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let f = std::fs::File::create(dir.join(format!("f{k}")))?;
                    std::io::Write::write_all(&mut &f, Self::content(k, lines).as_bytes())?;
                    f.sync_all()?;
                    done.store(k, Ordering::SeqCst);
                }
                Ok(())
            })
        };
        FileWriter { stop, done, thread }
    }

    /// What file k holds.
    fn content(k: u64, lines: usize) -> String {
        format!("{k}\n").repeat(lines)
    }

    /// Files completed so far.
    fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` files are complete.
    async fn wait_for(&self, n: u64) {
        while self.done() < n {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Stops the writer: the files it completed, or the error it saw.
    fn stop(self) -> std::io::Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let done = self.done;
        self.thread.join().unwrap()?;
        Ok(done.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// CreateSnapshot of a staged, published ext4 volume while a writer runs: the writer never
/// sees an error across the pivot, and a volume restored from the snapshot holds every file
/// completed before the call, none begun after it returned, and nothing torn.
#[tokio::test]
async fn a_snapshot_of_a_volume_in_use_restores_the_files_as_of_the_snapshot() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let v = create(&p, "live", 128 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let (staging, target) = stage_and_publish(&p, &mut node, &v, &cap, "target").await;
    let writer = FileWriter::start(&target, 1000);
    writer.wait_for(20).await;
    let before = writer.done();
    let snap = p
        .controller()
        .await
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: v.clone(),
            name: "live-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    // Files begun after this may not be in the snapshot; one in progress may be.
    let after = writer.done() + 1;
    writer.wait_for(after + 20).await;
    writer
        .stop()
        .expect("the writer saw no error across the pivot");

    // Restored into a larger volume: the filesystem grows to it at stage.
    let r = p
        .controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: "restored".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let restored = p.kubelet.join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    node.node_stage_volume(stage_req(&r, &restored, &cap))
        .await
        .unwrap();
    let total = bytes_total(&mut node, &r, &restored).await;
    assert!(
        total > 200 * MIB,
        "the filesystem grew to the restore's size: {total}"
    );
    for k in 1..=before {
        let text = std::fs::read_to_string(restored.join(format!("f{k}")))
            .unwrap_or_else(|e| panic!("f{k} (completed before the snapshot): {e}"));
        assert_eq!(text, FileWriter::content(k, 1000), "f{k}");
    }
    let mut present = 0;
    for e in std::fs::read_dir(&restored).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let Some(k) = name.strip_prefix('f').and_then(|k| k.parse::<u64>().ok()) else {
            continue;
        };
        assert!(k <= after, "f{k} began after the snapshot returned");
        present += 1;
    }
    assert!(present as u64 >= before);
    // The source went on: it has the files written after the snapshot.
    assert!(target.join(format!("f{}", after + 10)).exists());

    node.node_unstage_volume(unstage_req(&r, &restored))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req(&v, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    for l in p.layers() {
        qemu::check_clean(&l);
    }
    let mut c = p.controller().await;
    for id in [&v, &r] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    assert!(p.layers().is_empty(), "{:?}", p.layers());
}

/// Layers in the chain under volume `id`'s head, head included (the head may be open in
/// the plugin).
fn chain_len(p: &Plugin, id: &str) -> usize {
    qemu::backing_chain(&p.head_of(id)).len()
}

/// A staged volume in use is flattened online: snapshots under a running writer deepen its
/// chain past `--max-chain-depth`, the background job copies the frozen layers and switches
/// the head's backing file under a quiesced export, and the writer never sees an error; the
/// files are all there at the next stage.
#[tokio::test]
async fn a_staged_volume_in_use_is_flattened_online() {
    if !runnable() {
        return;
    }
    let p = Plugin::start_with_args(&["--max-chain-depth", "3"]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let v = create(&p, "deep", 64 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let staging = stage(&p, &mut node, &v, &cap).await;
    let writer = FileWriter::start(&staging, 500);
    for i in 0..5 {
        writer.wait_for(writer.done() + 5).await;
        loop {
            match p
                .controller()
                .await
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: v.clone(),
                    name: format!("deep-{i}"),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => break,
                Err(s) if s.code() == Code::Aborted => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while chain_len(&p, &v) > 3 {
        assert!(std::time::Instant::now() < deadline, "never flattened");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    writer.wait_for(writer.done() + 10).await;
    let written = writer.stop().expect("the writer saw no error");
    node.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
    for l in p.layers() {
        qemu::check_clean(&l);
    }
    node.node_stage_volume(stage_req(&v, &staging, &cap))
        .await
        .unwrap();
    for k in 1..=written {
        assert_eq!(
            std::fs::read_to_string(staging.join(format!("f{k}"))).unwrap(),
            FileWriter::content(k, 500),
            "f{k}"
        );
    }
    node.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
}

/// A caller of the socket names paths that are not its volume's: another volume's live
/// staging mount, a foreign mount, places outside the kubelet directory. Nothing of theirs
/// is unmounted, replaced or created.
#[tokio::test]
async fn a_hostile_caller_cannot_unmount_replace_or_escape() {
    if !runnable() {
        return;
    }
    let p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let a = create(&p, "a", 64 * MIB, cap.clone()).await;
    let b = create(&p, "b", 64 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let staging = stage(&p, &mut node, &a, &cap).await;
    std::fs::write(staging.join("a.txt"), "a's data").unwrap();
    let foreign = p.kubelet.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&foreign)
            .status()
            .unwrap()
            .success()
    );
    let is_mounted = |p: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&p.display().to_string()))
    };
    // Unstage of an unknown volume, of B at A's staging path, of A at the foreign mount.
    let unknown = "vol-0123456789abcdef0123456789abcdef";
    for (id, path) in [(unknown, &foreign), (&b, &staging), (unknown, &staging)] {
        let r = node.node_unstage_volume(unstage_req(id, path)).await;
        assert_eq!(code(r), Code::FailedPrecondition, "{id} {}", path.display());
    }
    // B staged over A's staging path.
    let r = node.node_stage_volume(stage_req(&b, &staging, &cap)).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(is_mounted(&foreign) && is_mounted(&staging));
    assert_eq!(
        std::fs::read_to_string(staging.join("a.txt")).unwrap(),
        "a's data"
    );
    // Publish outside the kubelet directory, directly, through `..` and a symlink.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), p.kubelet.join("escape")).unwrap();
    for target in [
        outside.path().join("t"),
        p.kubelet.join("escape/t"),
        p.kubelet
            .join("../..")
            .join(outside.path().strip_prefix("/").unwrap())
            .join("t"),
    ] {
        let r = node
            .node_publish_volume(publish_req(&a, &staging, &target, &cap))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{}", target.display());
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // A's publish target cannot be unpublished through B, nor A's staging path.
    let (_, target) = {
        let target = p.kubelet.join("pods/a");
        node.node_publish_volume(publish_req(&a, &staging, &target, &cap))
            .await
            .unwrap();
        (staging.clone(), target)
    };
    node.node_unpublish_volume(unpublish_req(&b, &target))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req(&a, &staging))
        .await
        .unwrap();
    assert!(is_mounted(&target) && is_mounted(&staging));
    node.node_unpublish_volume(unpublish_req(&a, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    node.node_unstage_volume(unstage_req(&a, &staging))
        .await
        .unwrap();
    assert!(
        Command::new("umount")
            .arg(&foreign)
            .status()
            .unwrap()
            .success()
    );
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
}

/// A snapshot that completes while NodeStage or NodeExpandVolume waits for the volume's
/// lock (a failpoint holds them just before it) changes the head: they must use the new
/// one, never write to the frozen layer or record it as the head again.
#[tokio::test]
async fn node_operations_read_the_record_under_the_volume_lock() {
    if !runnable() {
        return;
    }
    let mut p = Plugin::start().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "xfs");
    let v = create(&p, "v", 320 * MIB, cap.clone()).await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", "node-before-lock:sleep=1500")])
        .await;
    let staging = p.kubelet.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let snapshot = |name: &'static str| {
        let p = &p;
        let v = v.clone();
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            p.snapshot(&v, name).await.unwrap()
        }
    };
    let record = |kind: &str, id: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(p.state.join(kind).join(format!("{id}.json"))).unwrap(),
        )
        .unwrap()
    };
    let mut node = p.node().await;
    let mut n2 = node.clone();
    let (staged, s1) = tokio::join!(
        n2.node_stage_volume(stage_req(&v, &staging, &cap)),
        snapshot("s1")
    );
    staged.unwrap();
    let frozen = p
        .state
        .join("layers")
        .join(record("snapshots", &s1)["layer"].as_str().unwrap());
    let sum = |f: &Path| std::fs::read(f).unwrap();
    let before = sum(&frozen);
    std::fs::write(staging.join("after.txt"), vec![7u8; 1 << 20]).unwrap();
    let (expanded, s2) = tokio::join!(
        n2.node_expand_volume(expand_req(&v, &staging, 384 * MIB)),
        snapshot("s2")
    );
    expanded.unwrap();
    let s2_layer = record("snapshots", &s2)["layer"]
        .as_str()
        .unwrap()
        .to_string();
    let head = record("volumes", &v)["head"].as_str().unwrap().to_string();
    assert_ne!(
        head, s2_layer,
        "the frozen layer was written back as the head"
    );
    assert_eq!(record("volumes", &v)["size"], 384 * MIB);
    node.node_unstage_volume(unstage_req(&v, &staging))
        .await
        .unwrap();
    assert!(before == sum(&frozen), "the first snapshot's layer changed");
    qemu::check_clean(&p.state.join("layers").join(&head));
}

/// Unmounts a test's filesystem when dropped, even when the test fails.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// CreateVolume and CreateSnapshot on a state filesystem with one block free: the budget
/// lets them through (ratio 100), the disk does not. The answer is RESOURCE_EXHAUSTED naming
/// the full disk, nothing is recorded or left behind, and once space is freed the same
/// requests succeed.
#[tokio::test]
async fn a_full_state_filesystem_is_resource_exhausted_and_leaves_nothing() {
    if !runnable() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let fs_image = scratch.path().join("state.ext4");
    let mut mounted = None;
    let mut p = Plugin::start_prepared(&[], |state| {
        std::fs::create_dir_all(state).unwrap();
        sh(&format!(
            "truncate -s 16M {img} && mkfs.ext4 -q -F -m 0 {img} && mount -o loop {img} {st}",
            img = fs_image.display(),
            st = state.display()
        ));
        mounted = Some(Mounted(state.to_path_buf()));
    })
    .await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let first = create(&p, "pvc-before", MIB, cap.clone()).await;
    let before: Vec<PathBuf> = p.layers();

    let filler = p.state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "status=none"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    sh(&format!("truncate -s -4K {} && sync", filler.display()));
    let req = |name: &str| CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 256 << 10,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        parameters: [("overcommitRatio".to_string(), "100".to_string())].into(),
        ..Default::default()
    };
    let mut c = p.controller().await;
    let e = c.create_volume(req("pvc-full")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("No space left"), "{}", e.message());
    let e = p.snapshot(&first, "snap-full").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(p.layers(), before, "a refused request left a layer");
    assert_eq!(p.records().len(), 1, "a refused request left a record");

    std::fs::remove_file(&filler).unwrap();
    c.create_volume(req("pvc-full")).await.unwrap();
    p.snapshot(&first, "snap-full").await.unwrap();
    for layer in p.layers() {
        qemu::check_clean(&layer);
    }
    p.stop();
    drop(mounted);
}

/// The plugin's allocation gauges on the host's own filesystem: a staged block volume written
/// through nbdfuse shows the disk size `qemu-img info` reports for its head, and after a
/// snapshot, for its two-layer chain; the node's layer bytes add up; a volume without a
/// claim has empty claim labels.
#[tokio::test]
async fn metrics_allocation_gauges_equal_qemu_img_disk_sizes() {
    if !runnable() {
        return;
    }
    let p = Plugin::start_with_args(&["--metrics-address", "127.0.0.1:0"]).await;
    let address = p.metrics_address().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let id = create(&p, "pvc-alloc", 64 * MIB, cap.clone()).await;
    let mut node = p.node().await;
    let (staging, target) = stage_and_publish(&p, &mut node, &id, &cap, "blk").await;
    let out = Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=1M",
            "count=12",
            "oflag=direct",
            "conv=fsync,notrunc",
        ])
        .arg(format!("of={}", target.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vol = [
        ("volume", id.as_str()),
        ("pvc_namespace", ""),
        ("pvc_name", ""),
    ];
    let a = address.clone();
    let text = tokio::task::spawn_blocking(move || support::scrape(&a))
        .await
        .unwrap();
    let head = head_layer(&p);
    let sizes = qemu::chain_disk_sizes(&head);
    assert!(sizes[0] >= 12.0 * MIB as f64, "{sizes:?}");
    assert_eq!(
        support::sample(&text, "qcow2_csi_volume_head_allocated_bytes", &vol),
        Some(sizes[0])
    );
    assert_eq!(
        support::sample(&text, "qcow2_csi_volume_size_bytes", &vol),
        Some(64.0 * MIB as f64)
    );
    let nbdfuse = [
        ("volume", id.as_str()),
        ("mode", "nbdfuse"),
        ("state", "attached"),
    ];
    assert_eq!(
        support::sample(&text, "qcow2_csi_volume_attachment", &nbdfuse),
        Some(1.0),
        "{text}"
    );

    p.snapshot(&id, "snap-alloc").await.unwrap();
    let a = address.clone();
    let text = tokio::task::spawn_blocking(move || support::scrape(&a))
        .await
        .unwrap();
    let chain = qemu::chain_disk_sizes(&p.head_of(&id));
    assert_eq!(chain.len(), 2);
    assert_eq!(
        support::sample(&text, "qcow2_csi_volume_chain_depth", &vol),
        Some(2.0)
    );
    assert_eq!(
        support::sample(&text, "qcow2_csi_volume_chain_allocated_bytes", &vol),
        Some(chain.iter().sum())
    );
    assert_eq!(
        support::sample(&text, "qcow2_csi_node_layers_allocated_bytes", &[]),
        Some(chain.iter().sum())
    );
    support::promtool_check_metrics(&text);
    node.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
}
