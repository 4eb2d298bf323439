//! Snapshots, restores and clones over the socket: the contract csi-sanity checks, data kept
//! through deletes in any order (checked with qemu-io on the layers), and crashes at every
//! step. After each test every remaining layer is `qemu-img check` clean and reached from a
//! volume or a snapshot (nothing orphaned, nothing missing).

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use csi::{Plugin, mount_cap};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(ok) => panic!("expected an error, got {ok:?}"),
        Err(s) => s.code(),
    }
}

fn volume_req(
    name: &str,
    size: i64,
    source: Option<volume_content_source::Type>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: (size > 0).then_some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, "")],
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..CreateVolumeRequest::default()
    }
}

fn from_snapshot(id: &str) -> Option<volume_content_source::Type> {
    Some(volume_content_source::Type::Snapshot(
        volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        },
    ))
}

fn from_volume(id: &str) -> Option<volume_content_source::Type> {
    Some(volume_content_source::Type::Volume(
        volume_content_source::VolumeSource {
            volume_id: id.into(),
        },
    ))
}

async fn volume(p: &Plugin, req: CreateVolumeRequest) -> String {
    p.controller()
        .await
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

fn snap_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn snapshot(p: &Plugin, name: &str, source: &str) -> Snapshot {
    p.controller()
        .await
        .create_snapshot(snap_req(name, source))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

async fn delete_volume(p: &Plugin, id: &str) {
    p.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
}

async fn delete_snapshot(p: &Plugin, id: &str) {
    p.controller()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
}

fn record(p: &Plugin, dir: &str, id: &str) -> serde_json::Value {
    let path = p.state.join(dir).join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// A volume's head layer file.
fn head(p: &Plugin, id: &str) -> PathBuf {
    p.state
        .join("layers")
        .join(record(p, "volumes", id)["head"].as_str().unwrap())
}

/// The layer files of `path`'s chain, top first (`qemu-img info --backing-chain`).
fn chain(path: &Path) -> Vec<String> {
    let text = qemu::img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            Path::new(l["filename"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Every layer file is reached from a volume or snapshot record (none orphaned), every
/// reached layer exists (none missing), and each is `qemu-img check` clean.
fn assert_layer_graph_sound(p: &Plugin) {
    let mut roots = Vec::new();
    for (dir, key) in [("volumes", "head"), ("snapshots", "layer")] {
        for e in std::fs::read_dir(p.state.join(dir)).unwrap() {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
            roots.push(p.state.join("layers").join(v[key].as_str().unwrap()));
        }
    }
    let reached: BTreeSet<String> = roots.iter().flat_map(|r| chain(r)).collect();
    let present: BTreeSet<String> = p
        .layers()
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present, reached,
        "layers on disk vs layers reached from records"
    );
    for l in p.layers() {
        qemu::check_clean(&l);
    }
}

fn write(p: &Plugin, id: &str, pattern: u8, offset: i64, len: i64) {
    qemu::io(
        &head(p, id),
        &[format!("write -P {pattern:#x} {offset} {len}")],
    );
}

fn expect(p: &Plugin, id: &str, pattern: u8, offset: i64, len: i64) {
    qemu::io(
        &head(p, id),
        &[format!("read -P {pattern:#x} {offset} {len}")],
    );
}

#[tokio::test]
async fn the_snapshot_contract_as_csi_sanity_checks_it() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let mut c = p.controller().await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    let w = volume(&p, volume_req("w", 8 * MIB, None)).await;

    // Argument rules.
    assert_eq!(
        code(c.create_snapshot(snap_req("", &v)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap_req("s", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap_req("s", "fake-vol-id")).await),
        Code::NotFound
    );
    let mut bad = snap_req("s", &v);
    bad.parameters = HashMap::from([("XXX_FakeKey".into(), "1".into())]);
    assert_eq!(code(c.create_snapshot(bad).await), Code::InvalidArgument);
    let mut ok = snap_req("s0", &v);
    ok.parameters = HashMap::from([("csi.storage.k8s.io/volumesnapshot/name".into(), "x".into())]);
    c.create_snapshot(ok).await.unwrap();

    // Idempotency by name.
    let s1 = snapshot(&p, "s1", &v).await;
    assert!(s1.ready_to_use);
    assert_eq!(s1.size_bytes, 8 * MIB);
    assert_eq!(s1.source_volume_id, v);
    assert!(s1.creation_time.unwrap().seconds > 0);
    for _ in 0..10 {
        assert_eq!(snapshot(&p, "s1", &v).await, s1);
    }
    assert_eq!(
        code(c.create_snapshot(snap_req("s1", &w)).await),
        Code::AlreadyExists
    );
    let long = "n".repeat(128);
    let l1 = snapshot(&p, &long, &w).await;
    assert_eq!(snapshot(&p, &long, &w).await, l1);
    assert_eq!(
        code(c.create_snapshot(snap_req(&"n".repeat(129), &w)).await),
        Code::InvalidArgument
    );

    // Listing: filters, unknown ids, pagination, bad tokens.
    for i in 0..4 {
        snapshot(&p, &format!("p{i}"), &w).await;
    }
    let lister = c.clone();
    let list = |req: ListSnapshotsRequest| {
        let mut c = lister.clone();
        async move { c.list_snapshots(req).await.unwrap().into_inner() }
    };
    let all = list(ListSnapshotsRequest::default()).await;
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());
    let one = list(ListSnapshotsRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].snapshot.as_ref().unwrap(), &s1);
    for unknown in ["fake-snap-id", "snap-00000000000000000000000000000000"] {
        let none = list(ListSnapshotsRequest {
            snapshot_id: unknown.into(),
            ..Default::default()
        })
        .await;
        assert!(none.entries.is_empty(), "{unknown}");
    }
    let of_v = list(ListSnapshotsRequest {
        source_volume_id: v.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(of_v.entries.len(), 2);
    let first = list(ListSnapshotsRequest {
        max_entries: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    let rest = list(ListSnapshotsRequest {
        starting_token: first.next_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(rest.entries.len(), 5);
    let mut ids: Vec<String> = first
        .entries
        .iter()
        .chain(&rest.entries)
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 7, "the pages do not overlap");
    assert_eq!(
        code(
            c.list_snapshots(ListSnapshotsRequest {
                starting_token: "invalid-token".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );

    // Get and delete.
    let got = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: s1.snapshot_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap(), s1);
    assert_eq!(
        code(
            c.get_snapshot(GetSnapshotRequest {
                snapshot_id: "fake-snap-id".into(),
                secrets: HashMap::new(),
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: String::new(),
                secrets: HashMap::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    for unknown in ["fake-snap-id", "snap-00000000000000000000000000000000"] {
        delete_snapshot(&p, unknown).await;
    }
    delete_snapshot(&p, &s1.snapshot_id).await;
    delete_snapshot(&p, &s1.snapshot_id).await;
    assert_eq!(list(ListSnapshotsRequest::default()).await.entries.len(), 6);
    // A missing source snapshot for a restore is NOT_FOUND.
    assert_eq!(
        code(
            c.create_volume(volume_req("r", 0, from_snapshot(&s1.snapshot_id)))
                .await
        ),
        Code::NotFound
    );
    assert_layer_graph_sound(&p);
}

#[tokio::test]
async fn restores_and_clones_keep_their_data_whatever_is_deleted_first() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    write(&p, &v, 0x11, 0, MIB);
    let s1 = snapshot(&p, "s1", &v).await.snapshot_id;
    // The volume goes on in a new head; the snapshot is its old one, frozen.
    write(&p, &v, 0x22, 0, MIB / 2);
    assert_eq!(chain(&head(&p, &v)).len(), 2);

    let r1 = volume(&p, volume_req("r1", 0, from_snapshot(&s1))).await;
    assert_eq!(qemu::info(&head(&p, &r1))["virtual-size"], 8 * MIB);
    expect(&p, &r1, 0x11, 0, MIB);
    expect(&p, &v, 0x22, 0, MIB / 2);
    expect(&p, &v, 0x11, MIB / 2, MIB / 2);
    assert_eq!(
        record(&p, "volumes", &r1)["source"]["snapshot"].as_str(),
        Some(s1.as_str())
    );

    // Snapshot deleted, then its source: the restore still reads its data.
    delete_snapshot(&p, &s1).await;
    delete_volume(&p, &v).await;
    expect(&p, &r1, 0x11, 0, MIB);
    assert_eq!(chain(&head(&p, &r1)).len(), 2);
    assert_layer_graph_sound(&p);

    // A volume with snapshots is deleted, then restored from them.
    let w = volume(&p, volume_req("w", 8 * MIB, None)).await;
    write(&p, &w, 0x33, 0, MIB);
    let s2 = snapshot(&p, "s2", &w).await.snapshot_id;
    write(&p, &w, 0x34, 0, MIB);
    let s3 = snapshot(&p, "s3", &w).await.snapshot_id;
    delete_volume(&p, &w).await;
    let from2 = volume(&p, volume_req("from2", 0, from_snapshot(&s2))).await;
    let from3 = volume(&p, volume_req("from3", 0, from_snapshot(&s3))).await;
    expect(&p, &from2, 0x33, 0, MIB);
    expect(&p, &from3, 0x34, 0, MIB);

    // Restore into a larger volume: the data, then zeros up to the new size.
    let big = volume(&p, volume_req("big", 16 * MIB, from_snapshot(&s2))).await;
    assert_eq!(qemu::info(&head(&p, &big))["virtual-size"], 16 * MIB);
    expect(&p, &big, 0x33, 0, MIB);
    expect(&p, &big, 0, 8 * MIB, 8 * MIB);
    // A limit below the snapshot's size cannot be met.
    let mut small = volume_req("small", 4 * MIB, from_snapshot(&s2));
    small.capacity_range.as_mut().unwrap().limit_bytes = 4 * MIB;
    assert_eq!(
        code(p.controller().await.create_volume(small).await),
        Code::OutOfRange
    );

    // Clone of a clone of a clone: each sees its source as of its making.
    let c1 = volume(&p, volume_req("c1", 0, from_volume(&big))).await;
    let c2 = volume(&p, volume_req("c2", 0, from_volume(&c1))).await;
    write(&p, &c1, 0x44, 0, MIB);
    let c3 = volume(&p, volume_req("c3", 0, from_volume(&c2))).await;
    write(&p, &c2, 0x55, 0, MIB);
    expect(&p, &big, 0x33, 0, MIB);
    expect(&p, &c1, 0x44, 0, MIB);
    expect(&p, &c2, 0x55, 0, MIB);
    expect(&p, &c3, 0x33, 0, MIB);
    assert_eq!(qemu::info(&head(&p, &c3))["virtual-size"], 16 * MIB);
    // Repeats return the same clone; the same name with another source is refused.
    assert_eq!(volume(&p, volume_req("c1", 0, from_volume(&big))).await, c1);
    assert_eq!(
        code(
            p.controller()
                .await
                .create_volume(volume_req("c1", 0, from_volume(&c2)))
                .await
        ),
        Code::AlreadyExists
    );
    // Sources go first; the clones keep reading.
    for id in [&big, &c1, &c2] {
        delete_volume(&p, id).await;
    }
    expect(&p, &c3, 0x33, 0, MIB);
    assert_layer_graph_sound(&p);

    for id in [&r1, &from2, &from3, &c3] {
        delete_volume(&p, id).await;
    }
    for s in [&s2, &s3] {
        delete_snapshot(&p, s).await;
    }
    assert!(p.layers().is_empty(), "{:?}", p.layers());
}

/// Kills the plugin at `point` during a CreateSnapshot; after the restart the volume reads
/// everything written before, the layer graph is sound, and the retry makes the snapshot.
async fn crash_during_snapshot(point: &str) {
    let mut p = Plugin::start().await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    write(&p, &v, 0x61, 0, MIB);
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
    assert!(
        p.controller()
            .await
            .create_snapshot(snap_req("s", &v))
            .await
            .is_err()
    );
    assert!(p.wait_crash(), "the failpoint {point} fired");
    p.restart_with(&[]).await;
    assert_layer_graph_sound(&p);
    expect(&p, &v, 0x61, 0, MIB);
    let s = snapshot(&p, "s", &v).await;
    assert_eq!(snapshot(&p, "s", &v).await, s, "{point}");
    write(&p, &v, 0x62, 0, MIB);
    let r = volume(&p, volume_req("r", 0, from_snapshot(&s.snapshot_id))).await;
    expect(&p, &r, 0x61, 0, MIB);
    expect(&p, &v, 0x62, 0, MIB);
    assert_layer_graph_sound(&p);
}

#[tokio::test]
async fn a_crash_after_the_new_head_is_made() {
    if qemu::require() {
        crash_during_snapshot("freeze-after-layer").await;
    }
}

#[tokio::test]
async fn a_crash_after_the_volume_moves_to_its_new_head() {
    if qemu::require() {
        crash_during_snapshot("freeze-after-record").await;
    }
}

#[tokio::test]
async fn a_crash_after_the_snapshot_record() {
    if qemu::require() {
        crash_during_snapshot("snapshot-after-record").await;
    }
}

#[tokio::test]
async fn a_crash_during_a_snapshot_delete_or_a_clone_loses_nothing() {
    if !qemu::require() {
        return;
    }
    let mut p = Plugin::start().await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    write(&p, &v, 0x71, 0, MIB);
    let s = snapshot(&p, "s", &v).await.snapshot_id;
    let r = volume(&p, volume_req("r", 0, from_snapshot(&s))).await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", "delete-snapshot-after-record")])
        .await;
    let _ = p
        .controller()
        .await
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: s.clone(),
            secrets: HashMap::new(),
        })
        .await;
    assert!(p.wait_crash());
    p.restart_with(&[]).await;
    assert_layer_graph_sound(&p);
    expect(&p, &r, 0x71, 0, MIB);
    delete_snapshot(&p, &s).await; // the retry: already gone, OK

    // A clone interrupted after its layer: the source keeps its data, the retry clones.
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", "create-after-layer")])
        .await;
    assert!(
        p.controller()
            .await
            .create_volume(volume_req("c", 0, from_volume(&v)))
            .await
            .is_err()
    );
    assert!(p.wait_crash());
    p.restart_with(&[]).await;
    assert_layer_graph_sound(&p);
    expect(&p, &v, 0x71, 0, MIB);
    let c = volume(&p, volume_req("c", 0, from_volume(&v))).await;
    expect(&p, &c, 0x71, 0, MIB);
    assert_layer_graph_sound(&p);
}
