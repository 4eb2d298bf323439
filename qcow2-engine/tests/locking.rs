//! Image locks interoperate with QEMU's: a real qemu-io holding an image keeps us out, and an
//! image we hold keeps qemu-io and qemu-img out; readers share; `force_share` (qemu's `-U`)
//! inspects an image in use.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qcow2_engine::{Image, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-io with the image open, waiting for commands on stdin until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn start(path: &Path, read_only: bool) -> QemuIo {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

fn locked_out(path: &Path, opts: &OpenOptions) -> bool {
    match Image::open(path, opts) {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("lock"), "unexpected error: {msg}");
            true
        }
        Ok(_) => false,
    }
}

/// Waits until qemu-io has taken its locks (it opens the image after starting).
fn wait_locked(path: &Path, opts: &OpenOptions) {
    let start = Instant::now();
    while !locked_out(path, opts) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qemu-io never locked the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_io(path: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 even when it cannot open the image; it says so.
    (out.status.success() && !text.contains("lock"), text)
}

#[test]
fn qemu_writer_keeps_us_out() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    let holder = QemuIo::start(&p, false);
    wait_locked(&p, &OpenOptions::writable());
    assert!(
        locked_out(&p, &OpenOptions::default()),
        "a reader must not open an image qemu writes"
    );
    let shared = OpenOptions {
        force_share: true,
        ..OpenOptions::default()
    };
    assert_eq!(Image::open(&p, &shared).unwrap().size(), 16 << 20);
    drop(holder);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[1; 4096], 0).unwrap();
    img.close().unwrap();
    qemu::check_clean(&p);
}

#[test]
fn qemu_reader_shares_with_our_reader_only() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    let _holder = QemuIo::start(&p, true);
    wait_locked(&p, &OpenOptions::writable());
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let mut b = [1u8; 512];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0; 512]);
}

#[test]
fn our_writer_keeps_qemu_and_our_other_writers_out() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();

    let (ok, text) = qemu_io(&p, &["-c", "write 0 4k"]);
    assert!(!ok, "qemu-io wrote an image we hold: {text}");
    assert!(text.contains("Failed to get \"write\" lock"), "{text}");
    let info = qemu::img_output(&["info", s(&p)]);
    assert!(
        !info.status.success(),
        "qemu-img info without -U must be refused"
    );
    qemu::img(&["info", "-U", s(&p)]);
    let util = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qcow2util"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = util(&["info", "-f", s(&p)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    assert!(util(&["info", "-U", "-f", s(&p)]).status.success());
    assert_eq!(util(&["check", "-f", s(&p)]).status.code(), Some(1));
    assert!(locked_out(&p, &OpenOptions::writable()), "two writers");
    assert!(
        locked_out(&p, &OpenOptions::default()),
        "a reader while we write"
    );

    img.close().unwrap();
    let (ok, text) = qemu_io(&p, &["-c", "write -P 9 0 4k"]);
    assert!(ok, "after close qemu-io may write: {text}");
    qemu::check_clean(&p);
}

#[test]
fn our_reader_lets_qemu_read_but_not_write() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    let _img = Image::open(&p, &OpenOptions::default()).unwrap();
    let _other = Image::open(&p, &OpenOptions::default()).unwrap();
    let (ok, text) = qemu_io(&p, &["-r", "-c", "read 0 4k"]);
    assert!(ok, "qemu-io -r next to our reader: {text}");
    let (ok, text) = qemu_io(&p, &["-c", "write 0 4k"]);
    assert!(!ok, "qemu-io wrote an image we read: {text}");
}
