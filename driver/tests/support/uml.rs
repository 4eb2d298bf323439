//! Tests that need the kernel's nbd driver run inside user-mode Linux (`hack/uml-run.sh`):
//! on the host, a test boots the kernel with this very test binary as its command, asking
//! for itself by name; inside, the same test finds `QCOW2_CSI_IN_UML` set and runs its body.
//!
//! ```ignore
//! #[test]
//! fn a_kernel_test() {
//!     if !uml::enter("a_kernel_test") { return; }
//!     // runs as root inside the user-mode kernel, with /dev/nbdN for real
//! }
//! ```

use std::path::PathBuf;
use std::process::Command;

/// Whether this process runs inside the user-mode kernel.
pub fn inside() -> bool {
    std::env::var_os("QCOW2_CSI_IN_UML").is_some()
}

/// The runner script.
fn runner() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/uml-run.sh")
}

/// Why user-mode Linux cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    let has = |tool: &str| {
        Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("linux.uml") {
        return Some("linux.uml is missing (apt-get install user-mode-linux)".into());
    }
    if !has("insmod") {
        return Some("insmod is missing (apt-get install kmod)".into());
    }
    for tool in ["fio", "mkfs.ext4", "mkfs.xfs", "qemu-img", "fsfreeze"] {
        if !has(tool) {
            return Some(format!("{tool} is missing"));
        }
    }
    None
}

/// Inside the kernel: true, run the body. On the host: boots the kernel running test `name`
/// of this binary, passes its output through, fails if it failed; then false (the body has
/// run, inside). Skips (false) with a printed reason where user-mode Linux is missing,
/// unless `QCOW2_CSI_REQUIRE_ALL` is set, where that fails.
pub fn enter(name: &str) -> bool {
    if inside() {
        return true;
    }
    if !crate::support::runnable(&format!("{name} (user-mode Linux)"), missing()) {
        return false;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(runner())
        // Shorter than nextest's 300 s cut-off, so a hung test still prints what it
        // and the kernel said instead of being killed silently.
        .args(["--mem", "1G", "--timeout", "240", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .expect("running hack/uml-run.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}{err}");
    assert!(
        out.status.success(),
        "{name} failed inside user-mode Linux ({})",
        out.status
    );
    // The inner run must have found and run the test, not filtered it out.
    assert!(
        text.contains("1 passed"),
        "{name} did not run inside user-mode Linux"
    );
    false
}

/// The runtime a test body runs on inside the kernel (two workers: the kernel has one CPU,
/// and the plugin's blocking work must not starve the test's own calls).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
