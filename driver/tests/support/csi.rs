//! A running `qcow2-csi serve` and tonic clients over its unix socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::identity_client::IdentityClient;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi_proto::v1::{ProbeRequest, VolumeCapability};
use tonic::transport::Channel;

pub const NODE: &str = "node-a";

/// A plugin process with its own state directory and socket; killed when dropped.
pub struct Plugin {
    child: Option<Child>,
    /// Processes a successor was started beside ([`Plugin::spawn`]); killed when dropped.
    pub previous: Vec<Child>,
    /// Extra `serve` arguments, kept across restarts.
    args: Vec<String>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// The plugin's `--kubelet-dir`: staging and target paths go under it.
    pub kubelet: PathBuf,
    /// The plugin's `--key-dir` (unless the test's arguments name another): on the
    /// memory-backed `/dev/shm`, removed when dropped.
    pub keys: tempfile::TempDir,
}

impl Plugin {
    pub async fn start() -> Plugin {
        Plugin::start_with_args(&[]).await
    }

    pub async fn start_with_args(args: &[&str]) -> Plugin {
        Plugin::start_prepared(args, |_| {}).await
    }

    /// Starts with `prepare` run first on the plugin's state directory path (to mount a
    /// filesystem there, say); the path does not exist yet.
    pub async fn start_prepared(args: &[&str], prepare: impl FnOnce(&Path)) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let state = dir.path().join("state");
        let kubelet = dir.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        prepare(&state);
        let keys = tempfile::Builder::new()
            .prefix("qcow2-csi-keys")
            .tempdir_in("/dev/shm")
            .unwrap();
        let mut p = Plugin {
            child: None,
            previous: Vec::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir,
            socket,
            state,
            kubelet,
            keys,
        };
        p.restart_with(&[]).await;
        p
    }

    /// (Re)starts the process with extra environment variables; waits until Probe is ready.
    pub async fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.spawn(env);
        self.wait_ready().await;
    }

    /// Starts a process (the previous one, if any, is not touched: a successor takes its
    /// volumes over); its stderr goes to [`Plugin::log_path`].
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--node-id", NODE, "--state-dir"])
            .arg(&self.state)
            .arg("--kubelet-dir")
            .arg(&self.kubelet)
            .args(
                (!self
                    .args
                    .iter()
                    .any(|a| a.split('=').next() == Some("--key-dir")))
                .then(|| ["--key-dir".into(), self.keys.path().join("keys")])
                .into_iter()
                .flatten(),
            )
            .args(&self.args)
            .envs(env.iter().copied())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start qcow2-csi serve");
        if let Some(old) = self.child.replace(child) {
            self.previous.push(old);
        }
    }

    /// Where the plugin serves metrics (started with `--metrics-address 127.0.0.1:0`), from
    /// its log (text or JSON).
    pub async fn metrics_address(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            // Text lines say `address=A`, JSON ones `"address":"A"`.
            let found = log
                .lines()
                .find(|l| l.contains("serving metrics"))
                .and_then(|l| {
                    l.split("address=")
                        .nth(1)
                        .or_else(|| l.split("\"address\":\"").nth(1))
                })
                .and_then(|a| a.split(|c: char| c.is_whitespace() || c == '"').next())
                .map(str::to_string);
            if let Some(a) = found {
                return a;
            }
            assert!(Instant::now() < deadline, "no metrics address:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The head layer of volume `id` now, from its record.
    pub fn head_of(&self, id: &str) -> PathBuf {
        let rec = std::fs::read_to_string(self.state.join(format!("volumes/{id}.json")))
            .unwrap_or_else(|e| panic!("record of {id}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
        self.state.join("layers").join(v["head"].as_str().unwrap())
    }

    /// The block device volume `id` was staged on (from its stage record).
    pub fn staged_device(&self, id: &str) -> String {
        let rec = std::fs::read_to_string(self.state.join(format!("staged/{id}.json")))
            .unwrap_or_else(|e| panic!("stage record of {id}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
        v["device"].as_str().unwrap().to_string()
    }

    /// What every process of this plugin wrote to stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until Probe says ready.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(ch) = connect(&self.socket).await
                && let Ok(r) = IdentityClient::new(ch).probe(ProbeRequest {}).await
                && r.into_inner().ready == Some(true)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the plugin never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(connect(&self.socket).await.unwrap())
    }

    pub async fn node(&self) -> csi_proto::v1::node_client::NodeClient<Channel> {
        csi_proto::v1::node_client::NodeClient::new(connect(&self.socket).await.unwrap())
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(connect(&self.socket).await.unwrap())
    }

    pub async fn group(
        &self,
    ) -> csi_proto::v1::group_controller_client::GroupControllerClient<Channel> {
        csi_proto::v1::group_controller_client::GroupControllerClient::new(
            connect(&self.socket).await.unwrap(),
        )
    }

    /// CreateSnapshot of volume `source` named `name`; the snapshot's id.
    pub async fn snapshot(&self, source: &str, name: &str) -> Result<String, tonic::Status> {
        self.controller()
            .await
            .create_snapshot(csi_proto::v1::CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap().snapshot_id)
    }

    /// CreateVolumeGroupSnapshot of `volumes` named `name`; the group snapshot.
    pub async fn group_snapshot(
        &self,
        name: &str,
        volumes: &[&str],
    ) -> Result<csi_proto::v1::VolumeGroupSnapshot, tonic::Status> {
        self.group()
            .await
            .create_volume_group_snapshot(csi_proto::v1::CreateVolumeGroupSnapshotRequest {
                name: name.into(),
                source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().group_snapshot.unwrap())
    }

    /// Waits for the process to exit by itself (a failpoint); returns whether it did.
    pub fn wait_crash(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The running process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        for mut c in self.previous.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate();
        self.child.take().expect("running").wait().unwrap()
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let c = self.child.as_ref().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
    }

    /// The exit status once the process has exited, if within `limit`.
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Files in the state directory's `layers/`.
    pub fn layers(&self) -> Vec<PathBuf> {
        sorted_entries(&self.state.join("layers"))
    }

    /// Volume records in `volumes/`.
    pub fn records(&self) -> Vec<PathBuf> {
        sorted_entries(&self.state.join("volumes"))
    }
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub use qcow2_csi::csi::client::connect;

/// The member of group snapshot `g` taken of volume `v`.
pub fn member<'a>(
    g: &'a csi_proto::v1::VolumeGroupSnapshot,
    v: &str,
) -> &'a csi_proto::v1::Snapshot {
    g.snapshots
        .iter()
        .find(|s| s.source_volume_id == v)
        .unwrap_or_else(|| panic!("no member of {v} in {g:?}"))
}

/// A volume content source: snapshot `id`.
pub fn from_snapshot(id: &str) -> Option<csi_proto::v1::volume_content_source::Type> {
    use csi_proto::v1::volume_content_source::{SnapshotSource, Type};
    Some(Type::Snapshot(SnapshotSource {
        snapshot_id: id.into(),
    }))
}

/// A volume content source: volume `id` (a clone).
pub fn from_volume(id: &str) -> Option<csi_proto::v1::volume_content_source::Type> {
    use csi_proto::v1::volume_content_source::{Type, VolumeSource};
    Some(Type::Volume(VolumeSource {
        volume_id: id.into(),
    }))
}

/// The gRPC code of a call that must fail; panics if it succeeded.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(ok) => panic!("expected an error, got {ok:?}"),
        Err(s) => s.code(),
    }
}

pub fn mount_cap(mode: Mode, fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..MountVolume::default()
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}
