//! Attaching an NBD export as a block device on a host without kernel nbd: `nbdfuse` exposes
//! the export as a file on a FUSE mount, and a loop device is set up on that file. Detach
//! tears it down in the reverse order: loop device, FUSE mount, nbdfuse process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::nbd::device::{BlockDevice, DeviceError, DeviceResult, Extent};
use crate::nbd::listen::{Endpoint, Listener, ServeOptions, Serving, Stopper};
use crate::nbd::proto::errno;
use crate::nbd::{Export, Server};

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
    let out = cmd.output().map_err(|e| Error::io(step.clone(), e))?;
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
    /// empty or missing directory for the FUSE mount. With `size_limit`, the loop device
    /// shows only the file's first bytes (see [`FuseLoop::set_size`]).
    pub fn attach(
        socket: &Path,
        work: &Path,
        read_only: bool,
        size_limit: Option<u64>,
    ) -> Result<FuseLoop> {
        std::fs::create_dir_all(work)
            .map_err(|e| Error::io(format!("creating {}", work.display()), e))?;
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
            .map_err(|e| Error::io("starting nbdfuse", e))?;
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
        if let Some(limit) = size_limit {
            losetup.arg("--sizelimit").arg(limit.to_string());
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

    /// Changes how much of the file the loop device shows (its size limit), while in use:
    /// `LOOP_GET_STATUS64`, then `LOOP_SET_STATUS64` with the new limit (util-linux has no
    /// command for it). Older kernels answer EAGAIN while the device has cached pages they
    /// cannot drop; that is retried briefly, then reported.
    pub fn set_size(&self, size: u64) -> Result<()> {
        let step = || format!("setting the size of {}", self.device.display());
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .open(&self.device)
            .map_err(|e| Error::io(step(), e))?;
        for attempt in 0.. {
            match loop_ioctl::set_size_limit(&dev, size) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempt < 20 => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(Error::io(step(), e)),
            }
        }
        unreachable!("the loop returns")
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

/// The loop ioctls that change a bound device's size limit (`<linux/loop.h>`).
mod loop_ioctl {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
    const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

    /// `struct loop_info64`.
    #[repr(C)]
    struct LoopInfo64 {
        device: u64,
        inode: u64,
        rdevice: u64,
        offset: u64,
        sizelimit: u64,
        number: u32,
        encrypt_type: u32,
        encrypt_key_size: u32,
        flags: u32,
        file_name: [u8; 64],
        crypt_name: [u8; 64],
        encrypt_key: [u8; 32],
        init: [u64; 2],
    }

    const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

    #[allow(unsafe_code)] // two ioctls on a loop device with a correctly sized struct
    pub fn set_size_limit(dev: &File, limit: u64) -> std::io::Result<()> {
        // SAFETY: all-zero is a valid LoopInfo64 (integers and byte arrays).
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: GET writes exactly one loop_info64 into `info`, which outlives the call.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        info.sizelimit = limit;
        // SAFETY: SET reads one loop_info64 from `info`.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &info) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What nbdfuse is shown of a volume: a device far larger than the volume (the FUSE file
/// keeps the size it had when nbdfuse connected, so it is made large once). Reads past the
/// volume's current end are zeros and writes there fail with ENOSPC; the loop device's size
/// limit keeps the filesystem within the volume, and growing the volume is raising that limit.
#[derive(Debug)]
struct Headroom {
    volume: Arc<dyn BlockDevice>,
}

/// The size nbdfuse sees: volumes can grow online up to this (1 PiB).
pub const FUSE_FILE_SIZE: u64 = 1 << 50;

impl Headroom {
    /// The part of `[offset, offset + len)` inside the volume.
    fn inside(&self, offset: u64, len: u64) -> u64 {
        self.volume.size().saturating_sub(offset).min(len)
    }

    fn past_end(&self, offset: u64, len: u64) -> DeviceResult {
        if self.inside(offset, len) < len {
            return Err(DeviceError::new(
                errno::ENOSPC,
                format!(
                    "{len} bytes at {offset}: past the volume's end ({})",
                    self.volume.size()
                ),
            ));
        }
        Ok(())
    }
}

impl BlockDevice for Headroom {
    fn size(&self) -> u64 {
        FUSE_FILE_SIZE.max(self.volume.size())
    }
    fn read_only(&self) -> bool {
        self.volume.read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
        let inside = self.inside(offset, buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.volume.read_at(head, offset)
    }
    fn read_batch(&self, reads: &mut [(&mut [u8], u64)]) -> Vec<DeviceResult> {
        // The parts inside the volume go to it as one batch; past its end reads as zeros.
        let mut results = vec![Ok(()); reads.len()];
        let mut inside: Vec<(&mut [u8], u64)> = Vec::with_capacity(reads.len());
        let mut which = Vec::with_capacity(reads.len());
        for (i, (buf, offset)) in reads.iter_mut().enumerate() {
            let n = self.inside(*offset, buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(n);
            tail.fill(0);
            if !head.is_empty() {
                inside.push((head, *offset));
                which.push(i);
            }
        }
        for (i, r) in which.into_iter().zip(self.volume.read_batch(&mut inside)) {
            results[i] = r;
        }
        results
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
        self.past_end(offset, buf.len() as u64)?;
        self.volume.write_at(buf, offset)
    }
    fn flush(&self) -> DeviceResult {
        self.volume.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> DeviceResult {
        // Past the end is already nothing.
        match self.inside(offset, len) {
            0 => Ok(()),
            n => self.volume.trim(offset, n),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> DeviceResult {
        self.past_end(offset, len)?;
        self.volume.write_zeroes(offset, len, no_hole)
    }
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        self.inside(offset, len) == len && self.volume.zeroes_are_fast(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64, most: usize) -> DeviceResult<Vec<Extent>> {
        let inside = self.inside(offset, len);
        let mut extents = if inside > 0 {
            self.volume.block_status(offset, inside, most)?
        } else {
            Vec::new()
        };
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        if covered == inside && inside < len && extents.len() < most.max(1) {
            extents.push(Extent {
                length: len - inside,
                hole: true,
                zero: true,
                depth: 0,
            });
        }
        Ok(extents)
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
    /// this volume. A writable volume is served with headroom ([`FUSE_FILE_SIZE`]) so that
    /// it can grow while attached ([`FuseDevice::resize`]).
    pub fn attach(server: Arc<Server>, work: &Path) -> Result<FuseDevice> {
        std::fs::create_dir_all(work)
            .map_err(|e| Error::io(format!("creating {}", work.display()), e))?;
        let socket = work.join("nbd.sock");
        let listener = Listener::bind(&Endpoint::Unix(socket.clone()))?;
        let volume = server.exports()[0].clone();
        let read_only = volume.device.read_only();
        let size = volume.device.size();
        let facing = if read_only {
            server.clone()
        } else {
            let device: Arc<dyn BlockDevice> = Arc::new(Headroom {
                volume: volume.device.clone(),
            });
            Arc::new(Server::new(
                vec![Export { device, ..volume }],
                server.limits().clone(),
            ))
        };
        let serving = Serving::new(
            listener,
            facing,
            ServeOptions {
                shared: 16,
                persistent: true,
                ..ServeOptions::default()
            },
        );
        let stopper = serving.stopper();
        let thread = std::thread::spawn(move || serving.run());
        let limit = (!read_only).then_some(size);
        match FuseLoop::attach(&socket, &work.join("fuse"), read_only, limit) {
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

    /// Grows the device to `size` bytes while in use (the volume must already be that
    /// large): raises the loop device's size limit within the headroom.
    pub fn resize(&self, size: u64) -> Result<()> {
        let volume = &self.server.exports()[0].device;
        if volume.read_only() {
            return Err(Error::attach(
                "growing the device",
                "the volume is read-only",
            ));
        }
        if size > FUSE_FILE_SIZE || size > volume.size() {
            return Err(Error::attach(
                "growing the device",
                format!(
                    "{size} bytes: the volume has {} and nbdfuse serves at most {FUSE_FILE_SIZE}",
                    volume.size()
                ),
            ));
        }
        self.fuse.set_size(size)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::device::Memory;

    #[test]
    fn headroom_serves_the_volume_zeros_past_its_end_and_follows_its_growth() {
        let mem = Arc::new(Memory::new(8192));
        let dev = Headroom {
            volume: mem.clone(),
        };
        assert_eq!(dev.size(), FUSE_FILE_SIZE);
        mem.write_at(&[7; 8192], 0).unwrap();
        // A read across the end: the volume's bytes, then zeros.
        let mut buf = vec![1u8; 8192];
        dev.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf[..4096], &[7; 4096][..]);
        assert_eq!(&buf[4096..], &[0; 4096][..]);
        // The same in a batch, with a read wholly past the end between two inside it.
        let (mut a, mut b, mut c) = (vec![1u8; 8192], vec![1u8; 512], vec![1u8; 512]);
        let mut batch = [(&mut a[..], 4096), (&mut b[..], 1 << 30), (&mut c[..], 0)];
        let results = dev.read_batch(&mut batch);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(&a[..4096], &[7; 4096][..]);
        assert_eq!(&a[4096..], &[0; 4096][..]);
        assert_eq!(b, [0; 512]);
        assert_eq!(c, [7; 512]);
        // Writes and zeroing past the end fail with ENOSPC and change nothing.
        let e = dev.write_at(&[9; 512], 8000).unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
        assert_eq!(
            dev.write_zeroes(1 << 40, 512, false).unwrap_err().errno,
            errno::ENOSPC
        );
        assert_eq!(mem.bytes.lock().unwrap()[8000..], [7; 192]);
        dev.trim(8192, 4096).unwrap();
        let status = dev.block_status(4096, 8192, 16).unwrap();
        assert_eq!(status.iter().map(|e| e.length).sum::<u64>(), 8192);
        assert!(status.last().unwrap().hole && status.last().unwrap().zero);
        // The volume grows: the same offsets are now inside it.
        mem.bytes.lock().unwrap().resize(16384, 0);
        dev.write_at(&[9; 512], 8192).unwrap();
        dev.read_at(&mut buf[..512], 8192).unwrap();
        assert_eq!(&buf[..512], &[9; 512][..]);
    }
}
