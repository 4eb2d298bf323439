//! The kernel nbd data path for real, inside user-mode Linux (`support/uml.rs`): attach with
//! netlink and with the ioctls, the CSI plugin staging ext4, xfs and block volumes on
//! `/dev/nbdN`, online growth, snapshots and flattening under writers, and plugin restarts
//! under fio with verification, measured. Every test ends with `qemu-img check` clean on
//! every layer and no device, mount or process left.

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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi::{Plugin, block_cap, mount_cap};
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::*;

const MIB: i64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// nbd devices the kernel has connected (a `pid` file in sysfs means a live configuration).
fn connected_nbds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            (name.starts_with("nbd") && Path::new(&format!("/sys/block/{name}/pid")).exists())
                .then_some(name)
        })
        .collect();
    v.sort();
    v
}

/// Mounts under `dir`, connected nbd devices and qcow2-csi processes: all must be gone at
/// the end of a test.
fn leaks(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
        .collect();
    out.extend(connected_nbds());
    let ps = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    out.extend(
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .filter(|l| l.contains("qcow2-csi serve") || l.contains("qcow2-csi attach"))
            .map(String::from),
    );
    out
}

/// Every layer of the plugin's state directory passes `qemu-img check`.
fn check_layers(p: &Plugin) {
    for layer in p.layers() {
        qemu::check_clean(&layer);
    }
}

async fn create(p: &Plugin, name: &str, size: i64, cap: &VolumeCapability) -> String {
    p.controller()
        .await
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// Stages `id` at `DIR/staging-<id>` through the plugin; returns the path.
async fn stage(p: &Plugin, id: &str, cap: &VolumeCapability) -> PathBuf {
    let staging = p.dir.path().join(format!("staging-{id}"));
    std::fs::create_dir_all(&staging).unwrap();
    p.node()
        .await
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stage {id}: {e}\n{}", p.log()));
    staging
}

async fn unstage(p: &Plugin, id: &str, staging: &Path) {
    p.node()
        .await
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unstage {id}: {e}\n{}", p.log()));
}

/// The kernel device a staged volume got (from the stage record).
fn staged_device(p: &Plugin, id: &str) -> String {
    let rec = std::fs::read_to_string(p.state.join(format!("staged/{id}.json")))
        .unwrap_or_else(|e| panic!("stage record of {id}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
    v["device"].as_str().unwrap().to_string()
}

/// A fio job writing 4 KiB blocks at random at queue depth 16 with `O_DIRECT`, each block
/// carrying a crc32c header, then reading every block back and verifying it.
struct Fio {
    child: Child,
    output: PathBuf,
    started: Instant,
}

/// What a fio run measured.
#[derive(Debug)]
struct FioResult {
    /// The longest a write took to complete.
    max_write_latency: Duration,
    writes: u64,
    errors: u64,
}

impl Fio {
    fn start(file: &Path, size_mib: u64, output: &Path) -> Fio {
        let child = Command::new("fio")
            .args([
                "--name=restart",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--ioengine=libaio",
                "--direct=1",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={size_mib}M"))
            .arg(format!("--output={}", output.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting fio");
        Fio {
            child,
            output: output.to_path_buf(),
            started: Instant::now(),
        }
    }

    /// Waits for the run (with its verification) to end; panics if fio failed.
    fn finish(self) -> FioResult {
        let out = self.child.wait_with_output().unwrap();
        let json = std::fs::read_to_string(&self.output).unwrap_or_default();
        assert!(
            out.status.success(),
            "fio failed ({}): {}\n{json}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let job = &v["jobs"][0];
        FioResult {
            max_write_latency: Duration::from_nanos(
                job["write"]["clat_ns"]["max"].as_f64().unwrap() as u64,
            ),
            writes: job["write"]["total_ios"].as_u64().unwrap(),
            errors: job["error"].as_u64().unwrap(),
        }
    }
}

/// How the plugin is restarted while fio writes.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// `kill -9`, then a new process.
    Crash,
    /// SIGTERM, then a new process (the old one serves on until it has handed over).
    Planned,
    /// A new process beside the running one (a DaemonSet update with maxSurge), then
    /// SIGTERM to the old one.
    Surge,
}

/// Stages an ext4 volume on kernel nbd, runs fio on it, restarts the plugin as `how` says
/// while fio writes, and returns what fio measured; the data verifies, the volume unstages
/// cleanly and every layer checks clean.
async fn restart_under_fio(how: Restart) -> FioResult {
    let mut p = Plugin::start_with_args(&["--attach", "nbd"]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let id = create(&p, "pvc-restart", 512 * MIB, &cap).await;
    let staging = stage(&p, &id, &cap).await;
    let fio = Fio::start(&staging.join("fio.dat"), 96, &p.dir.path().join("fio.json"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    match how {
        Restart::Crash => {
            p.kill9();
            p.spawn(&[]);
        }
        Restart::Planned => {
            p.terminate();
            p.spawn(&[]);
        }
        Restart::Surge => {
            let old = p.pid();
            p.spawn(&[]);
            p.wait_ready().await;
            sh(&format!("kill -TERM {old}"));
        }
    }
    p.wait_ready().await;
    eprintln!(
        "{how:?}: the new plugin was ready {:?} after the restart began, {:?} into fio",
        restarted.elapsed(),
        fio.started.elapsed()
    );
    let result = tokio::task::spawn_blocking(move || fio.finish())
        .await
        .unwrap();
    eprintln!("{how:?}: {result:?}");
    let log = p.log();
    assert!(
        log.contains("took over") || log.contains("reattached"),
        "the new plugin did not take the device over:\n{log}"
    );
    unstage(&p, &id, &staging).await;
    for old in &mut p.previous {
        let status = old.wait().unwrap();
        assert!(
            status.success() || matches!(how, Restart::Crash),
            "{status}"
        );
    }
    p.stop();
    check_layers(&p);
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    result
}

#[test]
fn a_crash_under_fio_stalls_writes_at_most_5_s() {
    if !uml::enter("a_crash_under_fio_stalls_writes_at_most_5_s") {
        return;
    }
    let r = rt().block_on(restart_under_fio(Restart::Crash));
    assert_eq!(r.errors, 0);
    assert!(
        r.max_write_latency <= Duration::from_secs(5),
        "a write waited {:?} across a crash",
        r.max_write_latency
    );
}

#[test]
fn a_planned_restart_under_fio_stalls_writes_at_most_1_s() {
    if !uml::enter("a_planned_restart_under_fio_stalls_writes_at_most_1_s") {
        return;
    }
    let r = rt().block_on(restart_under_fio(Restart::Planned));
    assert_eq!(r.errors, 0);
    assert!(
        r.max_write_latency <= Duration::from_secs(1),
        "a write waited {:?} across a planned restart",
        r.max_write_latency
    );
}

#[test]
fn a_surge_restart_under_fio_stalls_writes_at_most_1_s() {
    if !uml::enter("a_surge_restart_under_fio_stalls_writes_at_most_1_s") {
        return;
    }
    let r = rt().block_on(restart_under_fio(Restart::Surge));
    assert_eq!(r.errors, 0);
    assert!(
        r.max_write_latency <= Duration::from_secs(1),
        "a write waited {:?} across a surge restart",
        r.max_write_latency
    );
}

#[test]
fn qcow2_csi_attach_serves_dev_nbd_through_netlink() {
    if !uml::enter("qcow2_csi_attach_serves_dev_nbd_through_netlink") {
        return;
    }
    attach_cli("nbd");
}

/// `qcow2-csi attach --mode MODE` on a fresh image: ext4 made on the device, fio writes and
/// verifies 32 MiB, SIGTERM detaches; the image checks clean, holds the files when attached
/// again, and nothing is left.
fn attach_cli(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 {} 256M",
        image.display()
    ));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for round in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .args(["attach", "--mode", mode, "--id", "vol-attach"])
            .arg(&image)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let dev = line.trim().to_string();
        assert!(dev.starts_with("/dev/nbd"), "{dev}");
        let name = dev.trim_start_matches("/dev/");
        if mode == "nbd" {
            assert_eq!(
                std::fs::read_to_string(format!("/sys/block/{name}/backend"))
                    .unwrap()
                    .trim(),
                "vol-attach"
            );
        }
        if round == 0 {
            sh(&format!("mkfs.ext4 -q {dev}"));
        }
        sh(&format!("mount {dev} {}", mnt.display()));
        if round == 0 {
            sh(&format!(
                "fio --name=v --filename={}/f --size=32M --rw=randwrite --bs=4k --iodepth=8 \
                 --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 >/dev/null",
                mnt.display()
            ));
            std::fs::write(mnt.join("hello"), "hello").unwrap();
        } else {
            assert_eq!(std::fs::read_to_string(mnt.join("hello")).unwrap(), "hello");
            sh(&format!(
                "fio --name=v --filename={}/f --size=32M --rw=randwrite --bs=4k \
                 --verify=crc32c --verify_only=1 >/dev/null",
                mnt.display()
            ));
        }
        sh(&format!("umount {}", mnt.display()));
        sh(&format!("kill -TERM {}", child.id()));
        assert!(child.wait().unwrap().success());
        qemu::check_clean(&image);
        assert!(connected_nbds().is_empty(), "{:?}", connected_nbds());
    }
    assert!(leaks(dir.path()).is_empty(), "{:?}", leaks(dir.path()));
}
