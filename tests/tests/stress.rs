//! Many threads on one image: random reads, writes, zero writes and discards, on plain and
//! overlay images, standard and extended L2, buffered and `O_DIRECT`; checked against a model
//! of the expected content, then by `qemu-img check` and by reading the result back with
//! qemu-img.
//!
//! Two phases per image:
//! - **disjoint requests, exact model**: each request holds a test-side lock on its byte range,
//!   so the expected content is exact; ranges are unaligned and short, so requests of different
//!   threads keep sharing clusters (the engine sees concurrent allocation, copy-on-write and
//!   zeroing inside one cluster);
//! - **overlapping requests, provenance check**: no test-side lock at all. Every write stamps
//!   each 512-byte sector with its own sector number and a checksum, so any sector read at
//!   any time must be a stamp for *that* sector, zeros, or what phase one left. A read that
//!   sees another position's data (a cluster reused too early, a lost copy-on-write) fails.
//!
//! Size: `QCOW2_STRESS_OPS` requests per thread per phase (default 300), seed from
//! `QCOW2_STRESS_SEED` (default 1). `for i in $(seq 20); do QCOW2_STRESS_SEED=$i cargo nextest
//! run --test stress; done` is the long form.

use qcow2_engine::sync::Recover;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use qcow2_csi_tests::qemu;
use qcow2_engine::{BackingFormat, CacheMode, CreateOptions, Image, OpenOptions, ZeroFlags};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const THREADS: usize = 8;
const SECTOR: usize = 512;

fn ops_per_thread() -> usize {
    std::env::var("QCOW2_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("QCOW2_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Byte ranges held by requests in flight; `lock` waits until a range overlaps none of them.
#[derive(Default)]
struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl RangeLock {
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().recover();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.freed.wait(held).recover();
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

/// Releases its range when dropped, also when the thread panics (the others must not hang).
struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().recover();
        let i = held.iter().position(|&r| r == self.range).unwrap();
        held.swap_remove(i);
        self.lock.freed.notify_all();
    }
}

struct Case {
    name: &'static str,
    size: u64,
    cluster_size: u64,
    extended_l2: bool,
    backing: bool,
    cache: CacheMode,
}

/// Content of the backing file: recognisable, different from zeros and from stamps.
fn backing_byte(off: u64) -> u8 {
    (off / 7 % 251) as u8 | 1
}

fn make_image(dir: &Path, case: &Case) -> (PathBuf, Vec<u8>) {
    let path = dir.join("stress.qcow2");
    let mut model = vec![0u8; case.size as usize];
    let backing = if case.backing {
        let base = dir.join("base.raw");
        let bytes: Vec<u8> = (0..case.size).map(backing_byte).collect();
        std::fs::write(&base, &bytes).unwrap();
        model = bytes;
        Some(("base.raw".to_string(), BackingFormat::Raw))
    } else {
        None
    };
    qcow2_engine::create(
        &path,
        &CreateOptions {
            size: Some(case.size),
            cluster_size: case.cluster_size,
            extended_l2: case.extended_l2,
            backing,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    (path, model)
}

fn open(path: &Path, case: &Case) -> Image {
    Image::open(
        path,
        &OpenOptions {
            cache: case.cache,
            ..OpenOptions::writable()
        },
    )
    .unwrap()
}

/// Phase one: random requests on unaligned ranges, each under a test-side range lock, so
/// the model is exact; every read is compared byte for byte.
fn disjoint_phase(img: &Image, model: &Mutex<Vec<u8>>, case: &Case, seed: u64) {
    let locks = RangeLock::default();
    let max_len = case.cluster_size * 2 + 1000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (locks, model) = (&locks, model);
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + t as u64);
                for i in 0..ops_per_thread() {
                    let len = rng.random_range(1..=max_len);
                    let start = rng.random_range(0..=case.size - len);
                    let end = start + len;
                    let range = start as usize..end as usize;
                    let _held = locks.lock(start, end);
                    match rng.random_range(0..10) {
                        0..=3 => {
                            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                            img.write_at(&data, start).unwrap();
                            model.lock().unwrap()[range].copy_from_slice(&data);
                        }
                        4 | 5 => {
                            let no_hole = rng.random_bool(0.3);
                            img.write_zeroes(start, len, ZeroFlags { no_hole }).unwrap();
                            model.lock().unwrap()[range].fill(0);
                        }
                        6 => {
                            img.discard(start, len).unwrap();
                            model.lock().unwrap()[range].fill(0);
                        }
                        _ => {
                            let mut got = vec![0u8; len as usize];
                            img.read_at(&mut got, start).unwrap();
                            let want = model.lock().unwrap()[range].to_vec();
                            if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
                                panic!(
                                    "{}: thread {t} op {i}: read {start:#x}+{len:#x} differs at {:#x}: got {:#x}, expected {:#x}",
                                    case.name,
                                    start + at as u64,
                                    got[at],
                                    want[at]
                                );
                            }
                        }
                    }
                    if rng.random_range(0..50) == 0 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
}

/// A 512-byte sector as written by phase two: word 0 names the sector, word 1 the writer,
/// and every other word is a function of the sector and the word's index.
fn stamp(sector: u64, writer: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    for (j, word) in s.chunks_mut(8).enumerate() {
        word.copy_from_slice(&stamp_word(sector, j, writer).to_le_bytes());
    }
    s
}

fn stamp_word(sector: u64, j: usize, writer: u64) -> u64 {
    match j {
        0 => sector + 1,
        1 => writer,
        _ => {
            let mut x = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (j as u64) << 48;
            x ^= x >> 29;
            x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            (x ^ (x >> 32)) | 1
        }
    }
}

/// Whether a sector read at `sector` holds only what may legitimately be there. Checked
/// word by word: the kernel does not make a read atomic against a concurrent write of the
/// same bytes, so a sector may mix two writes (or a write and zeros); but every word must
/// be zero, what phase one left, or a stamp word of this very sector.
fn valid_sector(got: &[u8], sector: u64, before: &[u8]) -> bool {
    got.chunks(8)
        .zip(before.chunks(8))
        .enumerate()
        .all(|(j, (w, b))| {
            let w64 = u64::from_le_bytes(w.try_into().unwrap());
            w64 == 0 || w == b || j == 1 || w64 == stamp_word(sector, j, 0)
        })
}

/// Phase two: overlapping requests with no test-side locking; every sector read, during and
/// after, must be valid for its position.
fn overlapping_phase(img: &Image, before: &[u8], case: &Case, seed: u64) {
    let sectors = case.size / SECTOR as u64;
    let max = (case.cluster_size * 2 / SECTOR as u64).max(2);
    let check = |buf: &[u8], first: u64, who: &str| {
        for (k, got) in buf.chunks(SECTOR).enumerate() {
            let sector = first + k as u64;
            let old = &before[sector as usize * SECTOR..][..SECTOR];
            assert!(
                valid_sector(got, sector, old),
                "{}: {who}: sector {sector} (offset {:#x}) holds data that was never written there",
                case.name,
                sector * SECTOR as u64
            );
        }
    };
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let check = &check;
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + 500 + t as u64);
                for i in 0..ops_per_thread() {
                    let n = rng.random_range(1..=max);
                    let first = rng.random_range(0..=sectors - n);
                    let (off, len) = (first * SECTOR as u64, n * SECTOR as u64);
                    match rng.random_range(0..10) {
                        0..=4 => {
                            let writer = ((t as u64) << 32) | i as u64;
                            let data: Vec<u8> =
                                (first..first + n).flat_map(|k| stamp(k, writer)).collect();
                            img.write_at(&data, off).unwrap();
                        }
                        5 => img
                            .write_zeroes(
                                off,
                                len,
                                ZeroFlags {
                                    no_hole: rng.random(),
                                },
                            )
                            .unwrap(),
                        6 => img.discard(off, len).unwrap(),
                        // Flushes release discarded clusters for reuse while other
                        // threads may still be reading them.
                        7 => img.flush().unwrap(),
                        _ => {
                            let mut buf = vec![0u8; len as usize];
                            img.read_at(&mut buf, off).unwrap();
                            check(&buf, first, &format!("thread {t} op {i}"));
                        }
                    }
                }
            });
        }
    });
    let mut all = vec![0u8; case.size as usize];
    img.read_at(&mut all, 0).unwrap();
    check(&all, 0, "final content");
}

fn run(case: &Case) {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, model) = make_image(dir.path(), case);
    let model = Mutex::new(model);
    let seed = seed();
    let img = open(&path, case);
    disjoint_phase(&img, &model, case, seed);
    img.close().unwrap();
    qemu::check_clean(&path);
    let expected = model.into_inner().unwrap();

    // qemu-img reads what the model says, and so do we after a reopen.
    let raw = dir.path().join("phase1.raw");
    qemu::to_raw(&path, &raw);
    let theirs = std::fs::read(&raw).unwrap();
    assert!(
        theirs == expected,
        "{}: qemu-img reads something other than the model",
        case.name
    );
    let img = open(&path, case);
    let mut ours = vec![0u8; case.size as usize];
    img.read_at(&mut ours, 0).unwrap();
    assert!(
        ours == expected,
        "{}: reopened image differs from the model",
        case.name
    );

    overlapping_phase(&img, &expected, case, seed);
    let mut ours = vec![0u8; case.size as usize];
    img.read_at(&mut ours, 0).unwrap();
    img.close().unwrap();
    qemu::check_clean(&path);
    qemu::to_raw(&path, &raw);
    let theirs = std::fs::read(&raw).unwrap();
    if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!(
            "{}: after the overlapping phase qemu-img and the engine disagree at {at:#x}",
            case.name
        );
    }
    eprintln!(
        "{}: {THREADS} threads x {} requests x 2 phases, seed {seed}",
        case.name,
        ops_per_thread()
    );
}

#[test]
fn plain_standard_l2() {
    run(&Case {
        name: "plain, 64 KiB clusters",
        size: 16 << 20,
        cluster_size: 65536,
        extended_l2: false,
        backing: false,
        cache: CacheMode::Buffered,
    });
}

#[test]
fn plain_extended_l2_direct() {
    run(&Case {
        name: "plain, extended L2, O_DIRECT",
        size: 16 << 20,
        cluster_size: 65536,
        extended_l2: true,
        backing: false,
        cache: CacheMode::Direct,
    });
}

#[test]
fn overlay_standard_l2_direct() {
    run(&Case {
        name: "overlay on raw, 64 KiB clusters, O_DIRECT",
        size: 16 << 20,
        cluster_size: 65536,
        extended_l2: false,
        backing: true,
        cache: CacheMode::Direct,
    });
}

#[test]
fn overlay_extended_l2() {
    run(&Case {
        name: "overlay on raw, extended L2",
        size: 16 << 20,
        cluster_size: 65536,
        extended_l2: true,
        backing: true,
        cache: CacheMode::Buffered,
    });
}

#[test]
fn small_clusters_many_tables() {
    // 4 KiB clusters: an L2 table maps only 2 MiB, so threads keep allocating tables and
    // refcount blocks while they race.
    run(&Case {
        name: "plain, 4 KiB clusters",
        size: 16 << 20,
        cluster_size: 4096,
        extended_l2: false,
        backing: false,
        cache: CacheMode::Buffered,
    });
}
