//! Attaching an NBD export as a block device on a host without kernel nbd: `nbdfuse` exposes
//! the export as a file on a FUSE mount, and a loop device is set up on that file. Detach
//! tears it down in the reverse order: loop device, FUSE mount, nbdfuse process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::nbd::Server;
use crate::nbd::listen::{Endpoint, Listener, ServeOptions, Serving, Stopper};

/// How long nbdfuse gets to connect and publish its file, and to exit after the unmount.
const WAIT: Duration = Duration::from_secs(10);

/// A block device backed by an export through nbdfuse and a loop device. Dropped without
/// [`FuseLoop::detach`] (an error path, a panic), it still tears everything down, best effort.
#[derive(Debug)]
pub struct FuseLoop {
    device: PathBuf,
    mountpoint: PathBuf,
    fuse: Child,
    attached: bool,
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if self.attached {
            let _ = self.teardown();
        }
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let step = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| Error::attach(&step, e.to_string()))?;
    if !out.status.success() {
        return Err(Error::attach(
            step,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl FuseLoop {
    /// Exposes the export on the unix socket `socket` as a loop device. `work` is a private,
    /// empty or missing directory for the FUSE mount.
    pub fn attach(socket: &Path, work: &Path, read_only: bool) -> Result<FuseLoop> {
        std::fs::create_dir_all(work)
            .map_err(|e| Error::attach(format!("creating {}", work.display()), e.to_string()))?;
        let file = work.join("disk");
        let pidfile = work.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        cmd.arg("-P").arg(&pidfile);
        if read_only {
            cmd.arg("-r");
        }
        let mut fuse = cmd
            .arg(&file)
            .arg("--unix")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::attach("starting nbdfuse", e.to_string()))?;
        // nbdfuse writes its pid file once the file is being served.
        let deadline = Instant::now() + WAIT;
        while !std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0) {
            if let Ok(Some(status)) = fuse.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = fuse.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(Error::attach(
                    "nbdfuse",
                    format!("exited with {status}: {}", err.trim()),
                ));
            }
            if Instant::now() > deadline {
                let _ = fuse.kill();
                let _ = fuse.wait();
                return Err(Error::attach("nbdfuse", "did not come up in time"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut losetup = Command::new("losetup");
        losetup.args(["--find", "--show"]);
        if read_only {
            losetup.arg("--read-only");
        }
        let device = match run(losetup.arg(&file)) {
            Ok(dev) => PathBuf::from(dev),
            Err(e) => {
                let _ = unmount(work);
                let _ = fuse.wait();
                return Err(e);
            }
        };
        Ok(FuseLoop {
            device,
            mountpoint: work.to_path_buf(),
            fuse,
            attached: true,
        })
    }

    /// The block device (`/dev/loopN`).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Tears down in order: the loop device (its buffers are flushed to the file, i.e. to the
    /// export), the FUSE mount, then waits for nbdfuse to exit (it flushes the export).
    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        run(Command::new("losetup").arg("-d").arg(&self.device))?;
        // While someone still has the loop device open (udev probing it after a mkfs or an
        // unmount, say), the kernel only marks it for auto-clear: it keeps the file open,
        // and the FUSE mount stays busy until it lets go.
        wait_until(
            || !loop_bound(&self.device),
            format!("{} to let go of its file", self.device.display()),
        )?;
        unmount(&self.mountpoint)?;
        let deadline = Instant::now() + WAIT;
        loop {
            match self.fuse.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.fuse.kill();
                    let _ = self.fuse.wait();
                    return Err(Error::attach("nbdfuse", "did not exit after the unmount"));
                }
            }
        }
    }
}

/// Whether a loop device is still bound to a file (`/sys/block/loopN/loop` exists).
fn loop_bound(device: &Path) -> bool {
    device
        .file_name()
        .is_some_and(|n| Path::new("/sys/block").join(n).join("loop").exists())
}

/// Polls `done` until it holds, or fails after [`WAIT`] naming `what` was awaited.
fn wait_until(mut done: impl FnMut() -> bool, what: String) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            return Err(Error::attach(format!("waiting for {what}"), "timed out"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Unmounts a FUSE mount: `fusermount3 -u` where installed, else `umount` (as root); a busy
/// mount (a file still open a moment longer) is retried until [`WAIT`].
fn unmount(mountpoint: &Path) -> Result<()> {
    let once = || {
        let fusermount = Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .output();
        match fusermount {
            Ok(out) if out.status.success() => Ok(()),
            _ => run(Command::new("umount").arg(mountpoint)).map(|_| ()),
        }
    };
    let deadline = Instant::now() + WAIT;
    loop {
        match once() {
            Err(Error::Attach { detail, .. })
                if detail.contains("busy") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// An export served on a private unix socket and attached through [`FuseLoop`].
#[derive(Debug)]
pub struct FuseDevice {
    fuse: FuseLoop,
    stopper: Stopper,
    /// Taken by [`FuseDevice::detach`]; still here at drop means an error path: stop serving.
    serving: Option<JoinHandle<Result<u64>>>,
    server: Arc<Server>,
}

impl Drop for FuseDevice {
    fn drop(&mut self) {
        if let Some(t) = self.serving.take() {
            // The FuseLoop's own drop has not run yet: tear it down first, then stop.
            let _ = self.fuse.teardown();
            self.stopper.stop();
            let _ = t.join();
        }
    }
}

impl FuseDevice {
    /// Serves export 0 of `server` on `work/nbd.sock` and attaches it; `work` is private to
    /// this volume.
    pub fn attach(server: Arc<Server>, work: &Path) -> Result<FuseDevice> {
        std::fs::create_dir_all(work)
            .map_err(|e| Error::attach(format!("creating {}", work.display()), e.to_string()))?;
        let socket = work.join("nbd.sock");
        let listener = Listener::bind(&Endpoint::Unix(socket.clone()))?;
        let serving = Serving::new(
            listener,
            server.clone(),
            ServeOptions {
                shared: 16,
                persistent: true,
            },
        );
        let stopper = serving.stopper();
        let thread = std::thread::spawn(move || serving.run());
        let read_only = server.exports()[0].device.read_only();
        match FuseLoop::attach(&socket, &work.join("fuse"), read_only) {
            Ok(fuse) => Ok(FuseDevice {
                fuse,
                stopper,
                serving: Some(thread),
                server,
            }),
            Err(e) => {
                stopper.stop();
                let _ = thread.join();
                Err(e)
            }
        }
    }

    pub fn device(&self) -> &Path {
        self.fuse.device()
    }

    /// Loop device, FUSE mount and nbdfuse go first (they flush through the export); then
    /// the export stops and the image is flushed.
    pub fn detach(mut self) -> Result<()> {
        let torn = self.fuse.teardown();
        self.stopper.stop();
        let serving = self.serving.take().expect("serving until detached");
        let served = serving
            .join()
            .map_err(|_| Error::attach("serving the export", "the thread panicked"))?;
        torn?;
        served?;
        super::flush_volume(&self.server)
    }
}
