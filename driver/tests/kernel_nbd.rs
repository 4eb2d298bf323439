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
use support::sh;

const MIB: i64 = 1 << 20;

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

/// Mounts under `dir` and connected nbd devices: all must be gone once a test unstaged
/// everything.
fn leaks(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
        .collect();
    out.extend(connected_nbds());
    out
}

/// Stops the plugin (SIGTERM: nothing is staged, so it exits at once) and checks that no
/// process of it, no mount and no device is left, and that every layer checks clean.
fn finish(mut p: Plugin, crashed: bool) {
    assert!(p.stop().success(), "{}", p.log());
    let ps = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    let d = p.dir.path().display().to_string();
    let procs: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&d))
        .map(String::from)
        .collect();
    assert!(procs.is_empty(), "{procs:?}");
    assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    check_layers(&p, crashed);
}

/// Every layer of the plugin's state directory passes `qemu-img check`: clean, or, after a
/// crash, with leaked clusters at most (the damage a crash may leave in a layer that is
/// never written again; the head's are reclaimed when it reopens).
fn check_layers(p: &Plugin, crashed: bool) {
    for layer in p.layers() {
        if crashed {
            qemu::check_no_corruption(&layer);
        } else {
            qemu::check_clean(&layer);
        }
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
    let staging = p.kubelet.join(format!("staging-{id}"));
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
                "--verify_state_save=0",
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
    /// No restart (the control).
    Nothing,
    /// `kill -9`, then a new process.
    Crash,
    /// SIGTERM, then a new process (the old one serves on until it has handed over).
    Planned,
    /// A new process beside the running one (a DaemonSet update with maxSurge), then
    /// SIGTERM to the old one.
    Surge,
    /// As `Surge`, but the new process finds no handover socket (an older plugin without
    /// handovers, say): it reports the volume lost while the old one serves it, and takes
    /// it back once the old one has gone.
    Overlap,
}

/// Stages an ext4 volume on kernel nbd, runs fio on it, restarts the plugin as `how` says
/// while fio writes, and returns what fio measured; the data verifies, the volume unstages
/// cleanly and every layer checks clean.
async fn restart_under_fio(how: Restart) -> FioResult {
    let mut p = Plugin::start_with_args(&["--attach", "nbd", "--handoff-wait", "20"]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
    let id = create(&p, "pvc-restart", 512 * MIB, &cap).await;
    let staging = stage(&p, &id, &cap).await;
    let fio = Fio::start(&staging.join("fio.dat"), 96, &p.dir.path().join("fio.json"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    match how {
        Restart::Nothing => {}
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
        Restart::Overlap => {
            let old = p.pid();
            std::fs::remove_file(p.state.join("handoff.sock")).unwrap();
            p.spawn(&[]);
            p.wait_ready().await;
            // SIGKILL: an old plugin without handovers does not wait for one either.
            sh(&format!("kill -KILL {old}"));
        }
    }
    p.wait_ready().await;
    // The old process is gone while fio still writes: the stall measured spans the whole
    // change of server.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut olds = std::mem::take(&mut p.previous);
    for old in &mut olds {
        while old.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the old plugin still runs 10 s after the restart:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    p.previous = olds;
    let mut fio = fio;
    assert!(
        fio.child.try_wait().unwrap().is_none(),
        "fio ended before the restart did"
    );
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
    for line in log
        .lines()
        .filter(|l| l.contains("handed the volumes over"))
    {
        eprintln!("{how:?}: {line}");
    }
    assert!(
        matches!(how, Restart::Nothing)
            || log.contains("took over")
            || log.contains("reattached")
            || log.contains("took back"),
        "the new plugin did not take the device over:\n{log}"
    );
    unstage(&p, &id, &staging).await;
    for old in &mut p.previous {
        let status = old.try_wait().unwrap().expect("exited");
        assert!(
            status.success() || matches!(how, Restart::Crash | Restart::Overlap),
            "{status}"
        );
    }
    p.previous.clear();
    finish(p, matches!(how, Restart::Crash | Restart::Overlap));
    result
}

/// Runs [`restart_under_fio`] inside the kernel (test `name`): no I/O error, and no write
/// waited longer than `limit`.
fn stall_at_most(name: &str, how: Restart, limit: Duration) {
    if !uml::enter(name) {
        return;
    }
    let r = uml::runtime().block_on(restart_under_fio(how));
    assert_eq!(r.errors, 0);
    assert!(
        r.max_write_latency <= limit,
        "a write waited {:?} across {how:?}",
        r.max_write_latency
    );
}

/// The control: the same fio run with no restart, for what a write's latency is anyway in
/// the user-mode kernel.
#[test]
fn fio_verifies_on_kernel_nbd_without_a_restart() {
    if !uml::enter("fio_verifies_on_kernel_nbd_without_a_restart") {
        return;
    }
    let r = uml::runtime().block_on(restart_under_fio(Restart::Nothing));
    assert_eq!(r.errors, 0);
    assert_eq!(r.writes, 24576);
}

#[test]
fn a_crash_under_fio_stalls_writes_at_most_5_s() {
    stall_at_most(
        "a_crash_under_fio_stalls_writes_at_most_5_s",
        Restart::Crash,
        Duration::from_secs(5),
    );
}

#[test]
fn a_planned_restart_under_fio_stalls_writes_at_most_1_s() {
    stall_at_most(
        "a_planned_restart_under_fio_stalls_writes_at_most_1_s",
        Restart::Planned,
        Duration::from_secs(1),
    );
}

#[test]
fn a_surge_restart_under_fio_stalls_writes_at_most_1_s() {
    stall_at_most(
        "a_surge_restart_under_fio_stalls_writes_at_most_1_s",
        Restart::Surge,
        Duration::from_secs(1),
    );
}

#[test]
fn an_overlap_without_a_handover_heals_within_5_s() {
    stall_at_most(
        "an_overlap_without_a_handover_heals_within_5_s",
        Restart::Overlap,
        Duration::from_secs(5),
    );
}

#[test]
fn qcow2_csi_attach_serves_dev_nbd_through_netlink() {
    if !uml::enter("qcow2_csi_attach_serves_dev_nbd_through_netlink") {
        return;
    }
    attach_cli("nbd");
}

#[test]
fn qcow2_csi_attach_serves_dev_nbd_through_the_ioctls() {
    if !uml::enter("qcow2_csi_attach_serves_dev_nbd_through_the_ioctls") {
        return;
    }
    attach_cli("nbd-ioctl");
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
                "fio --name=v --filename={}/f --size=32M --rw=randwrite --bs=4k --iodepth=8 --verify_state_save=0 \
                 --ioengine=libaio --direct=1 --verify=crc32c --verify_fatal=1 >/dev/null",
                mnt.display()
            ));
            std::fs::write(mnt.join("hello"), "hello").unwrap();
        } else {
            assert_eq!(std::fs::read_to_string(mnt.join("hello")).unwrap(), "hello");
            sh(&format!(
                "fio --name=v --filename={}/f --size=32M --rw=randwrite --bs=4k --verify_state_save=0 \
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

async fn publish(p: &Plugin, id: &str, staging: &Path, cap: &VolumeCapability) -> PathBuf {
    let target = p.kubelet.join("pods").join(id);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    p.node()
        .await
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("publish {id}: {e}\n{}", p.log()));
    target
}

async fn unpublish(p: &Plugin, id: &str, target: &Path) {
    p.node()
        .await
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unpublish {id}: {e}\n{}", p.log()));
}

async fn expand(p: &Plugin, id: &str, path: &Path, size: i64) {
    p.node()
        .await
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("expand {id}: {e}\n{}", p.log()));
}

/// The size of a mounted filesystem (`df`), in bytes.
fn fs_size(path: &Path) -> u64 {
    sh(&format!(
        "df -B1 --output=size {} | tail -1",
        path.display()
    ))
    .trim()
    .parse()
    .unwrap()
}

/// Stage, publish, write, grow online (RECONFIGURE, then resize2fs or xfs_growfs on the
/// mounted filesystem, or the block device alone), unpublish, unstage; stage again and read
/// the data back.
async fn csi_flow(fs: Option<&str>) {
    let p = Plugin::start_with_args(&["--attach", "nbd"]).await;
    let cap = match fs {
        Some(fs) => mount_cap(Mode::SingleNodeWriter, fs),
        None => block_cap(Mode::SingleNodeWriter),
    };
    let id = create(&p, "pvc-flow", 320 * MIB, &cap).await;
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for round in 0..2 {
        let staging = stage(&p, &id, &cap).await;
        let dev = p.staged_device(&id);
        let name = dev.trim_start_matches("/dev/");
        assert!(name.starts_with("nbd"), "{dev}");
        assert_eq!(
            std::fs::read_to_string(format!("/sys/block/{name}/backend"))
                .unwrap()
                .trim(),
            id
        );
        assert_eq!(
            std::fs::read_to_string(format!("/sys/block/{name}/queue/io_timeout"))
                .unwrap()
                .trim(),
            "1000"
        );
        let target = publish(&p, &id, &staging, &cap).await;
        if round == 0 {
            match fs {
                Some(_) => std::fs::write(target.join("data.bin"), &payload).unwrap(),
                None => {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&target)
                        .unwrap();
                    f.write_all_at(&payload, 4096).unwrap();
                    f.sync_all().unwrap();
                }
            }
            sh("sync");
            let before = fs.map(|_| fs_size(&target));
            expand(&p, &id, &target, 640 * MIB).await;
            match before {
                Some(before) => {
                    let after = fs_size(&target);
                    assert!(after > before + 250 * MIB as u64, "{before} -> {after}");
                }
                None => assert_eq!(
                    sh(&format!("blockdev --getsize64 {dev}")).trim(),
                    (640 * MIB).to_string()
                ),
            }
        } else {
            let read = match fs {
                Some(_) => std::fs::read(target.join("data.bin")).unwrap(),
                None => {
                    use std::os::unix::fs::FileExt;
                    let mut b = vec![0u8; payload.len()];
                    std::fs::File::open(&target)
                        .unwrap()
                        .read_exact_at(&mut b, 4096)
                        .unwrap();
                    b
                }
            };
            assert!(
                read == payload,
                "the data did not survive unstage and stage"
            );
            if fs.is_some() {
                assert!(fs_size(&target) > 500 * MIB as u64);
            }
        }
        unpublish(&p, &id, &target).await;
        unstage(&p, &id, &staging).await;
        assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
        check_layers(&p, false);
    }
    finish(p, false);
}

#[test]
fn ext4_volumes_stage_publish_and_grow_online_on_kernel_nbd() {
    if !uml::enter("ext4_volumes_stage_publish_and_grow_online_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(csi_flow(Some("ext4")));
}

#[test]
fn xfs_volumes_stage_publish_and_grow_online_on_kernel_nbd() {
    if !uml::enter("xfs_volumes_stage_publish_and_grow_online_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(csi_flow(Some("xfs")));
}

#[test]
fn block_volumes_stage_publish_and_grow_online_on_kernel_nbd() {
    if !uml::enter("block_volumes_stage_publish_and_grow_online_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(csi_flow(None));
}

/// Snapshots of a staged ext4 volume under a running fio (fsfreeze, pivot), a flatten of
/// its chain online, then a restore of the first snapshot staged beside it: fio verifies
/// every block it wrote, and the restore holds the file written before the snapshot.
#[test]
fn snapshots_and_an_online_flatten_under_fio_on_kernel_nbd() {
    if !uml::enter("snapshots_and_an_online_flatten_under_fio_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(async {
        let p = Plugin::start_with_args(&["--attach", "nbd", "--max-chain-depth", "2"]).await;
        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let id = create(&p, "pvc-snap", 384 * MIB, &cap).await;
        let staging = stage(&p, &id, &cap).await;
        std::fs::write(staging.join("before"), "before the snapshots").unwrap();
        let fio = Fio::start(&staging.join("fio.dat"), 64, &p.dir.path().join("fio.json"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let first = p.snapshot(&id, "snap-1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        p.snapshot(&id, "snap-2").await.unwrap();
        let result = tokio::task::spawn_blocking(move || fio.finish())
            .await
            .unwrap();
        assert_eq!(result.errors, 0);
        // Three layers past the limit of two: flattened in the background, online.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !p.log().contains("flattened") {
            assert!(Instant::now() < deadline, "no flatten:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restore = p
            .controller()
            .await
            .create_volume(CreateVolumeRequest {
                name: "pvc-restore".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 384 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Snapshot(
                        volume_content_source::SnapshotSource {
                            snapshot_id: first.clone(),
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
        let restored = stage(&p, &restore, &cap).await;
        assert_eq!(
            std::fs::read_to_string(restored.join("before")).unwrap(),
            "before the snapshots"
        );
        unstage(&p, &restore, &restored).await;
        unstage(&p, &id, &staging).await;
        finish(p, false);
    });
}

/// A plugin that dies between `fsfreeze -f` and `fsfreeze -u` (a snapshot in progress)
/// leaves the pod's filesystem frozen; the next process thaws it, and the blocked writer
/// goes on and verifies.
#[test]
fn a_crash_while_the_filesystem_is_frozen_is_thawed_by_the_next_process() {
    if !uml::enter("a_crash_while_the_filesystem_is_frozen_is_thawed_by_the_next_process") {
        return;
    }
    uml::runtime().block_on(async {
        let mut p = Plugin::start_with_args(&["--attach", "nbd"]).await;
        p.restart_with(&[("QCOW2_CSI_FAILPOINT", "snapshot-while-frozen")])
            .await;
        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let id = create(&p, "pvc-frozen", 256 * MIB, &cap).await;
        let staging = stage(&p, &id, &cap).await;
        let fio = Fio::start(&staging.join("fio.dat"), 48, &p.dir.path().join("fio.json"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(p.snapshot(&id, "snap").await.is_err());
        assert!(p.wait_crash(), "the failpoint did not end the plugin");
        // Frozen: a writer blocks (uninterruptibly), and nothing thaws it without the next
        // process.
        let mut probe = Command::new("touch")
            .arg(staging.join("probe"))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            probe.try_wait().unwrap().is_none(),
            "the filesystem was not frozen"
        );
        p.restart_with(&[]).await;
        assert!(p.log().contains("thawed a filesystem"), "{}", p.log());
        assert!(probe.wait().unwrap().success());
        let result = tokio::task::spawn_blocking(move || fio.finish())
            .await
            .unwrap();
        assert_eq!(result.errors, 0);
        std::fs::write(staging.join("after"), "thawed").unwrap();
        unstage(&p, &id, &staging).await;
        finish(p, true);
    });
}

/// A plugin killed inside a group snapshot of two staged ext4 volumes: while both
/// filesystems are frozen (`group-while-frozen`), and after the first member pivoted
/// (`group-after-pivot`). The next process takes both devices over from their records,
/// thaws both filesystems, the files written before read back, the retried group snapshot
/// is made, no member exists without its group, and every layer passes `qemu-img check`.
#[test]
fn a_crash_inside_a_group_snapshot_of_staged_volumes_is_healed_by_the_next_process() {
    if !uml::enter(
        "a_crash_inside_a_group_snapshot_of_staged_volumes_is_healed_by_the_next_process",
    ) {
        return;
    }
    uml::runtime().block_on(async {
        for point in ["group-while-frozen", "group-after-pivot"] {
            let mut p = Plugin::start_with_args(&["--attach", "nbd"]).await;
            let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
            let a = create(&p, "pvc-a", 128 * MIB, &cap).await;
            let b = create(&p, "pvc-b", 128 * MIB, &cap).await;
            let sa = stage(&p, &a, &cap).await;
            let sb = stage(&p, &b, &cap).await;
            std::fs::write(sa.join("before"), "a").unwrap();
            std::fs::write(sb.join("before"), "b").unwrap();
            p.restart_with(&[("QCOW2_CSI_FAILPOINT", point)]).await;
            assert!(p.group_snapshot("g", &[&a, &b]).await.is_err());
            assert!(
                p.wait_crash(),
                "{point}: the failpoint did not end the plugin"
            );
            p.restart_with(&[]).await;
            let log = p.log();
            if point == "group-while-frozen" {
                assert_eq!(log.matches("thawed a filesystem").count(), 2, "{log}");
            }
            for (staging, want) in [(&sa, "a"), (&sb, "b")] {
                assert_eq!(
                    std::fs::read_to_string(staging.join("before")).unwrap(),
                    want
                );
                std::fs::write(staging.join("after"), "written after the restart").unwrap();
            }
            let taken = p
                .group_snapshot("g", &[&a, &b])
                .await
                .unwrap_or_else(|e| panic!("{point}: {e}\n{}", p.log()));
            assert_eq!(taken.snapshots.len(), 2);
            for e in std::fs::read_dir(p.state.join("snapshots")).unwrap() {
                let rec: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
                assert_eq!(
                    rec["group"],
                    taken.group_snapshot_id.as_str(),
                    "{point}: {rec}"
                );
            }
            unstage(&p, &a, &sa).await;
            unstage(&p, &b, &sb).await;
            finish(p, true);
        }
    });
}

/// One storage request that takes 20 s (injected, while NodeStage mounts): the kernel waits
/// for it (I/O timeout 0; the 1 s queue timeout only looks), nothing fails, the device stays
/// and serves fio afterwards.
#[test]
fn a_20_s_storage_request_gives_no_error_and_keeps_the_device() {
    if !uml::enter("a_20_s_storage_request_gives_no_error_and_keeps_the_device") {
        return;
    }
    uml::runtime().block_on(async {
        let mut p = Plugin::start_with_args(&["--attach", "nbd"]).await;
        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let id = create(&p, "pvc-slow", 256 * MIB, &cap).await;
        let staging = stage(&p, &id, &cap).await;
        unstage(&p, &id, &staging).await;
        // The next process's first volume write takes 20 s.
        p.restart_with(&[("QCOW2_CSI_FAILPOINT", "volume-write:sleep-once=20000")])
            .await;
        // Mounting writes: the first of those writes is the slow one.
        let t = Instant::now();
        let staging = stage(&p, &id, &cap).await;
        assert!(t.elapsed() >= Duration::from_secs(19), "{:?}", t.elapsed());
        let kernel_log = sh("dmesg");
        assert!(
            kernel_log.contains("Possible stuck request"),
            "{kernel_log}"
        );
        assert!(!kernel_log.contains("I/O error"), "{kernel_log}");
        let dev = p.staged_device(&id);
        let fio = Fio::start(&staging.join("fio.dat"), 32, &p.dir.path().join("fio.json"));
        let result = tokio::task::spawn_blocking(move || fio.finish())
            .await
            .unwrap();
        assert_eq!(result.errors, 0);
        assert_eq!(result.writes, 8192);
        assert!(p.log().contains("sleeping 20000 ms, once"), "{}", p.log());
        assert!(Path::new(&dev).exists());
        unstage(&p, &id, &staging).await;
        finish(p, false);
    });
}

/// NodeGetVolumeStats' condition of a published volume.
async fn condition(p: &Plugin, id: &str, path: &Path) -> VolumeCondition {
    p.node()
        .await
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("stats {id}: {e}\n{}", p.log()))
        .into_inner()
        .volume_condition
        .unwrap()
}

/// The state directory on a 192 MiB ext4 (a loop device) filled to the brim while a pod
/// writes 48 MiB with O_DIRECT: the write waits, the volume condition says why, and once the
/// filler is deleted the write completes; the data reads back, every layer checks clean and
/// the volume's ext4 passes e2fsck. Prints how long the write was held and how soon it went
/// on after space was freed.
#[test]
fn a_full_node_pauses_writes_until_space_is_freed_on_kernel_nbd() {
    if !uml::enter("a_full_node_pauses_writes_until_space_is_freed_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(async {
        let scratch = tempfile::tempdir().unwrap();
        let fs_image = scratch.path().join("state.ext4");
        let mut p = Plugin::start_prepared(&["--attach", "nbd"], |state| {
            std::fs::create_dir_all(state).unwrap();
            sh(&format!(
                "truncate -s 192M {img} && mkfs.ext4 -q -F {img} && mount -o loop {img} {st}",
                img = fs_image.display(),
                st = state.display()
            ));
        })
        .await;
        let cap = mount_cap(Mode::SingleNodeWriter, "ext4");
        let id = p
            .controller()
            .await
            .create_volume(CreateVolumeRequest {
                name: "pvc-full".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 256 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                parameters: [("overcommitRatio".to_string(), "4".to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create: {e}\n{}", p.log()))
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = stage(&p, &id, &cap).await;
        let target = publish(&p, &id, &staging, &cap).await;
        assert!(!condition(&p, &id, &target).await.abnormal);

        // Fill the node's filesystem (as root: the reserved blocks too).
        let filler = p.state.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null()) // "No space left on device": the point
            .status();
        // Only the node's filesystem: a plain `sync` also waits on the volume's, and ext4's
        // lazy inode-table zeroing, paused by the full disk, holds its journal open until
        // space returns; only this test frees it (CI hung there once).
        sh(&format!("sync -f {}", p.state.display()));
        let avail = sh(&format!(
            "df -B1 --output=avail {} | tail -1",
            p.state.display()
        ));
        assert_eq!(avail.trim(), "0", "the node's filesystem is not full");

        let pattern = scratch.path().join("pattern.bin");
        sh(&format!(
            "head -c {} /dev/urandom > {}",
            48 * MIB,
            pattern.display()
        ));
        let data = target.join("data.bin");
        let mut writer = Command::new("dd")
            .args(["bs=1M", "oflag=direct", "conv=fsync", "status=none"])
            .arg(format!("if={}", pattern.display()))
            .arg(format!("of={}", data.display()))
            .spawn()
            .unwrap();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the write ended on a full disk instead of waiting:\n{}",
            p.log()
        );
        let c = condition(&p, &id, &target).await;
        assert!(c.abnormal, "{c:?}");
        assert!(c.message.contains("filesystem is full"), "{}", c.message);
        assert!(p.log().contains("writes to this volume are paused"));

        // Space returns: the write goes on.
        std::fs::remove_file(&filler).unwrap();
        let freed = Instant::now();
        let status = loop {
            if let Some(s) = writer.try_wait().unwrap() {
                break s;
            }
            assert!(
                freed.elapsed() < Duration::from_secs(60),
                "the write never resumed:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let resumed = freed.elapsed();
        assert!(status.success(), "the paused write failed");
        eprintln!(
            "full disk: write held {:.1} s; done {:.2} s after the filler was deleted",
            (freed - started).as_secs_f64(),
            resumed.as_secs_f64()
        );
        assert!(!condition(&p, &id, &target).await.abnormal);
        assert!(p.log().contains("space is back: paused writes resumed"));
        // The condition's changes are logged once each, with the reason.
        let log = p.log();
        let abnormal: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("volume condition: abnormal"))
            .collect();
        assert_eq!(abnormal.len(), 1, "{log}");
        assert!(abnormal[0].contains("reason=\"full\"") || abnormal[0].contains("reason=full"));
        assert!(log.contains("volume condition: normal again"), "{log}");
        sh(&format!(
            "echo 3 > /proc/sys/vm/drop_caches; cmp {} {}",
            pattern.display(),
            data.display()
        ));

        unpublish(&p, &id, &target).await;
        unstage(&p, &id, &staging).await;
        check_layers(&p, false);
        let layers = p.layers();
        assert_eq!(layers.len(), 1, "{layers:?}");
        let raw = scratch.path().join("volume.raw");
        qemu::img(&[
            "convert",
            "-O",
            "raw",
            &layers[0].display().to_string(),
            &raw.display().to_string(),
        ]);
        sh(&format!("e2fsck -fn {}", raw.display()));
        assert!(p.stop().success(), "{}", p.log());
        sh(&format!("umount {}", p.state.display()));
        assert!(leaks(p.dir.path()).is_empty(), "{:?}", leaks(p.dir.path()));
    });
}

/// A plugin serving `/metrics`, scraped while fio writes 4 KiB blocks at random through a
/// staged block volume on /dev/nbdN: every scrape answers during the run, the write
/// counters match fio's own totals within 1%, the allocation gauges equal `qemu-img info`'s
/// disk sizes (as this kernel sees them), a snapshot moves the chain depth and the node's counts, the claim's labels
/// come from the provisioner's parameters, and the scrape passes `promtool check metrics`.
#[test]
fn metrics_follow_fio_and_snapshots_on_kernel_nbd() {
    if !uml::enter("metrics_follow_fio_and_snapshots_on_kernel_nbd") {
        return;
    }
    uml::runtime().block_on(async {
        let p =
            Plugin::start_with_args(&["--attach", "nbd", "--metrics-address", "127.0.0.1:0"]).await;
        let address = p.metrics_address().await;
        let cap = block_cap(Mode::SingleNodeWriter);
        let id = p
            .controller()
            .await
            .create_volume(CreateVolumeRequest {
                name: "pvc-metrics".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 256 * MIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                parameters: [
                    ("csi.storage.k8s.io/pvc/namespace", "team-a"),
                    ("csi.storage.k8s.io/pvc/name", "data"),
                    ("csi.storage.k8s.io/pv/name", "pv-1"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = stage(&p, &id, &cap).await;
        let device = p.staged_device(&id);
        let vol = [
            ("volume", id.as_str()),
            ("pvc_namespace", "team-a"),
            ("pvc_name", "data"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l: Vec<(&str, &str)> = vol.to_vec();
            l.extend_from_slice(extra);
            l
        };
        let writes = |text: &str| {
            let l = with(&[("op", "write")]);
            let ops = support::sample(text, "qcow2_csi_volume_io_operations_total", &l);
            let bytes = support::sample(text, "qcow2_csi_volume_io_bytes_total", &l);
            (ops.unwrap_or(0.0), bytes.unwrap_or(0.0))
        };
        let before = support::scrape(&address);
        let attached = with(&[("mode", "nbd"), ("state", "attached")]);
        assert_eq!(
            support::sample(&before, "qcow2_csi_volume_attachment", &attached),
            Some(1.0),
            "{before}"
        );
        assert_eq!(
            support::sample(&before, "qcow2_csi_volume_chain_depth", &vol),
            Some(1.0)
        );
        let (ops0, bytes0) = writes(&before);

        let json = p.dir.path().join("fio.json");
        let fio = Command::new("fio")
            .args([
                "--name=metrics",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--ioengine=libaio",
                "--direct=1",
                "--size=128M",
                "--io_size=48M",
                // The flush makes the data reach the host's disk (hostfs reports its
                // blocks) and shows as one.
                "--end_fsync=1",
                "--output-format=json",
            ])
            .arg(format!("--filename={device}"))
            .arg(format!("--output={}", json.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let fio = tokio::task::spawn_blocking(move || fio.wait_with_output().unwrap());
        // Scraped all along the run: each answers, and the count only grows.
        let mut seen = Vec::new();
        while !fio.is_finished() {
            let a = address.clone();
            let text = tokio::task::spawn_blocking(move || support::scrape(&a))
                .await
                .unwrap();
            seen.push(writes(&text).0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = fio.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            seen.len() >= 2,
            "scraped {} times during the run",
            seen.len()
        );
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let fio_ios = v["jobs"][0]["write"]["total_ios"].as_f64().unwrap();
        let fio_bytes = v["jobs"][0]["write"]["io_bytes"].as_f64().unwrap();

        let mut after = support::scrape(&address);
        let (ops1, bytes1) = writes(&after);
        let (ops, bytes) = (ops1 - ops0, bytes1 - bytes0);
        eprintln!("fio: {fio_ios} writes, {fio_bytes} bytes; metrics: {ops} writes, {bytes} bytes");
        assert!(
            (ops - fio_ios).abs() <= fio_ios * 0.01,
            "{ops} vs {fio_ios}"
        );
        assert!(
            (bytes - fio_bytes).abs() <= fio_bytes * 0.01,
            "{bytes} vs {fio_bytes}"
        );
        let errors = support::sample(
            &after,
            "qcow2_csi_volume_io_errors_total",
            &with(&[("op", "write")]),
        );
        assert_eq!(errors, Some(0.0));

        let head = p.head_of(&id);
        let qemu = qemu::chain_disk_sizes(&head);
        after = support::scrape(&address);
        assert_eq!(
            support::sample(&after, "qcow2_csi_volume_head_allocated_bytes", &vol),
            Some(qemu[0])
        );
        // (User-mode Linux's hostfs keeps an open file's block count from when it was
        // looked up, so both read the same stale figure here: `csi_node` compares the two on
        // the host's own filesystem.)

        p.snapshot(&id, "snap-metrics").await.unwrap();
        let snapped = support::scrape(&address);
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_volume_chain_depth", &vol),
            Some(2.0)
        );
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_node_snapshots", &[]),
            Some(1.0)
        );
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_node_layers", &[]),
            Some(2.0)
        );
        let chain = qemu::chain_disk_sizes(&p.head_of(&id));
        assert_eq!(chain.len(), 2);
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_volume_chain_allocated_bytes", &vol),
            Some(chain.iter().sum())
        );
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_volume_head_allocated_bytes", &vol),
            Some(chain[0])
        );
        let created = [("method", "CreateSnapshot"), ("code", "OK")];
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_rpc_calls_total", &created),
            Some(1.0)
        );
        assert_eq!(
            support::sample(&snapped, "qcow2_csi_node_promised_bytes", &[]),
            Some(256.0 * MIB as f64)
        );
        support::promtool_check_metrics(&snapped);

        unstage(&p, &id, &staging).await;
        let gone = support::scrape(&address);
        assert_eq!(
            support::sample(&gone, "qcow2_csi_volume_attachment", &vol),
            None,
            "unstaged: no attachment"
        );
        assert_eq!(
            support::sample(&gone, "qcow2_csi_node_staged_volumes", &[]),
            Some(0.0)
        );
        finish(p, false);
    });
}
