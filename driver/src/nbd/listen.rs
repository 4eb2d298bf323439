//! Listening for NBD clients: a unix socket or a TCP address, a cap on clients connected at
//! once, and an orderly stop (stop accepting, let every connection finish the request it is
//! serving, return once all are gone so that dropping the server closes the image cleanly).
//! A client that does not let its connection finish (it stops reading our replies) is cut
//! off after [`ServeOptions::drain`].

use qcow2_engine::sync::Recover;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::server::Server;
use crate::error::{Error, Result};

/// Where clients connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port; see [`Listener::local`]).
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// How the accept loop behaves.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Clients connected at once; a further client waits in the listen backlog until one
    /// leaves (as with qemu-nbd `--shared`).
    pub shared: usize,
    /// Keep serving after the last client leaves; otherwise stop then (qemu-nbd's default).
    pub persistent: bool,
    /// At stop, how long connections get to answer what they have read before they are
    /// shut both ways (a reply blocked on a client that no longer reads then fails).
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            shared: 16,
            persistent: true,
            drain: Duration::from_secs(5),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
    local: Endpoint,
}

#[derive(Debug)]
enum Inner {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// An accepted connection.
#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Listener {
    /// Binds `endpoint`. A unix socket path that holds a stale socket is replaced; any other
    /// file there is an error (never deleted).
    pub fn bind(endpoint: &Endpoint) -> Result<Listener> {
        let ctx = |e: io::Error| Error::io(format!("listening on {endpoint}"), e);
        match endpoint {
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(ctx)?;
                Ok(Listener {
                    inner: Inner::Unix(l),
                    local: endpoint.clone(),
                })
            }
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(ctx)?;
                let local = Endpoint::Tcp(l.local_addr().map_err(ctx)?);
                Ok(Listener {
                    inner: Inner::Tcp(l),
                    local,
                })
            }
        }
    }

    /// Where the listener is bound (a TCP port 0 resolved to the real port).
    pub fn local(&self) -> &Endpoint {
        &self.local
    }

    fn accept(&self) -> io::Result<Conn> {
        match &self.inner {
            Inner::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Inner::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are written whole; Nagle would only hold small ones back.
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
        }
    }

    /// Unblocks a pending `accept` with a throwaway connection.
    fn wake(&self) {
        match &self.local {
            Endpoint::Unix(p) => {
                let _ = UnixStream::connect(p);
            }
            Endpoint::Tcp(addr) => {
                let mut to = *addr;
                if to.ip().is_unspecified() {
                    to.set_ip(match to {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                let _ = TcpStream::connect_timeout(&to, Duration::from_secs(1));
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Endpoint::Unix(p) = &self.local {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing the stale socket {}", path.display()), e)),
        Ok(_) => Err(Error::attach(
            format!("listening on {}", path.display()),
            "the path exists and is not a socket",
        )),
        Err(_) => Ok(()),
    }
}

/// Open connections and the stop flag, shared by the accept loop, the connection threads
/// and [`Stopper`].
#[derive(Debug, Default)]
struct State {
    /// A second handle of each open connection, to shut its read side at stop. A connection
    /// removes its entry when it ends, so its socket closes at once.
    open: Mutex<HashMap<u64, Conn>>,
    /// Signalled when a connection ends or a stop is asked for.
    changed: Condvar,
    stop: AtomicBool,
}

/// Asks a running [`Serving::run`] to stop; cheap to clone, callable from any thread.
#[derive(Debug, Clone)]
pub struct Stopper {
    state: Arc<State>,
    listener: Arc<Listener>,
}

impl Stopper {
    /// Stops accepting; [`Serving::run`] then drains the open connections and returns.
    pub fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.changed.notify_all();
        self.listener.wake();
    }
}

/// A listener being served: hand out [`Stopper`]s before calling [`Serving::run`].
#[derive(Debug)]
pub struct Serving {
    state: Arc<State>,
    listener: Arc<Listener>,
    server: Arc<Server>,
    options: ServeOptions,
}

impl Serving {
    pub fn new(listener: Listener, server: Arc<Server>, options: ServeOptions) -> Self {
        Self {
            state: Arc::default(),
            listener: Arc::new(listener),
            server,
            options,
        }
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            state: self.state.clone(),
            listener: self.listener.clone(),
        }
    }

    /// Accepts and serves clients, one thread each, until stopped (or, without `persistent`,
    /// until the last client has left); then shuts the read side of every open connection,
    /// waits up to [`ServeOptions::drain`] for them to finish what they were serving, shuts
    /// what is left both ways, and returns the number of connections served. The server is
    /// dropped here when nothing else holds it.
    pub fn run(self) -> Result<u64> {
        let Serving {
            state,
            listener,
            server,
            options,
        } = self;
        let stopper = Stopper {
            state: state.clone(),
            listener: listener.clone(),
        };
        let shared = options.shared.max(1);
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let mut served = 0u64;
        loop {
            {
                let mut open = state.open.lock().recover();
                while open.len() >= shared && !state.stop.load(Ordering::SeqCst) {
                    open = state.changed.wait(open).recover();
                }
            }
            if state.stop.load(Ordering::SeqCst) {
                break;
            }
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("qcow2-csi: accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if state.stop.load(Ordering::SeqCst) {
                break; // the wake-up connection, or a client that came too late
            }
            let id = served;
            served += 1;
            let Ok(handle) = conn.try_clone() else {
                continue; // out of descriptors: the client sees the connection close
            };
            state.open.lock().recover().insert(id, handle);
            let (server, state, stopper) = (server.clone(), state.clone(), stopper.clone());
            let persistent = options.persistent;
            threads.push(std::thread::spawn(move || {
                let result = match conn {
                    Conn::Unix(s) => server.serve(s),
                    Conn::Tcp(s) => server.serve(s),
                };
                if let Err(e) = result {
                    eprintln!("qcow2-csi: connection ended: {e}");
                }
                let mut open = state.open.lock().recover();
                open.remove(&id);
                let last = open.is_empty();
                drop(open);
                state.changed.notify_all();
                if last && !persistent {
                    stopper.stop();
                }
            }));
            threads.retain(|t| !t.is_finished());
        }
        let mut open = state.open.lock().recover();
        if !open.is_empty() {
            eprintln!("qcow2-csi: stopping: draining {} connections", open.len());
        }
        for c in open.values() {
            c.shutdown(Shutdown::Read);
        }
        let until = Instant::now() + options.drain;
        while !open.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                eprintln!(
                    "qcow2-csi: stopping: {} connections did not drain in {:?}: cut off",
                    open.len(),
                    options.drain
                );
                for c in open.values() {
                    c.shutdown(Shutdown::Both);
                }
                break;
            }
            open = state.changed.wait_timeout(open, left).recover().0;
        }
        drop(open);
        for t in threads {
            let _ = t.join();
        }
        drop(server);
        Ok(served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::device::Memory;
    use crate::nbd::server::tests::{quick_handshake, send_unread_reads};
    use crate::nbd::server::{Export, Limits};

    #[test]
    fn a_stop_cuts_off_a_client_that_no_longer_reads_after_the_drain_time() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("nbd.sock"));
        let listener = Listener::bind(&endpoint).unwrap();
        let server = Arc::new(Server::new(
            vec![Export::new("", Arc::new(Memory::new(64 << 20)))],
            Limits::default(), // no idle limit: only the drain can end this client
        ));
        let options = ServeOptions {
            drain: Duration::from_millis(300),
            ..ServeOptions::default()
        };
        let serving = Serving::new(listener, server, options);
        let stopper = serving.stopper();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(serving.run());
        });
        let Endpoint::Unix(path) = &endpoint else {
            unreachable!()
        };
        let mut client = UnixStream::connect(path).unwrap();
        quick_handshake(&mut client);
        send_unread_reads(&mut client).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        stopper.stop();
        let served = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stop waits forever on a client that does not read");
        assert_eq!(served.unwrap(), 1);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(client);
    }
}
