//! A simulated kernel nbd driver for tests: answers the netlink conversation as the driver
//! does and takes references to the sockets it is handed, so tests can do the kernel's I/O.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::netlink::{Message, Transport, attrs, nbd};
use crate::nbd::proto::{Request, cmd};

pub const FAMILY: u16 = 0x1c;

/// What the simulated kernel holds and was sent.
#[derive(Default)]
pub struct Sim {
    /// Its references to the sockets it was handed.
    pub held: Vec<UnixStream>,
    pub sent: Vec<Vec<u8>>,
    /// Whether RECONFIGURE finds dead sockets to replace.
    pub take_on_reconfigure: bool,
    pub refuse_connect: bool,
}

/// Duplicates a descriptor of the caller, as the kernel's `sockfd_lookup` takes a
/// reference of its own.
#[allow(unsafe_code)] // borrowing a descriptor by number, as the kernel does
pub fn take(fd: RawFd) -> UnixStream {
    // SAFETY: the descriptor is open for the duration of the call (the message naming
    // it is being sent by the code under test, which still owns it).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    UnixStream::from(rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap())
}

fn socket_fds(body: &[u8]) -> Vec<RawFd> {
    let Some((_, socks)) = attrs(body).find(|&(k, _)| k == nbd::ATTR_SOCKETS) else {
        return vec![];
    };
    attrs(socks)
        .filter_map(|(_, item)| attrs(item).find(|&(k, _)| k == nbd::SOCK_FD))
        .map(|(_, p)| u32::from_ne_bytes(p.try_into().unwrap()) as RawFd)
        .collect()
}

fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&36u32.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&errno.to_ne_bytes());
    m.extend_from_slice(&[0; 16]);
    m
}

/// A netlink transport answering like the nbd driver would.
pub struct FakeKernel {
    pub sim: Arc<Mutex<Sim>>,
    pub replies: VecDeque<Vec<u8>>,
}

impl Transport for FakeKernel {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let mut sim = self.sim.lock().unwrap();
        sim.sent.push(msg.to_vec());
        let family = u16::from_ne_bytes([msg[4], msg[5]]);
        let seq = u32::from_ne_bytes(msg[8..12].try_into().unwrap());
        let (command, body) = (msg[16], &msg[20..]);
        let mut out = Vec::new();
        if family == 0x10 {
            let mut m = Message::new(0x10, seq, 1, 1);
            m.u32(1, u32::from(FAMILY)); // FAMILY_ID (u16, padded)
            out.extend(m.finish());
            out.extend(ack(seq, 0));
        } else {
            match command {
                nbd::CMD_CONNECT if sim.refuse_connect => out.extend(ack(seq, -libc::EINVAL)),
                nbd::CMD_CONNECT => {
                    for fd in socket_fds(body) {
                        sim.held.push(take(fd));
                    }
                    let mut m = Message::new(FAMILY, seq, nbd::CMD_CONNECT, 1);
                    m.u32(nbd::ATTR_INDEX, 5);
                    out.extend(m.finish());
                    out.extend(ack(seq, 0));
                }
                nbd::CMD_RECONFIGURE => {
                    if sim.take_on_reconfigure {
                        for fd in socket_fds(body) {
                            sim.held.push(take(fd));
                        }
                    }
                    out.extend(ack(seq, 0));
                }
                nbd::CMD_DISCONNECT => {
                    // The driver sends NBD_CMD_DISC on every socket and shuts them down.
                    for s in sim.held.drain(..) {
                        send_disc(&s);
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                    out.extend(ack(seq, 0));
                }
                _ => out.extend(ack(seq, -libc::EOPNOTSUPP)),
            }
        }
        self.replies.push_back(out);
        Ok(())
    }
    fn recv(&mut self) -> io::Result<Vec<u8>> {
        Ok(self.replies.pop_front().unwrap_or_default())
    }
}

impl FakeKernel {
    /// A netlink conversation with the simulated kernel `sim`.
    pub fn door(sim: &Arc<Mutex<Sim>>) -> super::NetlinkDoor {
        let sim = sim.clone();
        Arc::new(move || {
            Ok(Box::new(FakeKernel {
                sim: sim.clone(),
                replies: VecDeque::new(),
            }) as super::BoxTransport)
        })
    }
}

/// The kernel's side of an NBD request on `sock` (simple replies, as the driver gets):
/// sends `kind` at `offset` with `data` (WRITE) or for `len` bytes, and returns the data read.
/// Panics on an error reply.
pub fn request(sock: &UnixStream, kind: u16, offset: u64, data: &[u8], len: u32) -> Vec<u8> {
    use std::io::Read;
    let mut sock = sock;
    let length = if kind == cmd::WRITE {
        data.len() as u32
    } else {
        len
    };
    let req = Request {
        flags: 0,
        kind,
        cookie: u64::from(kind) << 32 | offset,
        offset,
        length,
    };
    sock.write_all(&req.encode()).unwrap();
    if kind == cmd::WRITE {
        sock.write_all(data).unwrap();
    }
    let mut reply = [0u8; 16];
    sock.read_exact(&mut reply).unwrap();
    assert_eq!(
        reply,
        crate::nbd::proto::simple_reply(req.cookie, 0),
        "reply to {kind}"
    );
    let mut out = vec![0u8; if kind == cmd::READ { len as usize } else { 0 }];
    sock.read_exact(&mut out).unwrap();
    out
}

/// Sends `NBD_CMD_DISC` on `s`, as the driver does on each socket at a disconnect.
pub fn send_disc(s: &UnixStream) {
    let disc = Request {
        flags: 0,
        kind: cmd::DISC,
        cookie: 0,
        offset: 0,
        length: 0,
    };
    let _ = (&*s).write_all(&disc.encode());
}
