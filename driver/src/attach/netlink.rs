//! The kernel nbd driver's generic netlink family `"nbd"`: the messages we send (CONNECT,
//! DISCONNECT, RECONFIGURE, STATUS, and the controller's GETFAMILY to learn the family id)
//! and the replies we read. Layouts are the kernel's (`include/uapi/linux/netlink.h`,
//! `genetlink.h`, `nbd-netlink.h`): headers in host byte order, attributes padded to 4 bytes.
//!
//! Everything goes through a [`Transport`], so the exact bytes are unit-tested without the
//! nbd module (which this project's CI kernel lacks).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Error, Result};

/// `NLMSG_ERROR`: an error or, with errno 0, the acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a multi-part reply.
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// `NLA_F_NESTED`: the attribute holds attributes.
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// The generic netlink controller.
mod ctrl {
    pub const ID: u16 = 0x10;
    pub const CMD_GETFAMILY: u8 = 3;
    pub const VERSION: u8 = 1;
    pub const ATTR_FAMILY_ID: u16 = 1;
    pub const ATTR_FAMILY_NAME: u16 = 2;
}

/// The nbd family's commands and attributes (`nbd-netlink.h`).
pub mod nbd {
    pub const FAMILY: &str = "nbd";
    pub const VERSION: u8 = 1;

    pub const CMD_CONNECT: u8 = 1;
    pub const CMD_DISCONNECT: u8 = 2;
    pub const CMD_RECONFIGURE: u8 = 3;
    pub const CMD_STATUS: u8 = 5;

    pub const ATTR_INDEX: u16 = 1;
    pub const ATTR_SIZE_BYTES: u16 = 2;
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    pub const ATTR_TIMEOUT: u16 = 4;
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    pub const ATTR_SOCKETS: u16 = 7;
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    pub const ATTR_DEVICE_LIST: u16 = 9;
    pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;

    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
    pub const DEVICE_ITEM: u16 = 1;
    pub const DEVICE_INDEX: u16 = 1;
    pub const DEVICE_CONNECTED: u16 = 2;

    /// Free the device when it is disconnected (dynamic devices do not pile up).
    pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
}

/// A netlink message under construction: header, generic netlink header, attributes.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Message {
    /// A request of `family` running `cmd`, asking for an acknowledgement.
    pub fn new(family: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self {
            buf,
            open: Vec::new(),
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + payload.len()).expect("attributes are small");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string (`NLA_STRING` / `NLA_NUL_STRING`).
    pub fn string(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut z = Vec::with_capacity(s.len() + 1);
        z.extend_from_slice(s.as_bytes());
        z.push(0);
        self.attr(kind, &z)
    }

    /// Opens a nested attribute; close it with [`Message::end`].
    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("end() matches a begin()");
        let len = u16::try_from(self.buf.len() - start).expect("attributes are small");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished bytes, length patched in.
    pub fn finish(&mut self) -> Vec<u8> {
        assert!(self.open.is_empty(), "unclosed nested attribute");
        let len = u32::try_from(self.buf.len()).expect("messages are small");
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

/// The attributes in `buf`: (type without flags, payload). Stops at the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|&(k, _)| k == kind).map(|(_, p)| p)
}

fn as_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

fn as_u16(p: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
}

/// Moves datagrams to and from the kernel.
pub trait Transport {
    fn send(&mut self, msg: &[u8]) -> io::Result<()>;
    /// One datagram (possibly several messages).
    fn recv(&mut self) -> io::Result<Vec<u8>>;
}

/// A `NETLINK_GENERIC` socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink};
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
        // A kernel that never answers must not hang the caller.
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(30)),
        )?;
        Ok(Socket { fd })
    }
}

impl Transport for Socket {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let dest = rustix::net::netlink::SocketAddrNetlink::new(0, 0);
        let n = rustix::net::sendto(&self.fd, msg, rustix::net::SendFlags::empty(), &dest)?;
        if n != msg.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 64 << 10];
        let (n, _) = rustix::net::recv(&self.fd, &mut buf, rustix::net::RecvFlags::empty())?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// The state of one nbd device as STATUS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

/// What CONNECT sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    pub size: u64,
    pub block_size: u64,
    /// Transmission flags (`HAS_FLAGS|SEND_FLUSH|...`), as an NBD server would advertise.
    pub server_flags: u64,
    pub client_flags: u64,
    /// Per-request I/O timeout in seconds; 0 = never abort a request.
    pub timeout_s: u64,
    /// How long I/O waits for a RECONFIGURE once the sockets are dead.
    pub dead_conn_timeout_s: u64,
    /// The volume id: shown in `/sys/block/nbdN/backend`, required by RECONFIGURE.
    pub backend: String,
}

/// A client of the nbd family over a transport.
pub struct Nbd<T: Transport> {
    transport: T,
    family: u16,
    seq: u32,
}

impl<T: Transport> std::fmt::Debug for Nbd<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nbd")
            .field("family", &self.family)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Nbd<T> {
    /// Resolves the family id; a kernel without the nbd module answers ENOENT.
    pub fn new(mut transport: T) -> Result<Self> {
        let mut msg = Message::new(ctrl::ID, 1, ctrl::CMD_GETFAMILY, ctrl::VERSION);
        msg.string(ctrl::ATTR_FAMILY_NAME, nbd::FAMILY);
        let replies =
            exchange(&mut transport, &msg.finish(), 1, ctrl::ID).map_err(|e| family_error(&e))?;
        let family = replies
            .iter()
            .find_map(|r| find(r, ctrl::ATTR_FAMILY_ID).and_then(as_u16))
            .ok_or_else(|| Error::attach("netlink GETFAMILY nbd", "no family id in the reply"))?;
        Ok(Self {
            transport,
            family,
            seq: 1,
        })
    }

    /// The transport (tests inspect what was sent).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn run(&mut self, step: &str, msg: &mut Message, seq: u32) -> Result<Vec<Vec<u8>>> {
        exchange(&mut self.transport, &msg.finish(), seq, self.family)
            .map_err(|e| Error::attach(step, explain(step, &e)))
    }

    /// CONNECT on a device the kernel picks (or creates); returns its index. `sockets` are
    /// the kernel's ends (the kernel takes its own reference; close ours afterwards).
    pub fn connect(&mut self, cfg: &ConnectConfig, sockets: &[RawFd]) -> Result<u32> {
        let seq = self.next_seq();
        let mut msg = Message::new(self.family, seq, nbd::CMD_CONNECT, nbd::VERSION);
        // No INDEX: the kernel chooses a free device (0xffffffff would be refused).
        msg.u64(nbd::ATTR_SIZE_BYTES, cfg.size)
            .u64(nbd::ATTR_BLOCK_SIZE_BYTES, cfg.block_size)
            .u64(nbd::ATTR_SERVER_FLAGS, cfg.server_flags)
            .u64(nbd::ATTR_CLIENT_FLAGS, cfg.client_flags)
            .u64(nbd::ATTR_TIMEOUT, cfg.timeout_s)
            .u64(nbd::ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout_s)
            .string(nbd::ATTR_BACKEND_IDENTIFIER, &cfg.backend);
        put_sockets(&mut msg, sockets);
        let replies = self.run("netlink CONNECT", &mut msg, seq)?;
        replies
            .iter()
            .find_map(|r| find(r, nbd::ATTR_INDEX).and_then(as_u32))
            .ok_or_else(|| Error::attach("netlink CONNECT", "the reply carries no device index"))
    }

    /// RECONFIGURE a running device with fresh sockets (after a restart). The kernel checks
    /// `backend` against the one given at CONNECT, so a recycled index is never taken over.
    pub fn reconfigure(
        &mut self,
        index: u32,
        backend: &str,
        timeout_s: u64,
        dead_conn_timeout_s: u64,
        sockets: &[RawFd],
    ) -> Result<()> {
        let seq = self.next_seq();
        let mut msg = Message::new(self.family, seq, nbd::CMD_RECONFIGURE, nbd::VERSION);
        msg.u32(nbd::ATTR_INDEX, index)
            .string(nbd::ATTR_BACKEND_IDENTIFIER, backend)
            .u64(nbd::ATTR_TIMEOUT, timeout_s)
            .u64(nbd::ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_s);
        put_sockets(&mut msg, sockets);
        self.run("netlink RECONFIGURE", &mut msg, seq).map(drop)
    }

    /// RECONFIGURE a running device's size (online growth). The backend identifier must match.
    pub fn resize(&mut self, index: u32, backend: &str, size: u64) -> Result<()> {
        let seq = self.next_seq();
        let mut msg = Message::new(self.family, seq, nbd::CMD_RECONFIGURE, nbd::VERSION);
        msg.u32(nbd::ATTR_INDEX, index)
            .string(nbd::ATTR_BACKEND_IDENTIFIER, backend)
            .u64(nbd::ATTR_SIZE_BYTES, size);
        self.run("netlink RECONFIGURE (size)", &mut msg, seq)
            .map(drop)
    }

    /// DISCONNECT a device. The kernel checks no ownership: callers check the backend first.
    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        let seq = self.next_seq();
        let mut msg = Message::new(self.family, seq, nbd::CMD_DISCONNECT, nbd::VERSION);
        msg.u32(nbd::ATTR_INDEX, index);
        self.run("netlink DISCONNECT", &mut msg, seq).map(drop)
    }

    /// STATUS of one device, or of all when `index` is `None`.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>> {
        let seq = self.next_seq();
        let mut msg = Message::new(self.family, seq, nbd::CMD_STATUS, nbd::VERSION);
        if let Some(i) = index {
            msg.u32(nbd::ATTR_INDEX, i);
        }
        let replies = self.run("netlink STATUS", &mut msg, seq)?;
        let mut out = Vec::new();
        for r in &replies {
            let Some(list) = find(r, nbd::ATTR_DEVICE_LIST) else {
                continue;
            };
            for (kind, item) in attrs(list) {
                if kind != nbd::DEVICE_ITEM {
                    continue;
                }
                let index = find(item, nbd::DEVICE_INDEX).and_then(as_u32);
                let connected = find(item, nbd::DEVICE_CONNECTED).and_then(|p| p.first());
                if let (Some(index), Some(&c)) = (index, connected) {
                    out.push(DeviceStatus {
                        index,
                        connected: c != 0,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn put_sockets(msg: &mut Message, sockets: &[RawFd]) {
    msg.begin(nbd::ATTR_SOCKETS);
    for &fd in sockets {
        let fd = u32::try_from(fd).expect("descriptors are not negative");
        msg.begin(nbd::SOCK_ITEM).u32(nbd::SOCK_FD, fd).end();
    }
    msg.end();
}

/// Sends `msg` and reads until its acknowledgement: the attribute payloads of the replies of
/// `family` with sequence `seq`, or the kernel's error.
fn exchange<T: Transport>(
    t: &mut T,
    msg: &[u8],
    seq: u32,
    family: u16,
) -> io::Result<Vec<Vec<u8>>> {
    t.send(msg)?;
    let mut replies = Vec::new();
    loop {
        let datagram = t.recv()?;
        if datagram.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink socket closed",
            ));
        }
        let mut rest = &datagram[..];
        while rest.len() >= NLMSG_HDRLEN {
            let len = as_u32(rest).unwrap_or(0) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed netlink reply",
                ));
            }
            let kind = as_u16(&rest[4..]).unwrap_or(0);
            let their_seq = as_u32(&rest[8..]).unwrap_or(0);
            let body = &rest[NLMSG_HDRLEN..len];
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            if their_seq != seq {
                continue; // a stale reply to an earlier request
            }
            match kind {
                NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                    return if errno == 0 {
                        Ok(replies)
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                NLMSG_DONE => return Ok(replies),
                k if k == family && body.len() >= GENL_HDRLEN => {
                    replies.push(body[GENL_HDRLEN..].to_vec());
                }
                _ => {}
            }
        }
    }
}

fn family_error(e: &io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOENT) {
        Error::attach(
            "netlink family nbd",
            "not found: the nbd kernel module is not loaded (modprobe nbd nbds_max=0)",
        )
    } else {
        Error::attach("netlink family nbd", e.to_string())
    }
}

/// The kernel reports most refusals as EINVAL with the reason only in its log.
fn explain(step: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!("{e} (needs CAP_SYS_ADMIN)"),
        Some(libc::EINVAL) if step.contains("RECONFIGURE") => format!(
            "{e}: no such running device, or its backend identifier differs (see the kernel log)"
        ),
        Some(libc::EINVAL) => format!("{e} (the kernel log says why)"),
        _ => e.to_string(),
    }
}

/// The descriptor numbers of `fds` (what SOCK_FD carries).
pub fn raw_fds(fds: &[OwnedFd]) -> Vec<RawFd> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Records what is sent and answers with canned datagrams.
    #[derive(Default)]
    struct Fake {
        sent: Vec<Vec<u8>>,
        replies: VecDeque<Vec<u8>>,
    }

    impl Transport for Fake {
        fn send(&mut self, msg: &[u8]) -> io::Result<()> {
            self.sent.push(msg.to_vec());
            Ok(())
        }
        fn recv(&mut self) -> io::Result<Vec<u8>> {
            self.replies
                .pop_front()
                .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "no reply queued"))
        }
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_le_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_le_bytes());
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&errno.to_le_bytes());
        m.extend_from_slice(&[0; 16]); // the request's header, echoed
        m
    }

    fn reply(family: u16, seq: u32, build: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new(family, seq, 0, 1);
        build(&mut m);
        let mut b = m.finish();
        b[6..8].copy_from_slice(&0u16.to_le_bytes()); // replies carry no request flags
        b
    }

    /// A client whose family resolved to 0x1c.
    fn client(extra: Vec<Vec<u8>>) -> Nbd<Fake> {
        let mut fake = Fake::default();
        let mut both = reply(ctrl::ID, 1, |m| {
            m.attr(ctrl::ATTR_FAMILY_ID, &0x1cu16.to_le_bytes());
        });
        both.extend(ack(1, 0));
        fake.replies.push_back(both);
        fake.replies.extend(extra);
        Nbd::new(fake).unwrap()
    }

    #[rustfmt::skip]
    #[test]
    fn getfamily_asks_the_controller_for_nbd() {
        let nbd = client(vec![]);
        assert_eq!(nbd.family, 0x1c);
        assert_eq!(nbd.transport.sent[0], [
            28, 0, 0, 0,  0x10, 0,  5, 0,  1, 0, 0, 0,  0, 0, 0, 0, // len, GENL_ID_CTRL, REQUEST|ACK, seq 1, port 0
            3, 1, 0, 0,                                             // CTRL_CMD_GETFAMILY, version 1
            8, 0, 2, 0,  b'n', b'b', b'd', 0,                       // FAMILY_NAME "nbd\0"
        ]);
    }

    #[test]
    fn a_missing_family_says_to_load_the_module() {
        let mut fake = Fake::default();
        fake.replies.push_back(ack(1, -libc::ENOENT));
        let e = Nbd::new(fake).unwrap_err().to_string();
        assert!(e.contains("modprobe nbd"), "{e}");
    }

    #[rustfmt::skip]
    #[test]
    fn connect_sends_every_setting_and_no_index() {
        let mut answer = reply(0x1c, 2, |m| { m.u32(nbd::ATTR_INDEX, 7); });
        answer.extend(ack(2, 0));
        let mut nbd = client(vec![answer]);
        let cfg = ConnectConfig {
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x12d,
            client_flags: nbd::CFLAG_DESTROY_ON_DISCONNECT,
            timeout_s: 0,
            dead_conn_timeout_s: 300,
            backend: "pvc-1".into(),
        };
        assert_eq!(nbd.connect(&cfg, &[5, 6]).unwrap(), 7);
        let expected: Vec<u8> = [
            &[132u8, 0, 0, 0,  0x1c, 0,  5, 0,  2, 0, 0, 0,  0, 0, 0, 0][..], // header, seq 2
            &[1, 1, 0, 0],                                                   // CONNECT, version 1
            &[12, 0, 2, 0,  0, 0, 0, 0x40, 0, 0, 0, 0],                      // SIZE_BYTES 1 GiB
            &[12, 0, 3, 0,  0, 0x10, 0, 0, 0, 0, 0, 0],                      // BLOCK_SIZE_BYTES 4096
            &[12, 0, 5, 0,  0x2d, 0x01, 0, 0, 0, 0, 0, 0],                   // SERVER_FLAGS
            &[12, 0, 6, 0,  1, 0, 0, 0, 0, 0, 0, 0],                         // CLIENT_FLAGS destroy
            &[12, 0, 4, 0,  0, 0, 0, 0, 0, 0, 0, 0],                         // TIMEOUT 0
            &[12, 0, 8, 0,  0x2c, 0x01, 0, 0, 0, 0, 0, 0],                   // DEAD_CONN_TIMEOUT 300
            &[10, 0, 10, 0,  b'p', b'v', b'c', b'-', b'1', 0, 0, 0],         // BACKEND "pvc-1\0" + pad
            &[28, 0, 7, 0x80],                                               // SOCKETS (nested)
            &[12, 0, 1, 0x80,  8, 0, 1, 0,  5, 0, 0, 0],                     //   ITEM { FD 5 }
            &[12, 0, 1, 0x80,  8, 0, 1, 0,  6, 0, 0, 0],                     //   ITEM { FD 6 }
        ].concat();
        assert_eq!(nbd.transport.sent[1], expected);
    }

    #[rustfmt::skip]
    #[test]
    fn reconfigure_names_the_device_and_its_backend() {
        let mut nbd = client(vec![ack(2, 0)]);
        nbd.reconfigure(3, "vol", 0, 300, &[9]).unwrap();
        let expected: Vec<u8> = [
            &[76u8, 0, 0, 0,  0x1c, 0,  5, 0,  2, 0, 0, 0,  0, 0, 0, 0][..],
            &[3, 1, 0, 0],                                                   // RECONFIGURE
            &[8, 0, 1, 0,  3, 0, 0, 0],                                      // INDEX 3
            &[8, 0, 10, 0,  b'v', b'o', b'l', 0],                            // BACKEND "vol\0"
            &[12, 0, 4, 0,  0, 0, 0, 0, 0, 0, 0, 0],                         // TIMEOUT 0
            &[12, 0, 8, 0,  0x2c, 0x01, 0, 0, 0, 0, 0, 0],                   // DEAD_CONN_TIMEOUT 300
            &[16, 0, 7, 0x80,  12, 0, 1, 0x80,  8, 0, 1, 0,  9, 0, 0, 0],    // SOCKETS { ITEM { FD 9 } }
        ].concat();
        assert_eq!(nbd.transport.sent[1], expected);
    }

    #[rustfmt::skip]
    #[test]
    fn resize_reconfigures_the_size_of_the_named_device() {
        let mut nbd = client(vec![ack(2, 0)]);
        nbd.resize(3, "vol", 2 << 30).unwrap();
        let expected: Vec<u8> = [
            &[48u8, 0, 0, 0,  0x1c, 0,  5, 0,  2, 0, 0, 0,  0, 0, 0, 0][..],
            &[3, 1, 0, 0],                                                   // RECONFIGURE
            &[8, 0, 1, 0,  3, 0, 0, 0],                                      // INDEX 3
            &[8, 0, 10, 0,  b'v', b'o', b'l', 0],                            // BACKEND "vol\0"
            &[12, 0, 2, 0,  0, 0, 0, 0x80, 0, 0, 0, 0],                      // SIZE_BYTES 2 GiB
        ].concat();
        assert_eq!(nbd.transport.sent[1], expected);
    }

    #[test]
    fn a_refused_reconfigure_explains_the_backend_check() {
        let mut nbd = client(vec![ack(2, -libc::EINVAL)]);
        let e = nbd.reconfigure(3, "other", 0, 300, &[9]).unwrap_err();
        assert!(e.to_string().contains("backend identifier differs"), "{e}");
    }

    #[rustfmt::skip]
    #[test]
    fn disconnect_and_status_messages() {
        let mut status = reply(0x1c, 3, |m| {
            m.begin(nbd::ATTR_DEVICE_LIST);
            m.begin(nbd::DEVICE_ITEM).u32(nbd::DEVICE_INDEX, 0).attr(nbd::DEVICE_CONNECTED, &[1]).end();
            m.begin(nbd::DEVICE_ITEM).u32(nbd::DEVICE_INDEX, 4).attr(nbd::DEVICE_CONNECTED, &[0]).end();
            m.end();
        });
        status.extend(ack(3, 0));
        let mut nbd = client(vec![ack(2, 0), status]);
        nbd.disconnect(4).unwrap();
        assert_eq!(nbd.transport.sent[1], [
            28, 0, 0, 0,  0x1c, 0,  5, 0,  2, 0, 0, 0,  0, 0, 0, 0,
            2, 1, 0, 0,                                                      // DISCONNECT
            8, 0, 1, 0,  4, 0, 0, 0,                                         // INDEX 4
        ]);
        let devices = nbd.status(None).unwrap();
        assert_eq!(nbd.transport.sent[2], [
            20, 0, 0, 0,  0x1c, 0,  5, 0,  3, 0, 0, 0,  0, 0, 0, 0,
            5, 1, 0, 0,                                                      // STATUS, all devices
        ]);
        assert_eq!(devices, [
            DeviceStatus { index: 0, connected: true },
            DeviceStatus { index: 4, connected: false },
        ]);
    }

    #[test]
    fn replies_to_other_requests_are_skipped_and_garbage_is_an_error() {
        let mut stale = ack(1, -libc::EBUSY); // an old sequence number
        stale.extend(ack(2, 0));
        let garbage = vec![40, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]; // claims 40 bytes
        let mut nbd = client(vec![stale, garbage]);
        nbd.disconnect(1).unwrap();
        assert!(nbd.disconnect(1).is_err()); // a truncated datagram
    }

    /// The real kernel's controller parses our GETFAMILY: a malformed request would get
    /// EINVAL, a well-formed one the family, or ENOENT without the nbd module.
    #[test]
    fn the_running_kernel_understands_getfamily() {
        let socket = Socket::open().expect("a NETLINK_GENERIC socket");
        let module = std::path::Path::new("/sys/module/nbd").exists();
        match Nbd::new(socket) {
            Ok(nbd) => assert!(module && nbd.family >= 0x10, "family {}", nbd.family),
            Err(e) => {
                assert!(!module, "{e}");
                assert!(e.to_string().contains("not loaded"), "{e}");
            }
        }
    }

    #[test]
    fn attribute_parsing_stops_at_malformed_lengths() {
        let bad = [8u8, 0, 1, 0, 1, 2, 3, 4, 200, 0, 2, 0, 0, 0, 0, 0];
        let got: Vec<_> = attrs(&bad).collect();
        assert_eq!(got, [(1, &[1u8, 2, 3, 4][..])]);
        assert_eq!(attrs(&[3, 0, 1, 0]).count(), 0);
    }
}
