//! Helpers the engine's test binaries share (each includes this module with `mod common;`).

use std::path::Path;
use std::process::Command;

/// Runs `cmd`; asserts it succeeded and returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our own `check` finds no corruption, leak or check error in the image at `path`.
pub fn our_check_is_clean(path: &Path) {
    let storage: std::sync::Arc<dyn qcow2_engine::storage::Storage> =
        std::sync::Arc::new(qcow2_engine::storage::FileStorage::open(path, false).unwrap());
    let report =
        qcow2_engine::ops::check::check(&storage, qcow2_engine::ops::check::Repair::None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{}: {:?}",
        path.display(),
        report.messages
    );
}
