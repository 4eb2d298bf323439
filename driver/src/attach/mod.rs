//! Attaching a volume's export as a block device on this host, one interface over two
//! mechanisms: the kernel's nbd driver ([`kernel`], netlink or ioctls) where the module is
//! available, and nbdfuse + a loop device ([`fuse`]) where it is not. [`Mode::Auto`] picks
//! the kernel when it can.

pub mod fuse;
pub mod ioctl;
pub mod kernel;
pub mod netlink;
#[cfg(test)]
pub(crate) mod sim;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use fuse::{FuseDevice, FuseLoop};
pub use kernel::{BoxTransport, KernelDevice, KernelOptions};

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
    /// The kernel's nbd driver through the ioctls only (kernels without the netlink
    /// family; such a device ends with this process and cannot grow online).
    NbdIoctl,
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
            Attached::Kernel(k) if !k.is_netlink() => Mode::NbdIoctl,
            Attached::Kernel(_) => Mode::Nbd,
            Attached::Fuse(_) => Mode::Nbdfuse,
        }
    }

    /// Grows the device to `size` bytes while it is in use (the volume must already be that
    /// large): netlink RECONFIGURE for the kernel's nbd, the loop size limit for nbdfuse.
    pub fn resize(&mut self, size: u64) -> Result<()> {
        match self {
            Attached::Kernel(k) => k.resize(size),
            Attached::Fuse(f) => f.resize(size),
        }
    }

    /// The kernel device index a restarted process can take over with
    /// [`Attacher::reattach`]: only netlink devices outlive their server (ioctl devices end
    /// with the process that ran `NBD_DO_IT`, nbdfuse with its connection).
    pub fn reattach_index(&self) -> Option<u32> {
        match self {
            Attached::Kernel(k) if k.is_netlink() => Some(k.index()),
            _ => None,
        }
    }

    /// Whether [`Attached::resize`] can work: not for ioctl-attached kernel devices.
    pub fn can_resize(&self) -> bool {
        match self {
            Attached::Kernel(k) => k.is_netlink(),
            Attached::Fuse(_) => true,
        }
    }

    /// Pauses a kernel netlink device for a handover (see [`KernelDevice::pause`]).
    pub fn pause(&mut self) -> Result<Vec<std::os::unix::net::UnixStream>> {
        match self {
            Attached::Kernel(k) => k.pause(),
            Attached::Fuse(_) => Err(Error::attach(
                "handing over an nbdfuse device",
                "an nbdfuse device ends with the process that serves it",
            )),
        }
    }

    /// Serves again what [`Attached::pause`] paused.
    pub fn resume(&mut self, sockets: Vec<std::os::unix::net::UnixStream>) {
        if let Attached::Kernel(k) = self {
            k.resume(sockets);
        }
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

/// Opens a netlink conversation with the kernel's nbd family.
pub type NetlinkDoor = Arc<dyn Fn() -> Result<BoxTransport> + Send + Sync>;

/// How this host attaches volumes: the mode, the kernel settings and the door to the kernel
/// (the real netlink socket; tests substitute a simulated kernel).
#[derive(Clone)]
pub struct Attacher {
    pub mode: Mode,
    pub kernel: KernelOptions,
    netlink: Option<NetlinkDoor>,
}

impl std::fmt::Debug for Attacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attacher")
            .field("mode", &self.mode)
            .field("kernel", &self.kernel)
            .field("simulated", &self.netlink.is_some())
            .finish()
    }
}

impl Attacher {
    /// The host's own kernel and nbdfuse, with default kernel settings.
    pub fn new(mode: Mode) -> Attacher {
        Attacher {
            mode,
            kernel: KernelOptions::default(),
            netlink: None,
        }
    }

    /// A kernel reached through `door` instead of a netlink socket (`kernel.sysfs` and
    /// `kernel.dev` point at its files). Mode [`Mode::Nbd`].
    pub fn with_kernel(kernel: KernelOptions, door: NetlinkDoor) -> Attacher {
        Attacher {
            mode: Mode::Nbd,
            kernel,
            netlink: Some(door),
        }
    }

    fn open_netlink(&self) -> Result<BoxTransport> {
        match &self.netlink {
            Some(door) => door(),
            None => netlink::Socket::open()
                .map(|s| Box::new(s) as BoxTransport)
                .map_err(|e| Error::io("opening a netlink socket", e)),
        }
    }

    fn netlink_available(&self) -> bool {
        self.netlink.is_some() || kernel::netlink_available()
    }

    /// Attaches `volume` with the mechanism the mode resolves to.
    pub fn attach(&self, volume: Volume<'_>) -> Result<Attached> {
        let resolved = match (&self.netlink, self.mode) {
            (Some(_), Mode::Auto) => Mode::Nbd,
            (_, mode) => resolve(mode, &self.kernel)?,
        };
        match resolved {
            Mode::Nbdfuse => FuseDevice::attach(volume.server, volume.work_dir).map(Attached::Fuse),
            Mode::NbdIoctl => {
                KernelDevice::connect_ioctl(volume.server, &self.kernel).map(Attached::Kernel)
            }
            _ => {
                let device = match self.open_netlink().and_then(|t| {
                    KernelDevice::connect(volume.server.clone(), volume.id, &self.kernel, t)
                }) {
                    Ok(d) => d,
                    // An old kernel without the netlink family: the pre-created devices.
                    Err(e) if !self.netlink_available() && ioctl_node(&self.kernel).exists() => {
                        tracing::warn!(error = %e, "netlink attach unavailable; using the ioctls");
                        KernelDevice::connect_ioctl(volume.server, &self.kernel)?
                    }
                    Err(e) => return Err(e),
                };
                Ok(Attached::Kernel(device))
            }
        }
    }

    /// Takes over `/dev/nbd{index}`, which a previous process attached for `volume` (see
    /// [`Attached::reattach_index`]): the kernel kept it waiting for a new connection.
    pub fn reattach(&self, volume: Volume<'_>, index: u32) -> Result<Attached> {
        let transport = self.open_netlink()?;
        KernelDevice::reconnect(volume.server, index, volume.id, &self.kernel, transport)
            .map(Attached::Kernel)
    }

    /// Serves `/dev/nbd{index}` on the sockets a previous process paused and passed on
    /// ([`Attached::pause`]).
    pub fn adopt(
        &self,
        volume: Volume<'_>,
        index: u32,
        sockets: Vec<std::os::unix::net::UnixStream>,
    ) -> Result<Attached> {
        let transport = self.open_netlink()?;
        KernelDevice::adopt(
            volume.server,
            index,
            volume.id,
            sockets,
            &self.kernel,
            transport,
        )
        .map(Attached::Kernel)
    }

    /// Whether `device` (a mount's source) provably belongs to volume `volume_id`, whose
    /// attachment work directory is `work`: an nbd device naming it as backend, or one no
    /// process serves any more (what a dead attachment leaves: nothing else can be using
    /// it); or a loop device over this volume's nbdfuse file. Leftovers are only cleared
    /// when this holds, so a request cannot make the plugin unmount another's filesystem.
    pub fn made_for(&self, device: &Path, volume_id: &str, work: &Path) -> bool {
        let Some(name) = device.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        let block = self.kernel.sysfs.join("block").join(name);
        if let Some(index) = name.strip_prefix("nbd").and_then(|i| i.parse::<u32>().ok()) {
            return kernel::backend_of(&self.kernel.sysfs, index).as_deref() == Some(volume_id)
                || (block.exists() && !block.join("pid").exists());
        }
        if name.starts_with("loop") {
            // Not through `fuse/`: a dead FUSE mount fails path lookups.
            let work = std::fs::canonicalize(work).unwrap_or_else(|_| work.to_path_buf());
            return std::fs::read_to_string(block.join("loop/backing_file"))
                .is_ok_and(|f| Path::new(f.trim_end_matches('\n')) == work.join("fuse/disk"));
        }
        false
    }

    /// Disconnects the kernel devices that still name `volume_id` as their backend: what an
    /// interrupted attach or a lost process left. The kernel's own list in sysfs says which;
    /// none without the netlink family.
    pub fn disconnect_stale(&self, volume_id: &str) -> Result<Vec<u32>> {
        let stale = kernel::devices_of(&self.kernel.sysfs, volume_id);
        if stale.is_empty() || !self.netlink_available() {
            return Ok(Vec::new());
        }
        let mut nl = netlink::Nbd::new(self.open_netlink()?)?;
        for &index in &stale {
            nl.disconnect(index)?;
            tracing::info!(
                volume = volume_id,
                device = index,
                "disconnected a stale nbd device"
            );
        }
        Ok(stale)
    }
}
