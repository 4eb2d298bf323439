//! Snapshots, restores and clones over the socket: the contract csi-sanity checks, data kept
//! through deletes in any order (checked with qemu-io on the layers), and crashes at every
//! step. After each test every remaining layer is `qemu-img check` clean and reached from a
//! volume or a snapshot (nothing orphaned, nothing missing).

#[allow(dead_code)]
#[path = "support/csi.rs"]
mod csi;
#[allow(dead_code)]
#[path = "support/fake_api.rs"]
mod fake_api;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use csi::{Plugin, code, from_snapshot, from_volume, member, mount_cap};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

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

async fn volume(p: &Plugin, req: CreateVolumeRequest) -> String {
    let c = p.controller().await;
    retried("CreateVolume", || {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.create_volume(req).await }
    })
    .await
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

/// CreateSnapshot, retried on ABORTED as a CO does (a background flatten holds the volume
/// while it switches the head's backing file).
async fn snapshot(p: &Plugin, name: &str, source: &str) -> Snapshot {
    let c = p.controller().await;
    retried("CreateSnapshot", || {
        let mut c = c.clone();
        let req = snap_req(name, source);
        async move { c.create_snapshot(req).await }
    })
    .await
    .into_inner()
    .snapshot
    .unwrap()
}

/// Retries `call` on ABORTED, as a CO does.
async fn retried<T, F: std::future::Future<Output = Result<T, tonic::Status>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    loop {
        match call().await {
            Ok(r) => return r,
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(s) => panic!("{what}: {s:?}"),
        }
    }
}

async fn delete_volume(p: &Plugin, id: &str) {
    let c = p.controller().await;
    retried("DeleteVolume", || {
        let mut c = c.clone();
        let req = DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        };
        async move { c.delete_volume(req).await }
    })
    .await;
}

async fn delete_snapshot(p: &Plugin, id: &str) {
    let c = p.controller().await;
    retried("DeleteSnapshot", || {
        let mut c = c.clone();
        let req = DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: HashMap::new(),
        };
        async move { c.delete_snapshot(req).await }
    })
    .await;
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

/// The layer file names of `path`'s chain, top first.
fn chain(path: &Path) -> Vec<String> {
    qemu::backing_chain(path)
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The layer files on disk, and the layers reached from the volume and snapshot records.
fn layers_present_and_reached(p: &Plugin) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut roots = Vec::new();
    for (dir, key) in [("volumes", "head"), ("snapshots", "layer")] {
        for e in std::fs::read_dir(p.state.join(dir)).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "json") {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
                roots.push(p.state.join("layers").join(v[key].as_str().unwrap()));
            }
        }
    }
    let reached: BTreeSet<String> = roots.iter().flat_map(|r| chain(r)).collect();
    let present: BTreeSet<String> = p
        .layers()
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    (present, reached)
}

/// Every layer file is reached from a volume or snapshot record (none orphaned), every
/// reached layer exists (none missing), and each is `qemu-img check` clean.
fn assert_layer_graph_sound(p: &Plugin) {
    let (present, reached) = layers_present_and_reached(p);
    assert_eq!(
        present, reached,
        "layers on disk vs layers reached from records"
    );
    for l in p.layers() {
        qemu::check_clean(&l);
    }
}

/// Whether background work (flattens) has settled: no layer on disk that no record reaches.
fn layer_graph_settled(p: &Plugin) -> bool {
    let (present, reached) = layers_present_and_reached(p);
    present == reached
}

/// Runs one qemu-io command on volume `id`'s head; `read_only` opens it unlocked. A
/// background flatten holds the head for a moment when it switches its backing file: an
/// open refused by the lock is retried, as anything else is a failure.
fn qemu_io(p: &Plugin, id: &str, command: &str, read_only: bool) {
    for _ in 0..200 {
        let mut cmd = std::process::Command::new("qemu-io");
        if read_only {
            cmd.args(["-r", "-U"]);
        }
        let out = cmd
            .args(["-f", "qcow2", "-c", command])
            .arg(head(p, id))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("Failed to get") && text.contains("lock") {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        assert!(
            out.status.success()
                && !text.contains("failed")
                && !text.contains("error")
                && !text.contains("Could not"),
            "qemu-io {command:?} on {id}: {text}"
        );
        return;
    }
    panic!("qemu-io {command:?} on {id}: the head stayed locked");
}

fn write(p: &Plugin, id: &str, pattern: u8, offset: i64, len: i64) {
    qemu_io(
        p,
        id,
        &format!("write -P {pattern:#x} {offset} {len}"),
        false,
    );
}

fn expect(p: &Plugin, id: &str, pattern: u8, offset: i64, len: i64) {
    qemu_io(p, id, &format!("read -P {pattern:#x} {offset} {len}"), true);
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
    // A source this node does not hold is NOT_FOUND, and the message says where restores
    // and clones are made (sources are node-local; the pod must go to their node).
    for source in [from_snapshot(&s1.snapshot_id), from_volume("vol-elsewhere")] {
        let s = c
            .create_volume(volume_req("r", 0, source))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
        assert!(
            s.message().contains(csi::NODE) && s.message().contains(qcow2_csi::csi::TOPOLOGY_KEY),
            "{s:?}"
        );
    }
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
async fn a_crash_during_a_snapshot_delete_a_clone_or_a_restore_loses_nothing() {
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

    // A restore interrupted after its layer and after its record.
    let s2 = snapshot(&p, "s2", &c).await.snapshot_id;
    for point in ["create-after-layer", "create-after-record"] {
        p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
        assert!(
            p.controller()
                .await
                .create_volume(volume_req("restored", 0, from_snapshot(&s2)))
                .await
                .is_err()
        );
        assert!(p.wait_crash(), "{point}");
        p.restart_with(&[]).await;
        assert_layer_graph_sound(&p);
    }
    let restored = volume(&p, volume_req("restored", 0, from_snapshot(&s2))).await;
    expect(&p, &restored, 0x71, 0, MIB);
    assert_layer_graph_sound(&p);
}

/// Waits until `cond` holds (polling), or panics naming `what`.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Chains deeper than `--max-chain-depth` are flattened in the background while a reader
/// checks the volume's content all along; every snapshot still restores its own content.
#[tokio::test]
async fn deep_chains_flatten_in_the_background_and_read_correctly_throughout() {
    if !qemu::require() {
        return;
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let p = Plugin::start_with_args(&["--max-chain-depth", "3"]).await;
    let v = volume(&p, volume_req("v", 16 * MIB, None)).await;
    write(&p, &v, 0x40, 0, MIB);
    // The reader: the first MiB never changes; qemu-io opens the chain read-only and
    // unlocked each time. Opening may race with the collection of an old chain (a file
    // gone between header and open); a read that opened must verify.
    let stop = Arc::new(AtomicBool::new(false));
    let (verified, mismatched) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, verified, mismatched) = (stop.clone(), verified.clone(), mismatched.clone());
        let state = p.state.clone();
        let id = v.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let rec: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(state.join("volumes").join(format!("{id}.json"))).unwrap(),
                )
                .unwrap();
                let head = state.join("layers").join(rec["head"].as_str().unwrap());
                let out = std::process::Command::new("qemu-io")
                    .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x40 0 1M"])
                    .arg(&head)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                if text.contains("Pattern verification failed") {
                    mismatched.fetch_add(1, Ordering::SeqCst);
                } else if text.contains("read 1048576/1048576 bytes") {
                    verified.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let mut snaps = Vec::new();
    for i in 1..=6u8 {
        write(&p, &v, 0x40 + i, i64::from(i) * MIB, MIB);
        snaps.push(snapshot(&p, &format!("s{i}"), &v).await.snapshot_id);
    }
    wait_until("the chain is flattened to the limit", || {
        chain(&head(&p, &v)).len() <= 3
    })
    .await;
    // Let the reader run over the flattened chain too.
    let seen = verified.load(Ordering::SeqCst);
    wait_until("the reader reads again", || {
        verified.load(Ordering::SeqCst) > seen + 2
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert_eq!(mismatched.load(Ordering::SeqCst), 0);
    assert!(verified.load(Ordering::SeqCst) > 0);

    for i in 0..=6u8 {
        expect(&p, &v, 0x40 + i, i64::from(i) * MIB, MIB);
    }
    // Each snapshot restores exactly its own content.
    for (i, s) in snaps.iter().enumerate() {
        let i = i as u8 + 1;
        let r = volume(&p, volume_req(&format!("r{i}"), 0, from_snapshot(s))).await;
        expect(&p, &r, 0x40 + i, i64::from(i) * MIB, MIB);
        if i < 6 {
            expect(&p, &r, 0, i64::from(i + 1) * MIB, MIB);
        }
        delete_volume(&p, &r).await;
    }
    // Without the snapshots only the head and the flattened copy remain.
    for s in &snaps {
        delete_snapshot(&p, s).await;
    }
    wait_until("background work settles", || layer_graph_settled(&p)).await;
    assert!(p.layers().len() <= 3, "{:?}", p.layers());
    for i in 0..=6u8 {
        expect(&p, &v, 0x40 + i, i64::from(i) * MIB, MIB);
    }
    assert_layer_graph_sound(&p);
}

/// kill -9 while flattening, after the copy and after the switch: the restart finds the
/// deep chain (or the flattened one), flattens again if needed, and loses nothing.
async fn crash_during_flatten(point: &str) {
    let mut p = Plugin::start_with_args(&["--max-chain-depth", "2"]).await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    write(&p, &v, 0x51, 0, MIB);
    let s1 = snapshot(&p, "s1", &v).await.snapshot_id;
    wait_until("the first flatten", || chain(&head(&p, &v)).len() <= 2).await;
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
    write(&p, &v, 0x52, MIB, MIB);
    // This snapshot makes the chain 3 deep: the flatten starts and the process dies in it.
    let _ = p
        .controller()
        .await
        .create_snapshot(snap_req("s2", &v))
        .await;
    assert!(p.wait_crash(), "the failpoint {point} fired");
    p.restart_with(&[]).await;
    // Nothing lost, whichever chain the volume is on now.
    expect(&p, &v, 0x51, 0, MIB);
    expect(&p, &v, 0x52, MIB, MIB);
    // The restart checks every chain and flattens what is too deep.
    wait_until("the flatten after the restart", || {
        chain(&head(&p, &v)).len() <= 2 && layer_graph_settled(&p)
    })
    .await;
    assert_layer_graph_sound(&p);
    let r = volume(&p, volume_req("r", 0, from_snapshot(&s1))).await;
    expect(&p, &r, 0x51, 0, MIB);
    expect(&p, &r, 0, MIB, MIB);
    expect(&p, &v, 0x52, MIB, MIB);
    assert_layer_graph_sound(&p);
}

#[tokio::test]
async fn a_crash_after_the_flatten_copy() {
    if qemu::require() {
        crash_during_flatten("flatten-after-copy").await;
    }
}

#[tokio::test]
async fn a_crash_after_the_flatten_switch() {
    if qemu::require() {
        crash_during_flatten("flatten-after-rebase").await;
    }
}

/// A clone of a clone of a clone with `--max-chain-depth 2`: each clone's chain is flattened
/// in the background, and each keeps its own content.
#[tokio::test]
async fn clones_of_clones_are_flattened_and_keep_their_content() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start_with_args(&["--max-chain-depth", "2"]).await;
    let v = volume(&p, volume_req("v", 8 * MIB, None)).await;
    write(&p, &v, 0x81, 0, MIB);
    let c1 = volume(&p, volume_req("c1", 0, from_volume(&v))).await;
    write(&p, &c1, 0x82, MIB, MIB);
    let c2 = volume(&p, volume_req("c2", 0, from_volume(&c1))).await;
    write(&p, &c2, 0x83, 2 * MIB, MIB);
    let c3 = volume(&p, volume_req("c3", 12 * MIB, from_volume(&c2))).await;
    write(&p, &c3, 0x84, 3 * MIB, MIB);
    wait_until("every chain at the limit", || {
        [&v, &c1, &c2, &c3]
            .iter()
            .all(|id| chain(&head(&p, id)).len() <= 2)
            && layer_graph_settled(&p)
    })
    .await;
    expect(&p, &c3, 0x81, 0, MIB);
    expect(&p, &c3, 0x82, MIB, MIB);
    expect(&p, &c3, 0x83, 2 * MIB, MIB);
    expect(&p, &c3, 0x84, 3 * MIB, MIB);
    expect(&p, &c3, 0, 8 * MIB, 4 * MIB);
    expect(&p, &c2, 0, 3 * MIB, MIB);
    expect(&p, &c1, 0, 2 * MIB, MIB);
    expect(&p, &v, 0, MIB, MIB);
    assert_layer_graph_sound(&p);
    for id in [&v, &c1, &c2, &c3] {
        delete_volume(&p, id).await;
    }
    wait_until("all collected", || p.layers().is_empty()).await;
}

fn group_req(name: &str, volumes: &[&str]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

async fn group_snapshot(p: &Plugin, name: &str, volumes: &[&str]) -> VolumeGroupSnapshot {
    let g = p.group().await;
    retried("CreateVolumeGroupSnapshot", || {
        let mut g = g.clone();
        let req = group_req(name, volumes);
        async move { g.create_volume_group_snapshot(req).await }
    })
    .await
    .into_inner()
    .group_snapshot
    .unwrap()
}

/// The GroupController contract: capabilities, the spec's codes for bad requests, one
/// instant of every member kept while the volumes move on, members that are ordinary
/// snapshots (listed with their group id, restorable, deletable on their own), idempotent
/// creates and deletes, and nothing left behind.
#[tokio::test]
async fn group_snapshots_follow_the_contract_and_keep_one_instant_of_every_member() {
    if !qemu::require() {
        return;
    }
    let p = Plugin::start().await;
    let mut g = p.group().await;
    let caps = g
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps.len(), 1);
    let a = volume(&p, volume_req("a", 8 * MIB, None)).await;
    let b = volume(&p, volume_req("b", 4 * MIB, None)).await;
    write(&p, &a, 0x11, 0, MIB);
    write(&p, &b, 0x22, 0, MIB);

    // Bad requests.
    let elsewhere = format!("vol-{}", "e".repeat(32));
    for (req, want) in [
        (group_req("", &[&a]), Code::InvalidArgument),
        (group_req("g", &[]), Code::InvalidArgument),
        (group_req("g", &[&a, &a]), Code::InvalidArgument),
        (group_req("g", &[&a, "no-such-volume"]), Code::NotFound),
        (group_req("g", &[&a, &elsewhere]), Code::FailedPrecondition),
    ] {
        assert_eq!(code(g.create_volume_group_snapshot(req).await), want);
    }
    let mut bad = group_req("g", &[&a, &b]);
    bad.parameters = HashMap::from([("frozen".to_string(), "yes".to_string())]);
    assert_eq!(
        code(g.create_volume_group_snapshot(bad).await),
        Code::InvalidArgument
    );
    let s = g
        .create_volume_group_snapshot(group_req("g", &[&a, &elsewhere]))
        .await
        .unwrap_err();
    assert!(s.message().contains("one node"), "{s:?}");
    assert!(
        p.state
            .join("snapshots")
            .read_dir()
            .unwrap()
            .next()
            .is_none()
    );

    let taken = group_snapshot(&p, "g", &[&b, &a]).await;
    assert!(taken.group_snapshot_id.starts_with("group-"));
    assert_eq!(taken.snapshots.len(), 2);
    assert!(taken.ready_to_use);
    for s in &taken.snapshots {
        assert_eq!(s.group_snapshot_id, taken.group_snapshot_id);
        assert!(s.ready_to_use);
    }
    assert_eq!(member(&taken, &a).size_bytes, 8 * MIB);
    // Idempotent by name and members (in any order); other members under the name are not.
    assert_eq!(group_snapshot(&p, "g", &[&a, &b]).await, taken);
    assert_eq!(
        code(g.create_volume_group_snapshot(group_req("g", &[&a])).await),
        Code::AlreadyExists
    );
    // The volumes move on; the members keep the instant.
    write(&p, &a, 0x33, 0, MIB);
    write(&p, &b, 0x44, 0, MIB);
    let ra = volume(
        &p,
        volume_req("ra", 0, from_snapshot(&member(&taken, &a).snapshot_id)),
    )
    .await;
    let rb = volume(
        &p,
        volume_req("rb", 0, from_snapshot(&member(&taken, &b).snapshot_id)),
    )
    .await;
    expect(&p, &ra, 0x11, 0, MIB);
    expect(&p, &rb, 0x22, 0, MIB);
    expect(&p, &a, 0x33, 0, MIB);

    // Listed as ordinary snapshots, with their group.
    let listed = p
        .controller()
        .await
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|e| e.snapshot.as_ref().unwrap().group_snapshot_id == taken.group_snapshot_id)
    );

    // Get: the codes, and the members.
    let get = |id: &str, members: Vec<String>| GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    };
    assert_eq!(
        code(g.get_volume_group_snapshot(get("", vec![])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(g.get_volume_group_snapshot(get("group-nope", vec![])).await),
        Code::NotFound
    );
    let stray = vec![member(&taken, &a).snapshot_id.clone(), "snap-x".into()];
    assert_eq!(
        code(
            g.get_volume_group_snapshot(get(&taken.group_snapshot_id, stray))
                .await
        ),
        Code::InvalidArgument
    );
    let got = g
        .get_volume_group_snapshot(get(&taken.group_snapshot_id, vec![]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got, taken);

    // A member deleted on its own leaves the other; the group lists what is left.
    delete_snapshot(&p, &member(&taken, &b).snapshot_id).await;
    let got = g
        .get_volume_group_snapshot(get(&taken.group_snapshot_id, vec![]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.snapshots, vec![member(&taken, &a).clone()]);

    // Delete: the codes, a mismatch refused, then gone (twice is fine).
    let del = |id: &str, members: Vec<String>| DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    };
    assert_eq!(
        code(g.delete_volume_group_snapshot(del("", vec![])).await),
        Code::InvalidArgument
    );
    g.delete_volume_group_snapshot(del("group-nope", vec![]))
        .await
        .unwrap();
    assert_eq!(
        code(
            g.delete_volume_group_snapshot(del(&taken.group_snapshot_id, vec!["snap-x".into()]))
                .await
        ),
        Code::InvalidArgument
    );
    for _ in 0..2 {
        g.delete_volume_group_snapshot(del(&taken.group_snapshot_id, vec![]))
            .await
            .unwrap();
    }
    assert_eq!(
        code(
            g.get_volume_group_snapshot(get(&taken.group_snapshot_id, vec![]))
                .await
        ),
        Code::NotFound
    );
    // The restores outlive the group.
    expect(&p, &ra, 0x11, 0, MIB);
    expect(&p, &rb, 0x22, 0, MIB);
    assert_layer_graph_sound(&p);
}

/// Kills the plugin at `point` during a CreateVolumeGroupSnapshot of two volumes (and of a
/// delete, for `delete-group-after-record`). After the restart: every volume reads what was
/// written, no member snapshot exists without its group, the layer graph is sound (nothing
/// orphaned, every layer `qemu-img check` clean), and the retry makes the group.
async fn crash_during_group_snapshot(point: &str) {
    let mut p = Plugin::start().await;
    let a = volume(&p, volume_req("a", 8 * MIB, None)).await;
    let b = volume(&p, volume_req("b", 8 * MIB, None)).await;
    write(&p, &a, 0x61, 0, MIB);
    write(&p, &b, 0x62, 0, MIB);
    let deleting = point.starts_with("delete-");
    let earlier = if deleting {
        Some(group_snapshot(&p, "g0", &[&a, &b]).await)
    } else {
        None
    };
    p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
    let mut g = p.group().await;
    let failed = match &earlier {
        Some(e) => g
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: e.group_snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .is_err(),
        None => g
            .create_volume_group_snapshot(group_req("g", &[&a, &b]))
            .await
            .is_err(),
    };
    assert!(failed, "{point}");
    assert!(p.wait_crash(), "the failpoint {point} fired");
    p.restart_with(&[]).await;
    assert_layer_graph_sound(&p);
    expect(&p, &a, 0x61, 0, MIB);
    expect(&p, &b, 0x62, 0, MIB);
    // No member without its group.
    let groups: BTreeSet<String> = std::fs::read_dir(p.state.join("groups"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for e in std::fs::read_dir(p.state.join("snapshots")).unwrap() {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        let group = rec["group"].as_str().unwrap();
        assert!(
            groups.contains(group),
            "{point}: member of a missing group: {rec}"
        );
    }
    if deleting {
        assert!(
            groups.is_empty(),
            "{point}: the delete's commit point passed"
        );
    }
    let taken = group_snapshot(&p, "g", &[&a, &b]).await;
    write(&p, &a, 0x71, 0, MIB);
    let r = volume(
        &p,
        volume_req("r", 0, from_snapshot(&member(&taken, &a).snapshot_id)),
    )
    .await;
    expect(&p, &r, 0x61, 0, MIB);
    assert_layer_graph_sound(&p);
}

#[tokio::test]
async fn a_crash_at_every_step_of_a_group_snapshot_leaves_nothing_half_done() {
    if !qemu::require() {
        return;
    }
    for point in [
        "group-after-layers",
        "group-after-record",
        "group-after-member",
        "delete-group-after-record",
    ] {
        crash_during_group_snapshot(point).await;
    }
}

/// `--label-snapshot-contents` against a stand-in API server: the group content of two
/// volumes of this node and its member contents get this node's managed-by label (so this
/// node's csi-snapshotter takes them); a group content naming another node's volume,
/// another driver's content and one labelled already are left alone; a content made while
/// the plugin was down is labelled when it starts; the only writes are those merge patches.
#[tokio::test(flavor = "multi_thread")]
async fn this_nodes_group_snapshot_contents_are_labelled_for_its_snapshotter() {
    if !qemu::require() {
        return;
    }
    let mut p = Plugin::start_with_args(&["--label-snapshot-contents"]).await;
    let api = fake_api::FakeApi::start(p.dir.path());
    let kubeconfig = api.kubeconfig.display().to_string();
    p.restart_with(&[("KUBECONFIG", &kubeconfig)]).await;
    let a = volume(&p, volume_req("a", 4 * MIB, None)).await;
    let b = volume(&p, volume_req("b", 4 * MIB, None)).await;
    let elsewhere = format!("vol-{}", "f".repeat(32));
    let group = |name: &str, handles: &[&str], driver: &str, labels: serde_json::Value| {
        serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"driver": driver, "deletionPolicy": "Delete",
                     "source": {"volumeHandles": handles}},
        })
    };
    let none = serde_json::json!({});
    tokio::task::block_in_place(|| api.wait_watches(2));
    for (name, handles, driver, labels) in [
        (
            "ours",
            vec![a.as_str(), b.as_str()],
            "qcow2.csi.dev",
            none.clone(),
        ),
        ("mixed", vec![&a, &elsewhere], "qcow2.csi.dev", none.clone()),
        ("alien", vec![&a], "other.csi.dev", none.clone()),
        (
            "taken",
            vec![&a],
            "qcow2.csi.dev",
            serde_json::json!({fake_api::MANAGED_BY: "node-9"}),
        ),
    ] {
        api.put("vgscs", name, &group(name, &handles, driver, labels));
    }
    let put_member = |name: &str, handle: &str| {
        api.put(
            "vscs",
            name,
            &serde_json::json!({
                "metadata": {"name": name},
                "spec": {"driver": "qcow2.csi.dev", "source": {"volumeHandle": handle}},
            }),
        );
    };
    put_member("member-a", &a);
    let labelled = |kind: &str, name: &str| {
        api.get(kind, name)["metadata"]["labels"][fake_api::MANAGED_BY].clone()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while labelled("vgscs", "ours").is_null() || labelled("vscs", "member-a").is_null() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(labelled("vgscs", "ours"), csi::NODE);
    assert_eq!(labelled("vscs", "member-a"), csi::NODE);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(labelled("vgscs", "mixed").is_null());
    assert!(labelled("vgscs", "alien").is_null());
    assert_eq!(labelled("vgscs", "taken"), "node-9");

    // Made while the plugin is down: labelled from the watch's first listing, which waits
    // for the state directory (slow here) to load.
    assert!(p.stop().success());
    put_member("member-b", &b);
    p.restart_with(&[
        ("KUBECONFIG", &kubeconfig),
        ("QCOW2_CSI_FAILPOINT", "state-load:sleep=1500"),
    ])
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while labelled("vscs", "member-b").is_null() {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(labelled("vscs", "member-b"), csi::NODE);
    let requests = api.requests();
    let writes: Vec<&str> = requests
        .lines()
        .filter(|l| !l.starts_with("GET "))
        .collect();
    assert_eq!(writes.len(), 3, "{requests}");
    assert!(writes.iter().all(|w| w.starts_with("PATCH ")), "{requests}");
}
