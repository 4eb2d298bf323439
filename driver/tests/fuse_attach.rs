//! The nbdfuse + loop attach path end to end: `qcow2-csi nbd` serves a qcow2 image, it is
//! attached as `/dev/loopN`, a real filesystem is made and mounted, files are written,
//! everything is torn down, the image is checked, re-attached and read back.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)] // each test binary uses part of the helpers
mod support;

use std::path::Path;
use std::process::Command;

use qcow2_csi::attach::FuseLoop;
use support::Served;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why this host cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, mounts)".into());
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        return Some("needs /dev/fuse and /dev/loop-control".into());
    }
    ["nbdfuse", "losetup", "mkfs.ext4", "mkfs.xfs", "qemu-img"]
        .into_iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} is not installed"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn round_trip(fs: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.qcow2");
    let work = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "512M",
    ]);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();

    let server = Served::start(&image, &[]);
    let att = FuseLoop::attach(&server.socket, &work, false).unwrap();
    sh(Command::new(format!("mkfs.{fs}"))
        .arg("-q")
        .arg(att.device()));
    sh(Command::new("mount").arg(att.device()).arg(&mnt));
    std::fs::write(mnt.join("data.bin"), &payload).unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/hello"), b"hello\n").unwrap();
    sh(Command::new("umount").arg(&mnt));
    att.detach().unwrap();
    server.stop();
    qemu::check_clean(&image);

    let server = Served::start(&image, &[]);
    let att = FuseLoop::attach(&server.socket, &work, false).unwrap();
    sh(Command::new("mount").arg(att.device()).arg(&mnt));
    assert!(
        std::fs::read(mnt.join("data.bin")).unwrap() == payload,
        "{fs}: file differs"
    );
    assert_eq!(std::fs::read(mnt.join("dir/hello")).unwrap(), b"hello\n");
    sh(Command::new("umount").arg(&mnt));
    att.detach().unwrap();
    server.stop();
    qemu::check_clean(&image);
}

#[test]
fn ext4_and_xfs_survive_detach_and_reattach() {
    if let Some(why) = missing() {
        assert!(
            std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
            "fuse attach test cannot run: {why} (QCOW2_CSI_REQUIRE_ALL is set)"
        );
        eprintln!("skipped: {why}");
        return;
    }
    round_trip("ext4");
    round_trip("xfs");
}
