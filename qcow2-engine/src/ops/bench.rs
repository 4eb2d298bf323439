//! A load generator for one image: `qcow2util bench`, shaped like `qemu-img bench` so the two
//! can be compared side by side. Threads stand in for queue depth: each keeps one request in
//! flight, the way a multi-connection NBD export or a multi-queue block device drives the
//! engine.
//!
//! Offsets are a pure function of the request index (a seeded hash for random patterns), so
//! the same options give the same offsets whatever the number of threads, and the benchmark
//! script can give QEMU the same offsets.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions, ReadRequest};
use crate::storage::{AlignedBuf, CacheMode};

/// Where requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Request `i` at `offset + i * step`, wrapping inside the range.
    Seq,
    /// Request `i` at a block-aligned offset drawn from a seeded hash of `i`.
    Rand,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Write (else read).
    pub write: bool,
    pub pattern: Pattern,
    /// Request size.
    pub block: u64,
    /// Distance between sequential requests (default: the block size; `qemu-img bench -S`).
    pub step: Option<u64>,
    /// Requests in flight.
    pub depth: usize,
    /// Threads sharing the depth, for reads: each submits its share of the requests as one
    /// batch ([`Image::read_batch`]: io_uring) and waits for it. `None`: one thread per
    /// request, each a plain `read_at`. Writes always run a thread per request.
    pub threads: Option<usize>,
    /// Stop after this many requests...
    pub count: Option<u64>,
    /// ...or after this long (whichever comes first; one of the two is required).
    pub time: Option<Duration>,
    /// `O_DIRECT` for guest data.
    pub direct: bool,
    /// First byte of the range requests fall in.
    pub offset: u64,
    /// Length of that range (default: to the end of the image).
    pub range: Option<u64>,
    /// Seed of the random pattern.
    pub seed: u64,
    /// Byte the write buffers are filled with.
    pub fill: u8,
    /// Flush after the last request, inside the timed part.
    pub flush: bool,
    /// Passphrase of an encrypted image.
    pub passphrase: Option<crate::crypto::Passphrase>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            write: false,
            pattern: Pattern::Seq,
            block: 4096,
            step: None,
            depth: 1,
            threads: None,
            count: None,
            time: None,
            direct: false,
            offset: 0,
            range: None,
            seed: 1,
            fill: 0xab,
            flush: false,
            passphrase: None,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub write: bool,
    pub pattern: Pattern,
    pub block: u64,
    pub depth: usize,
    pub direct: bool,
    /// Requests completed.
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    /// Peak resident memory of the process (`VmHWM`), KiB; `None` where unknown.
    pub max_rss_kib: Option<u64>,
}

impl BenchReport {
    /// One human-readable summary line.
    pub fn summary(&self) -> String {
        format!(
            "{} {} bs={} qd={}{}: {} ops in {:.3} s = {:.0} IOPS, {:.1} MiB/s{}",
            if self.write { "write" } else { "read" },
            match self.pattern {
                Pattern::Seq => "seq",
                Pattern::Rand => "rand",
            },
            self.block,
            self.depth,
            if self.direct { " direct" } else { "" },
            self.ops,
            self.seconds,
            self.iops,
            self.mib_per_s,
            self.max_rss_kib
                .map(|k| format!(", max RSS {:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_default()
        )
    }
}

/// A seeded 64-bit mix (SplitMix64's finaliser): request index → pseudo-random number.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(i.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The offsets of a run, by request index.
#[derive(Debug, Clone, Copy)]
pub struct Offsets {
    pattern: Pattern,
    start: u64,
    block: u64,
    step: u64,
    /// Request slots in the range (sequential: positions before wrapping; random: blocks).
    slots: u64,
    seed: u64,
}

impl Offsets {
    /// Checks the options against an image of `size` bytes.
    pub fn new(opts: &BenchOptions, size: u64) -> Result<Offsets> {
        let block = opts.block;
        if block == 0 || block > 32 << 20 {
            return Err(Error::arg("block size must be between 1 byte and 32 MiB"));
        }
        let range = opts.range.unwrap_or(size.saturating_sub(opts.offset));
        if opts.offset.checked_add(range).is_none_or(|end| end > size) || range < block {
            return Err(Error::arg(format!(
                "range {:#x}+{range:#x} does not fit the image (size {size:#x}) or holds no block",
                opts.offset
            )));
        }
        let step = opts.step.unwrap_or(block);
        if step == 0 {
            return Err(Error::arg("step must not be 0"));
        }
        let slots = match opts.pattern {
            Pattern::Seq => (range - block) / step + 1,
            Pattern::Rand => range / block,
        };
        Ok(Offsets {
            pattern: opts.pattern,
            start: opts.offset,
            block,
            step,
            slots,
            seed: opts.seed,
        })
    }

    /// Guest offset of request `i`.
    pub fn at(&self, i: u64) -> u64 {
        match self.pattern {
            Pattern::Seq => self.start + (i % self.slots) * self.step,
            Pattern::Rand => self.start + (mix(self.seed, i) % self.slots) * self.block,
        }
    }
}

/// Peak resident memory of this process, from `/proc/self/status`.
pub fn max_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens the image at `path` and runs the benchmark on it.
pub fn bench_file(path: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    let open = OpenOptions {
        writable: opts.write,
        cache: if opts.direct {
            CacheMode::Direct
        } else {
            CacheMode::Buffered
        },
        passphrase: opts.passphrase.clone(),
        ..OpenOptions::default()
    };
    let image = Image::open(path, &open)?;
    let report = bench(&image, opts)?;
    image.close()?;
    Ok(report)
}

/// Runs the benchmark on an open image.
pub fn bench(image: &Image, opts: &BenchOptions) -> Result<BenchReport> {
    if opts.count.is_none() && opts.time.is_none() {
        return Err(Error::arg("give a request count or a time limit"));
    }
    if opts.depth == 0 || opts.depth > 1024 {
        return Err(Error::arg("depth must be between 1 and 1024"));
    }
    let offsets = Offsets::new(opts, image.size())?;
    let count = opts.count.unwrap_or(u64::MAX);
    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = opts.time.map(|t| start + t);
    let batched = opts.threads.filter(|_| !opts.write);
    if batched.is_some_and(|t| t == 0 || t > opts.depth) {
        return Err(Error::arg("threads must be between 1 and the depth"));
    }
    let threads = batched.unwrap_or(opts.depth);
    // The requests thread `t` keeps in flight.
    let share = |t: usize| opts.depth / threads + usize::from(t < opts.depth % threads);
    let failure = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (next, completed, stop, offsets) = (&next, &completed, &stop, &offsets);
                s.spawn(move || -> Result<()> {
                    let n = share(t);
                    // Aligned, so O_DIRECT requests need no bounce copy.
                    let mut bufs: Vec<AlignedBuf> = (0..n)
                        .map(|_| {
                            let mut buf = AlignedBuf::new(opts.block as usize);
                            buf.bytes_mut().fill(opts.fill);
                            buf
                        })
                        .collect();
                    loop {
                        if stop.load(Ordering::Relaxed)
                            || deadline.is_some_and(|d| Instant::now() >= d)
                        {
                            return Ok(());
                        }
                        let first = next.fetch_add(n as u64, Ordering::Relaxed);
                        if first >= count {
                            return Ok(());
                        }
                        let took = (count - first).min(n as u64) as usize;
                        let done = if opts.write {
                            image.write_at(bufs[0].bytes(), offsets.at(first))
                        } else if batched.is_none() {
                            image.read_at(bufs[0].bytes_mut(), offsets.at(first))
                        } else {
                            let mut reqs: Vec<ReadRequest<'_>> = bufs[..took]
                                .iter_mut()
                                .enumerate()
                                .map(|(k, b)| {
                                    ReadRequest::new(b.bytes_mut(), offsets.at(first + k as u64))
                                })
                                .collect();
                            image.read_batch(&mut reqs);
                            reqs.into_iter().try_for_each(|r| r.result)
                        };
                        if let Err(e) = done {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        completed.fetch_add(took as u64, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bench worker panicked"))
            .find_map(|r| r.err())
    });
    if let Some(e) = failure {
        return Err(e);
    }
    if opts.flush {
        image.flush()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ops = completed.load(Ordering::Relaxed);
    let bytes = ops * opts.block;
    Ok(BenchReport {
        write: opts.write,
        pattern: opts.pattern,
        block: opts.block,
        depth: opts.depth,
        direct: opts.direct,
        ops,
        bytes,
        seconds,
        iops: ops as f64 / seconds,
        mib_per_s: bytes as f64 / seconds / (1 << 20) as f64,
        max_rss_kib: max_rss_kib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pattern: Pattern, block: u64, range: u64) -> BenchOptions {
        BenchOptions {
            pattern,
            block,
            range: Some(range),
            ..BenchOptions::default()
        }
    }

    #[test]
    fn sequential_offsets_step_and_wrap() {
        let mut o = opts(Pattern::Seq, 4096, 1 << 20);
        o.step = Some(65536);
        o.offset = 1 << 20;
        let off = Offsets::new(&o, 4 << 20).unwrap();
        assert_eq!(off.at(0), 1 << 20);
        assert_eq!(off.at(1), (1 << 20) + 65536);
        assert_eq!(off.at(15), (1 << 20) + 15 * 65536);
        assert_eq!(off.at(16), 1 << 20, "wraps inside the range");
    }

    #[test]
    fn random_offsets_are_aligned_in_range_spread_and_repeatable() {
        let o = opts(Pattern::Rand, 4096, 1 << 30);
        let off = Offsets::new(&o, 1 << 30).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let at = off.at(i);
            assert_eq!(at % 4096, 0);
            assert!(at + 4096 <= 1 << 30);
            seen.insert(at);
        }
        // 10000 uniform draws from 262144 slots: about 190 birthday collisions expected.
        assert!(seen.len() > 9_700, "only {} distinct offsets", seen.len());
        let again = Offsets::new(&o, 1 << 30).unwrap();
        assert_eq!(off.at(1234), again.at(1234));
        let other = Offsets::new(
            &BenchOptions {
                seed: 2,
                ..o.clone()
            },
            1 << 30,
        )
        .unwrap();
        assert_ne!(
            (0..8).map(|i| off.at(i)).collect::<Vec<_>>(),
            (0..8).map(|i| other.at(i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(Offsets::new(&opts(Pattern::Seq, 4096, 8192), 4096).is_err());
        assert!(Offsets::new(&opts(Pattern::Seq, 8192, 4096), 1 << 20).is_err());
        assert!(Offsets::new(&opts(Pattern::Rand, 0, 4096), 1 << 20).is_err());
    }
}
