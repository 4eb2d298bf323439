//! Per-volume QoS: token buckets for read and write IOPS and bytes per second (issue 20).
//!
//! Every request of a volume passes through our NBD server, so the server can hold a volume
//! to exact limits, and change them while the volume is in use. This module is the
//! arithmetic: how long a request must wait before it runs. The connection's reader waits
//! that long before it takes the request (`server.rs`). The limits come from the StorageClass
//! and VolumeAttributesClass parameters of a CSI volume (kept in its record, changed live by
//! ModifyVolume) or from `qcow2-csi nbd --read-iops ...` on a standalone export.
//!
//! Each limit is a bucket of `rate × burst` tokens, refilled at `rate` per second. A request
//! takes its tokens (1 for an IOPS bucket, its length for a bytes bucket) at once, even into
//! debt, and waits until the debt is paid back: a request larger than the bucket still runs,
//! and the long-run rate is exact whatever the request sizes. With no limit set, a request
//! costs one atomic load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use qcow2_engine::sync::Recover;

use crate::csi::params::number_with_suffix;
use crate::error::{Error, Result};

/// The parameter names (StorageClass and VolumeAttributesClass), in the order they are
/// documented.
pub const KEYS: [&str; 5] = [
    "readIOPS",
    "writeIOPS",
    "readBytesPerSecond",
    "writeBytesPerSecond",
    "burstSeconds",
];

/// Highest IOPS limit accepted: far above what one volume does, low enough to catch a typo.
const MAX_IOPS: u64 = 10_000_000;
/// Highest bandwidth limit accepted (1 TiB/s).
const MAX_BYTES_PER_SECOND: u64 = 1 << 40;
/// Longest burst accepted.
const MAX_BURST_SECONDS: u64 = 60;

/// Limits of one volume; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub read_bytes_per_second: Option<u64>,
    pub write_bytes_per_second: Option<u64>,
    /// How many seconds of each rate an idle volume may spend at once.
    pub burst_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            read_iops: None,
            write_iops: None,
            read_bytes_per_second: None,
            write_bytes_per_second: None,
            burst_seconds: 1,
        }
    }
}

impl Limits {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.rates().iter().any(Option::is_some)
    }

    fn rates(&self) -> [Option<u64>; 4] {
        [
            self.read_iops,
            self.write_iops,
            self.read_bytes_per_second,
            self.write_bytes_per_second,
        ]
    }

    /// The QoS keys of a parameter map, typed; other keys are left to the caller. `0` or an
    /// empty value is "no limit". Sizes take the suffixes K, M and G (powers of 1024).
    pub fn parse(raw: &HashMap<String, String>) -> Result<Limits> {
        Limits::default().overlay(raw)
    }

    /// These limits with the QoS keys `raw` names changed, and the others kept: a
    /// VolumeAttributesClass changes what it names (CSI: no change "based on the absence of
    /// keys"). Other keys are left to the caller.
    pub fn overlay(self, raw: &HashMap<String, String>) -> Result<Limits> {
        let mut l = self;
        for key in KEYS {
            let Some(v) = raw.get(key).map(|v| v.trim()) else {
                continue;
            };
            match key {
                "readIOPS" => l.read_iops = parse_rate(key, v, MAX_IOPS, false)?,
                "writeIOPS" => l.write_iops = parse_rate(key, v, MAX_IOPS, false)?,
                "readBytesPerSecond" => {
                    l.read_bytes_per_second = parse_rate(key, v, MAX_BYTES_PER_SECOND, true)?;
                }
                "writeBytesPerSecond" => {
                    l.write_bytes_per_second = parse_rate(key, v, MAX_BYTES_PER_SECOND, true)?;
                }
                "burstSeconds" => {
                    l.burst_seconds = v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (1..=MAX_BURST_SECONDS).contains(n))
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "burstSeconds: {v:?} is not a whole number of seconds from 1 \
                                 to {MAX_BURST_SECONDS}"
                            ))
                        })?;
                }
                _ => unreachable!("every key of KEYS is handled"),
            }
        }
        Ok(l)
    }

    /// Mutable parameters (VolumeAttributesClass, ModifyVolume) applied over these limits:
    /// only the QoS keys may change after creation, anything else is refused by name. The
    /// `csi.storage.k8s.io/` keys the csi-resizer adds (`--extra-modify-metadata`) are
    /// ignored.
    pub fn modified(self, raw: &HashMap<String, String>) -> Result<Limits> {
        let mut unknown: Vec<&str> = raw
            .keys()
            .map(String::as_str)
            .filter(|k| !KEYS.contains(k) && !k.starts_with("csi.storage.k8s.io/"))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(Error::InvalidArgument(format!(
                "mutable parameters {unknown:?} are not supported (known: {})",
                KEYS.join(", ")
            )));
        }
        self.overlay(raw)
    }

    /// The canonical form kept in a volume record: the limits set, and `burstSeconds` when
    /// it is not the default. [`Limits::parse`] reads it back.
    pub fn canonical(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (key, rate) in KEYS.iter().zip(self.rates()) {
            if let Some(rate) = rate {
                m.insert(key.to_string(), rate.to_string());
            }
        }
        if self.burst_seconds != Limits::default().burst_seconds {
            m.insert("burstSeconds".into(), self.burst_seconds.to_string());
        }
        m
    }

    /// Back from [`Limits::canonical`].
    pub fn from_canonical(m: &BTreeMap<String, String>) -> Result<Limits> {
        Limits::parse(&m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

fn parse_rate(key: &str, v: &str, max: u64, size: bool) -> Result<Option<u64>> {
    let bad = || {
        Error::InvalidArgument(format!(
            "{key}: {v:?} is not a {} from 0 (no limit) to {max}",
            if size {
                "byte rate (e.g. 20M)"
            } else {
                "whole number"
            }
        ))
    };
    if v.is_empty() {
        return Ok(None);
    }
    const SIZES: &[(&str, u64)] = &[
        ("K", 1 << 10),
        ("Ki", 1 << 10),
        ("M", 1 << 20),
        ("Mi", 1 << 20),
        ("G", 1 << 30),
        ("Gi", 1 << 30),
    ];
    let n = number_with_suffix(v, if size { SIZES } else { &[] })
        .filter(|&n| n <= max)
        .ok_or_else(bad)?;
    Ok((n > 0).then_some(n))
}

/// Which way a request moves data. Only READ counts as a read; WRITE, WRITE_ZEROES and TRIM
/// count as writes (a zeroing of a large range costs one operation and no bytes: it moves
/// none through the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens per second.
    rate: f64,
    capacity: f64,
    /// May go below zero: the debt of the last requests.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst_seconds: u64, now: Instant) -> Self {
        let capacity = rate as f64 * burst_seconds as f64;
        Self {
            rate: rate as f64,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Refills up to `now`; the tokens there are (negative: a debt).
    fn level(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.tokens
    }

    /// Takes `n` tokens; returns how long until the bucket is out of debt.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.level(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The buckets of one volume, shared by all its connections; limits can change at any time.
#[derive(Debug, Default)]
pub struct Qos {
    limited: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    limits: Limits,
    /// read IOPS, write IOPS, read bytes, write bytes.
    buckets: [Option<Bucket>; 4],
}

impl Qos {
    pub fn new(limits: Limits) -> Self {
        let qos = Qos::default();
        qos.set(limits, Instant::now());
        qos
    }

    /// Replaces the limits, effective for the next request. A bucket whose rate is unchanged
    /// keeps its state (debt included), so re-applying the same limits changes nothing. A
    /// changed rate keeps the tokens (or the debt) the bucket had, up to its new capacity: a
    /// change gives no fresh burst, so the new rate holds from the change on. A limit that
    /// was not set starts with a full bucket, as at staging.
    pub fn set(&self, limits: Limits, now: Instant) {
        let mut st = self.state.lock().recover();
        let old = st.limits;
        for (i, (new, was)) in limits.rates().into_iter().zip(old.rates()).enumerate() {
            let same = new == was && limits.burst_seconds == old.burst_seconds;
            if !same || st.buckets[i].is_none() {
                let carried = st.buckets[i].as_mut().map(|b| b.level(now));
                st.buckets[i] = new.map(|rate| {
                    let mut b = Bucket::new(rate, limits.burst_seconds, now);
                    if let Some(level) = carried {
                        b.tokens = level.min(b.capacity);
                    }
                    b
                });
            }
        }
        st.limits = limits;
        self.limited.store(limits.is_limited(), Ordering::Release);
    }

    /// Whether any limit is set (one atomic load).
    pub fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> Limits {
        self.state.lock().recover().limits
    }

    /// Charges one request of `bytes` and returns how long it must wait before it runs.
    pub fn delay(&self, dir: Direction, bytes: u64, now: Instant) -> Duration {
        if !self.is_limited() {
            return Duration::ZERO;
        }
        let (ops, data) = match dir {
            Direction::Read => (0, 2),
            Direction::Write => (1, 3),
        };
        let mut st = self.state.lock().recover();
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut st.buckets[ops] {
            wait = wait.max(b.take(1.0, now));
        }
        if let Some(b) = &mut st.buckets[data] {
            wait = wait.max(b.take(bytes as f64, now));
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Runs `n` requests back to back, each starting when the previous one's wait ends, and
    /// returns the simulated time they took.
    fn drive(qos: &Qos, start: Instant, n: u64, dir: Direction, bytes: u64) -> Duration {
        let mut now = start;
        for _ in 0..n {
            now += qos.delay(dir, bytes, now);
        }
        now - start
    }

    #[test]
    fn parameters_are_typed_and_bad_ones_refused_by_name() {
        let l = Limits::parse(&map(&[
            ("readIOPS", "1000"),
            ("writeIOPS", "0"),
            ("writeBytesPerSecond", "20M"),
            ("readBytesPerSecond", ""),
            ("burstSeconds", "5"),
            ("clusterSize", "64K"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            Limits {
                read_iops: Some(1000),
                write_iops: None,
                read_bytes_per_second: None,
                write_bytes_per_second: Some(20 << 20),
                burst_seconds: 5,
            }
        );
        assert!(!Limits::parse(&HashMap::new()).unwrap().is_limited());
        for (k, v, says) in [
            ("readIOPS", "1k", "whole number"),
            ("readIOPS", "-5", "whole number"),
            ("writeIOPS", "20000000", "whole number"),
            ("readBytesPerSecond", "20X", "byte rate"),
            ("writeBytesPerSecond", "2048G", "byte rate"),
            ("burstSeconds", "0", "burstSeconds"),
            ("burstSeconds", "61", "burstSeconds"),
        ] {
            let err = Limits::parse(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(err.contains(k) && err.contains(says), "{k}={v}: {err}");
        }
    }

    #[test]
    fn mutable_parameters_change_what_they_name_and_refuse_other_keys() {
        let base = Limits::parse(&map(&[("readIOPS", "1000"), ("writeIOPS", "500")])).unwrap();
        let l = base
            .modified(&map(&[("writeIOPS", "0"), ("readBytesPerSecond", "1M")]))
            .unwrap();
        assert_eq!(l.read_iops, Some(1000), "an absent key is kept");
        assert_eq!(l.write_iops, None, "0 lifts the limit");
        assert_eq!(l.read_bytes_per_second, Some(1 << 20));
        let with_metadata = base.modified(&map(&[
            ("readIOPS", "5"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pv/name", "pvc-1234"),
        ]));
        assert_eq!(with_metadata.unwrap().read_iops, Some(5));
        let err = base
            .modified(&map(&[("readIOPS", "5"), ("clusterSize", "64K")]))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(err.to_string().contains("\"clusterSize\""), "{err}");
        let canon = l.canonical();
        assert_eq!(
            canon.keys().collect::<Vec<_>>(),
            ["readBytesPerSecond", "readIOPS"]
        );
        assert_eq!(Limits::from_canonical(&canon).unwrap(), l);
        let bursty = l.modified(&map(&[("burstSeconds", "7")])).unwrap();
        assert_eq!(Limits::from_canonical(&bursty.canonical()).unwrap(), bursty);
    }

    #[test]
    fn an_iops_limit_holds_the_long_run_rate_after_the_burst() {
        let t0 = Instant::now();
        let qos = Qos::default();
        qos.set(
            Limits {
                read_iops: Some(1000),
                ..Limits::default()
            },
            t0,
        );
        // The first second's worth passes at once (the burst), then 1000 per second.
        assert_eq!(drive(&qos, t0, 1000, Direction::Read, 4096), Duration::ZERO);
        let took = drive(&qos, t0, 10_000, Direction::Read, 4096);
        assert!((9.99..=10.01).contains(&took.as_secs_f64()), "{took:?}");
        // Writes are not limited by a read limit.
        assert_eq!(
            drive(&qos, t0, 100_000, Direction::Write, 4096),
            Duration::ZERO
        );
    }

    #[test]
    fn a_bandwidth_limit_counts_bytes_and_lets_a_request_larger_than_the_bucket_run() {
        let t0 = Instant::now();
        let qos = Qos::default();
        qos.set(
            Limits {
                write_bytes_per_second: Some(20 << 20),
                ..Limits::default()
            },
            t0,
        );
        // 1 GiB in 1 MiB writes: 51.2 s at 20 MiB/s, less the 1 s burst.
        let took = drive(&qos, t0, 1024, Direction::Write, 1 << 20).as_secs_f64();
        assert!((50.1..=50.3).contains(&took), "{took}");
        // One 64 MiB write on a 20 MiB bucket runs, then the next one waits it off.
        let t1 = t0 + Duration::from_secs(100);
        let wait = qos.delay(Direction::Write, 64 << 20, t1).as_secs_f64();
        assert!((wait - 44.0 / 20.0).abs() < 1e-6, "{wait}");
    }

    #[test]
    fn changed_limits_apply_to_the_next_request_and_the_same_ones_change_nothing() {
        let t0 = Instant::now();
        let limit = |iops| Limits {
            write_iops: Some(iops),
            ..Limits::default()
        };
        let qos = Qos::new(limit(100));
        qos.set(limit(100), t0);
        drive(&qos, t0, 100, Direction::Write, 512); // the burst is spent
        let before = qos.delay(Direction::Write, 512, t0);
        assert!(before > Duration::ZERO);
        qos.set(limit(100), t0); // re-applied: the debt stays
        assert!(qos.delay(Direction::Write, 512, t0) > before);
        // Raised to 10 000: the debt carries over and no burst is granted, so 5000 requests
        // take half a second at the new rate (not an instant, as a fresh bucket would).
        qos.set(limit(10_000), t0);
        let took = drive(&qos, t0, 5000, Direction::Write, 512).as_secs_f64();
        assert!((0.5..0.501).contains(&took), "{took}");
        // An idle bucket keeps what it saved, up to its new capacity.
        let t1 = t0 + Duration::from_secs(10);
        qos.set(limit(2000), t1);
        assert_eq!(drive(&qos, t1, 2000, Direction::Write, 512), Duration::ZERO);
        assert!(qos.delay(Direction::Write, 512, t1) > Duration::ZERO);
        // Lifted: nothing waits any more.
        qos.set(Limits::default(), t0);
        assert!(!qos.limits().is_limited());
        assert_eq!(
            drive(&qos, t0, 1_000_000, Direction::Write, 512),
            Duration::ZERO
        );
    }
}
