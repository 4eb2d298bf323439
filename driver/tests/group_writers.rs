//! A group snapshot of two staged volumes under a writer, restored: both restores hold one
//! single instant. The writer puts sequence number n on volume A, then on volume B, then
//! n + 1 on A, and so on (direct I/O, each write acknowledged before the next), so at any
//! instant A holds n and B holds n or n - 1. Restores of a group snapshot must show the
//! same: B equal to A or one behind, never ahead and never further behind. Run on nbdfuse
//! + loop here, and on kernel nbd inside user-mode Linux.

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)] // each test binary uses part of the helpers
mod support;
#[path = "support/uml.rs"]
mod uml;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use csi::{Plugin, block_cap, member};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;

const MIB: i64 = 1 << 20;

/// A 4 KiB window of `buf` aligned for direct I/O.
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let skip = buf.as_ptr().align_offset(4096);
    &mut buf[skip..skip + 4096]
}

async fn create(p: &Plugin, name: &str, source: Option<&str>) -> String {
    p.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
            volume_content_source: source.map(|s| VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: s.into(),
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
        .volume_id
}

/// Stages and publishes block volume `id`; returns the staging path and the device file.
async fn stage(p: &Plugin, id: &str) -> (PathBuf, PathBuf) {
    let cap = block_cap(Mode::SingleNodeWriter);
    let staging = p.kubelet.join(format!("staging-{id}"));
    let target = p.kubelet.join("pods").join(id);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut node = p.node().await;
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap();
    (staging, target)
}

async fn unstage(p: &Plugin, id: &str, staging: &Path, target: &Path) {
    let mut node = p.node().await;
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
}

/// The sequence number in the first 8 bytes of volume `id`'s content (its head, read by
/// qemu-img through the backing chain).
fn sequence_of(p: &Plugin, id: &str) -> u64 {
    let path = p.state.join("volumes").join(format!("{id}.json"));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let head = p.state.join("layers").join(rec["head"].as_str().unwrap());
    let raw = p.dir.path().join(format!("{id}.raw"));
    qemu::to_raw(&head, &raw);
    let bytes = std::fs::read(&raw).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// Writes n to A then to B, n = 1, 2, ..., until stopped; the last n written to both.
fn writer(a: PathBuf, b: PathBuf, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> u64 {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    };
    let (fa, fb) = (open(&a), open(&b));
    let mut buf = vec![0u8; 8192];
    let block = aligned(&mut buf);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        block[..8].copy_from_slice(&n.to_le_bytes());
        fa.write_all_at(block, 0).unwrap();
        fb.write_all_at(block, 0).unwrap();
        done.store(n, Ordering::Relaxed);
    }
    n
}

/// The whole test on a plugin started with `args`.
async fn group_snapshot_under_a_writer(args: &[&str]) {
    let p = Plugin::start_with_args(args).await;
    let a = create(&p, "a", None).await;
    let b = create(&p, "b", None).await;
    let (sa, da) = stage(&p, &a).await;
    let (sb, db) = stage(&p, &b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let w = {
        let (da, db, stop, done) = (da.clone(), db.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || writer(da, db, stop, done))
    };
    let mut groups = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = done.load(Ordering::Relaxed);
        let g = p
            .group_snapshot(&format!("g{round}"), &[&a, &b])
            .await
            .unwrap();
        groups.push((g, before));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let last = tokio::task::spawn_blocking(move || w.join().unwrap())
        .await
        .unwrap();
    assert!(last > 100, "the writer wrote {last} rounds");
    for (round, (g, before)) in groups.iter().enumerate() {
        let of = |v: &str| member(g, v).snapshot_id.clone();
        let ra = create(&p, &format!("ra{round}"), Some(&of(&a))).await;
        let rb = create(&p, &format!("rb{round}"), Some(&of(&b))).await;
        let (na, nb) = (sequence_of(&p, &ra), sequence_of(&p, &rb));
        eprintln!("group {round}: A at {na}, B at {nb} (the writer was past {before})");
        assert!(na >= *before, "the snapshot is older than its call");
        assert!(
            nb == na || nb + 1 == na,
            "group {round}: A at {na}, B at {nb}: not one instant"
        );
    }
    // The volumes themselves went on to the last round.
    unstage(&p, &a, &sa, &da).await;
    unstage(&p, &b, &sb, &db).await;
    assert_eq!(sequence_of(&p, &a), last);
    assert_eq!(sequence_of(&p, &b), last);
    for l in p.layers() {
        qemu::check_clean(&l);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_snapshot_under_a_writer_holds_one_instant_on_nbdfuse() {
    let missing = support::root_attach_missing(&["nbdfuse", "losetup", "qemu-img"]);
    if !support::runnable("group snapshot on nbdfuse", missing) {
        return;
    }
    group_snapshot_under_a_writer(&["--attach", "nbdfuse"]).await;
}

#[test]
fn a_group_snapshot_under_a_writer_holds_one_instant_on_kernel_nbd() {
    if !uml::enter("a_group_snapshot_under_a_writer_holds_one_instant_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(group_snapshot_under_a_writer(&["--attach", "nbd"]));
}
