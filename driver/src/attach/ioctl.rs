//! The kernel nbd driver's ioctl interface on `/dev/nbdN`, the fallback where the netlink
//! family is unusable. Its limits (`docs/nbd.md`): devices are pre-created by the module, no
//! backend identifier, and the device lives only while a thread of ours sits in `NBD_DO_IT`,
//! so it does not survive a restart of the plugin.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `_IO(0xab, n)`: no direction or size bits.
pub mod req {
    pub const SET_SOCK: u32 = 0xab00;
    pub const SET_BLKSIZE: u32 = 0xab01;
    pub const SET_SIZE: u32 = 0xab02;
    pub const DO_IT: u32 = 0xab03;
    pub const CLEAR_SOCK: u32 = 0xab04;
    pub const DISCONNECT: u32 = 0xab08;
    pub const SET_TIMEOUT: u32 = 0xab09;
    pub const SET_FLAGS: u32 = 0xab0a;
}

/// Issues nbd ioctls on one device.
pub trait Ioctl: Send + Sync {
    fn ioctl(&self, request: u32, arg: u64) -> io::Result<()>;
}

/// An opened `/dev/nbdN`.
#[derive(Debug)]
pub struct DevNode {
    file: File,
    path: PathBuf,
}

impl DevNode {
    pub fn open(path: &Path) -> io::Result<DevNode> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(DevNode {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Ioctl for DevNode {
    #[allow(unsafe_code)] // ioctl(2) has no safe wrapper for these request numbers
    fn ioctl(&self, request: u32, arg: u64) -> io::Result<()> {
        // SAFETY: the nbd ioctls take an integer argument (a size, a flag word or a
        // descriptor number), never a pointer; the descriptor is ours and open.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::c_ulong::from(request),
                arg as libc::c_ulong,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// What the device is told before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub size: u64,
    pub block_size: u64,
    pub flags: u64,
    pub timeout_s: u64,
}

fn step(dev: &dyn Ioctl, name: &str, request: u32, arg: u64) -> Result<()> {
    dev.ioctl(request, arg)
        .map_err(|e| Error::io(format!("ioctl {name}"), e))
}

/// Configures the device and hands it the kernel's ends of the sockets; on failure the
/// sockets are cleared again so the device stays free. Then [`run`] it.
pub fn configure(dev: &dyn Ioctl, setup: &Setup, sockets: &[RawFd]) -> Result<()> {
    let steps = || -> Result<()> {
        step(dev, "NBD_SET_BLKSIZE", req::SET_BLKSIZE, setup.block_size)?;
        step(dev, "NBD_SET_SIZE", req::SET_SIZE, setup.size)?;
        step(dev, "NBD_SET_TIMEOUT", req::SET_TIMEOUT, setup.timeout_s)?;
        step(dev, "NBD_SET_FLAGS", req::SET_FLAGS, setup.flags)?;
        for &fd in sockets {
            let fd = u64::try_from(fd).expect("descriptors are not negative");
            step(dev, "NBD_SET_SOCK", req::SET_SOCK, fd)?;
        }
        Ok(())
    };
    steps().inspect_err(|_| {
        let _ = dev.ioctl(req::CLEAR_SOCK, 0);
    })
}

/// Runs the device: blocks the calling thread until the device is disconnected.
pub fn run(dev: &dyn Ioctl) -> Result<()> {
    step(dev, "NBD_DO_IT", req::DO_IT, 0)
}

/// Disconnects the device (the kernel sends `NBD_CMD_DISC`) and clears its sockets, which
/// lets [`run`] return.
pub fn disconnect(dev: &dyn Ioctl) -> Result<()> {
    step(dev, "NBD_DISCONNECT", req::DISCONNECT, 0)?;
    step(dev, "NBD_CLEAR_SOCK", req::CLEAR_SOCK, 0)
}

/// The first `/dev/nbdN` that sysfs shows unused (size 0, no serving pid).
pub fn free_device(sysfs: &Path, dev: &Path) -> Result<PathBuf> {
    let block = sysfs.join("block");
    let mut names: Vec<(u32, String)> = std::fs::read_dir(&block)
        .map_err(|e| Error::io(format!("listing {}", block.display()), e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| Some((n.strip_prefix("nbd")?.parse().ok()?, n)))
        .collect();
    names.sort();
    for (_, name) in names {
        let d = block.join(&name);
        let size = std::fs::read_to_string(d.join("size")).unwrap_or_default();
        if size.trim() == "0" && !d.join("pid").exists() {
            return Ok(dev.join(name));
        }
    }
    Err(Error::attach(
        "finding a free /dev/nbdN",
        "every nbd device is in use (the module's nbds_max)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(u32, u64)>>,
        fail_on: Option<u32>,
    }

    impl Ioctl for Recorder {
        fn ioctl(&self, request: u32, arg: u64) -> io::Result<()> {
            self.calls.lock().unwrap().push((request, arg));
            if self.fail_on == Some(request) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            Ok(())
        }
    }

    const SETUP: Setup = Setup {
        size: 1 << 30,
        block_size: 4096,
        flags: 0x12d,
        timeout_s: 0,
    };

    #[test]
    fn the_request_numbers_are_the_kernels() {
        // _IO(0xab, n) = (0xab << 8) | n
        assert_eq!(req::SET_SOCK, 0xab << 8);
        assert_eq!(req::DO_IT, (0xab << 8) | 3);
        assert_eq!(req::SET_FLAGS, (0xab << 8) | 10);
    }

    #[test]
    fn configure_sets_geometry_then_flags_then_sockets() {
        let dev = Recorder::default();
        configure(&dev, &SETUP, &[7, 8]).unwrap();
        assert_eq!(
            *dev.calls.lock().unwrap(),
            [
                (req::SET_BLKSIZE, 4096),
                (req::SET_SIZE, 1 << 30),
                (req::SET_TIMEOUT, 0),
                (req::SET_FLAGS, 0x12d),
                (req::SET_SOCK, 7),
                (req::SET_SOCK, 8),
            ]
        );
        run(&dev).unwrap();
        disconnect(&dev).unwrap();
        let calls = dev.calls.lock().unwrap();
        assert_eq!(
            calls[6..],
            [(req::DO_IT, 0), (req::DISCONNECT, 0), (req::CLEAR_SOCK, 0)]
        );
    }

    #[test]
    fn a_busy_device_is_left_clear() {
        let dev = Recorder {
            fail_on: Some(req::SET_SOCK),
            ..Recorder::default()
        };
        let e = configure(&dev, &SETUP, &[7]).unwrap_err().to_string();
        assert!(e.contains("NBD_SET_SOCK"), "{e}");
        assert_eq!(
            dev.calls.lock().unwrap().last(),
            Some(&(req::CLEAR_SOCK, 0))
        );
    }

    #[test]
    fn free_device_skips_devices_in_use() {
        let sys = tempfile::tempdir().unwrap();
        let mk = |name: &str, size: &str, pid: bool| {
            let d = sys.path().join("block").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("size"), size).unwrap();
            if pid {
                std::fs::write(d.join("pid"), "1\n").unwrap();
            }
        };
        mk("nbd0", "2097152\n", true);
        mk("nbd1", "0\n", true); // being set up by someone
        mk("nbd10", "0\n", false);
        mk("nbd2", "0\n", false);
        mk("loop0", "0\n", false);
        let got = free_device(sys.path(), Path::new("/dev")).unwrap();
        assert_eq!(got, Path::new("/dev/nbd2"));
        std::fs::write(sys.path().join("block/nbd2/pid"), "2").unwrap();
        std::fs::write(sys.path().join("block/nbd10/size"), "8").unwrap();
        assert!(free_device(sys.path(), Path::new("/dev")).is_err());
    }
}
