//! Protocol edge cases through python3-libnbd (`libnbd_cases.py`), one server per case, with
//! `qemu-img check` on the image after each.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)]
mod support;

use std::process::Command;

use support::Served;

const SIZE: u64 = 64 << 20;

/// A Python that can `import nbd` (Debian's python3-libnbd is for the system interpreter,
/// which a virtualenv or pyenv `python3` on PATH may hide).
fn python() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import nbd"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs `case`; then stops the server (SIGTERM), or with `kill` SIGKILLs it and compares the
/// image with the raw file the case wrote as its expectation.
fn run(case: &str) {
    run_then(case, false);
}

fn run_then(case: &str, kill: bool) {
    if !qemu::require() {
        return;
    }
    let Some(py) = python() else {
        assert!(
            std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
            "python3-libnbd is required (QCOW2_CSI_REQUIRE_ALL is set)"
        );
        eprintln!("skipped: python3-libnbd is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vol.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let served = Served::start(&img, &["--name", "vol"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libnbd_cases.py");
    let expect = dir.path().join("expect.raw");
    std::fs::File::create(&expect)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let out = Command::new(py)
        .env("EXPECT", &expect)
        .arg(script)
        .arg(case)
        .arg(&served.socket)
        .arg(SIZE.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{case}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if kill {
        served.kill9();
        qemu::check_no_corruption(&img);
        qemu::compare(&img, "qcow2", &expect, "raw");
    } else {
        served.stop();
        qemu::check_clean(&img);
    }
}

#[test]
fn oldstyle_export_name() {
    run("oldstyle_export_name");
}

#[test]
fn simple_replies_only() {
    run("simple_replies_only");
}

#[test]
fn structured_replies_and_block_status() {
    run("structured_and_block_status");
}

#[test]
fn unknown_export() {
    run("unknown_export");
}

#[test]
fn starttls_is_refused_and_the_session_goes_on() {
    run("starttls");
}

#[test]
fn out_of_range_requests() {
    run("out_of_range");
}

#[test]
fn oversize_requests() {
    run("oversize");
}

#[test]
fn unknown_options() {
    run("unknown_options");
}

#[test]
fn abrupt_disconnects() {
    run("abrupt_disconnects");
}

#[test]
fn eight_connections_with_multi_conn_flush_then_sigkill() {
    run_then("multi_conn", true);
}
