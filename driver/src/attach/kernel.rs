//! Kernel nbd attach: socket pairs between us and the kernel's nbd driver, one end served
//! in-process (no handshake, simple replies), the other handed to the driver with netlink
//! CONNECT (or, where the netlink family is unusable, the ioctls).
//!
//! Deliberate settings (`docs/nbd.md` § Kernel attach):
//! - backend identifier = the volume id: `/sys/block/nbdN/backend` names the volume, and the
//!   kernel refuses a RECONFIGURE that names another volume on a recycled index;
//! - I/O timeout 0: the kernel never aborts a request of a slow but live server, and with one
//!   connection never kills the socket on a timeout;
//! - the block queue's request timeout ([`KernelOptions::requeue_after`], 1 s): with I/O
//!   timeout 0 its expiry only looks at the request, and a request sent on a socket that has
//!   since been replaced (RECONFIGURE after a crash) is sent again on the new one. The
//!   kernel's default, 30 s, froze every writer for 30 s after a plugin crash. CONNECT and
//!   every RECONFIGURE that sets the I/O timeout reset it, so it is set again after each;
//! - dead-connection timeout 15 min: while the plugin is restarting (crash-loop backoff caps at
//!   5 min, plus an image pull) I/O waits instead of failing and turning the filesystem
//!   read-only; after it, I/O fails rather than hanging forever;
//! - destroy on disconnect: dynamic devices do not pile up.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ioctl::{self, DevNode, Ioctl};
use super::netlink::{self, ConnectConfig, Nbd, Transport};
use crate::error::{Error, Result};
use crate::nbd::proto::flag;
use crate::nbd::{Ended, Server};

/// Settings of the kernel attacher.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Socket pairs per device (blk-mq hardware queues).
    pub connections: usize,
    /// Logical = physical block size of the device.
    pub block_size: u64,
    /// Per-request I/O timeout in seconds; 0 = never abort.
    pub timeout_s: u64,
    /// How long I/O waits for a reconnect once our sockets are gone.
    pub dead_conn_timeout_s: u64,
    /// Where sysfs and device nodes live (tests point these elsewhere).
    pub sysfs: PathBuf,
    pub dev: PathBuf,
    /// How long to wait for udev to create `/dev/nbdN`.
    pub device_wait: Duration,
    /// The block queue's request timeout (`queue/io_timeout`): how soon a request stranded
    /// on a dead connection is sent again once the device has a new one.
    pub requeue_after: Duration,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            connections: 1,
            block_size: 4096,
            timeout_s: 0,
            dead_conn_timeout_s: 15 * 60,
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            device_wait: Duration::from_secs(10),
            requeue_after: Duration::from_secs(1),
        }
    }
}

/// A transport that can be moved to another thread.
pub type BoxTransport = Box<dyn Transport + Send>;

impl Transport for BoxTransport {
    fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        (**self).send(msg)
    }
    fn recv(&mut self) -> std::io::Result<Vec<u8>> {
        (**self).recv()
    }
}

/// How the device was set up, which decides how it is torn down.
enum Control {
    Netlink(Nbd<BoxTransport>),
    Ioctl {
        dev: Arc<dyn Ioctl>,
        do_it: JoinHandle<Result<()>>,
    },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Netlink(_) => "netlink",
            Control::Ioctl { .. } => "ioctl",
        })
    }
}

/// A volume attached as `/dev/nbdN`, served by threads of this process.
#[derive(Debug)]
pub struct KernelDevice {
    index: u32,
    backend: String,
    device: PathBuf,
    server: Arc<Server>,
    serving: Serving,
    control: Control,
    sysfs: PathBuf,
}

/// The transmission flags the driver is told: what the export supports, multi-conn only
/// with several sockets.
fn kernel_flags(server: &Server, connections: usize) -> u64 {
    let mut f = u64::from(server.transmission_flags(0));
    if connections <= 1 {
        f &= !u64::from(flag::CAN_MULTI_CONN);
    }
    f
}

/// Socket pairs: (ours, the kernel's).
fn pairs(n: usize) -> Result<Vec<(UnixStream, OwnedFd)>> {
    (0..n.max(1))
        .map(|_| {
            let (ours, theirs) = UnixStream::pair()?;
            Ok((ours, OwnedFd::from(theirs)))
        })
        .collect()
}

/// The threads serving a device's connections, and the flag that pauses them.
#[derive(Debug)]
struct Serving {
    stop: Arc<AtomicBool>,
    /// Each ends with its socket when paused, without one when the connection ended.
    threads: Vec<JoinHandle<Option<UnixStream>>>,
}

impl Serving {
    fn start(server: &Arc<Server>, ours: Vec<UnixStream>, volume: &str) -> Serving {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = ours
            .into_iter()
            .map(|mut s| {
                let (server, stop) = (server.clone(), stop.clone());
                let volume = volume.to_string();
                std::thread::Builder::new()
                    .name("nbd-kernel".into())
                    .spawn(move || match server.serve_kernel(&mut s, 0, Some(&stop)) {
                        Ok(Ended::Stopped) => Some(s),
                        Ok(Ended::Closed) => None,
                        Err(e) => {
                            eprintln!("qcow2-csi: {volume}: kernel connection ended: {e}");
                            None
                        }
                    })
                    .expect("spawning a serving thread")
            })
            .collect();
        Serving { stop, threads }
    }

    /// Pauses every connection (each answers what it has read) and returns their sockets,
    /// in order, `None` for a connection that had ended.
    fn pause(self) -> Vec<Option<UnixStream>> {
        self.stop.store(true, Ordering::Release);
        self.threads
            .into_iter()
            .map(|t| t.join().ok().flatten())
            .collect()
    }

    /// Waits for every connection to end (after a disconnect).
    fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Sets the block queue's request timeout of `nbd{index}` (see the module's notes); a
/// failure is logged, not fatal (the device works, only crash recovery is slower).
fn set_requeue_timeout(sysfs: &Path, index: u32, after: Duration) {
    let path = sysfs.join(format!("block/nbd{index}/queue/io_timeout"));
    let ms = after.as_millis().max(1).to_string();
    if let Err(e) = std::fs::write(&path, &ms) {
        tracing::error!(
            path = %path.display(),
            error = %e,
            "setting the request timeout failed: requests stranded by a plugin crash will wait 30 s"
        );
    }
}

fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Error::attach(
                format!("waiting for {}", path.display()),
                "udev did not create the device node",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The backend identifier the kernel shows for `nbd{index}`, if any.
pub(crate) fn backend_of(sysfs: &Path, index: u32) -> Option<String> {
    let p = sysfs.join(format!("block/nbd{index}/backend"));
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

impl KernelDevice {
    /// Attaches export 0 of `server` through netlink, on a device the kernel picks.
    pub fn connect(
        server: Arc<Server>,
        volume_id: &str,
        opts: &KernelOptions,
        transport: BoxTransport,
    ) -> Result<KernelDevice> {
        let mut nl = Nbd::new(transport)?;
        let export = &server.exports()[0];
        let cfg = ConnectConfig {
            size: export.device.size(),
            block_size: opts.block_size,
            server_flags: kernel_flags(&server, opts.connections),
            client_flags: netlink::nbd::CFLAG_DESTROY_ON_DISCONNECT,
            timeout_s: opts.timeout_s,
            dead_conn_timeout_s: opts.dead_conn_timeout_s,
            backend: volume_id.to_string(),
        };
        let (ours, theirs): (Vec<_>, Vec<_>) = pairs(opts.connections)?.into_iter().unzip();
        // Served before CONNECT: the kernel may read the partition table at once.
        let serving = Serving::start(&server, ours, volume_id);
        let index = match nl.connect(&cfg, &netlink::raw_fds(&theirs)) {
            Ok(i) => i,
            Err(e) => {
                drop(theirs); // our threads see end-of-file and stop
                serving.join();
                return Err(e);
            }
        };
        drop(theirs); // the kernel holds its own references
        set_requeue_timeout(&opts.sysfs, index, opts.requeue_after);
        let device = opts.dev.join(format!("nbd{index}"));
        let dev = KernelDevice {
            index,
            backend: volume_id.to_string(),
            device,
            server,
            serving,
            control: Control::Netlink(nl),
            sysfs: opts.sysfs.clone(),
        };
        if let Err(e) = wait_for(&dev.device, opts.device_wait) {
            let _ = dev.detach();
            return Err(e);
        }
        Ok(dev)
    }

    /// Takes over a device a previous process attached (index and volume id from its
    /// records): fresh sockets through RECONFIGURE. The kernel swaps only dead sockets and
    /// reports success even when it swapped none, so a socket it did not take (it closes
    /// when we drop our copy of its end) is reported as an error.
    pub fn reconnect(
        server: Arc<Server>,
        index: u32,
        volume_id: &str,
        opts: &KernelOptions,
        transport: BoxTransport,
    ) -> Result<KernelDevice> {
        match backend_of(&opts.sysfs, index) {
            Some(b) if b == volume_id => {}
            Some(b) => {
                return Err(Error::attach(
                    format!("reconnecting nbd{index}"),
                    format!("the device serves {b:?}, not {volume_id:?}"),
                ));
            }
            None => {
                return Err(Error::attach(
                    format!("reconnecting nbd{index}"),
                    "no backend identifier in sysfs (no such device, or a kernel before 5.14)",
                ));
            }
        }
        let mut nl = Nbd::new(transport)?;
        let (ours, theirs): (Vec<_>, Vec<_>) = pairs(opts.connections)?.into_iter().unzip();
        nl.reconfigure(
            index,
            volume_id,
            opts.timeout_s,
            opts.dead_conn_timeout_s,
            &netlink::raw_fds(&theirs),
        )?;
        drop(theirs);
        set_requeue_timeout(&opts.sysfs, index, opts.requeue_after);
        if let Some(i) = ours
            .iter()
            .position(|s| hung_up(s, Duration::from_millis(200)))
        {
            return Err(Error::attach(
                format!("reconnecting nbd{index}"),
                format!(
                    "the kernel did not take socket {i}: the device still has live connections \
                     (another process serves it?)"
                ),
            ));
        }
        Ok(Self::serving_netlink(
            server, index, volume_id, ours, opts, nl,
        ))
    }

    /// A netlink device `nbd{index}` of `volume_id`, served on `sockets` from now on.
    fn serving_netlink(
        server: Arc<Server>,
        index: u32,
        volume_id: &str,
        sockets: Vec<UnixStream>,
        opts: &KernelOptions,
        nl: Nbd<BoxTransport>,
    ) -> KernelDevice {
        let serving = Serving::start(&server, sockets, volume_id);
        KernelDevice {
            index,
            backend: volume_id.to_string(),
            device: opts.dev.join(format!("nbd{index}")),
            server,
            serving,
            control: Control::Netlink(nl),
            sysfs: opts.sysfs.clone(),
        }
    }

    /// Attaches through the ioctls on the first free pre-created device.
    pub fn connect_ioctl(server: Arc<Server>, opts: &KernelOptions) -> Result<KernelDevice> {
        let path = ioctl::free_device(&opts.sysfs, &opts.dev)?;
        let node = DevNode::open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Self::start_ioctl(server, opts, Arc::new(node), path)
    }

    fn start_ioctl(
        server: Arc<Server>,
        opts: &KernelOptions,
        dev: Arc<dyn Ioctl>,
        path: PathBuf,
    ) -> Result<KernelDevice> {
        let index: u32 = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("nbd")?.parse().ok())
            .unwrap_or(u32::MAX);
        let setup = ioctl::Setup {
            size: server.exports()[0].device.size(),
            block_size: opts.block_size,
            flags: kernel_flags(&server, opts.connections),
            timeout_s: opts.timeout_s,
        };
        let (ours, theirs): (Vec<_>, Vec<_>) = pairs(opts.connections)?.into_iter().unzip();
        ioctl::configure(&*dev, &setup, &netlink::raw_fds(&theirs))?;
        let serving = Serving::start(&server, ours, &path.display().to_string());
        let do_it = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let r = ioctl::run(&*dev);
                drop(theirs); // the kernel has let go of them
                r
            })
        };
        Ok(KernelDevice {
            index,
            backend: String::new(),
            device: path,
            server,
            serving,
            control: Control::Ioctl { dev, do_it },
            sysfs: opts.sysfs.clone(),
        })
    }

    /// Grows the device to `size` bytes online (the export must already be that large).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        match &mut self.control {
            Control::Netlink(nl) => nl.resize(self.index, &self.backend, size),
            Control::Ioctl { .. } => Err(Error::attach(
                format!("growing nbd{}", self.index),
                "a device set up with ioctls cannot change size while running",
            )),
        }
    }

    /// The block device (`/dev/nbdN`).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The kernel's device index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether it was set up through netlink (and so can be taken over after a restart).
    pub fn is_netlink(&self) -> bool {
        matches!(self.control, Control::Netlink(_))
    }

    /// Disconnects the device (after checking it still serves our volume), waits for the
    /// serving threads to answer what is in flight, and flushes the image.
    pub fn detach(self) -> Result<()> {
        match self.control {
            Control::Netlink(mut nl) => {
                match backend_of(&self.sysfs, self.index) {
                    Some(b) if b == self.backend => nl.disconnect(self.index)?,
                    Some(b) => {
                        return Err(Error::attach(
                            format!("detaching nbd{}", self.index),
                            format!("the device now serves {b:?}; left alone"),
                        ));
                    }
                    // Gone already (destroyed by an earlier disconnect): nothing to do.
                    None => {}
                }
            }
            Control::Ioctl { dev, do_it } => {
                ioctl::disconnect(&*dev)?;
                match do_it.join() {
                    Ok(r) => r?,
                    Err(_) => return Err(Error::attach("NBD_DO_IT", "the thread panicked")),
                }
            }
        }
        self.serving.join();
        super::flush_volume(&self.server)
    }

    /// Pauses the device for a handover to another process: every connection answers the
    /// requests it has read and stops reading; the kernel queues what it sends meanwhile.
    /// Returns the device's sockets, to pass on, or to [`KernelDevice::resume`] with. Only
    /// netlink devices outlive this process. On error nothing is paused.
    pub fn pause(&mut self) -> Result<Vec<UnixStream>> {
        if !self.is_netlink() {
            return Err(Error::attach(
                format!("handing nbd{} over", self.index),
                "a device set up with ioctls ends with the process that runs it",
            ));
        }
        let serving = std::mem::replace(
            &mut self.serving,
            Serving {
                stop: Arc::default(),
                threads: Vec::new(),
            },
        );
        let paused = serving.pause();
        if paused.iter().any(Option::is_none) {
            let live: Vec<UnixStream> = paused.into_iter().flatten().collect();
            self.serving = Serving::start(&self.server, live, &self.backend);
            return Err(Error::attach(
                format!("handing nbd{} over", self.index),
                "one of its connections had ended",
            ));
        }
        Ok(paused.into_iter().flatten().collect())
    }

    /// Serves again the sockets [`KernelDevice::pause`] returned (the handover failed).
    pub fn resume(&mut self, sockets: Vec<UnixStream>) {
        self.serving = Serving::start(&self.server, sockets, &self.backend);
    }

    /// Serves `nbd{index}` on `sockets` a previous process paused and passed to us (see
    /// [`KernelDevice::pause`]): the kernel never noticed the change of server.
    pub fn adopt(
        server: Arc<Server>,
        index: u32,
        volume_id: &str,
        sockets: Vec<UnixStream>,
        opts: &KernelOptions,
        transport: BoxTransport,
    ) -> Result<KernelDevice> {
        match backend_of(&opts.sysfs, index) {
            Some(b) if b == volume_id => {}
            other => {
                return Err(Error::attach(
                    format!("adopting nbd{index}"),
                    format!("the device serves {other:?}, not {volume_id:?}"),
                ));
            }
        }
        let nl = Nbd::new(transport)?;
        Ok(Self::serving_netlink(
            server, index, volume_id, sockets, opts, nl,
        ))
    }
}

/// Whether the peer of `s` closed within `wait`.
fn hung_up(s: &UnixStream, wait: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(
        s,
        PollFlags::IN | PollFlags::RDHUP | PollFlags::HUP,
    )];
    let timeout = Timespec::try_from(wait).ok();
    match poll(&mut fds, timeout.as_ref()) {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            let r = fds[0].revents();
            r.intersects(PollFlags::HUP | PollFlags::RDHUP)
                || (r.contains(PollFlags::IN) && peek_eof(s))
        }
    }
}

fn peek_eof(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        rustix::net::recv(
            s,
            &mut b,
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT
        ),
        Ok((0, _))
    )
}

/// The nbd devices whose backend identifier is `volume_id`, by index (from sysfs).
pub fn devices_of(sysfs: &Path, volume_id: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(sysfs.join("block")) else {
        return Vec::new();
    };
    let mut found: Vec<u32> = entries
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("nbd")?
                .parse()
                .ok()
        })
        .filter(|&i| backend_of(sysfs, i).as_deref() == Some(volume_id))
        .collect();
    found.sort_unstable();
    found
}

/// Whether the kernel offers the nbd netlink family (the module is loaded).
pub fn netlink_available() -> bool {
    netlink::Socket::open()
        .ok()
        .and_then(|s| Nbd::new(Box::new(s) as BoxTransport).ok())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::ioctl::req;
    use crate::attach::netlink::{attrs, nbd};
    use crate::nbd::device::Memory;
    use crate::nbd::proto::{self, cmd};
    use crate::nbd::{Export, Limits};
    use std::collections::VecDeque;
    use std::io;
    use std::os::fd::RawFd;
    use std::sync::{Condvar, Mutex};

    use crate::attach::sim::{FAMILY, FakeKernel, Sim, request, send_disc, take};

    struct Rig {
        sim: Arc<Mutex<Sim>>,
        mem: Arc<Memory>,
        server: Arc<Server>,
        opts: KernelOptions,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let mem = Arc::new(Memory::new(1 << 20));
            let server = Arc::new(Server::new(
                vec![Export::new("", mem.clone())],
                Limits::default(),
            ));
            let opts = KernelOptions {
                sysfs: dir.path().join("sys"),
                dev: dir.path().join("dev"),
                device_wait: Duration::from_secs(2),
                ..KernelOptions::default()
            };
            std::fs::create_dir_all(opts.sysfs.join("block/nbd5/queue")).unwrap();
            std::fs::create_dir_all(&opts.dev).unwrap();
            std::fs::write(opts.dev.join("nbd5"), "").unwrap();
            Rig {
                sim: Arc::default(),
                mem,
                server,
                opts,
                _dir: dir,
            }
        }

        fn set_backend(&self, b: &str) {
            std::fs::write(self.opts.sysfs.join("block/nbd5/backend"), format!("{b}\n")).unwrap();
        }

        fn transport(&self) -> BoxTransport {
            Box::new(FakeKernel {
                sim: self.sim.clone(),
                replies: VecDeque::new(),
            })
        }

        /// What the kernel would do for a filesystem: a write, a read and a flush, on the
        /// socket it holds; returns the data read.
        fn kernel_io(&self) -> Vec<u8> {
            let sock = self.sim.lock().unwrap().held[0].try_clone().unwrap();
            request(&sock, cmd::WRITE, 4096, &[0xaa; 512], 0);
            let data = request(&sock, cmd::READ, 4096, &[], 1024);
            request(&sock, cmd::FLUSH, 0, &[], 0);
            data
        }

        fn sent(&self, command: u8) -> Vec<Vec<u8>> {
            let sim = self.sim.lock().unwrap();
            sim.sent
                .iter()
                .filter(|m| u16::from_ne_bytes([m[4], m[5]]) == FAMILY && m[16] == command)
                .cloned()
                .collect()
        }
    }

    fn u64_attr(msg: &[u8], kind: u16) -> Option<u64> {
        attrs(&msg[20..])
            .find(|&(k, _)| k == kind)
            .map(|(_, p)| u64::from_ne_bytes(p.try_into().unwrap()))
    }

    #[test]
    fn connect_serves_the_kernel_and_detach_disconnects_and_flushes() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        let dev =
            KernelDevice::connect(rig.server.clone(), "vol-1", &rig.opts, rig.transport()).unwrap();
        assert_eq!(dev.device(), rig.opts.dev.join("nbd5"));
        assert_eq!(dev.index(), 5);
        let mut expect = vec![0u8; 1024];
        expect[..512].fill(0xaa);
        assert_eq!(rig.kernel_io(), expect);

        let connect = &rig.sent(nbd::CMD_CONNECT)[0];
        let flags = u64_attr(connect, nbd::ATTR_SERVER_FLAGS).unwrap() as u16;
        use proto::flag;
        for want in [
            flag::HAS_FLAGS,
            flag::SEND_FLUSH,
            flag::SEND_FUA,
            flag::SEND_TRIM,
            flag::SEND_WRITE_ZEROES,
        ] {
            assert_ne!(flags & want, 0, "flag {want:#x} in {flags:#x}");
        }
        assert_eq!(flags & flag::CAN_MULTI_CONN, 0, "one socket: no multi-conn");
        assert_eq!(flags & flag::READ_ONLY, 0);
        assert_eq!(u64_attr(connect, nbd::ATTR_SIZE_BYTES), Some(1 << 20));
        assert_eq!(u64_attr(connect, nbd::ATTR_TIMEOUT), Some(0));
        assert_eq!(u64_attr(connect, nbd::ATTR_DEAD_CONN_TIMEOUT), Some(900));
        assert_eq!(u64_attr(connect, nbd::ATTR_CLIENT_FLAGS), Some(1));
        assert!(connect.windows(6).any(|w| w == b"vol-1\0"));
        assert!(attrs(&connect[20..]).all(|(k, _)| k != nbd::ATTR_INDEX));
        // The queue's request timeout, which CONNECT reset to 30 s, is ours again.
        let timeout = rig.opts.sysfs.join("block/nbd5/queue/io_timeout");
        assert_eq!(std::fs::read_to_string(&timeout).unwrap(), "1000");

        dev.detach().unwrap();
        let disconnect = &rig.sent(nbd::CMD_DISCONNECT)[0];
        assert_eq!(&disconnect[20..], [8, 0, 1, 0, 5, 0, 0, 0].map(u8::to_le));
        // The kernel's FLUSH, then the one at detach.
        assert_eq!(rig.mem.flushes.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_netlink_device_grows_online_with_reconfigure() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        let mut dev =
            KernelDevice::connect(rig.server.clone(), "vol-1", &rig.opts, rig.transport()).unwrap();
        dev.resize(4 << 20).unwrap();
        let msg = rig
            .sent(nbd::CMD_RECONFIGURE)
            .pop()
            .expect("a RECONFIGURE was sent");
        assert_eq!(u64_attr(&msg, nbd::ATTR_SIZE_BYTES), Some(4 << 20));
        assert!(msg.windows(6).any(|w| w == b"vol-1\0"));
        assert!(attrs(&msg[20..]).all(|(k, _)| k != nbd::ATTR_SOCKETS));
        dev.detach().unwrap();
    }

    #[test]
    fn multi_conn_is_advertised_only_with_several_sockets() {
        let mut rig = Rig::new();
        rig.set_backend("v");
        rig.opts.connections = 3;
        let dev =
            KernelDevice::connect(rig.server.clone(), "v", &rig.opts, rig.transport()).unwrap();
        assert_eq!(rig.sim.lock().unwrap().held.len(), 3);
        let connect = &rig.sent(nbd::CMD_CONNECT)[0];
        let flags = u64_attr(connect, nbd::ATTR_SERVER_FLAGS).unwrap() as u16;
        assert_ne!(flags & proto::flag::CAN_MULTI_CONN, 0);
        dev.detach().unwrap();
    }

    #[test]
    fn detach_leaves_alone_a_device_that_now_serves_another_volume() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        let dev =
            KernelDevice::connect(rig.server.clone(), "vol-1", &rig.opts, rig.transport()).unwrap();
        rig.set_backend("vol-2");
        let e = dev.detach().unwrap_err().to_string();
        assert!(e.contains("vol-2"), "{e}");
        assert!(rig.sent(nbd::CMD_DISCONNECT).is_empty());
        rig.sim.lock().unwrap().held.clear(); // let the serving thread go
    }

    #[test]
    fn a_refused_connect_stops_the_serving_threads() {
        let rig = Rig::new();
        rig.sim.lock().unwrap().refuse_connect = true;
        let e = KernelDevice::connect(rig.server.clone(), "v", &rig.opts, rig.transport())
            .unwrap_err()
            .to_string();
        assert!(e.contains("CONNECT"), "{e}");
        // Every serving thread has ended: nothing holds the server but us.
        assert_eq!(Arc::strong_count(&rig.server), 1);
    }

    #[test]
    fn reconnect_hands_fresh_sockets_to_the_same_device() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        rig.sim.lock().unwrap().take_on_reconfigure = true;
        let dev =
            KernelDevice::reconnect(rig.server.clone(), 5, "vol-1", &rig.opts, rig.transport())
                .unwrap();
        let msg = &rig.sent(nbd::CMD_RECONFIGURE)[0];
        let body: Vec<_> = attrs(&msg[20..]).map(|(k, _)| k).collect();
        assert_eq!(
            body,
            [
                nbd::ATTR_INDEX,
                nbd::ATTR_BACKEND_IDENTIFIER,
                nbd::ATTR_TIMEOUT,
                nbd::ATTR_DEAD_CONN_TIMEOUT,
                nbd::ATTR_SOCKETS
            ]
        );
        assert!(msg.windows(6).any(|w| w == b"vol-1\0"));
        assert_eq!(rig.kernel_io()[..512], [0xaa; 512]);
        dev.detach().unwrap();
    }

    #[test]
    fn a_paused_device_answers_what_it_read_and_the_next_server_reads_on() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        let mut dev =
            KernelDevice::connect(rig.server.clone(), "vol-1", &rig.opts, rig.transport()).unwrap();
        let kernel = rig.sim.lock().unwrap().held[0].try_clone().unwrap();
        request(&kernel, cmd::WRITE, 0, &[0x11; 512], 0);
        let mut sockets = dev.pause().unwrap();
        assert_eq!(sockets.len(), 1);
        // Sent while nobody reads: it waits in the socket, whole, for the next server.
        let sent = std::thread::spawn(move || request(&kernel, cmd::READ, 0, &[], 512));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!sent.is_finished(), "a paused device answered");
        // Another server (here: the same process again) reads it where the first stopped.
        let s = sockets.pop().unwrap();
        let next = KernelDevice::adopt(
            rig.server.clone(),
            5,
            "vol-1",
            vec![s],
            &rig.opts,
            rig.transport(),
        )
        .unwrap();
        assert_eq!(sent.join().unwrap(), [0x11; 512]);
        assert!(matches!(
            KernelDevice::adopt(
                rig.server.clone(),
                5,
                "vol-2",
                Vec::new(),
                &rig.opts,
                rig.transport()
            ),
            Err(Error::Attach { .. })
        ));
        drop(dev);
        next.detach().unwrap();
    }

    #[test]
    fn reconnect_fails_when_the_kernel_keeps_live_sockets() {
        let rig = Rig::new();
        rig.set_backend("vol-1");
        // RECONFIGURE "succeeds" but the kernel drops the socket (no dead one to replace).
        let e = KernelDevice::reconnect(rig.server.clone(), 5, "vol-1", &rig.opts, rig.transport())
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not take"), "{e}");
    }

    #[test]
    fn reconnect_checks_the_backend_before_touching_the_device() {
        let rig = Rig::new();
        rig.set_backend("vol-2");
        let e = KernelDevice::reconnect(rig.server.clone(), 5, "vol-1", &rig.opts, rig.transport())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vol-2"), "{e}");
        assert!(rig.sim.lock().unwrap().sent.is_empty());
        std::fs::remove_file(rig.opts.sysfs.join("block/nbd5/backend")).unwrap();
        let e = KernelDevice::reconnect(rig.server.clone(), 5, "vol-1", &rig.opts, rig.transport())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no backend identifier"), "{e}");
    }

    /// An nbd device driven by ioctls: SET_SOCK takes a reference, DO_IT blocks until
    /// DISCONNECT, which sends NBD_CMD_DISC like the driver.
    #[derive(Default)]
    struct IoctlSim {
        calls: Mutex<Vec<(u32, u64)>>,
        held: Mutex<Vec<UnixStream>>,
        disconnected: Mutex<bool>,
        cv: Condvar,
    }

    impl Ioctl for IoctlSim {
        fn ioctl(&self, request: u32, arg: u64) -> io::Result<()> {
            self.calls.lock().unwrap().push((request, arg));
            match request {
                req::SET_SOCK => self.held.lock().unwrap().push(take(arg as RawFd)),
                req::DO_IT => {
                    let mut d = self.disconnected.lock().unwrap();
                    while !*d {
                        d = self.cv.wait(d).unwrap();
                    }
                }
                req::DISCONNECT => {
                    for s in self.held.lock().unwrap().drain(..) {
                        send_disc(&s);
                    }
                    *self.disconnected.lock().unwrap() = true;
                    self.cv.notify_all();
                }
                _ => {}
            }
            Ok(())
        }
    }

    #[test]
    fn the_ioctl_path_configures_runs_and_disconnects_in_order() {
        let rig = Rig::new();
        let sim = Arc::new(IoctlSim::default());
        let dev = KernelDevice::start_ioctl(
            rig.server.clone(),
            &rig.opts,
            sim.clone(),
            rig.opts.dev.join("nbd5"),
        )
        .unwrap();
        assert_eq!(dev.index(), 5);
        while !sim
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|&(r, _)| r == req::DO_IT)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let sock = sim.held.lock().unwrap()[0].try_clone().unwrap();
        rig.sim.lock().unwrap().held.push(sock);
        assert_eq!(rig.kernel_io()[..512], [0xaa; 512]);
        dev.detach().unwrap();
        let calls = sim.calls.lock().unwrap();
        let kinds: Vec<u32> = calls.iter().map(|&(r, _)| r).collect();
        assert_eq!(
            kinds,
            [
                req::SET_BLKSIZE,
                req::SET_SIZE,
                req::SET_TIMEOUT,
                req::SET_FLAGS,
                req::SET_SOCK,
                req::DO_IT,
                req::DISCONNECT,
                req::CLEAR_SOCK
            ]
        );
        assert_eq!(calls[0].1, 4096);
        assert_eq!(calls[1].1, 1 << 20);
    }
}
