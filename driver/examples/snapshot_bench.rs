//! CreateSnapshot and restore latency, side by side with what other tools pay for the same
//! point-in-time copy (`make bench-snapshot`, `docs/benchmarks.md`):
//! - qcow2-csi CreateSnapshot and CreateVolume-from-snapshot over the plugin's socket;
//! - `qemu-img create -b` of an overlay on the same image (an external snapshot by hand);
//! - `cp --sparse=always` of the image (what a copying driver such as csi-driver-host-path
//!   does per snapshot).
//!
//! The volume is 100 GiB with 1 GiB written (1 MiB every 100 MiB). Times are medians.
//!
//! ```sh
//! cargo run --release -p qcow2-csi --example snapshot_bench -- target/release/qcow2-csi [ROUNDS]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use csi_proto::v1::*;
use qcow2_engine::{Image, OpenOptions};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn head_of(state: &Path, volume: &str) -> anyhow::Result<PathBuf> {
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(
        state.join("volumes").join(format!("{volume}.json")),
    )?)?;
    Ok(state
        .join("layers")
        .join(rec["head"].as_str().unwrap_or_default()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bin = args
        .first()
        .cloned()
        .unwrap_or_else(|| "target/release/qcow2-csi".into());
    let rounds: usize = args.get(1).map_or(Ok(15), |r| r.parse())?;
    let dir = tempfile::tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or_else(|| ".".into()))?;
    let state = dir.path().join("state");
    let socket = dir.path().join("csi.sock");
    let _plugin = Plugin(
        Command::new(&bin)
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "bench", "--state-dir"])
            .arg(&state)
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let ch = loop {
        if let Ok(ch) = qcow2_csi::csi::client::connect(&socket).await {
            break ch;
        }
        anyhow::ensure!(Instant::now() < deadline, "the plugin did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut c = ControllerClient::new(ch);
    let cap = VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    let create = |name: String, source: Option<volume_content_source::Type>| CreateVolumeRequest {
        name,
        capacity_range: Some(CapacityRange {
            required_bytes: (100 * GIB) as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        parameters: [("overcommitRatio".to_string(), "100".to_string())].into(),
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    };
    let volume = c
        .create_volume(create("bench".into(), None))
        .await?
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // 1 GiB of data, 1 MiB every 100 MiB, written with the engine (the volume is not staged).
    // The anchors run on this layer (it stays, frozen, under the volume's later heads).
    let head = head_of(&state, &volume)?;
    {
        let img = Image::open(&head, &OpenOptions::writable())?;
        let chunk = vec![0x5au8; MIB as usize];
        for i in 0..1024 {
            img.write_at(&chunk, i * 100 * MIB)?;
        }
        img.flush()?;
        img.close()?;
    }
    let (mut snaps, mut restores) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let t = Instant::now();
        let snap = c
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: volume.clone(),
                name: format!("snap-{i}"),
                ..Default::default()
            })
            .await?
            .into_inner()
            .snapshot
            .unwrap();
        snaps.push(t.elapsed());
        let t = Instant::now();
        let restored = c
            .create_volume(create(
                format!("restore-{i}"),
                Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: snap.snapshot_id.clone(),
                    },
                )),
            ))
            .await?
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        restores.push(t.elapsed());
        c.delete_volume(DeleteVolumeRequest {
            volume_id: restored,
            ..Default::default()
        })
        .await?;
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await?;
    }
    // The anchors, on the layer holding the data.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut overlays = Vec::new();
    for i in 0..rounds {
        let overlay = scratch.join(format!("overlay-{i}.qcow2"));
        overlays.push(timed(|| {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&head)
                .arg(&overlay))
        })?);
        std::fs::remove_file(&overlay)?;
    }
    let mut copies = Vec::new();
    for i in 0..3 {
        let copy = scratch.join(format!("copy-{i}.qcow2"));
        copies.push(timed(|| {
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&head)
                .arg(&copy))?;
            run(Command::new("sync").arg(&copy))
        })?);
        std::fs::remove_file(&copy)?;
    }
    let (snap, restore) = (median(snaps), median(restores));
    let (overlay, copy) = (median(overlays), median(copies));
    println!("100 GiB volume, 1 GiB written; median of {rounds} rounds (copies: 3)\n");
    println!("| operation | median ms | vs qemu-img create -b | vs cp --sparse + sync |");
    println!("|---|---|---|---|");
    for (what, d) in [
        ("qcow2-csi CreateSnapshot (gRPC, records fsynced)", snap),
        ("qcow2-csi CreateVolume from snapshot", restore),
        ("qemu-img create -b (overlay only)", overlay),
        ("cp --sparse=always + sync (a full copy)", copy),
    ] {
        println!(
            "| {what} | {:.1} | {:.2} | {:.4} |",
            ms(d),
            ms(d) / ms(overlay),
            ms(d) / ms(copy)
        );
    }
    Ok(())
}
