//! Per-volume I/O counters, kept by the NBD server on the request path.
//!
//! Every counter is a relaxed atomic owned by one volume: a request touches a handful of
//! them and takes no lock, global or not. A scrape reads them without stopping the volume;
//! the numbers it sees may be a request apart from each other, never wrong.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::nbd::proto::cmd;

/// The kinds of requests counted apart (the `op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    /// BLOCK_STATUS and CACHE: no data moves.
    Other,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Zero,
        Op::Other,
    ];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Other => "other",
        }
    }

    /// The kind of an NBD command.
    pub fn of_command(kind: u16) -> Op {
        match kind {
            cmd::READ => Op::Read,
            cmd::WRITE => Op::Write,
            cmd::FLUSH => Op::Flush,
            cmd::TRIM => Op::Trim,
            cmd::WRITE_ZEROES => Op::Zero,
            _ => Op::Other,
        }
    }

    /// Whether the request's length is bytes moved (or freed, or zeroed).
    fn counts_bytes(self) -> bool {
        !matches!(self, Op::Flush | Op::Other)
    }
}

/// Upper bounds of the latency buckets, in seconds: from 25 µs (a page-cache hit) to 10 s
/// (a write held by a full disk shows up in the last ones).
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`LATENCY_BOUNDS`] in nanoseconds, for the request path's integer compare.
const BOUNDS_NS: [u64; 18] = {
    let mut ns = [0u64; 18];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = (LATENCY_BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// The counters of one kind of request.
#[derive(Debug, Default)]
struct OpCounters {
    /// Requests answered.
    done: AtomicU64,
    /// Of those, answered with an error.
    errors: AtomicU64,
    /// Bytes of the successful ones.
    bytes: AtomicU64,
    /// Sum of their latencies.
    nanos: AtomicU64,
    /// Requests per latency bucket; the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
}

/// One volume's I/O counters.
#[derive(Debug, Default)]
pub struct IoStats {
    ops: [OpCounters; Op::ALL.len()],
    in_flight: AtomicI64,
    /// Requests held back by QoS, and the nanoseconds they waited: reads, then writes.
    throttled: [AtomicU64; 2],
    throttled_nanos: [AtomicU64; 2],
}

/// What QoS held back of one direction ([`IoStats::throttled`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    pub requests: u64,
    pub seconds: f64,
}

/// A request being served: [`IoStats::started`] to [`IoStats::finished`].
#[derive(Debug, Clone, Copy)]
pub struct Started(Instant);

impl IoStats {
    /// A request was read off the socket.
    pub fn started(&self) -> Started {
        self.in_flight.fetch_add(1, Relaxed);
        Started(Instant::now())
    }

    /// The request's reply was sent (or could not be).
    pub fn finished(&self, started: Started, op: Op, len: u32, ok: bool) {
        let nanos = started.0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        let c = &self.ops[op as usize];
        c.done.fetch_add(1, Relaxed);
        if ok {
            if op.counts_bytes() {
                c.bytes.fetch_add(u64::from(len), Relaxed);
            }
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        c.nanos.fetch_add(nanos, Relaxed);
        let bucket = BOUNDS_NS.partition_point(|&b| b < nanos);
        c.buckets[bucket].fetch_add(1, Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// QoS held a request (a read when `write` is false) back for `waited`.
    pub fn throttle(&self, write: bool, waited: std::time::Duration) {
        let i = usize::from(write);
        self.throttled[i].fetch_add(1, Relaxed);
        let nanos = waited.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.throttled_nanos[i].fetch_add(nanos, Relaxed);
    }

    /// What QoS held back of reads (`write` false) or writes.
    pub fn throttled(&self, write: bool) -> Throttled {
        let i = usize::from(write);
        Throttled {
            requests: self.throttled[i].load(Relaxed),
            seconds: self.throttled_nanos[i].load(Relaxed) as f64 / 1e9,
        }
    }

    /// Requests read and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed).max(0) as u64
    }

    /// The counters of `op` now.
    pub fn of(&self, op: Op) -> OpSnapshot {
        let c = &self.ops[op as usize];
        let mut buckets = [0u64; LATENCY_BOUNDS.len() + 1];
        for (out, b) in buckets.iter_mut().zip(&c.buckets) {
            *out = b.load(Relaxed);
        }
        OpSnapshot {
            done: c.done.load(Relaxed),
            errors: c.errors.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            seconds: c.nanos.load(Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// The counters of one kind of request at a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSnapshot {
    pub done: u64,
    pub errors: u64,
    pub bytes: u64,
    /// Sum of latencies.
    pub seconds: f64,
    /// Requests per bucket of [`LATENCY_BOUNDS`] (not cumulative), then those above them all.
    pub buckets: [u64; LATENCY_BOUNDS.len() + 1],
}

impl OpSnapshot {
    /// The histogram's (upper bound, count) pairs, not cumulative, `+Inf` last.
    pub fn histogram(&self) -> Vec<(f64, u64)> {
        LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets)
            .collect()
    }

    /// Requests in the histogram (equal to `done` once the requests counted have all ended).
    pub fn observed(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounds_in_nanoseconds_match_the_seconds() {
        assert_eq!(BOUNDS_NS[0], 25_000);
        assert_eq!(BOUNDS_NS[5], 1_000_000);
        assert_eq!(*BOUNDS_NS.last().unwrap(), 10_000_000_000);
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn requests_are_counted_by_kind_with_bytes_errors_and_latency() {
        let s = IoStats::default();
        let a = s.started();
        let b = s.started();
        let c = s.started();
        assert_eq!(s.in_flight(), 3);
        s.finished(a, Op::Write, 4096, true);
        s.finished(b, Op::Write, 8192, false);
        std::thread::sleep(Duration::from_millis(3));
        s.finished(c, Op::Read, 65536, true);
        assert_eq!(s.in_flight(), 0);

        let w = s.of(Op::Write);
        assert_eq!(
            (w.done, w.errors, w.bytes),
            (2, 1, 4096),
            "a failed write moved nothing"
        );
        assert_eq!(w.observed(), 2);
        let r = s.of(Op::Read);
        assert_eq!((r.done, r.errors, r.bytes), (1, 0, 65536));
        assert!(r.seconds >= 0.003, "{}", r.seconds);
        // 3 ms or more: not in a bucket up to 2.5 ms.
        let hist = r.histogram();
        assert_eq!(hist.len(), LATENCY_BOUNDS.len() + 1);
        assert!(
            hist.iter()
                .filter(|(le, _)| *le <= 0.0025)
                .all(|(_, n)| *n == 0)
        );
        assert_eq!(hist.iter().map(|(_, n)| n).sum::<u64>(), 1);
        assert_eq!(hist.last().unwrap().0, f64::INFINITY);
        assert_eq!(s.of(Op::Flush).done, 0);
    }

    #[test]
    fn flushes_and_other_requests_count_no_bytes() {
        let s = IoStats::default();
        s.finished(s.started(), Op::Flush, 0, true);
        s.finished(s.started(), Op::Other, 1 << 20, true);
        s.finished(s.started(), Op::Trim, 1 << 20, true);
        assert_eq!(s.of(Op::Flush).bytes, 0);
        assert_eq!(s.of(Op::Other).bytes, 0);
        assert_eq!(s.of(Op::Trim).bytes, 1 << 20);
    }

    #[test]
    fn commands_map_to_their_kinds() {
        assert_eq!(Op::of_command(cmd::READ), Op::Read);
        assert_eq!(Op::of_command(cmd::WRITE_ZEROES), Op::Zero);
        assert_eq!(Op::of_command(cmd::BLOCK_STATUS), Op::Other);
        assert_eq!(Op::of_command(cmd::CACHE), Op::Other);
    }
}
