//! The nbdfuse + loop attach path end to end: `qcow2-csi nbd` serves a qcow2 image, it is
//! attached as `/dev/loopN`, a real filesystem is made and mounted, files are written,
//! everything is torn down, the image is checked, re-attached and read back.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)] // each test binary uses part of the helpers
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use qcow2_csi::attach::{Attacher, FuseLoop, Mode, Volume};
use qcow2_csi::nbd::{Export, Limits, Server};
use qcow2_engine::{Image, OpenOptions};
use support::Served;

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One way of getting a block device for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// `qcow2-csi nbd` on a socket, and [`FuseLoop`] on it.
    Socket,
    /// [`qcow2_csi::attach::Attacher`] in this process with `Mode::Auto` (the kernel's nbd
    /// where the module is loaded, else nbdfuse), serving the engine directly.
    InProcess,
    /// `qcow2-csi attach --mode auto`, stopped with SIGTERM.
    Command,
}

enum Handle {
    Socket(Served, FuseLoop),
    InProcess(qcow2_csi::attach::Attached),
    Command(Child, PathBuf),
}

impl Handle {
    fn attach(way: Way, image: &Path, work: &Path) -> Handle {
        match way {
            Way::Socket => {
                let server = Served::start(image, &[]);
                let fuse = FuseLoop::attach(&server.socket, work, false, None).unwrap();
                Handle::Socket(server, fuse)
            }
            Way::InProcess => {
                let opts = OpenOptions {
                    writable: true,
                    ..OpenOptions::default()
                };
                let img = Image::open(image, &opts).unwrap();
                let server = Arc::new(Server::new(
                    vec![Export::new("", Arc::new(img))],
                    Limits::default(),
                ));
                let volume = Volume {
                    id: "pvc-test",
                    server,
                    work_dir: work,
                };
                Handle::InProcess(Attacher::new(Mode::Auto).attach(volume).unwrap())
            }
            Way::Command => {
                let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
                    .args(["attach", "--mode", "auto", "--work-dir"])
                    .arg(work)
                    .arg(image)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                BufReader::new(child.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                assert!(line.starts_with("/dev/"), "attach printed {line:?}");
                Handle::Command(child, PathBuf::from(line.trim()))
            }
        }
    }

    fn device(&self) -> &Path {
        match self {
            Handle::Socket(_, f) => f.device(),
            Handle::InProcess(a) => a.device(),
            Handle::Command(_, d) => d,
        }
    }

    fn detach(self) {
        match self {
            Handle::Socket(server, fuse) => {
                fuse.detach().unwrap();
                server.stop();
            }
            Handle::InProcess(a) => a.detach().unwrap(),
            Handle::Command(mut child, _) => {
                let pid = child.id().to_string();
                sh(Command::new("kill").args(["-TERM", &pid]));
                let status = child.wait().unwrap();
                assert!(status.success(), "qcow2-csi attach exited with {status}");
            }
        }
    }
}

fn round_trip(fs: &str, way: Way) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.qcow2");
    let work = dir.path().join("work");
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

    let att = Handle::attach(way, &image, &work);
    sh(Command::new(format!("mkfs.{fs}"))
        .arg("-q")
        .arg(att.device()));
    sh(Command::new("mount").arg(att.device()).arg(&mnt));
    std::fs::write(mnt.join("data.bin"), &payload).unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/hello"), b"hello\n").unwrap();
    sh(Command::new("umount").arg(&mnt));
    att.detach();
    qemu::check_clean(&image);

    let att = Handle::attach(way, &image, &work);
    sh(Command::new("mount").arg(att.device()).arg(&mnt));
    assert!(
        std::fs::read(mnt.join("data.bin")).unwrap() == payload,
        "{fs} {way:?}: file differs"
    );
    assert_eq!(std::fs::read(mnt.join("dir/hello")).unwrap(), b"hello\n");
    sh(Command::new("umount").arg(&mnt));
    att.detach();
    qemu::check_clean(&image);
}

fn runnable() -> bool {
    support::runnable(
        "attach test",
        support::root_attach_missing(&["nbdfuse", "losetup", "mkfs.ext4", "mkfs.xfs", "qemu-img"]),
    )
}

#[test]
fn ext4_and_xfs_survive_detach_and_reattach() {
    if runnable() {
        round_trip("ext4", Way::Socket);
        round_trip("xfs", Way::Socket);
    }
}

#[test]
fn the_in_process_attacher_serves_the_engine_directly() {
    if runnable() {
        round_trip("ext4", Way::InProcess);
    }
}

#[test]
fn qcow2_csi_attach_holds_the_device_until_sigterm() {
    if runnable() {
        round_trip("xfs", Way::Command);
    }
}

#[test]
fn kernel_mode_without_the_module_says_what_to_load() {
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("skipped: this host has the nbd module");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1M"]);
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
        .args(["attach", "--mode", "nbd"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("modprobe nbd"), "{err}");
    qemu::check_clean(&image);
}
