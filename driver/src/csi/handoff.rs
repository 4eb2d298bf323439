//! Planned restarts without a pause: a new plugin process takes the kernel nbd devices over
//! from the running one, sockets and all, instead of waiting for them to die.
//!
//! The running process listens on `STATE/handoff.sock` once it has loaded. A new process,
//! before it loads the state directory, connects there and asks for everything:
//!
//! 1. `Hello` (new → old). The old process stops taking RPCs (they get UNAVAILABLE) and waits
//!    for the ones running and any flatten to end, so nothing changes the state directory
//!    under the new process; then it says `Quiet`.
//! 2. The new process loads the state directory (the volumes' I/O goes on meanwhile) and
//!    says `Ready`.
//! 3. The old process pauses every kernel nbd device: each connection answers the requests
//!    it has read and stops reading at a request boundary (the kernel queues what it sends
//!    meanwhile), and each head image is flushed and closed. `Offer` lists the devices, and
//!    one `Sockets` message per device carries its sockets (`SCM_RIGHTS`).
//! 4. The new process opens the heads and serves the sockets it was given; it answers
//!    `Accept`, or `Refuse` after letting go of all of them.
//! 5. On `Accept` the old process closes its copies, answers `Done`, stops its gRPC server
//!    and waits for SIGTERM; on `Refuse` or a broken connection it reopens the heads and
//!    serves the devices again.
//!
//! A pod's I/O waits only for steps 3 and 4: the pause, the closes and the opens. Devices that
//! cannot move (nbdfuse, ioctls) stay with the old process until it exits.

use qcow2_engine::sync::Recover;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use super::Plugin;
use super::staged::Staged;
use crate::error::{Error, Result};

/// The socket's name in the state directory.
pub const SOCKET: &str = "handoff.sock";
/// How long the old process waits for running operations (and flattens) to end.
const QUIESCE_LIMIT: Duration = Duration::from_secs(60);
/// How long either side waits for the other's next message.
const REPLY_LIMIT: Duration = Duration::from_secs(120);
/// The largest message (a list of volumes).
const MAX_MESSAGE: usize = 16 << 20;

/// The messages, one JSON object each behind a 4-byte big-endian length.
#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Hello {
        pid: u32,
    },
    /// Nothing changes the state directory any more.
    Quiet,
    /// The new process loaded it and asks for the devices.
    Ready,
    Offer {
        volumes: Vec<Offered>,
    },
    /// The sockets of one offered volume ride on this message.
    Sockets {
        volume: String,
    },
    /// The old process cannot hand over now.
    Busy {
        why: String,
    },
    Accept,
    Refuse {
        why: String,
    },
    Done,
}

/// A device on offer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offered {
    volume: String,
    index: u32,
    sockets: usize,
}

/// A device taken over: its kernel index and its sockets, paused at a request boundary.
#[derive(Debug)]
pub struct Incoming {
    pub index: u32,
    pub sockets: Vec<UnixStream>,
}

/// A handover under way on the new process's side.
#[derive(Debug)]
pub struct Taking {
    conn: UnixStream,
    /// The devices offered, by volume id; recovery takes them out as it adopts them.
    pub volumes: HashMap<String, Incoming>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

fn send(conn: &UnixStream, msg: &Msg, fds: &[OwnedFd]) -> Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| Error::Internal(e.to_string()))?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(Error::Internal(
            "too many descriptors for one message".into(),
        ));
    }
    let sent = rustix::net::sendmsg(
        conn,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| Error::io("handover: sending", e.into()))?;
    // The descriptors went with the first bytes; the rest is plain data.
    let mut w = conn;
    w.write_all(&frame[sent..])?;
    Ok(())
}

/// The next message and the descriptors that came with it.
fn recv(conn: &UnixStream) -> Result<(Msg, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < 4 {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(64))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = rustix::net::recvmsg(
            conn,
            &mut [IoSliceMut::new(&mut len[got..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| Error::io("handover: receiving", e.into()))?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = m {
                fds.extend(passed);
            }
        }
        if r.bytes == 0 {
            return Err(Error::Internal(
                "handover: the other process hung up".into(),
            ));
        }
        got += r.bytes;
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(Error::Internal(format!("handover: a {n}-byte message")));
    }
    let mut body = vec![0u8; n];
    let mut r = conn;
    r.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body)
        .map_err(|e| Error::Internal(format!("handover: a malformed message: {e}")))?;
    Ok((msg, fds))
}

/// New process: asks a running plugin for its devices. `None` when no plugin listens (the
/// usual start); an error when one answered but could not hand over.
pub fn request(state_dir: &Path) -> Result<Option<Taking>> {
    let path = socket_path(state_dir);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        // No socket, or a stale one: nobody serves these volumes now.
        Err(_) => return Ok(None),
    };
    conn.set_read_timeout(Some(REPLY_LIMIT))?;
    tracing::info!(socket = %path.display(), "a running plugin serves this state directory: taking its volumes over");
    send(
        &conn,
        &Msg::Hello {
            pid: std::process::id(),
        },
        &[],
    )?;
    match recv(&conn)?.0 {
        Msg::Quiet => {}
        Msg::Busy { why } => {
            return Err(Error::Unavailable(format!(
                "the running plugin cannot hand over now: {why}"
            )));
        }
        other => return Err(Error::Internal(format!("handover: unexpected {other:?}"))),
    }
    Ok(Some(Taking {
        conn,
        volumes: HashMap::new(),
    }))
}

impl Taking {
    /// Asks for the devices (the state directory is loaded): the old process pauses them
    /// and passes them on, into [`Taking::volumes`].
    pub fn ready(&mut self) -> Result<()> {
        send(&self.conn, &Msg::Ready, &[])?;
        let offered = match recv(&self.conn)?.0 {
            Msg::Offer { volumes } => volumes,
            Msg::Busy { why } => {
                return Err(Error::Unavailable(format!(
                    "the running plugin cannot hand over now: {why}"
                )));
            }
            other => return Err(Error::Internal(format!("handover: unexpected {other:?}"))),
        };
        for o in offered {
            let (msg, fds) = recv(&self.conn)?;
            match msg {
                Msg::Sockets { volume } if volume == o.volume && fds.len() == o.sockets => {}
                other => {
                    return Err(Error::Internal(format!(
                        "handover: expected {} sockets of {}, got {other:?} with {}",
                        o.sockets,
                        o.volume,
                        fds.len()
                    )));
                }
            }
            self.volumes.insert(
                o.volume,
                Incoming {
                    index: o.index,
                    sockets: fds.into_iter().map(UnixStream::from).collect(),
                },
            );
        }
        Ok(())
    }

    /// Tells the old process the devices are ours now; waits for it to let go.
    pub fn accept(self) -> Result<()> {
        send(&self.conn, &Msg::Accept, &[])?;
        self.conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        match recv(&self.conn) {
            Ok((Msg::Done, _)) => Ok(()),
            Ok((other, _)) => Err(Error::Internal(format!("handover: unexpected {other:?}"))),
            // It got the answer and then went away: the devices are ours all the same.
            Err(e) => {
                tracing::warn!(error = %e, "the previous plugin did not confirm the handover");
                Ok(())
            }
        }
    }

    /// Tells the old process to serve its devices again (we let go of all of them).
    pub fn refuse(self, why: &str) {
        if let Err(e) = send(&self.conn, &Msg::Refuse { why: why.into() }, &[]) {
            tracing::warn!(error = %e, "telling the previous plugin the handover failed");
        }
    }
}

/// Binds the handover socket (replacing a stale one; never another kind of file).
fn bind(path: &Path) -> Result<UnixListener> {
    super::serve::remove_stale_socket(path)?;
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Old process: listens for a successor until one takes the volumes over; then tells the
/// plugin ([`Handoff::wait`]). A handover that did not happen takes operations again.
pub fn listen(plugin: Arc<Plugin>) -> Result<()> {
    let path = socket_path(&plugin.config.state_dir);
    let listener = bind(&path)?;
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let given = give(&plugin, &conn);
                if matches!(given, Ok(true)) {
                    plugin.handoff.finish();
                    return;
                }
                plugin.handoff.handing.store(false, Ordering::SeqCst);
                if let Err(e) = given {
                    tracing::warn!(error = %e, "a handover failed; serving on");
                }
            }
        })
        .map_err(|e| Error::io("spawning the handover thread", e))?;
    Ok(())
}

/// A device paused for the handover.
struct Paused {
    staged: Arc<Staged>,
    index: u32,
    sockets: Vec<UnixStream>,
}

/// Serves one successor's request; true when it took everything. It leaves operations
/// refused ([`Handoff::handing`]); [`listen`] takes them again when this is not true.
fn give(plugin: &Arc<Plugin>, conn: &UnixStream) -> Result<bool> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let pid = match recv(conn)?.0 {
        Msg::Hello { pid } => pid,
        other => return Err(Error::Internal(format!("handover: unexpected {other:?}"))),
    };
    tracing::info!(successor = pid, "a new plugin process asks for the volumes");
    if let Err(why) = quiesce(plugin) {
        send(conn, &Msg::Busy { why: why.clone() }, &[])?;
        return Err(Error::Unavailable(why));
    }
    // The successor loads the state directory while the volumes' I/O goes on here.
    let loaded = send(conn, &Msg::Quiet, &[]).and_then(|()| {
        conn.set_read_timeout(Some(REPLY_LIMIT))?;
        recv(conn)
    });
    match loaded {
        Ok((Msg::Ready, _)) => {}
        other => {
            return Err(Error::Internal(format!(
                "handover: the successor did not get ready: {other:?}"
            )));
        }
    }
    let started = Instant::now();
    let paused = match pause_all(plugin) {
        Ok(p) => p,
        Err(e) => {
            send(conn, &Msg::Busy { why: e.to_string() }, &[])?;
            return Err(e);
        }
    };
    let offered: Vec<Offered> = paused
        .iter()
        .map(|p| Offered {
            volume: p.staged.volume_id.clone(),
            index: p.index,
            sockets: p.sockets.len(),
        })
        .collect();
    let exchanged = (|| {
        send(conn, &Msg::Offer { volumes: offered }, &[])?;
        for p in &paused {
            let fds: Vec<OwnedFd> = p
                .sockets
                .iter()
                .map(|s| s.try_clone().map(OwnedFd::from))
                .collect::<std::io::Result<_>>()?;
            send(
                conn,
                &Msg::Sockets {
                    volume: p.staged.volume_id.clone(),
                },
                &fds,
            )?;
        }
        conn.set_read_timeout(Some(REPLY_LIMIT))?;
        recv(conn).map(|(m, _)| m)
    })();
    match exchanged {
        Ok(Msg::Accept) => {
            let ids: Vec<String> = paused.iter().map(|p| p.staged.volume_id.clone()).collect();
            {
                let mut map = plugin.node.map();
                for id in &ids {
                    map.remove(id);
                }
            }
            // Our copies of the sockets close here; the successor holds its own.
            drop(paused);
            let _ = send(conn, &Msg::Done, &[]);
            tracing::info!(
                successor = pid,
                volumes = ids.len(),
                paused_ms = started.elapsed().as_millis() as u64,
                "handed the volumes over"
            );
            Ok(true)
        }
        other => {
            let why = match other {
                Ok(Msg::Refuse { why }) => why,
                Ok(m) => format!("unexpected {m:?}"),
                Err(e) => e.to_string(),
            };
            tracing::warn!(successor = pid, reason = %why, "the handover did not happen; serving the volumes again");
            resume_all(plugin, paused);
            Ok(false)
        }
    }
}

/// Stops taking operations and waits for the running ones and any flatten to end.
fn quiesce(plugin: &Plugin) -> std::result::Result<(), String> {
    plugin.handoff.handing.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + QUIESCE_LIMIT;
    while plugin.operations() > 0 || plugin.flattening() > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} operations and {} flattens still running after {QUIESCE_LIMIT:?}",
                plugin.operations(),
                plugin.flattening()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Pauses every kernel netlink device and closes its head; on an error, resumes the ones
/// already paused.
fn pause_all(plugin: &Plugin) -> Result<Vec<Paused>> {
    let staged: Vec<Arc<Staged>> = plugin.node.map().values().cloned().collect();
    let mut paused = Vec::new();
    for s in staged {
        let mut attached = s.attached.lock().recover();
        let (Some(a), Some(image)) = (attached.as_mut(), &s.image) else {
            continue;
        };
        let Some(index) = a.reattach_index() else {
            tracing::warn!(volume = %s.volume_id, "its device cannot be handed over; it ends with this process");
            continue;
        };
        // Writes held by a full disk fail now: the pause waits for every request read.
        image.end_pauses();
        let sockets = match a.pause() {
            Ok(sockets) => sockets,
            Err(e) => {
                drop(attached);
                resume_all(plugin, paused);
                return Err(e);
            }
        };
        if let Err(e) = image.close() {
            a.resume(sockets);
            drop(attached);
            resume_all(plugin, paused);
            return Err(e);
        }
        drop(attached);
        paused.push(Paused {
            staged: s,
            index,
            sockets,
        });
    }
    Ok(paused)
}

/// Reopens the heads of `paused` and serves their devices again.
fn resume_all(plugin: &Plugin, paused: Vec<Paused>) {
    for p in paused {
        let s = &p.staged;
        let reopened = (|| {
            let rec = plugin.volume_record(&s.volume_id)?;
            let st = plugin.state()?;
            let opts = super::staged::head_options(st.layers_dir(), &s.cap, s.passphrase.clone());
            s.image
                .as_ref()
                .expect("paused volumes have an image")
                .reopen_at(&st.layer_path(&rec.head), &opts)
        })();
        if let Err(e) = &reopened {
            tracing::error!(volume = %s.volume_id, error = %e, "reopening the head after a failed handover: its I/O fails");
        }
        if let Some(a) = s.attached.lock().recover().as_mut() {
            a.resume(p.sockets);
        }
    }
}

/// The handover's state in a plugin process.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Set while a successor is being served: operations are refused.
    pub handing: std::sync::atomic::AtomicBool,
    /// Set once a successor took the volumes over.
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Handoff {
    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Whether a successor took the volumes over.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Resolves once a successor took the volumes over.
    pub async fn wait(&self) {
        while !self.is_done() {
            self.notify.notified().await;
        }
    }
}
