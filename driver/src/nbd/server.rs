//! The NBD server: fixed-newstyle handshake and the transmission phase, for any
//! [`BlockDevice`].
//!
//! Bounded everywhere: option data (64 KiB), options per connection (256), request payloads
//! (32 MiB), the handshake's whole duration, a client's silence ([`Limits::idle_timeout`]),
//! and block-status replies ([`MAX_STATUS_EXTENTS`], counted in the byte budget). A malformed request gets the spec's error and the
//! stream stays in sync (a WRITE's payload is always consumed); only what cannot be answered
//! without losing sync (a bad magic, an oversized WRITE payload, an unknown export named by
//! `EXPORT_NAME`) closes the connection.
//!
//! Each connection has a reader (the thread that called [`Server::serve`]) and a pool of
//! workers: requests run concurrently, up to [`Limits::requests_in_flight`] and
//! [`Limits::bytes_in_flight`], and are answered as they complete. Connections share one
//! device per export, so `CAN_MULTI_CONN` holds: a FLUSH on any connection is an
//! `fdatasync` of the one image everybody writes to, covering every write already answered.

use qcow2_engine::sync::Recover;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::device::{BlockDevice, DeviceError};
use super::proto::{
    self, IHAVEOPT, InfoRequest, MetaContextRequest, NBDMAGIC, REQUEST_LEN, Request, cmd, cmd_flag,
    context, errno, flag, handshake, info, opt, rep, reply,
};
use super::qos::{Direction, Qos};
use crate::error::Error;
use crate::metrics::io::{IoStats, Op, Started};

/// A worker's read scratch buffer above this is not kept for the next request (32 workers
/// per connection: keeping large ones would pin memory per volume).
const SCRATCH_KEEP: usize = 256 << 10;
/// Read buffer for incoming requests.
const REQUEST_BUFFER: usize = 64 << 10;
/// Largest READ the connection's reader answers itself when it is the only request in
/// flight (see [`Server::read_requests`]).
const INLINE_READ: u32 = 256 << 10;
/// Largest WRITE handed to a worker together with others.
const BATCH_WRITE: u32 = 64 << 10;
/// Most WRITEs handed to one worker as one batch.
const MAX_WRITE_BATCH: usize = 16;
/// Most READs handed to one worker as one batch.
const MAX_READ_BATCH: usize = 32;
/// Longest sleep of a reader waiting for its QoS turn before it checks for a stop.
const QOS_SLICE: Duration = Duration::from_millis(50);
/// How often an idle kernel connection that may be paused looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Most extents one BLOCK_STATUS reply describes, per metadata context. A reply may cover
/// less than was asked (the client asks again from where it ends), so a fragmented image
/// costs round trips, never an unbounded reply: at most 512 KiB per context.
pub const MAX_STATUS_EXTENTS: usize = 64 << 10;

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest READ/WRITE payload (the spec's recommended floor for "not a denial of service").
    pub max_payload: u32,
    /// Largest option data.
    pub max_option_len: u32,
    /// Options accepted before transmission.
    pub max_options: u32,
    /// Time allowed for the whole handshake, however slowly the client trickles it.
    pub handshake_timeout: Duration,
    /// After the handshake, a client is disconnected when it has sent nothing for this long
    /// with none of its requests in flight, stalls this long inside a request, or leaves a
    /// reply unread this long. `None` for connections that may rightly idle for hours (the
    /// plugin's own nbdfuse and kernel connections).
    pub idle_timeout: Option<Duration>,
    /// Requests of one connection executing at once.
    pub requests_in_flight: usize,
    /// Payload and read-buffer bytes of one connection in flight.
    pub bytes_in_flight: u64,
    /// Put every serving thread in the `PR_SET_IO_FLUSHER` state (needs `CAP_SYS_RESOURCE`):
    /// when the kernel's nbd client on this host writes back dirty pages through us, memory
    /// reclaim must not wait on I/O that only we can complete.
    pub io_flusher: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            max_option_len: 64 << 10,
            max_options: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            requests_in_flight: 32,
            bytes_in_flight: 64 << 20,
            io_flusher: false,
        }
    }
}

/// One named export.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub device: Arc<dyn BlockDevice>,
    /// What TRIM and hole-punching zero writes do.
    pub discard: Discard,
    /// Where its requests are counted (metrics), if anywhere.
    pub stats: Option<Arc<IoStats>>,
    /// Its QoS limits, shared by every connection to it and changeable while it is served.
    pub qos: Option<Arc<Qos>>,
}

impl Export {
    /// An export of `device` named `name` that passes discards through.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            description: None,
            device,
            discard: Discard::Unmap,
            stats: None,
            qos: None,
        }
    }
}

/// What a client's discard requests do to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// TRIM frees the range, and WRITE_ZEROES without `NO_HOLE` may too (thin volumes stay thin).
    #[default]
    Unmap,
    /// TRIM succeeds and changes nothing; WRITE_ZEROES always keeps the range allocated
    /// (qemu-nbd's default, for images that must stay fully allocated).
    Ignore,
}

/// A connected stream the server can talk over.
pub trait Socket: Read + Write + Send + Sized {
    /// Bounds every read, or not.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Bounds every write, or not.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// A second handle on the same connection (replies are written through it).
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts both directions: every handle's blocked read or write returns at once.
    fn shutdown(&self);
}

impl Socket for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Socket for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
    fn shutdown(&self) {
        let _ = std::net::TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// A socket whose reads and writes must all be done by one instant: the handshake's
/// deadline holds for the whole exchange, not for each read.
struct Deadlined<'a, S: Socket> {
    s: &'a mut S,
    until: Instant,
}

impl<S: Socket> Deadlined<'_, S> {
    /// Time left, or `TimedOut` once there is none.
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake ran out of time",
            ));
        }
        Ok(left)
    }
}

impl<S: Socket> Read for Deadlined<'_, S> {
    /// A socket timeout (`EAGAIN`) is retried with what is left, so the deadline's own
    /// `TimedOut` is what ends the handshake, however the timer and the clock fall.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.s.set_read_timeout(Some(self.left()?))?;
            match self.s.read(buf) {
                Err(e) if idle(&e) => {}
                r => return r,
            }
        }
    }
}

impl<S: Socket> Write for Deadlined<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.s.set_write_timeout(Some(self.left()?))?;
            match self.s.write(buf) {
                Err(e) if idle(&e) => {}
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// The server: exports and limits; serve each accepted connection with [`Server::serve`].
#[derive(Debug, Clone)]
pub struct Server {
    exports: Vec<Export>,
    limits: Limits,
}

/// What the handshake ended with.
enum Negotiated {
    Transmission {
        export: usize,
        structured: bool,
        /// Selected metadata context ids.
        contexts: Vec<u32>,
    },
    Closed,
}

/// The contexts a LIST (wildcards allowed, nothing = everything) or SET query names, in the
/// order first named; unknown namespaces and names are ignored, as the spec asks.
fn match_contexts(queries: &[String], list: bool) -> Vec<(u32, &'static str)> {
    let all = [
        (context::BASE_ALLOCATION_ID, context::BASE_ALLOCATION),
        (context::ALLOCATION_DEPTH_ID, context::ALLOCATION_DEPTH),
    ];
    if list && queries.is_empty() {
        return all.to_vec();
    }
    let mut out = Vec::new();
    for q in queries {
        for (id, name) in all {
            let namespace = &name[..=name.find(':').expect("names have a namespace")];
            let hit = q == name || (list && q == namespace);
            if hit && !out.iter().any(|&(i, _)| i == id) {
                out.push((id, name));
            }
        }
    }
    out
}

impl Server {
    pub fn new(exports: Vec<Export>, limits: Limits) -> Self {
        Self { exports, limits }
    }

    fn find(&self, name: &str) -> Option<usize> {
        // The empty name is the default export: the first one.
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Transmission flags of an export.
    pub fn transmission_flags(&self, export: usize) -> u16 {
        let mut f = flag::HAS_FLAGS
            | flag::SEND_FLUSH
            | flag::SEND_FUA
            | flag::SEND_DF
            | flag::SEND_CACHE
            | flag::CAN_MULTI_CONN;
        if self.exports[export].device.read_only() {
            f |= flag::READ_ONLY;
        } else {
            f |= flag::SEND_TRIM | flag::SEND_WRITE_ZEROES | flag::SEND_FAST_ZERO;
        }
        f
    }

    /// Marks the calling thread as an I/O flusher if the limits ask for it. Without the
    /// capability the call fails; the server then runs as before, and says so once.
    fn io_flusher(&self) {
        if self.limits.io_flusher
            && let Err(e) = rustix::process::configure_io_flusher_behavior(true)
        {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("qcow2-csi: PR_SET_IO_FLUSHER refused: {e}"));
        }
    }

    /// Serves one connection to its end. `Ok` when the client disconnected (cleanly or not).
    pub fn serve<S: Socket>(&self, mut s: S) -> Result<(), Error> {
        self.io_flusher();
        let until = Instant::now() + self.limits.handshake_timeout;
        let negotiated = self.handshake(&mut Deadlined { s: &mut s, until })?;
        // Reads wake up often enough to notice an idle client; a reply the client leaves
        // unread fails its write after the idle limit.
        s.set_read_timeout(self.limits.idle_timeout.map(idle_poll))?;
        s.set_write_timeout(self.limits.idle_timeout)?;
        match negotiated {
            Negotiated::Closed => Ok(()),
            Negotiated::Transmission {
                export,
                structured,
                contexts,
            } => {
                let idle = self.limits.idle_timeout;
                self.transmission(&mut s, export, structured, &contexts, None, idle)
                    .map(drop)
            }
        }
    }

    /// Serves our end of a socket pair handed to the kernel's nbd driver: no handshake (the
    /// driver was told size and flags over netlink or ioctl), simple replies only.
    ///
    /// With `stop`, the connection can be paused for a handover to another process: once
    /// `stop` is set, the requests already read (in part or whole) are read to their end,
    /// executed and answered, nothing further is read, and this returns
    /// [`Ended::Stopped`] with the socket at a request boundary, so another server can go on
    /// reading it where this one left off. The kernel meanwhile queues what it sends.
    pub fn serve_kernel<S: Socket>(
        &self,
        s: &mut S,
        export: usize,
        stop: Option<&AtomicBool>,
    ) -> Result<Ended, Error> {
        if export >= self.exports.len() {
            return Err(Error::Protocol(format!("no export #{export}")));
        }
        self.io_flusher();
        if stop.is_some() {
            // A reader idle between requests looks at `stop` this often.
            s.set_read_timeout(Some(STOP_POLL))?;
        }
        // The kernel may rightly send nothing for hours: no idle limit.
        self.transmission(s, export, false, &[], stop, None)
    }

    /// The exports, in the order given.
    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn handshake<S: Read + Write>(&self, s: &mut S) -> Result<Negotiated, Error> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
        s.write_all(&hello)?;
        let client = read_u32(s)?;
        let known = u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
        if client & !known != 0 {
            return Err(Error::Protocol(format!("unknown client flags {client:#x}")));
        }
        let no_zeroes = client & u32::from(handshake::NO_ZEROES) != 0;
        let mut structured = false;
        // Contexts chosen by SET_META_CONTEXT, and for which export name.
        let mut selected: Option<(String, Vec<u32>)> = None;
        let contexts_for = |selected: &Option<(String, Vec<u32>)>, export: usize| match selected {
            Some((name, ids)) if self.find(name) == Some(export) => ids.clone(),
            _ => Vec::new(),
        };
        for _ in 0..self.limits.max_options {
            let mut head = [0u8; 16];
            s.read_exact(&mut head)?;
            if proto::be64(&head[0..8]) != IHAVEOPT {
                return Err(Error::Protocol("option without IHAVEOPT".into()));
            }
            let option = proto::be32(&head[8..12]);
            let len = proto::be32(&head[12..16]);
            if len > self.limits.max_option_len {
                return Err(Error::Protocol(format!(
                    "option {option} carries {len} bytes"
                )));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    // No way to report an error here: an unknown export closes the connection.
                    let Some(export) = self.find(&name) else {
                        return Err(Error::Protocol(format!("unknown export {name:?}")));
                    };
                    let mut r = Vec::with_capacity(134);
                    r.extend_from_slice(&self.exports[export].device.size().to_be_bytes());
                    r.extend_from_slice(&self.transmission_flags(export).to_be_bytes());
                    if !no_zeroes {
                        r.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&r)?;
                    return Ok(Negotiated::Transmission {
                        export,
                        structured,
                        contexts: contexts_for(&selected, export),
                    });
                }
                opt::ABORT => {
                    // The client may already be gone: its leaving is the point.
                    let _ = s.write_all(&proto::option_reply(option, rep::ACK, 0));
                    return Ok(Negotiated::Closed);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        error_reply(s, option, rep::ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    for e in &self.exports {
                        let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(e.name.as_bytes());
                        send_option(s, option, rep::SERVER, &d)?;
                    }
                    send_option(s, option, rep::ACK, &[])?;
                }
                opt::STARTTLS => {
                    error_reply(s, option, rep::ERR_UNSUP, "TLS is not offered")?;
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        error_reply(
                            s,
                            option,
                            rep::ERR_INVALID,
                            "STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    structured = true;
                    send_option(s, option, rep::ACK, &[])?;
                }
                opt::INFO | opt::GO => {
                    let Some(req) = InfoRequest::decode(&data) else {
                        error_reply(s, option, rep::ERR_INVALID, "malformed INFO/GO data")?;
                        continue;
                    };
                    let Some(export) = self.find(&req.name) else {
                        let msg = format!("no export named {:?}", req.name);
                        error_reply(s, option, rep::ERR_UNKNOWN, &msg)?;
                        continue;
                    };
                    self.send_info(s, option, export, &req)?;
                    send_option(s, option, rep::ACK, &[])?;
                    if option == opt::GO {
                        return Ok(Negotiated::Transmission {
                            export,
                            structured,
                            contexts: contexts_for(&selected, export),
                        });
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    if !structured {
                        let msg = "metadata contexts need structured replies first";
                        error_reply(s, option, rep::ERR_INVALID, msg)?;
                        continue;
                    }
                    let Some(req) = MetaContextRequest::decode(&data) else {
                        error_reply(s, option, rep::ERR_INVALID, "malformed context query")?;
                        continue;
                    };
                    if self.find(&req.name).is_none() {
                        let msg = format!("no export named {:?}", req.name);
                        error_reply(s, option, rep::ERR_UNKNOWN, &msg)?;
                        continue;
                    }
                    let list = option == opt::LIST_META_CONTEXT;
                    let matched = match_contexts(&req.queries, list);
                    for &(id, name) in &matched {
                        let mut d = id.to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        send_option(s, option, rep::META_CONTEXT, &d)?;
                    }
                    if !list {
                        selected = Some((req.name, matched.iter().map(|&(id, _)| id).collect()));
                    }
                    send_option(s, option, rep::ACK, &[])?;
                }
                _ => {
                    let msg = format!("option {option} is not supported");
                    error_reply(s, option, rep::ERR_UNSUP, &msg)?;
                }
            }
        }
        Err(Error::Protocol(format!(
            "more than {} options",
            self.limits.max_options
        )))
    }

    fn send_info<S: Write>(
        &self,
        s: &mut S,
        option: u32,
        export: usize,
        req: &InfoRequest,
    ) -> io::Result<()> {
        let e = &self.exports[export];
        // NBD_INFO_EXPORT always, even unrequested: QEMU's client depends on it.
        let mut d = info::EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&e.device.size().to_be_bytes());
        d.extend_from_slice(&self.transmission_flags(export).to_be_bytes());
        send_option(s, option, rep::INFO, &d)?;
        if req.requests.contains(&info::NAME) {
            let mut d = info::NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            send_option(s, option, rep::INFO, &d)?;
        }
        if let Some(desc) = &e.description
            && req.requests.contains(&info::DESCRIPTION)
        {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            send_option(s, option, rep::INFO, &d)?;
        }
        // Any offset and length work (minimum 1); 4 KiB is what the engine prefers.
        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&4096u32.to_be_bytes());
        d.extend_from_slice(&self.limits.max_payload.to_be_bytes());
        send_option(s, option, rep::INFO, &d)
    }

    fn transmission<S: Socket>(
        &self,
        s: &mut S,
        export: usize,
        structured: bool,
        contexts: &[u32],
        stop: Option<&AtomicBool>,
        idle: Option<Duration>,
    ) -> Result<Ended, Error> {
        let exp = &self.exports[export];
        let conn = Conn {
            export: exp,
            structured,
            contexts,
            writer: Mutex::new(s.try_clone()?),
            broken: AtomicBool::new(false),
            budget: Budget::new(self.limits.bytes_in_flight),
            stats: exp.stats.as_deref(),
            spare: Spare::default(),
        };
        let workers = self.limits.requests_in_flight.max(1);
        // Requests run on a pool of workers and are answered as they complete (replies may
        // overtake each other, as the spec allows); a reply is written whole under the writer
        // lock. The queue and the byte budget bound what is in flight.
        let (jobs, work) = crossbeam_channel::bounded::<Work>(workers);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    self.io_flusher();
                    // A READ's reply is built in place here; kept between requests unless a
                    // large read grew it.
                    let mut scratch = Vec::new();
                    while let Ok(work) = work.recv() {
                        match work {
                            Work::One(job) => self.answer(&conn, job, &mut scratch),
                            Work::Reads(batch) => self.answer_reads(&conn, batch, &mut scratch),
                            Work::Writes(batch) => {
                                for job in batch {
                                    self.answer(&conn, job, &mut scratch);
                                }
                            }
                        }
                    }
                });
            }
            let patience = Patience {
                limit: idle,
                budget: &conn.budget,
            };
            let result = self.read_requests(&mut *s, &conn, &jobs, stop, patience);
            drop(jobs); // the workers finish what is queued, reply, and stop
            result
        })
    }

    /// Runs one request and writes its reply (on the connection's writer, whole). `scratch`
    /// is the calling thread's buffer for READ replies.
    fn answer<S: Socket>(&self, conn: &Conn<'_, S>, job: Job, scratch: &mut Vec<u8>) {
        let Job {
            req,
            payload,
            started,
        } = job;
        let (exp, structured) = (conn.export, conn.structured);
        let dev = &*exp.device;
        let counted = |ok: bool| {
            if let (Some(stats), Some(t)) = (conn.stats, started) {
                stats.finished(t, Op::of_command(req.kind), req.length, ok);
            }
        };
        let charge = conn.charge(&req);
        if conn.broken.load(Ordering::Acquire) {
            counted(false);
            conn.budget.release(charge);
            return;
        }
        if scratch.capacity() > SCRATCH_KEEP {
            *scratch = Vec::new();
        }
        let mut out = Vec::new();
        let mut window = None;
        // Whether the device did what was asked (the reply is no error).
        let mut done = true;
        let reply = match self.check(dev, &req, structured, conn.contexts) {
            Err(e) => {
                done = false;
                reply_error(&mut out, &req, structured, &e)
            }
            Ok(()) if req.kind == cmd::READ => {
                let (range, ok) = read_reply(dev, &req, structured, scratch);
                (window, done) = (Some(range), ok);
                Ok(())
            }
            Ok(()) if req.kind == cmd::BLOCK_STATUS => {
                block_status(&mut out, dev, &req, conn.contexts).map(|ok| done = ok)
            }
            Ok(()) => self
                .execute(&mut out, exp, &req, payload.bytes(), structured)
                .map(|ok| done = ok),
        };
        conn.spare.put(payload);
        let bytes = match window {
            Some(range) => &scratch[range],
            None => &out[..],
        };
        let sent = conn.send(|w| reply.and_then(|()| w.write_all(bytes)));
        counted(done && sent.is_ok());
        conn.budget.release(charge);
    }

    /// Runs READs that arrived together as one batch (their host reads submitted at once,
    /// see [`BlockDevice::read_batch`]) and writes all their replies with one vectored write.
    /// Each reply is still whole and in the order read; a failed read gets its own error.
    fn answer_reads<S: Socket>(&self, conn: &Conn<'_, S>, batch: Vec<Job>, scratch: &mut Vec<u8>) {
        const ALIGN: usize = qcow2_engine::storage::DIRECT_ALIGN;
        let count = |job: &Job, ok: bool| {
            if let (Some(stats), Some(t)) = (conn.stats, job.started) {
                stats.finished(t, Op::Read, job.req.length, ok);
            }
            conn.budget.release(conn.charge(&job.req));
        };
        if conn.broken.load(Ordering::Acquire) {
            batch.iter().for_each(|job| count(job, false));
            return;
        }
        let (dev, structured) = (&*conn.export.device, conn.structured);
        // Each valid read's data goes to a 4 KiB-aligned slot of the scratch buffer (no
        // bounce copy under O_DIRECT); `slot` is where, `failed` what went wrong instead.
        let mut failed: Vec<Option<DeviceError>> = batch
            .iter()
            .map(|job| self.check(dev, &job.req, structured, conn.contexts).err())
            .collect();
        let mut slot = Vec::with_capacity(batch.len());
        let mut end = 0;
        for (job, failed) in batch.iter().zip(&failed) {
            slot.push(end);
            if failed.is_none() {
                end += (job.req.length as usize).next_multiple_of(ALIGN);
            }
        }
        if scratch.capacity() > SCRATCH_KEEP.max(end + ALIGN) {
            *scratch = Vec::new();
        }
        if scratch.len() < end + ALIGN {
            *scratch = vec![0u8; end + ALIGN];
        }
        let base = scratch.as_ptr().align_offset(ALIGN);
        {
            let mut reads = Vec::with_capacity(batch.len());
            let mut which = Vec::with_capacity(batch.len());
            let mut rest: &mut [u8] = &mut scratch[base..base + end];
            for (i, job) in batch.iter().enumerate() {
                if failed[i].is_some() {
                    continue;
                }
                let len = job.req.length as usize;
                let (data, tail) =
                    std::mem::take(&mut rest).split_at_mut(len.next_multiple_of(ALIGN));
                rest = tail;
                reads.push((&mut data[..len], job.req.offset));
                which.push(i);
            }
            for (i, result) in which.into_iter().zip(dev.read_batch(&mut reads)) {
                failed[i] = result.err();
            }
        }
        // Reply heads (and whole error replies) in one buffer, then the iovecs.
        let mut heads = Vec::with_capacity(batch.len() * READ_HEAD_MAX);
        let mut parts = Vec::with_capacity(batch.len());
        for (job, failed) in batch.iter().zip(&failed) {
            let start = heads.len();
            match failed {
                Some(e) => {
                    reply_error(&mut heads, &job.req, structured, e)
                        .expect("writing to a Vec cannot fail");
                }
                None => {
                    let mut head = [0u8; READ_HEAD_MAX];
                    let n = read_head(&job.req, structured, &mut head);
                    heads.extend_from_slice(&head[..n]);
                }
            }
            parts.push(start..heads.len());
        }
        let mut iov = Vec::with_capacity(2 * batch.len());
        for (i, (job, failed)) in batch.iter().zip(&failed).enumerate() {
            iov.push(io::IoSlice::new(&heads[parts[i].clone()]));
            if failed.is_none() {
                let at = base + slot[i];
                iov.push(io::IoSlice::new(&scratch[at..at + job.req.length as usize]));
            }
        }
        let sent = conn.send(|w| write_all_vectored(w, &mut iov));
        for (job, failed) in batch.iter().zip(&failed) {
            count(job, failed.is_none() && sent.is_ok());
        }
    }

    /// The reading half of a connection: requests (and WRITE payloads) in, jobs out.
    /// Several requests pipelined by the client come in with one read; a large WRITE
    /// payload bypasses the buffer. Once `stop` is set, only what completes the request
    /// under way is read, so the stream is left at a request boundary.
    fn read_requests<R: Read, S: Socket>(
        &self,
        mut s: R,
        conn: &Conn<'_, S>,
        jobs: &crossbeam_channel::Sender<Work>,
        stop: Option<&AtomicBool>,
        patience: Patience<'_>,
    ) -> Result<Ended, Error> {
        let stopping = || stop.is_some_and(|f| f.load(Ordering::Acquire));
        let mut buf = RequestBuffer::new(REQUEST_BUFFER);
        // The reader's own buffer for the READs it answers itself.
        let mut scratch = Vec::new();
        loop {
            if buf.is_empty() && stopping() {
                return Ok(Ended::Stopped);
            }
            match buf.fill_to(&mut s, REQUEST_LEN, stopping, patience) {
                Ok(Fill::Ready) => {}
                Ok(Fill::Paused) => return Ok(Ended::Stopped),
                // The client went away between requests (or within a header: nothing of
                // that request had been acted on).
                Ok(Fill::Eof) => return Ok(Ended::Closed),
                Err(e) => return Err(e.into()),
            }
            let head: [u8; REQUEST_LEN] = buf.take(REQUEST_LEN).try_into().expect("28 bytes");
            let Some(req) = Request::decode(&head) else {
                return Err(Error::Protocol("request with a bad magic".into()));
            };
            if req.kind == cmd::DISC {
                return Ok(Ended::Closed); // outstanding requests finish before the close
            }
            let mut payload = Payload::default();
            if req.kind == cmd::WRITE && req.length > self.limits.max_payload {
                return Err(Error::Protocol(format!(
                    "WRITE of {} bytes exceeds the {}-byte limit",
                    req.length, self.limits.max_payload
                )));
            }
            // QoS: the reader waits out the request's turn before it takes it, so the
            // requests behind it wait in the socket, where the client sees the limit.
            let limited = conn.export.qos.as_deref().filter(|q| q.is_limited());
            if let Some(qos) = limited {
                let charged = match req.kind {
                    cmd::READ => Some((Direction::Read, req.length.into())),
                    cmd::WRITE => Some((Direction::Write, req.length.into())),
                    cmd::WRITE_ZEROES | cmd::TRIM => Some((Direction::Write, 0)),
                    _ => None,
                };
                let wait = charged.map_or(Duration::ZERO, |(dir, bytes)| {
                    qos.delay(dir, bytes, Instant::now())
                });
                // In slices: a stop (drain, hand-over) must not wait out a long debt. Then
                // the request runs at once, like every request already read.
                let start = Instant::now();
                let until = start + wait;
                while !stopping() {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(QOS_SLICE));
                }
                if let (Some(stats), false) = (&conn.export.stats, wait.is_zero()) {
                    let write = req.kind != cmd::READ;
                    stats.throttle(write, start.elapsed());
                }
            }
            let charge = conn.charge(&req);
            // A small READ that arrives alone, with nothing in flight and nothing behind it
            // in the buffer, is answered here: at queue depth 1 the hand-off to a worker and
            // back (two wake-ups) is most of a request's cost. Anything that may wait long
            // (writes can be paused by a full disk, flushes sync) still goes to a worker, so
            // the reader keeps reading.
            let inline = req.kind == cmd::READ
                && req.length <= INLINE_READ
                && buf.len() < REQUEST_LEN
                && conn.budget.is_idle();
            conn.budget.acquire(charge);
            if req.kind == cmd::WRITE {
                payload = conn.spare.take(req.length as usize);
                if let Err(e) = buf.read_into(&mut s, payload.bytes_mut(), patience) {
                    conn.budget.release(charge);
                    return Err(e.into());
                }
            }
            let job = Job {
                req,
                payload,
                started: conn.stats.map(IoStats::started),
            };
            if inline {
                self.answer(conn, job, &mut scratch);
                if conn.broken.load(Ordering::Acquire) {
                    return Err(Error::Protocol("the reply could not be sent".into()));
                }
            } else {
                // Small READs, or small WRITEs, that came in together go to one worker
                // (not under QoS: each request takes its turn above).
                let work = match req.kind {
                    _ if limited.is_some() => Work::One(job),
                    cmd::READ if req.length <= INLINE_READ => {
                        gather(conn, &mut buf, job, MAX_READ_BATCH, |next, _| {
                            next.kind == cmd::READ && next.length <= INLINE_READ
                        })
                    }
                    cmd::WRITE if req.length <= BATCH_WRITE => {
                        gather(conn, &mut buf, job, MAX_WRITE_BATCH, |next, buffered| {
                            // Only whole requests: the reader never waits for a batch.
                            next.kind == cmd::WRITE
                                && next.length <= BATCH_WRITE
                                && buffered >= next.length as usize
                        })
                    }
                    _ => Work::One(job),
                };
                if jobs.send(work).is_err() {
                    return Ok(Ended::Closed);
                }
            }
        }
    }

    /// Validates a request before it touches the device.
    fn check(
        &self,
        dev: &dyn BlockDevice,
        r: &Request,
        structured: bool,
        contexts: &[u32],
    ) -> Result<(), DeviceError> {
        let allowed = match r.kind {
            cmd::READ => cmd_flag::FUA | if structured { cmd_flag::DF } else { 0 },
            cmd::WRITE => cmd_flag::FUA,
            cmd::FLUSH | cmd::CACHE => cmd_flag::FUA,
            cmd::TRIM => cmd_flag::FUA,
            cmd::WRITE_ZEROES => cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
            cmd::BLOCK_STATUS if structured && !contexts.is_empty() => {
                if r.length == 0 {
                    return Err(DeviceError::new(errno::EINVAL, "block status of 0 bytes"));
                }
                cmd_flag::FUA | cmd_flag::REQ_ONE
            }
            cmd::BLOCK_STATUS => {
                return Err(DeviceError::new(
                    errno::EINVAL,
                    "block status needs structured replies and a metadata context",
                ));
            }
            other => {
                return Err(DeviceError::new(
                    errno::EINVAL,
                    format!("command {other} is not supported"),
                ));
            }
        };
        if r.flags & !allowed != 0 {
            return Err(DeviceError::new(
                errno::EINVAL,
                format!("flags {:#x} are not valid for command {}", r.flags, r.kind),
            ));
        }
        let writes = matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && dev.read_only() {
            return Err(DeviceError::new(errno::EPERM, "the export is read-only"));
        }
        if r.kind == cmd::FLUSH {
            return Ok(());
        }
        if r.kind == cmd::READ && r.length > self.limits.max_payload {
            return Err(DeviceError::new(
                errno::EINVAL,
                format!("READ of {} bytes exceeds the limit", r.length),
            ));
        }
        let in_range = r
            .offset
            .checked_add(u64::from(r.length))
            .is_some_and(|end| end <= dev.size());
        if !in_range {
            let e = if matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err(DeviceError::new(
                e,
                format!(
                    "{:#x}+{:#x} is beyond the end of the export ({:#x})",
                    r.offset,
                    r.length,
                    dev.size()
                ),
            ));
        }
        if r.kind == cmd::WRITE_ZEROES
            && r.flags & cmd_flag::FAST_ZERO != 0
            && !dev.zeroes_are_fast(r.offset, u64::from(r.length))
        {
            return Err(DeviceError::new(
                errno::ENOTSUP,
                "zeroing this range means writing zeros (not whole allocation units)",
            ));
        }
        Ok(())
    }

    fn execute<W: Write>(
        &self,
        s: &mut W,
        export: &Export,
        r: &Request,
        payload: &[u8],
        structured: bool,
    ) -> io::Result<bool> {
        let (dev, discard) = (&*export.device, export.discard);
        let fua = r.flags & cmd_flag::FUA != 0;
        let len = u64::from(r.length);
        let done = match r.kind {
            cmd::READ => unreachable!("READ is answered by read_reply"),
            cmd::WRITE => dev.write_at(payload, r.offset),
            cmd::FLUSH => dev.flush(),
            cmd::TRIM if discard == Discard::Ignore => Ok(()),
            cmd::TRIM => dev.trim(r.offset, len),
            cmd::WRITE_ZEROES => {
                let no_hole = r.flags & cmd_flag::NO_HOLE != 0 || discard == Discard::Ignore;
                dev.write_zeroes(r.offset, len, no_hole)
            }
            cmd::CACHE => Ok(()), // a hint; the engine has no read-ahead to prime
            _ => unreachable!("check() refuses other commands"),
        };
        let done = done.and_then(|()| {
            if fua && matches!(r.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
                dev.flush()
            } else {
                Ok(())
            }
        });
        match done {
            Ok(()) => s
                .write_all(&proto::simple_reply(r.cookie, 0))
                .map(|()| true),
            Err(e) => reply_error(s, r, structured, &e).map(|()| false),
        }
    }
}

/// A READ's reply, built in `buf` so that the data lands on a 4 KiB boundary (an `O_DIRECT`
/// read goes straight into it, without a bounce buffer) with the reply header just before
/// it: returns the window of `buf` to send. `buf` is a worker's scratch space, reused from
/// request to request (no allocation and no zero-filling once it is big enough). The flag
/// says whether the read succeeded (the reply is data, not an error).
fn read_reply(
    dev: &dyn BlockDevice,
    r: &Request,
    structured: bool,
    buf: &mut Vec<u8>,
) -> (Range<usize>, bool) {
    const ALIGN: usize = qcow2_engine::storage::DIRECT_ALIGN;
    let len = r.length as usize;
    if buf.len() < len + 2 * ALIGN {
        // A fresh zeroed allocation (large ones come zeroed from the kernel, without a
        // memset), not a resize of the old one.
        *buf = vec![0u8; len + 2 * ALIGN];
    }
    let data = buf.as_ptr().align_offset(ALIGN) + ALIGN;
    if let Err(e) = dev.read_at(&mut buf[data..data + len], r.offset) {
        buf.clear();
        reply_error(buf, r, structured, &e).expect("writing to a Vec cannot fail");
        return (0..buf.len(), false);
    }
    let mut head = [0u8; READ_HEAD_MAX];
    let n = read_head(r, structured, &mut head);
    let start = data - n;
    buf[start..data].copy_from_slice(&head[..n]);
    (start..data + len, true)
}

/// Longest head of a READ's data reply (a structured chunk header and the offset).
const READ_HEAD_MAX: usize = proto::CHUNK_HEADER_LEN + 8;

/// Writes into `out` what precedes a successful READ's data on the wire: a simple reply, or
/// an `OFFSET_DATA` chunk header with the offset. Returns its length.
fn read_head(r: &Request, structured: bool, out: &mut [u8; READ_HEAD_MAX]) -> usize {
    if structured {
        let h = proto::chunk_header(r.cookie, reply::FLAG_DONE, reply::OFFSET_DATA, 8 + r.length);
        out[..proto::CHUNK_HEADER_LEN].copy_from_slice(&h);
        out[proto::CHUNK_HEADER_LEN..].copy_from_slice(&r.offset.to_be_bytes());
        READ_HEAD_MAX
    } else {
        let h = proto::simple_reply(r.cookie, 0);
        out[..h.len()].copy_from_slice(&h);
        h.len()
    }
}

/// How a connection's serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client disconnected (cleanly or not).
    Closed,
    /// Paused at a request boundary, every request read answered (see
    /// [`Server::serve_kernel`]).
    Stopped,
}

/// The read timeout of a connection with an idle limit: often enough to notice the limit
/// passing soon after it does.
fn idle_poll(limit: Duration) -> Duration {
    (limit / 4).max(Duration::from_millis(10))
}

/// How long a client may stay silent (see [`Limits::idle_timeout`]).
#[derive(Debug, Clone, Copy)]
struct Patience<'a> {
    limit: Option<Duration>,
    budget: &'a Budget,
}

impl Patience<'_> {
    /// The error ending a connection whose client, last heard at `heard`, has been silent
    /// too long: inside a request (`partial`: it owes us bytes) from `heard` on; between
    /// requests only while none of its requests is in flight, and from the later of `heard`
    /// and the last reply.
    fn exhausted(&self, heard: Instant, partial: bool) -> Option<io::Error> {
        let limit = self.limit?;
        let since = if partial {
            heard
        } else {
            heard.max(self.budget.quiet_since()?)
        };
        (since.elapsed() >= limit).then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client was silent for {} s{}",
                    limit.as_secs_f64(),
                    if partial { " inside a request" } else { "" }
                ),
            )
        })
    }
}

/// Whether a read failed only because nothing came within the socket's read timeout.
fn idle(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// What [`RequestBuffer::fill_to`] came to.
enum Fill {
    Ready,
    /// The stream ended.
    Eof,
    /// Idle between requests with the stop flag set.
    Paused,
}

/// Incoming bytes not yet decoded: `data[start..end]`.
struct RequestBuffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// When the client last sent anything.
    heard: Instant,
}

impl RequestBuffer {
    fn new(capacity: usize) -> Self {
        Self {
            data: vec![0; capacity],
            start: 0,
            end: 0,
            heard: Instant::now(),
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    /// Reads until at least `need` bytes are buffered: as much as the stream has (one read
    /// may bring several requests), or, once `exact()` says so, no more than `need`. An
    /// idle read is retried, unless nothing is buffered and `exact()` says to stop, or the
    /// client has tried `patience` too long.
    fn fill_to<R: Read>(
        &mut self,
        s: &mut R,
        need: usize,
        exact: impl Fn() -> bool,
        patience: Patience<'_>,
    ) -> io::Result<Fill> {
        if self.data.len() - self.start < need {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.len() < need {
            let limit = if exact() {
                self.start + need
            } else {
                self.data.len()
            };
            match s.read(&mut self.data[self.end..limit]) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => {
                    self.end += n;
                    self.heard = Instant::now();
                }
                Err(e) if idle(&e) => {
                    if self.is_empty() && exact() {
                        return Ok(Fill::Paused);
                    }
                    if let Some(e) = patience.exhausted(self.heard, !self.is_empty()) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Ready)
    }

    /// The next request header, left in the buffer (a whole one must be buffered).
    fn peek_request(&self) -> &[u8; REQUEST_LEN] {
        self.data[self.start..self.start + REQUEST_LEN]
            .try_into()
            .expect("a request header")
    }

    /// The next `n` buffered bytes (there must be that many).
    fn take(&mut self, n: usize) -> &[u8] {
        let r = &self.data[self.start..self.start + n];
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        r
    }

    /// Fills `out` with what is buffered, then straight from the stream (never reading
    /// past its end).
    fn read_into<R: Read>(
        &mut self,
        s: &mut R,
        out: &mut [u8],
        patience: Patience<'_>,
    ) -> io::Result<()> {
        let have = self.len().min(out.len());
        out[..have].copy_from_slice(self.take(have));
        let mut got = have;
        while got < out.len() {
            match s.read(&mut out[got..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    got += n;
                    self.heard = Instant::now();
                }
                Err(e) if idle(&e) => {
                    if let Some(e) = patience.exhausted(self.heard, true) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What the reader and the workers of one connection share.
struct Conn<'a, S> {
    export: &'a Export,
    structured: bool,
    /// Selected metadata context ids.
    contexts: &'a [u32],
    /// Replies are written whole under this lock.
    writer: Mutex<S>,
    /// Set once a reply could not be written: the connection is shut both ways, so the
    /// reader stops, and the workers drain what is queued without running it.
    broken: AtomicBool,
    budget: Budget,
    /// Where the export counts its requests: their clock starts when they are read.
    stats: Option<&'a IoStats>,
    /// WRITE payload buffers, back from the workers for the reader to fill again.
    spare: Spare,
}

/// A WRITE's data: the first `len` bytes of `buf`.
#[derive(Debug, Default)]
struct Payload {
    buf: Vec<u8>,
    len: usize,
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// Payload buffers of one connection kept for reuse: a fresh one is zero-filled before the
/// socket fills it again (5 % of the server's time at 64 KiB writes, `perf`), a reused one is
/// not. At most [`SPARE_BUFFERS`] of at most [`SPARE_BUFFER`] bytes each are kept.
#[derive(Debug, Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

/// Most payload buffers a connection keeps for reuse.
const SPARE_BUFFERS: usize = 16;
/// Largest payload buffer kept for reuse (larger ones come zeroed from the kernel anyway).
const SPARE_BUFFER: usize = 256 << 10;

impl Spare {
    /// A buffer of `len` bytes (their values are whatever they were: the caller fills it).
    fn take(&self, len: usize) -> Payload {
        let mut buf = if len <= SPARE_BUFFER {
            self.0.lock().recover().pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        if buf.len() < len {
            // Grows with zeros only past what the buffer held before.
            buf.resize(len, 0);
        }
        Payload { buf, len }
    }

    /// Keeps a buffer for a later [`Spare::take`], if there is room and it is not too large.
    fn put(&self, p: Payload) {
        if p.buf.is_empty() || p.buf.len() > SPARE_BUFFER {
            return;
        }
        let mut spare = self.0.lock().recover();
        if spare.len() < SPARE_BUFFERS {
            spare.push(p.buf);
        }
    }
}

impl<S> Conn<'_, S> {
    /// Bytes a request holds while in flight: its payload, its read buffer, or the largest
    /// block-status reply for the selected metadata contexts.
    fn charge(&self, r: &Request) -> u64 {
        charge(r, self.contexts.len())
    }
}

impl<S: Socket> Conn<'_, S> {
    /// Writes a reply, whole, under the writer lock. If that fails, the client is gone or
    /// left the reply unread past the idle limit, and a reply cut short leaves the stream out
    /// of sync: the connection is marked broken and shut both ways.
    fn send(&self, write: impl FnOnce(&mut S) -> io::Result<()>) -> io::Result<()> {
        let mut w = self.writer.lock().recover();
        let sent = write(&mut w);
        if sent.is_err() {
            self.broken.store(true, Ordering::Release);
            w.shutdown();
        }
        sent
    }
}

/// What a worker is handed.
enum Work {
    One(Job),
    /// Small READs read off the socket together.
    Reads(Vec<Job>),
    /// Small WRITEs read off the socket together, run in order.
    Writes(Vec<Job>),
}

/// A request read off the socket, for a worker (or the reader itself).
struct Job {
    req: Request,
    /// A WRITE's data.
    payload: Payload,
    /// When it was read, if the export counts its requests.
    started: Option<Started>,
}

/// See [`Conn::charge`].
fn charge(r: &Request, contexts: usize) -> u64 {
    match r.kind {
        cmd::READ | cmd::WRITE => u64::from(r.length),
        cmd::BLOCK_STATUS => (contexts * (proto::CHUNK_HEADER_LEN + 4 + 8 * MAX_STATUS_EXTENTS))
            .try_into()
            .unwrap_or(u64::MAX),
        _ => 0,
    }
}

/// A byte budget for the requests of one connection in flight. A request larger than the
/// whole budget still runs, alone. It also knows when the connection last went quiet.
#[derive(Debug)]
struct Budget {
    limit: u64,
    used: Mutex<Flight>,
    freed: Condvar,
}

/// What one connection has in flight.
#[derive(Debug)]
struct Flight {
    bytes: u64,
    requests: usize,
    /// When the last request was answered (or the connection began).
    last_done: Instant,
    /// The reader is waiting for bytes to be released (only then is a release signalled:
    /// a futex wake per request costs as much as the request's own `pread` at QD1).
    waiting: bool,
}

impl Flight {
    /// Whether `n` more bytes fit under `limit`. A request larger than the whole budget
    /// still fits when nothing else is in flight, so it runs alone.
    fn fits(&self, n: u64, limit: u64) -> bool {
        self.bytes == 0 || self.bytes + n <= limit
    }
}

impl Budget {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Mutex::new(Flight {
                bytes: 0,
                requests: 0,
                last_done: Instant::now(),
                waiting: false,
            }),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, n: u64) {
        let mut used = self.used.lock().recover();
        while !used.fits(n, self.limit) {
            used.waiting = true;
            used = self.freed.wait(used).recover();
        }
        used.bytes += n;
        used.requests += 1;
    }

    /// Takes `n` bytes if they fit now (never waits).
    fn try_acquire(&self, n: u64) -> bool {
        let mut used = self.used.lock().recover();
        if !used.fits(n, self.limit) {
            return false;
        }
        used.bytes += n;
        used.requests += 1;
        true
    }

    fn release(&self, n: u64) {
        let mut used = self.used.lock().recover();
        used.bytes -= n;
        used.requests -= 1;
        used.last_done = Instant::now();
        let wake = std::mem::take(&mut used.waiting);
        drop(used);
        if wake {
            self.freed.notify_all();
        }
    }

    /// Whether no request is in flight.
    fn is_idle(&self) -> bool {
        self.used.lock().recover().requests == 0
    }

    /// When the last request was answered, if none is in flight now.
    fn quiet_since(&self) -> Option<Instant> {
        let used = self.used.lock().recover();
        (used.requests == 0).then_some(used.last_done)
    }
}

/// `first` and the requests buffered behind it that `joins` accepts (given the bytes buffered
/// after the next header), while the byte budget has room now, up to `most` in all: work for
/// one worker. READs become [`Work::Reads`] (one batch for the engine), WRITEs (with their
/// payloads, copied out of the buffer) [`Work::Writes`], run in order.
fn gather<S>(
    conn: &Conn<'_, S>,
    buf: &mut RequestBuffer,
    first: Job,
    most: usize,
    joins: impl Fn(&Request, usize) -> bool,
) -> Work {
    let kind = first.req.kind;
    let mut batch = vec![first];
    while batch.len() < most && buf.len() >= REQUEST_LEN {
        let Some(next) = Request::decode(buf.peek_request()) else {
            break; // a bad magic: the reader's next turn says so
        };
        if !joins(&next, buf.len() - REQUEST_LEN) || !conn.budget.try_acquire(conn.charge(&next)) {
            break;
        }
        buf.take(REQUEST_LEN);
        let mut payload = Payload::default();
        if next.kind == cmd::WRITE {
            payload = conn.spare.take(next.length as usize);
            payload
                .bytes_mut()
                .copy_from_slice(buf.take(next.length as usize));
        }
        batch.push(Job {
            req: next,
            payload,
            started: conn.stats.map(IoStats::started),
        });
    }
    match (batch.len(), kind) {
        (1, _) => Work::One(batch.pop().expect("one job")),
        (_, cmd::READ) => Work::Reads(batch),
        _ => Work::Writes(batch),
    }
}

/// Writes every byte of `bufs` (writev), however the socket splits it.
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers BLOCK_STATUS: one chunk per selected context, the last one marked done.
fn block_status<W: Write>(
    s: &mut W,
    dev: &dyn BlockDevice,
    r: &Request,
    contexts: &[u32],
) -> io::Result<bool> {
    let one = r.flags & cmd_flag::REQ_ONE != 0;
    let most = if one { 1 } else { MAX_STATUS_EXTENTS };
    let extents = match dev.block_status(r.offset, u64::from(r.length), most) {
        Ok(e) => e,
        Err(e) => return reply_error(s, r, true, &e).map(|()| false),
    };
    let mut out = Vec::new();
    for (i, &id) in contexts.iter().enumerate() {
        // (length, flags) pairs, neighbours with equal flags merged; never longer than the
        // request (so never above u32).
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for e in &extents {
            let flags = match id {
                context::BASE_ALLOCATION_ID => {
                    (if e.hole { context::STATE_HOLE } else { 0 })
                        | (if e.zero { context::STATE_ZERO } else { 0 })
                }
                _ => e.depth,
            };
            match pairs.last_mut() {
                Some((len, f)) if *f == flags => *len += e.length as u32,
                _ => pairs.push((e.length as u32, flags)),
            }
        }
        // A device that described more than asked: the reply still stays bounded.
        pairs.truncate(most);
        let done = if i + 1 == contexts.len() {
            reply::FLAG_DONE
        } else {
            0
        };
        let body_len = 4 + 8 * pairs.len() as u32;
        out.extend_from_slice(&proto::chunk_header(
            r.cookie,
            done,
            reply::BLOCK_STATUS,
            body_len,
        ));
        out.extend_from_slice(&id.to_be_bytes());
        for (len, flags) in pairs {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    s.write_all(&out).map(|()| true)
}

/// The error reply for a request: a structured error chunk when structured replies are on
/// (it carries the message), a simple reply otherwise.
fn reply_error<W: Write>(
    s: &mut W,
    r: &Request,
    structured: bool,
    e: &DeviceError,
) -> io::Result<()> {
    if structured {
        s.write_all(&proto::error_chunk(r.cookie, e.errno, &e.message))
    } else {
        s.write_all(&proto::simple_reply(r.cookie, e.errno))
    }
}

fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn send_option<S: Write>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = proto::option_reply(option, kind, data.len() as u32).to_vec();
    out.extend_from_slice(data);
    s.write_all(&out)
}

fn error_reply<S: Write>(s: &mut S, option: u32, kind: u32, message: &str) -> io::Result<()> {
    send_option(s, option, kind, message.as_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::device::{DeviceResult, Extent};

    /// A memory device whose read of block 0 waits until block 1 has been written: served in
    /// order, a READ of block 0 followed by a WRITE of block 1 would never finish.
    #[derive(Debug, Default)]
    struct Rendezvous {
        bytes: Mutex<Vec<u8>>,
        written: Condvar,
    }

    impl BlockDevice for Rendezvous {
        fn size(&self) -> u64 {
            8192
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
            let mut b = self.bytes.lock().unwrap();
            if offset == 0 {
                // Bounded, so a server that serialises requests fails the test, not hangs it.
                let (guard, timeout) = self
                    .written
                    .wait_timeout_while(b, Duration::from_secs(5), |b| b[4096] == 0)
                    .unwrap();
                b = guard;
                if timeout.timed_out() {
                    return Err(crate::nbd::DeviceError::new(errno::EIO, "never written"));
                }
            }
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
            self.bytes.lock().unwrap()[offset as usize..offset as usize + buf.len()]
                .copy_from_slice(buf);
            self.written.notify_all();
            Ok(())
        }
        fn flush(&self) -> DeviceResult {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> DeviceResult {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult {
            Ok(())
        }
    }

    /// Records whether the thread serving a read is an I/O flusher.
    #[derive(Debug, Default)]
    struct Probe {
        flusher: Mutex<Option<bool>>,
    }

    impl BlockDevice for Probe {
        fn size(&self) -> u64 {
            4096
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> DeviceResult {
            *self.flusher.lock().unwrap() = rustix::process::is_io_flusher().ok();
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> DeviceResult {
            Ok(())
        }
        fn flush(&self) -> DeviceResult {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> DeviceResult {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult {
            Ok(())
        }
    }

    /// Handshake with EXPORT_NAME "" over `theirs`; returns after the export reply.
    #[test]
    fn an_export_with_stats_counts_each_request_by_kind_and_outcome() {
        use crate::metrics::io::{IoStats, Op};
        let stats = Arc::new(IoStats::default());
        let mut export = Export::new("", Arc::new(crate::nbd::device::Memory::new(1 << 20)));
        export.stats = Some(stats.clone());
        let server = Server::new(vec![export], Limits::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let req = |kind, cookie, offset, length| Request {
            flags: 0,
            kind,
            cookie,
            offset,
            length,
        };
        std::thread::scope(|s| {
            s.spawn(|| server.serve(ours).unwrap());
            quick_handshake(&mut theirs);
            let mut w = theirs.try_clone().unwrap();
            let mut reply = |data: usize| {
                let mut r = [0u8; 16];
                theirs.read_exact(&mut r).unwrap();
                let mut d = vec![0u8; data];
                theirs.read_exact(&mut d).unwrap();
                u32::from_be_bytes(r[4..8].try_into().unwrap())
            };
            // One at a time, so each reply is known before the next request.
            let send = |theirs: &mut UnixStream, r: Request, payload: &[u8]| {
                theirs.write_all(&r.encode()).unwrap();
                theirs.write_all(payload).unwrap();
            };
            send(&mut w, req(cmd::WRITE, 1, 0, 8192), &[7; 8192]);
            assert_eq!(reply(0), 0);
            send(&mut w, req(cmd::READ, 2, 0, 4096), &[]);
            assert_eq!(reply(4096), 0);
            // Past the end: answered with an error, counted as one, no bytes.
            send(&mut w, req(cmd::READ, 3, 1 << 20, 4096), &[]);
            assert_ne!(reply(0), 0);
            send(&mut w, req(cmd::TRIM, 4, 0, 4096), &[]);
            assert_eq!(reply(0), 0);
            send(&mut w, req(cmd::FLUSH, 5, 0, 0), &[]);
            assert_eq!(reply(0), 0);
            send(&mut w, req(cmd::DISC, 6, 0, 0), &[]);
        });
        let w = stats.of(Op::Write);
        assert_eq!((w.done, w.errors, w.bytes), (1, 0, 8192));
        let r = stats.of(Op::Read);
        assert_eq!((r.done, r.errors, r.bytes), (2, 1, 4096));
        assert_eq!(r.observed(), 2, "the failed read has a latency too");
        assert_eq!(stats.of(Op::Trim).bytes, 4096);
        assert_eq!(stats.of(Op::Flush).done, 1);
        assert_eq!(stats.in_flight(), 0, "the disconnect is not a request");
    }

    #[test]
    fn a_qos_limit_paces_requests_and_a_lifted_one_stops_at_once() {
        use crate::nbd::qos::Limits as QosLimits;
        let qos = Arc::new(Qos::new(QosLimits {
            read_iops: Some(200),
            ..QosLimits::default()
        }));
        let mut export = Export::new("", Arc::new(crate::nbd::device::Memory::new(1 << 20)));
        export.qos = Some(qos.clone());
        let server = Server::new(vec![export], Limits::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // `n` READs sent at once; returns how long until every reply was in.
        let reads = |theirs: &mut UnixStream, n: u64| {
            let start = Instant::now();
            let mut all = Vec::new();
            for cookie in 0..n {
                let r = Request {
                    flags: 0,
                    kind: cmd::READ,
                    cookie,
                    offset: (cookie % 256) * 4096,
                    length: 4096,
                };
                all.extend_from_slice(&r.encode());
            }
            theirs.write_all(&all).unwrap();
            let mut reply = vec![0u8; 16 + 4096];
            for _ in 0..n {
                theirs.read_exact(&mut reply).unwrap();
                assert_eq!(&reply[4..8], &[0; 4], "an error reply");
            }
            start.elapsed()
        };
        std::thread::scope(|s| {
            s.spawn(|| server.serve(ours).unwrap());
            quick_handshake(&mut theirs);
            // The burst (200: one second's worth) passes at once, the next 200 take 1 s.
            let took = reads(&mut theirs, 400);
            assert!(
                (0.95..2.0).contains(&took.as_secs_f64()),
                "400 reads at 200 IOPS with a 200 burst took {took:?}"
            );
            // Lifted while the connection is open: the next requests no longer wait.
            qos.set(QosLimits::default(), Instant::now());
            let took = reads(&mut theirs, 400);
            assert!(took < Duration::from_millis(500), "unlimited took {took:?}");
            theirs
                .write_all(
                    &Request {
                        flags: 0,
                        kind: cmd::DISC,
                        cookie: 0,
                        offset: 0,
                        length: 0,
                    }
                    .encode(),
                )
                .unwrap();
        });
    }

    #[test]
    fn a_stop_does_not_wait_out_a_qos_debt_the_request_read_runs_and_is_answered() {
        use crate::nbd::qos::Limits as QosLimits;
        let mut export = Export::new("", Arc::new(crate::nbd::device::Memory::new(1 << 20)));
        // 1 KiB/s: a 64 KiB write owes 63 s.
        export.qos = Some(Arc::new(Qos::new(QosLimits {
            write_bytes_per_second: Some(1024),
            ..QosLimits::default()
        })));
        let server = Server::new(vec![export], Limits::default());
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let served = s.spawn(|| server.serve_kernel(&mut ours, 0, Some(&stop)));
            let w = Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: 9,
                offset: 0,
                length: 64 << 10,
            };
            theirs.write_all(&w.encode()).unwrap();
            theirs.write_all(&[5; 64 << 10]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let stopped_at = Instant::now();
            stop.store(true, Ordering::Release);
            let mut reply = [0u8; 16];
            theirs.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "the write succeeded");
            assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 9);
            assert!(matches!(served.join().unwrap(), Ok(Ended::Stopped)));
            assert!(stopped_at.elapsed() < Duration::from_secs(2));
        });
    }

    pub(crate) fn quick_handshake(theirs: &mut UnixStream) {
        let mut hello = [0u8; 18];
        theirs.read_exact(&mut hello).unwrap();
        theirs
            .write_all(&u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        theirs.write_all(&m).unwrap();
        let mut export = [0u8; 10];
        theirs.read_exact(&mut export).unwrap();
    }

    #[test]
    fn serving_threads_are_io_flushers_when_asked() {
        let privileged = rustix::process::configure_io_flusher_behavior(false).is_ok();
        if !privileged {
            eprintln!("skipped: PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE");
            return;
        }
        for wanted in [true, false] {
            let probe = Arc::new(Probe::default());
            let server = Server::new(
                vec![Export::new("", probe.clone())],
                Limits {
                    io_flusher: wanted,
                    ..Limits::default()
                },
            );
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            std::thread::scope(|s| {
                s.spawn(|| server.serve(ours).unwrap());
                quick_handshake(&mut theirs);
                let read = Request {
                    flags: 0,
                    kind: cmd::READ,
                    cookie: 1,
                    offset: 0,
                    length: 512,
                };
                theirs.write_all(&read.encode()).unwrap();
                let mut r = vec![0u8; 16 + 512];
                theirs.read_exact(&mut r).unwrap();
                drop(theirs);
            });
            assert_eq!(*probe.flusher.lock().unwrap(), Some(wanted));
        }
    }

    /// Records which thread ran each read, and each write with its first byte.
    #[derive(Debug, Default)]
    struct WhoReads(
        Mutex<Vec<std::thread::ThreadId>>,
        Mutex<Vec<(std::thread::ThreadId, u8)>>,
    );

    impl BlockDevice for WhoReads {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> DeviceResult {
            self.0.lock().unwrap().push(std::thread::current().id());
            buf.fill(7);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], _: u64) -> DeviceResult {
            self.1
                .lock()
                .unwrap()
                .push((std::thread::current().id(), buf[0]));
            Ok(())
        }
        fn flush(&self) -> DeviceResult {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> DeviceResult {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult {
            Ok(())
        }
    }

    #[test]
    fn small_writes_sent_together_run_in_order_on_one_worker_each_answered() {
        let dev = Arc::new(WhoReads::default());
        let server = Server::new(vec![Export::new("", dev.clone())], Limits::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| server.serve(ours).unwrap());
            quick_handshake(&mut theirs);
            // Six 1 KiB WRITEs in one send (6 KiB: one socket buffer, read at once); #3 is past
            // the end.
            let mut bytes = Vec::new();
            for i in 0..6u8 {
                let w = Request {
                    flags: 0,
                    kind: cmd::WRITE,
                    cookie: u64::from(i),
                    offset: if i == 3 { 1 << 20 } else { u64::from(i) * 1024 },
                    length: 1024,
                };
                bytes.extend_from_slice(&w.encode());
                bytes.extend_from_slice(&[i + 1; 1024]);
            }
            theirs.write_all(&bytes).unwrap();
            let mut answered = Vec::new();
            for _ in 0..6 {
                let mut r = [0u8; 16];
                theirs.read_exact(&mut r).unwrap();
                let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                let errno = u32::from_be_bytes(r[4..8].try_into().unwrap());
                let want = if cookie == 3 { errno::ENOSPC } else { 0 };
                assert_eq!(errno, want, "cookie {cookie}");
                answered.push(cookie);
            }
            answered.sort_unstable();
            assert_eq!(answered, [0, 1, 2, 3, 4, 5]);
            drop(theirs);
        });
        let writes = dev.1.lock().unwrap().clone();
        // The first went to a worker with the four others behind it; in order, one thread.
        assert_eq!(
            writes.iter().map(|w| w.1).collect::<Vec<_>>(),
            [1, 2, 3, 5, 6]
        );
        assert!(writes.iter().all(|w| w.0 == writes[0].0), "{writes:?}");
    }

    #[test]
    fn a_lone_small_read_is_answered_by_the_reader_and_pipelined_ones_by_workers() {
        let dev = Arc::new(WhoReads::default());
        let server = Server::new(vec![Export::new("", dev.clone())], Limits::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let read = |cookie, length| Request {
            flags: 0,
            kind: cmd::READ,
            cookie,
            offset: 0,
            length,
        };
        let reader = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let id = std::thread::current().id();
                server.serve(ours).unwrap();
                id
            });
            quick_handshake(&mut theirs);
            // One at a time (QD1): each is alone when read.
            for cookie in 1..=3 {
                theirs.write_all(&read(cookie, 4096).encode()).unwrap();
                let mut r = vec![0u8; 16 + 4096];
                theirs.read_exact(&mut r).unwrap();
                assert_eq!(r[..16], proto::simple_reply(cookie, 0));
                assert!(r[16..].iter().all(|&b| b == 7));
            }
            // Two in one send: the first has the second behind it.
            let mut two = read(4, 4096).encode().to_vec();
            two.extend_from_slice(&read(5, 4096).encode());
            theirs.write_all(&two).unwrap();
            for _ in 0..2 {
                let mut r = vec![0u8; 16 + 4096];
                theirs.read_exact(&mut r).unwrap();
            }
            // Larger than the reader answers itself.
            theirs
                .write_all(&read(6, INLINE_READ + 4096).encode())
                .unwrap();
            let mut r = vec![0u8; 16 + INLINE_READ as usize + 4096];
            theirs.read_exact(&mut r).unwrap();
            drop(theirs);
            reader.join().unwrap()
        });
        let ran = dev.0.lock().unwrap().clone();
        assert_eq!(ran.len(), 6);
        assert!(
            ran[..3].iter().all(|&t| t == reader),
            "QD1 reads went to workers"
        );
        assert_ne!(
            ran[3], reader,
            "a read with another behind it ran on the reader"
        );
        assert_ne!(ran[5], reader, "a large read ran on the reader");
    }

    #[test]
    fn reads_sent_together_are_answered_as_a_batch_each_with_its_own_reply() {
        for structured in [false, true] {
            let mem = crate::nbd::device::Memory::new(1 << 20);
            let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
            mem.write_at(&pattern, 0).unwrap();
            let server = Server::new(vec![Export::new("", Arc::new(mem))], Limits::default());
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            std::thread::scope(|s| {
                s.spawn(|| server.serve(ours).unwrap());
                if structured {
                    structured_handshake(&mut theirs);
                } else {
                    quick_handshake(&mut theirs);
                }
                // 40 READs in one send (more than one batch holds); #7 is past the end.
                let reads: Vec<Request> = (0..40u64)
                    .map(|i| Request {
                        flags: 0,
                        kind: cmd::READ,
                        cookie: 100 + i,
                        offset: if i == 7 {
                            1 << 20
                        } else {
                            (i * 24_593) % (1 << 19)
                        },
                        length: 512 + (i as u32 * 1000) % 9000,
                    })
                    .collect();
                let bytes: Vec<u8> = reads.iter().flat_map(|r| r.encode()).collect();
                theirs.write_all(&bytes).unwrap();
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..reads.len() {
                    let (cookie, data) = read_one_reply(&mut theirs, structured);
                    let r = reads[(cookie - 100) as usize];
                    match data {
                        Ok(data) => {
                            let at = r.offset as usize;
                            assert!(data == pattern[at..at + r.length as usize], "#{cookie}");
                        }
                        Err(errno) => {
                            assert_eq!(cookie, 107, "only the read past the end fails");
                            assert_eq!(errno, errno::EINVAL);
                        }
                    }
                    assert!(seen.insert(cookie), "two replies to {cookie}");
                }
                drop(theirs);
            });
        }
    }

    /// One reply to a READ: its cookie, and its data or errno.
    fn read_one_reply(s: &mut UnixStream, structured: bool) -> (u64, Result<Vec<u8>, u32>) {
        if !structured {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let errno = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            if errno != 0 {
                return (cookie, Err(errno));
            }
            // The length is the test's to know: callers ask for what they sent.
            return (cookie, Ok(read_simple_data(s, cookie)));
        }
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        if kind == reply::OFFSET_DATA {
            (cookie, Ok(payload[8..].to_vec()))
        } else {
            (
                cookie,
                Err(u32::from_be_bytes(payload[..4].try_into().unwrap())),
            )
        }
    }

    /// The data of a simple reply to the READ with `cookie` of the batch test above.
    fn read_simple_data(s: &mut UnixStream, cookie: u64) -> Vec<u8> {
        let i = cookie - 100;
        let mut data = vec![0u8; 512 + (i as usize * 1000) % 9000];
        s.read_exact(&mut data).unwrap();
        data
    }

    #[test]
    fn payload_buffers_are_reused_up_to_the_caps() {
        let spare = Spare::default();
        let mut p = spare.take(4096);
        assert_eq!(p.bytes().len(), 4096);
        p.bytes_mut().fill(1);
        let at = p.buf.as_ptr();
        spare.put(p);
        // The same buffer comes back, sized to the new request, without a new allocation.
        let p = spare.take(1000);
        assert_eq!((p.buf.as_ptr(), p.bytes().len()), (at, 1000));
        spare.put(p);
        let p = spare.take(8192);
        assert_eq!(p.bytes().len(), 8192);
        assert!(
            p.bytes()[4096..].iter().all(|&b| b == 0),
            "grown with zeros"
        );
        spare.put(p);
        // Too large to keep, and never more than SPARE_BUFFERS kept.
        spare.put(spare.take(SPARE_BUFFER + 1));
        assert_eq!(spare.0.lock().unwrap().len(), 1);
        let many: Vec<Payload> = (0..SPARE_BUFFERS + 4).map(|_| spare.take(512)).collect();
        many.into_iter().for_each(|p| spare.put(p));
        assert_eq!(spare.0.lock().unwrap().len(), SPARE_BUFFERS);
    }

    #[test]
    fn requests_of_one_connection_run_concurrently_and_replies_overtake() {
        let dev = Rendezvous {
            bytes: Mutex::new(vec![0; 8192]),
            written: Condvar::new(),
        };
        let server = Server::new(vec![Export::new("", Arc::new(dev))], Limits::default());
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::thread::scope(|s| {
            s.spawn(|| server.serve(ours).unwrap());
            // Owned here: if an assertion fails, the socket closes while unwinding and the
            // server thread ends, so the scope reports the failure instead of hanging.
            let mut theirs = theirs;
            quick_handshake(&mut theirs);
            let read = Request {
                flags: 0,
                kind: cmd::READ,
                cookie: 1,
                offset: 0,
                length: 4096,
            };
            let write = Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: 2,
                offset: 4096,
                length: 4,
            };
            // Sent at once: the reader sees the WRITE behind the READ, so it hands the READ
            // to a worker instead of answering it itself.
            let mut both = read.encode().to_vec();
            both.extend_from_slice(&write.encode());
            both.extend_from_slice(&[9; 4]);
            theirs.write_all(&both).unwrap();
            // The READ completes only once the later WRITE has run beside it (the device
            // fails it with EIO after 5 s otherwise). Once the WRITE is done, the two replies
            // race for the socket: either may come first.
            let mut answered = Vec::new();
            for _ in 0..2 {
                let mut r = [0u8; 16];
                theirs.read_exact(&mut r).unwrap();
                let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                assert_eq!(r, proto::simple_reply(cookie, 0), "cookie {cookie}");
                if cookie == 1 {
                    let mut data = vec![0u8; 4096];
                    theirs.read_exact(&mut data).unwrap();
                }
                answered.push(cookie);
            }
            answered.sort_unstable();
            assert_eq!(answered, [1, 2]);
            let disc = Request {
                flags: 0,
                kind: cmd::DISC,
                cookie: 3,
                offset: 0,
                length: 0,
            };
            theirs.write_all(&disc.encode()).unwrap();
        });
    }

    /// Reads one option reply: (reply type, data).
    fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        (kind, data)
    }

    fn send_opt(s: &mut UnixStream, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    #[test]
    fn several_named_exports_are_listed_and_each_serves_its_own_device() {
        use crate::nbd::device::Memory;
        let a = Arc::new(Memory::new(1 << 20));
        let b = Arc::new(Memory::new(2 << 20));
        b.bytes.lock().unwrap()[4096] = 0xbb;
        let server = Server::new(
            vec![Export::new("a", a.clone()), Export::new("b", b.clone())],
            Limits::default(),
        );
        std::thread::scope(|scope| {
            // LIST names both, then GO to "b" reports b's size and reads b's bytes.
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            scope.spawn(|| server.serve(ours).unwrap());
            let mut hello = [0u8; 18];
            theirs.read_exact(&mut hello).unwrap();
            theirs
                .write_all(
                    &u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes(),
                )
                .unwrap();
            send_opt(&mut theirs, opt::LIST, &[]);
            let mut names = Vec::new();
            loop {
                let (kind, data) = option_reply(&mut theirs);
                if kind == rep::ACK {
                    break;
                }
                assert_eq!(kind, rep::SERVER);
                let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
            }
            assert_eq!(names, ["a", "b"]);
            let mut go = 1u32.to_be_bytes().to_vec();
            go.extend_from_slice(b"b");
            go.extend_from_slice(&0u16.to_be_bytes());
            send_opt(&mut theirs, opt::GO, &go);
            let mut size = None;
            loop {
                let (kind, data) = option_reply(&mut theirs);
                if kind == rep::ACK {
                    break;
                }
                if u16::from_be_bytes(data[..2].try_into().unwrap()) == info::EXPORT {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
            }
            assert_eq!(size, Some(2 << 20));
            let read = Request {
                flags: 0,
                kind: cmd::READ,
                cookie: 7,
                offset: 4096,
                length: 1,
            };
            theirs.write_all(&read.encode()).unwrap();
            let mut r = [0u8; 17];
            theirs.read_exact(&mut r).unwrap();
            assert_eq!(r[16], 0xbb);
            drop(theirs);

            // EXPORT_NAME "a" on another connection: a's size.
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            scope.spawn(|| server.serve(ours).unwrap());
            theirs.read_exact(&mut hello).unwrap();
            theirs
                .write_all(
                    &u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes(),
                )
                .unwrap();
            send_opt(&mut theirs, opt::EXPORT_NAME, b"a");
            let mut export = [0u8; 10];
            theirs.read_exact(&mut export).unwrap();
            assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1 << 20);
        });
    }

    /// Runs `serve` on a socket pair under `limits`; returns our end and the server's
    /// outcome (with how long it took), or `None` if it had not ended in `within`.
    fn serve_with(
        limits: Limits,
        dev: Arc<dyn BlockDevice>,
        client: impl FnOnce(UnixStream) + Send,
        within: Duration,
    ) -> Option<(Result<(), Error>, Duration)> {
        let server = Arc::new(Server::new(vec![Export::new("", dev)], limits));
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(server.serve(ours));
        });
        std::thread::scope(|s| {
            s.spawn(|| client(theirs));
            let ended = rx.recv_timeout(within).ok();
            ended.map(|r| (r, started.elapsed()))
        })
    }

    fn timed_out(r: &Result<(), Error>) -> bool {
        matches!(r, Err(Error::Io(e)) if e.kind() == io::ErrorKind::TimedOut)
    }

    #[test]
    fn a_handshake_trickled_byte_by_byte_ends_at_the_whole_handshake_deadline() {
        let limits = Limits {
            handshake_timeout: Duration::from_millis(600),
            ..Limits::default()
        };
        let dev = Arc::new(crate::nbd::device::Memory::new(1 << 20));
        // Each byte comes well within the deadline; the handshake as a whole never ends.
        let client = |mut theirs: UnixStream| {
            let mut hello = [0u8; 18];
            theirs.read_exact(&mut hello).unwrap();
            let mut bytes = u32::from(handshake::FIXED_NEWSTYLE).to_be_bytes().to_vec();
            bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
            bytes.extend(std::iter::repeat_n(0u8, 64));
            for b in bytes {
                std::thread::sleep(Duration::from_millis(100));
                if theirs.write_all(&[b]).is_err() {
                    return;
                }
            }
        };
        let (result, took) = serve_with(limits, dev, client, Duration::from_secs(5))
            .expect("the server still waits on a client trickling its handshake");
        assert!(timed_out(&result), "{result:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    /// Sends 64 reads of 1 MiB whose replies the caller never reads: far more than a socket
    /// buffers, so the server's workers block writing them.
    pub(crate) fn send_unread_reads(s: &mut UnixStream) -> io::Result<()> {
        for cookie in 0..64u64 {
            let read = Request {
                flags: 0,
                kind: cmd::READ,
                cookie,
                offset: cookie << 20,
                length: 1 << 20,
            };
            s.write_all(&read.encode())?;
        }
        Ok(())
    }

    /// A device whose flush takes 800 ms.
    #[derive(Debug)]
    struct SlowFlush(crate::nbd::device::Memory);

    impl BlockDevice for SlowFlush {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> DeviceResult {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> DeviceResult {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> DeviceResult {
            std::thread::sleep(Duration::from_millis(800));
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> DeviceResult {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult {
            Ok(())
        }
    }

    #[test]
    fn an_idle_client_is_let_go_but_not_while_its_request_runs() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let dev = Arc::new(SlowFlush(crate::nbd::device::Memory::new(1 << 20)));
        let client = |mut theirs: UnixStream| {
            quick_handshake(&mut theirs);
            let flush = Request {
                flags: 0,
                kind: cmd::FLUSH,
                cookie: 5,
                offset: 0,
                length: 0,
            };
            theirs.write_all(&flush.encode()).unwrap();
            // The flush outlasts the idle limit: its reply still comes.
            let mut r = [0u8; 16];
            theirs.read_exact(&mut r).unwrap();
            assert_eq!(r, proto::simple_reply(5, 0));
            // Then silence: the server lets go.
            let t = Instant::now();
            theirs
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(theirs.read(&mut r).unwrap(), 0, "closed by the server");
            assert!(
                t.elapsed() < Duration::from_millis(1000),
                "{:?}",
                t.elapsed()
            );
        };
        let (result, _) = serve_with(limits, dev, client, Duration::from_secs(10))
            .expect("an idle client is never let go");
        assert!(timed_out(&result), "{result:?}");
    }

    #[test]
    fn a_client_stalled_inside_a_write_payload_is_let_go() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let dev = Arc::new(crate::nbd::device::Memory::new(1 << 20));
        let client = |mut theirs: UnixStream| {
            quick_handshake(&mut theirs);
            let write = Request {
                flags: 0,
                kind: cmd::WRITE,
                cookie: 1,
                offset: 0,
                length: 4096,
            };
            theirs.write_all(&write.encode()).unwrap();
            theirs.write_all(&[7u8; 100]).unwrap();
            let mut r = [0u8; 1];
            theirs
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(theirs.read(&mut r).unwrap(), 0, "closed by the server");
        };
        let (result, took) = serve_with(limits, dev, client, Duration::from_secs(10))
            .expect("a stalled client is never let go");
        assert!(timed_out(&result), "{result:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_client_that_stops_reading_its_replies_is_cut_off() {
        let limits = Limits {
            idle_timeout: Some(Duration::from_millis(300)),
            ..Limits::default()
        };
        let dev = Arc::new(crate::nbd::device::Memory::new(64 << 20));
        let client = |mut theirs: UnixStream| {
            quick_handshake(&mut theirs);
            let _ = send_unread_reads(&mut theirs);
            // Hold the socket open, never reading, well past when the server lets go.
            std::thread::sleep(Duration::from_secs(4));
        };
        let (_, took) = serve_with(limits, dev, client, Duration::from_secs(10))
            .expect("the server waits forever on a client that does not read");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// A device that records the extent limit it was asked for and describes more.
    #[derive(Debug, Default)]
    struct Fragmented {
        asked: Mutex<Vec<usize>>,
    }

    impl BlockDevice for Fragmented {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> DeviceResult {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> DeviceResult {
            Ok(())
        }
        fn flush(&self) -> DeviceResult {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> DeviceResult {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult {
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64, most: usize) -> DeviceResult<Vec<Extent>> {
            self.asked.lock().unwrap().push(most);
            // One extent per 512 bytes, alternating, ignoring the limit.
            Ok((0..len / 512)
                .map(|i| Extent {
                    length: 512,
                    hole: i % 2 == 1,
                    zero: i % 2 == 1,
                    depth: 1,
                })
                .collect())
        }
    }

    /// Negotiates structured replies and `base:allocation` on export "".
    fn structured_handshake(theirs: &mut UnixStream) {
        let mut hello = [0u8; 18];
        theirs.read_exact(&mut hello).unwrap();
        theirs
            .write_all(&u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes())
            .unwrap();
        send_opt(theirs, opt::STRUCTURED_REPLY, &[]);
        assert_eq!(option_reply(theirs).0, rep::ACK);
        let mut q = 0u32.to_be_bytes().to_vec(); // export name ""
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(context::BASE_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(context::BASE_ALLOCATION.as_bytes());
        send_opt(theirs, opt::SET_META_CONTEXT, &q);
        while option_reply(theirs).0 != rep::ACK {}
        send_opt(theirs, opt::GO, &[0, 0, 0, 0, 0, 0]);
        while option_reply(theirs).0 != rep::ACK {}
    }

    #[test]
    fn a_block_status_reply_is_bounded_whatever_the_device_describes() {
        let dev = Arc::new(Fragmented::default());
        let server = Server::new(vec![Export::new("", dev.clone())], Limits::default());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| server.serve(ours).unwrap());
            structured_handshake(&mut theirs);
            for (cookie, flags) in [(1u64, 0u16), (2, cmd_flag::REQ_ONE)] {
                let status = Request {
                    flags,
                    kind: cmd::BLOCK_STATUS,
                    cookie,
                    offset: 0,
                    length: 1 << 30, // 2 Mi extents of 512 bytes
                };
                theirs.write_all(&status.encode()).unwrap();
                let mut h = [0u8; 20];
                theirs.read_exact(&mut h).unwrap();
                let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
                let mut body = vec![0u8; len];
                theirs.read_exact(&mut body).unwrap();
                let extents = (len - 4) / 8;
                let want = if flags == 0 { MAX_STATUS_EXTENTS } else { 1 };
                assert_eq!(extents, want, "cookie {cookie}");
            }
            drop(theirs);
        });
        assert_eq!(*dev.asked.lock().unwrap(), [MAX_STATUS_EXTENTS, 1]);
    }
}
