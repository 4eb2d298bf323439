//! A stand-in for the Kubernetes API server (`tests/fake_apiserver.py`) and what tests put
//! in it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The csi-snapshotter's node label.
pub const MANAGED_BY: &str = "snapshot.storage.kubernetes.io/managed-by";

/// The stand-in API server (`fake_apiserver.py`) on a data directory; killed when dropped.
pub struct FakeApi {
    child: Child,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl FakeApi {
    pub fn start(dir: &Path) -> FakeApi {
        let dir = dir.join("api");
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fake_apiserver.py"
            ))
            .arg(&dir)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(dir.join("port")) {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "the fake API server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
                 users: [{{name: u, user: {{token: test}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n"
            ),
        )
        .unwrap();
        FakeApi {
            child,
            dir,
            kubeconfig,
        }
    }

    /// Writes (atomically) the PersistentVolume of CSI volume `handle` of `driver`, naming
    /// `class`.
    pub fn put_pv(&self, name: &str, driver: &str, handle: &str, class: &str) {
        let pv = serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "csi": {"driver": driver, "volumeHandle": handle},
                "volumeAttributesClassName": class,
            },
        });
        let tmp = self.dir.join("pv.tmp");
        std::fs::write(&tmp, pv.to_string()).unwrap();
        std::fs::rename(tmp, self.dir.join("pvs").join(format!("{name}.json"))).unwrap();
    }

    pub fn put_class(&self, name: &str, driver: &str, parameters: serde_json::Value) {
        let vac = serde_json::json!({"driverName": driver, "parameters": parameters});
        std::fs::write(
            self.dir.join("vacs").join(format!("{name}.json")),
            vac.to_string(),
        )
        .unwrap();
    }

    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.join("requests.log")).unwrap_or_default()
    }

    /// Waits until a watch of PersistentVolumes is open.
    pub fn wait_watching(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.requests().contains("watch=true") {
            assert!(Instant::now() < deadline, "no watch: {}", self.requests());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeApi {
    /// Writes (atomically) object `name` into the collection directory `kind` (`vscs`,
    /// `vgscs`).
    pub fn put(&self, kind: &str, name: &str, object: &serde_json::Value) {
        let tmp = self.dir.join(format!("{kind}.tmp"));
        std::fs::write(&tmp, object.to_string()).unwrap();
        std::fs::rename(tmp, self.dir.join(kind).join(format!("{name}.json"))).unwrap();
    }

    /// Object `name` of collection `kind` as it is now.
    pub fn get(&self, kind: &str, name: &str) -> serde_json::Value {
        let path = self.dir.join(kind).join(format!("{name}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Waits until `n` watches are open.
    pub fn wait_watches(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.requests().matches("watch=true").count() < n {
            assert!(Instant::now() < deadline, "no watch: {}", self.requests());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
