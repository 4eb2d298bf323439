//! Helpers shared by the driver's integration tests.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `qcow2-csi nbd`; killed when dropped.
pub struct Served {
    child: Child,
    pub socket: PathBuf,
}

impl Served {
    pub fn start(image: &Path, extra: &[&str]) -> Served {
        let socket = image.with_extension("sock");
        let child = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .arg("nbd")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .arg(image)
            .stderr(Stdio::null())
            .spawn()
            .expect("start qcow2-csi nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Served { child, socket }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM, then wait: the server drains and closes the image cleanly.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit status {status}");
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `tool` runs; if not, the test skips with a reason, unless
/// `QCOW2_CSI_REQUIRE_ALL` is set (CI), where a missing tool is a failure.
pub fn require_tool(tool: &str, package: &str) -> bool {
    if Command::new(tool).arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
        "{tool} is required (QCOW2_CSI_REQUIRE_ALL is set)"
    );
    eprintln!("skipped: {tool} ({package}) is not installed");
    false
}
