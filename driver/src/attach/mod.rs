//! Attaching a volume's export as a block device on this host, one interface over two
//! mechanisms: the kernel's nbd driver ([`kernel`], netlink or ioctls) where the module is
//! available, and nbdfuse + a loop device ([`fuse`]) where it is not. [`Mode::Auto`] picks
//! the kernel when it can.

pub mod fuse;
pub mod ioctl;
pub mod kernel;
pub mod netlink;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use fuse::{FuseDevice, FuseLoop};
pub use kernel::{KernelDevice, KernelOptions};

use crate::error::{Error, Result};
use crate::nbd::Server;

/// Which attacher to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The kernel's nbd driver when the module is loaded, else nbdfuse.
    #[default]
    Auto,
    /// The kernel's nbd driver (netlink; the ioctls where the netlink family is missing but
    /// `/dev/nbd0` exists).
    Nbd,
    /// nbdfuse and a loop device.
    Nbdfuse,
}

/// A volume to attach.
#[derive(Debug, Clone)]
pub struct Volume<'a> {
    /// The volume id: the kernel device's backend identifier.
    pub id: &'a str,
    /// Serves the volume as its export 0.
    pub server: Arc<Server>,
    /// A directory private to this volume (the nbdfuse socket and mount live there).
    pub work_dir: &'a Path,
}

/// An attached volume.
#[derive(Debug)]
pub enum Attached {
    Kernel(KernelDevice),
    Fuse(FuseDevice),
}

impl Attached {
    /// The block device.
    pub fn device(&self) -> &Path {
        match self {
            Attached::Kernel(k) => k.device(),
            Attached::Fuse(f) => f.device(),
        }
    }

    /// Which mechanism serves it.
    pub fn mode(&self) -> Mode {
        match self {
            Attached::Kernel(_) => Mode::Nbd,
            Attached::Fuse(_) => Mode::Nbdfuse,
        }
    }

    /// Grows the device to `size` bytes while it is in use. Only the kernel's nbd driver can:
    /// the nbdfuse file keeps the size it had at attach (grow by attaching again).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        match self {
            Attached::Kernel(k) => k.resize(size),
            Attached::Fuse(_) => Err(Error::FailedPrecondition(
                "an nbdfuse-attached volume cannot grow while staged; it grows at the next stage"
                    .into(),
            )),
        }
    }

    /// Whether [`Attached::resize`] can work.
    pub fn can_resize(&self) -> bool {
        matches!(self, Attached::Kernel(_))
    }

    /// Tears the device down and flushes the volume.
    pub fn detach(self) -> Result<()> {
        match self {
            Attached::Kernel(k) => k.detach(),
            Attached::Fuse(f) => f.detach(),
        }
    }
}

/// Flushes the volume an attachment served (export 0), the last step of every detach.
fn flush_volume(server: &Server) -> Result<()> {
    server.exports()[0]
        .device
        .flush()
        .map_err(|e| Error::attach("flushing the volume", e.to_string()))
}

fn nbdfuse_available() -> bool {
    Path::new("/dev/fuse").exists()
        && std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("nbdfuse").is_file()))
}

/// The mechanism `mode` stands for on this host, or why there is none.
pub fn resolve(mode: Mode, kernel: &KernelOptions) -> Result<Mode> {
    let kernel_ok = || kernel::netlink_available() || ioctl_node(kernel).exists();
    match mode {
        Mode::Auto if kernel_ok() => Ok(Mode::Nbd),
        Mode::Auto if nbdfuse_available() => Ok(Mode::Nbdfuse),
        Mode::Auto => Err(Error::attach(
            "choosing an attacher",
            "no kernel nbd (modprobe nbd) and no nbdfuse (install nbdfuse and fuse3)",
        )),
        Mode::Nbdfuse if !nbdfuse_available() => Err(Error::attach(
            "attaching with nbdfuse",
            "nbdfuse or /dev/fuse is missing",
        )),
        m => Ok(m),
    }
}

fn ioctl_node(kernel: &KernelOptions) -> PathBuf {
    kernel.dev.join("nbd0")
}

/// Attaches `volume` with the mechanism `mode` resolves to.
pub fn attach(mode: Mode, volume: Volume<'_>, kernel: &KernelOptions) -> Result<Attached> {
    match resolve(mode, kernel)? {
        Mode::Nbdfuse => FuseDevice::attach(volume.server, volume.work_dir).map(Attached::Fuse),
        _ => {
            let device = match netlink::Socket::open()
                .map_err(|e| Error::attach("opening a netlink socket", e.to_string()))
                .and_then(|s| {
                    KernelDevice::connect(volume.server.clone(), volume.id, kernel, Box::new(s))
                }) {
                Ok(d) => d,
                // An old kernel without the netlink family: the pre-created devices.
                Err(e) if !kernel::netlink_available() && ioctl_node(kernel).exists() => {
                    eprintln!("qcow2-csi: netlink attach unavailable ({e}); using the ioctls");
                    KernelDevice::connect_ioctl(volume.server, kernel)?
                }
                Err(e) => return Err(e),
            };
            Ok(Attached::Kernel(device))
        }
    }
}
