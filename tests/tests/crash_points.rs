//! Crash-point enumeration: every storage mutation and every flush of a mixed workload is a
//! crash point. At each one we build
//! - the image a **process crash** leaves (every completed mutation), and
//! - the images a **power loss** leaves (the durable bytes plus several subsets of the
//!   unflushed mutations: none, all, and random ones),
//!
//! and require, for every image: `qemu-img check` finds no corruption (leaks allowed); the
//! guest content holds every write acknowledged before the crash (process crash) or every
//! write acknowledged before the last completed guest flush (power loss); our read-write open
//! repairs it to zero leaks and zero corruptions without changing a byte of guest content.
//!
//! Workloads cover allocating writes, COW into an extended-L2 overlay, discards, zero writes
//! with and without unmap, cluster reuse, L1 growth, refcount block allocation and refcount
//! table growth.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use qcow2_csi_tests::qemu;
use qcow2_engine::ops::check::{self, Repair};
use qcow2_engine::ops::create::NewEncryption;
use qcow2_engine::storage::{FaultPlan, FaultStorage, MemoryStorage, Mutation, Storage};
use qcow2_engine::{BackingFormat, CreateOptions, Image, OpenOptions, ZeroFlags};
use rand::{Rng, SeedableRng};

/// The passphrase of the encrypted cases.
const PASS: &str = "crash points";
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero { off: u64, len: u64, no_hole: bool },
    Discard(u64, u64),
    Flush,
    Resize(u64),
}

impl Op {
    /// The guest range the op may change.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write(off, d) => Some((*off, d.len() as u64)),
            Op::Zero { off, len, .. } | Op::Discard(off, len) => Some((*off, *len)),
            Op::Flush | Op::Resize(_) => None,
        }
    }

    fn apply(&self, img: &Image) -> qcow2_engine::Result<()> {
        match self {
            Op::Write(off, d) => img.write_at(d, *off),
            Op::Zero { off, len, no_hole } => {
                img.write_zeroes(*off, *len, ZeroFlags { no_hole: *no_hole })
            }
            Op::Discard(off, len) => img.discard(*off, *len),
            Op::Flush => img.flush(),
            Op::Resize(n) => img.resize(*n),
        }
    }

    fn apply_model(&self, m: &mut Vec<u8>) {
        match self {
            Op::Write(off, d) => m[*off as usize..*off as usize + d.len()].copy_from_slice(d),
            Op::Zero { off, len, .. } | Op::Discard(off, len) => {
                m[*off as usize..(*off + *len) as usize].fill(0);
            }
            Op::Flush => {}
            Op::Resize(n) => m.resize(*n as usize, 0),
        }
    }
}

struct Case {
    name: &'static str,
    dir: PathBuf,
    /// The image before the workload (clean, durable).
    initial: Vec<u8>,
    /// Guest content before the workload.
    base_model: Vec<u8>,
    ops: Vec<Op>,
    /// The passphrase of a LUKS-encrypted image.
    passphrase: Option<&'static str>,
    /// The external data file before the workload, for an image with one (named
    /// [`DATA_FILE`]): it crashes with the image, as another file of the same process.
    data_initial: Option<Vec<u8>>,
}

/// The data file name of the data-file cases.
const DATA_FILE: &str = "top.data";

impl Case {
    fn path(&self) -> PathBuf {
        self.dir.join("top.qcow2")
    }

    fn open(
        &self,
        storage: Arc<dyn Storage>,
        data: Option<Arc<dyn Storage>>,
        writable: bool,
    ) -> qcow2_engine::Result<Image> {
        let opts = OpenOptions {
            writable,
            passphrase: self.passphrase.map(qcow2_engine::crypto::Passphrase::new),
            ..OpenOptions::default()
        };
        match data {
            Some(d) => Image::open_storage_with_data_file(storage, d, Some(&self.path()), &opts),
            None => Image::open_storage(storage, Some(&self.path()), &opts),
        }
    }

    fn model_after(&self, k: usize) -> Vec<u8> {
        let mut m = self.base_model.clone();
        for op in &self.ops[..k] {
            op.apply_model(&mut m);
        }
        m
    }
}

/// How a workload run ended.
struct Run {
    /// Ops that completed (acknowledged).
    acked: usize,
    /// Ops up to and including the last completed guest flush.
    flushed: usize,
    storage: Arc<FaultStorage>,
    /// The data file, crashed with the image.
    data: Option<Arc<FaultStorage>>,
}

fn run(case: &Case, plan: FaultPlan) -> Run {
    let storage = Arc::new(FaultStorage::new(case.initial.clone(), plan));
    let data = case
        .data_initial
        .as_ref()
        .map(|d| Arc::new(FaultStorage::sharing(d.clone(), &storage)));
    let mut acked = 0;
    let mut flushed = 0;
    let data_dyn = data.clone().map(|d| d as Arc<dyn Storage>);
    if let Ok(img) = case.open(storage.clone(), data_dyn, true) {
        for (i, op) in case.ops.iter().enumerate() {
            if op.apply(&img).is_err() {
                break;
            }
            acked = i + 1;
            if matches!(op, Op::Flush) {
                flushed = i + 1;
            }
        }
        if acked == case.ops.len() && img.close().is_ok() {
            flushed = acked;
        }
    }
    Run {
        acked,
        flushed,
        storage,
        data,
    }
}

fn memory(bytes: &[u8]) -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::from_bytes(bytes.to_vec()))
}

/// Guest content of an image held in memory (read-only open: no repair, no writes).
fn content(case: &Case, bytes: &[u8], data: Option<&[u8]>) -> Vec<u8> {
    let img = case
        .open(memory(bytes), data.map(memory), false)
        .unwrap_or_else(|e| panic!("{}: crashed image does not open read-only: {e}", case.name));
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{}: reading the crashed image: {e}", case.name));
    buf
}

/// Checks one crashed image; `allowed(i, byte)` says whether guest byte `i` may hold `byte`.
fn verify(
    case: &Case,
    what: &str,
    (bytes, data): (&[u8], Option<&[u8]>),
    scratch: &Path,
    allowed: impl Fn(usize, u8) -> bool,
) {
    std::fs::write(scratch, bytes).unwrap();
    match data {
        Some(d) => {
            let dir = scratch.parent().unwrap();
            std::fs::write(dir.join(DATA_FILE), d).unwrap();
            qemu::check_no_corruption_in(dir, scratch);
        }
        None => {
            qemu::check_no_corruption_with(scratch, case.passphrase);
        }
    }
    let ours = check::check(
        &(Arc::new(MemoryStorage::from_bytes(bytes.to_vec())) as Arc<dyn Storage>),
        Repair::None,
    )
    .unwrap();
    assert_eq!(
        ours.corruptions, 0,
        "{}: {what}: {:?}",
        case.name, ours.messages
    );

    let before = content(case, bytes, data);
    if let Some(i) = (0..before.len()).find(|&i| !allowed(i, before[i])) {
        panic!(
            "{}: {what}: guest byte {i:#x} is {:#x}, which no acknowledged state allows",
            case.name, before[i]
        );
    }

    // Our read-write open repairs (the image is dirty) and the close is clean.
    let storage = Arc::new(MemoryStorage::from_bytes(bytes.to_vec()));
    let data_storage = data.map(|d| Arc::new(MemoryStorage::from_bytes(d.to_vec())));
    let img = case
        .open(
            storage.clone(),
            data_storage.clone().map(|d| d as Arc<dyn Storage>),
            true,
        )
        .unwrap_or_else(|e| panic!("{}: {what}: read-write open/repair failed: {e}", case.name));
    img.close().unwrap();
    let repaired = storage.to_bytes();
    let after = check::check(
        &(Arc::new(MemoryStorage::from_bytes(repaired.clone())) as Arc<dyn Storage>),
        Repair::None,
    )
    .unwrap();
    assert_eq!(
        (after.corruptions, after.leaks),
        (0, 0),
        "{}: {what}: after repair: {:?}",
        case.name,
        after.messages
    );
    let data_after = data_storage.map(|d| d.to_bytes());
    assert!(
        content(case, &repaired, data_after.as_deref()) == before,
        "{}: {what}: repair changed guest content",
        case.name
    );
}

/// Every crash point of a case; returns how many crash points were covered.
fn enumerate(case: &Case) -> u64 {
    let clean = run(case, FaultPlan::None);
    assert_eq!(
        clean.acked,
        case.ops.len(),
        "{}: workload fails without faults",
        case.name
    );
    let mutations = clean.storage.mutations();
    let flushes = clean.storage.flushes();
    let mut points: Vec<FaultPlan> = (0..mutations).map(FaultPlan::CrashAtMutation).collect();
    points.extend((0..flushes).map(FaultPlan::CrashAtFlush));
    let images = AtomicU64::new(0);
    let workers = 2;
    std::thread::scope(|s| {
        for w in 0..workers {
            let points = &points;
            let images = &images;
            s.spawn(move || {
                // Beside the backing file; with a data file, one directory per worker, the
                // data file beside the image.
                let scratch = match &case.data_initial {
                    None => case.dir.join(format!("crash-{w}.qcow2")),
                    Some(_) => {
                        let d = case.dir.join(format!("worker-{w}"));
                        std::fs::create_dir_all(&d).unwrap();
                        d.join("crash.qcow2")
                    }
                };
                let mut rng = ChaCha8Rng::seed_from_u64(w as u64);
                for &plan in points.iter().skip(w).step_by(workers) {
                    let r = run(case, plan);
                    assert!(r.storage.has_crashed(), "{}: {plan:?} never hit", case.name);
                    let done = case.model_after(r.acked);
                    let next = case.model_after((r.acked + 1).min(case.ops.len()));
                    // Process crash: everything acknowledged, the op in flight old or new.
                    let live_data = r.data.as_ref().map(|d| d.live());
                    verify(
                        case,
                        &format!("process crash at {plan:?}"),
                        (&r.storage.live(), live_data.as_deref()),
                        &scratch,
                        |i, b| {
                            done.get(i).copied().unwrap_or(0) == b
                                || next.get(i).copied().unwrap_or(0) == b
                        },
                    );
                    // Power loss: what the last guest flush covered must be there.
                    let flushed = case.model_after(r.flushed);
                    let mut touched = vec![false; flushed.len().max(next.len())];
                    for op in &case.ops[r.flushed..(r.acked + 1).min(case.ops.len())] {
                        if let Some((off, len)) = op.range() {
                            let end = ((off + len) as usize).min(touched.len());
                            touched[off as usize..end].fill(true);
                        }
                    }
                    let unflushed = r.storage.unflushed();
                    let n = unflushed.len();
                    // None, all, the writes without the zeroings and punches (a disk that
                    // kept the new metadata but not the deallocation it relies on), random.
                    let writes = unflushed
                        .iter()
                        .map(|m| matches!(m, Mutation::Write(..)))
                        .collect();
                    let mut subsets: Vec<Vec<bool>> = vec![vec![false; n], vec![true; n], writes];
                    for _ in 0..2 {
                        subsets.push((0..n).map(|_| rng.random_bool(0.5)).collect());
                    }
                    // The data file's unflushed mutations, chosen the same way.
                    let data_unflushed = r.data.as_ref().map(|d| d.unflushed()).unwrap_or_default();
                    let dn = data_unflushed.len();
                    let mut data_subsets: Vec<Vec<bool>> = vec![
                        vec![false; dn],
                        vec![true; dn],
                        data_unflushed
                            .iter()
                            .map(|m| matches!(m, Mutation::Write(..)))
                            .collect(),
                    ];
                    for _ in 0..2 {
                        data_subsets.push((0..dn).map(|_| rng.random_bool(0.5)).collect());
                    }
                    for (k, keep) in subsets.iter().enumerate() {
                        let bytes = r.storage.power_loss(|j| keep[j]);
                        let data_bytes = r.data.as_ref().map(|d| {
                            let keep = &data_subsets[k];
                            d.power_loss(|j| keep[j])
                        });
                        verify(
                            case,
                            &format!("power loss {k} at {plan:?}"),
                            (&bytes, data_bytes.as_deref()),
                            &scratch,
                            |i, b| {
                                touched.get(i).copied().unwrap_or(true)
                                    || flushed.get(i).copied().unwrap_or(0) == b
                            },
                        );
                    }
                    images.fetch_add(1 + subsets.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let n = images.load(Ordering::Relaxed);
    eprintln!(
        "{}: {} crash points ({mutations} mutations, {flushes} flushes), {n} images checked",
        case.name,
        points.len()
    );
    points.len() as u64
}

fn pattern(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let b: u8 = rng.random_range(1..=255);
    (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect()
}

/// A seeded mixed workload over `[0, size)`, with a flush every few ops.
fn workload(seed: u64, size: u64, count: usize, unit: u64, grow_to: Option<u64>) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ops = Vec::new();
    let mut size = size;
    for i in 0..count {
        if let Some(n) = grow_to.filter(|_| i == count / 2) {
            ops.push(Op::Resize(n));
            size = n;
        }
        let len = rng.random_range(1..=4 * unit).min(size);
        let off = if rng.random_bool(0.5) {
            rng.random_range(0..size / unit) * unit
        } else {
            rng.random_range(0..=size - len)
        };
        let len = len.min(size - off);
        ops.push(match rng.random_range(0..10) {
            0..=4 => Op::Write(off, pattern(&mut rng, len as usize)),
            5 | 6 => Op::Discard(off, len),
            7 => Op::Zero {
                off,
                len,
                no_hole: false,
            },
            8 => Op::Zero {
                off,
                len,
                no_hole: true,
            },
            _ => Op::Flush,
        });
        if rng.random_range(0..4) == 0 {
            ops.push(Op::Flush);
        }
    }
    ops
}

fn make_case(
    name: &'static str,
    dir: &Path,
    create: CreateOptions,
    prefill: &[(u64, u64)],
    ops: Vec<Op>,
) -> Case {
    let storage = Arc::new(MemoryStorage::new());
    let path = dir.join("top.qcow2");
    qcow2_engine::create_on(storage.clone(), Some(&path), &create).unwrap();
    // create_on makes no data file: an empty one, as large as the image.
    let data = create.data_file.as_ref().map(|_| {
        let d = Arc::new(MemoryStorage::new());
        d.set_len(create.size.expect("a size")).unwrap();
        d
    });
    let passphrase = match &create.encryption {
        Some(NewEncryption::New { .. }) => Some(PASS),
        _ => None,
    };
    let opts = OpenOptions {
        passphrase: passphrase.map(qcow2_engine::crypto::Passphrase::new),
        ..OpenOptions::writable()
    };
    let img = match &data {
        Some(d) => {
            Image::open_storage_with_data_file(storage.clone(), d.clone(), Some(&path), &opts)
        }
        None => Image::open_storage(storage.clone(), Some(&path), &opts),
    }
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for &(off, len) in prefill {
        img.write_at(&pattern(&mut rng, len as usize), off).unwrap();
    }
    img.close().unwrap();
    let initial = storage.to_bytes();
    let mut case = Case {
        name,
        dir: dir.to_path_buf(),
        initial,
        base_model: Vec::new(),
        ops,
        passphrase,
        data_initial: data.map(|d| d.to_bytes()),
    };
    let (initial, data) = (case.initial.clone(), case.data_initial.clone());
    case.base_model = content(&case, &initial, data.as_deref());
    case
}

#[test]
fn small_clusters_refblocks_reftable_and_l1_growth() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the
    // one-cluster refcount table covers 2 MiB of file, so the prefill brings the file close
    // to the point where the table must grow, and the workload crosses it; the resize makes
    // the L1 table (64 entries per cluster) move.
    let size = 2 << 20;
    let case = make_case(
        "512B clusters",
        dir.path(),
        CreateOptions {
            size: Some(size),
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::default()
        },
        &[(0, 1_900_000)],
        workload(1, size, 100, 512, Some(3 << 20)),
    );
    let before = case.initial.len();
    let n = enumerate(&case);
    let grown = run(&case, FaultPlan::None).storage.live();
    let h = qcow2_engine::format::Header::parse(&grown[..512]).unwrap();
    assert!(
        h.refcount_table_clusters > 1,
        "the refcount table never grew"
    );
    assert!(u64::from(h.l1_size) > 64, "the L1 table never grew");
    assert!(grown.len() > before);
    // Multi-cluster writes are merged into few mutations, so ~300 points cover this workload.
    assert!(n > 250, "only {n} crash points");
}

#[test]
fn overlay_with_extended_l2_copy_on_write() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let size: u64 = 2 << 20;
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        &size.to_string(),
    ]);
    qemu::io(
        &base,
        &[
            "write -P 0x5a 0 2M".to_string(),
            "write -z 256k 64k".to_string(),
        ],
    );
    let case = make_case(
        "extended-L2 overlay",
        dir.path(),
        CreateOptions {
            size: Some(size),
            cluster_size: 32 << 10,
            extended_l2: true,
            backing: Some(("base.qcow2".into(), BackingFormat::Qcow2)),
            ..CreateOptions::default()
        },
        &[],
        workload(2, size, 120, 1536, None),
    );
    assert!(enumerate(&case) > 400);
}

#[test]
fn standard_clusters_with_reuse_of_freed_clusters() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let mut ops = workload(3, size, 120, 40 << 10, None);
    // Free a run, make it durable, then allocate again: the allocator reuses freed clusters.
    ops.extend([
        Op::Discard(0, 1 << 20),
        Op::Flush,
        Op::Write(3 << 20, vec![0x77; 300 << 10]),
        Op::Flush,
    ]);
    let case = make_case(
        "64K clusters",
        dir.path(),
        CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        },
        &[(0, 1 << 20)],
        ops,
    );
    // Batched L2 writes and merged data writes: ~300 mutations and flushes cover this workload.
    let n = enumerate(&case);
    assert!(n > 250, "only {n} crash points");
}

/// An encrypted image: every write is encrypted at its host offset, partial writes into
/// new clusters write encrypted zeros around them (synced before the entry), unaligned ones
/// read-modify-write their edge sectors. A crash or power loss anywhere leaves no
/// corruption and no guest byte that no acknowledged state allows: noise from a cluster
/// linked before its encrypted zeros were durable would show here.
#[test]
fn encrypted_image_partial_and_unaligned_writes() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 2 << 20;
    let mut ops = workload(5, size, 60, 20 << 10, None);
    ops.extend([
        Op::Write(100_003, vec![0x31; 1_000]),
        Op::Flush,
        Op::Write((1 << 20) + 7, vec![0x32; 70_001]),
        Op::Discard(65_536, 65_536),
        Op::Flush,
    ]);
    let case = make_case(
        "encrypted 64K clusters",
        dir.path(),
        CreateOptions {
            size: Some(size),
            encryption: Some(NewEncryption::New {
                passphrase: qcow2_engine::crypto::Passphrase::new(PASS),
                params: qcow2_engine::crypto::luks::NewHeader {
                    iter_time_ms: 1,
                    ..Default::default()
                },
            }),
            ..CreateOptions::default()
        },
        &[(0, 256 << 10)],
        ops,
    );
    let n = enumerate(&case);
    assert!(n > 100, "only {n} crash points");
}

#[test]
fn reused_clusters_read_as_zeros_after_a_power_loss() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    // The discard's clusters are released at the flush (and punched, not yet durably); the
    // first allocation after it refills the reserve from them. A partial-cluster write into
    // a reused cluster leaves bytes of it unwritten: they must read as zeros, not as the
    // prefill, whatever a power loss keeps.
    let ops = vec![
        Op::Discard(0, 1 << 20),
        Op::Flush,
        Op::Write((2 << 20) + 4096, vec![0x66; 300 << 10]),
        Op::Write(3 << 20, vec![0x67; 5000]),
        Op::Flush,
    ];
    let case = make_case(
        "reuse after release",
        dir.path(),
        CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        },
        &[(0, 1 << 20)],
        ops,
    );
    let n = enumerate(&case);
    assert!(n > 10, "only {n} crash points");
    // The writes took the freed clusters: the file did not grow.
    let after = run(&case, FaultPlan::None).storage.live();
    assert!(
        after.len() <= case.initial.len(),
        "no cluster was reused: {} -> {} bytes",
        case.initial.len(),
        after.len()
    );
}

/// The repair itself is crash-safe: a dirty image with leaks (left by a crash in the middle of
/// a workload) is repaired by a read-write open and closed; a crash or power loss at every
/// mutation and flush of that repair leaves an image without corruption and with the same
/// guest content, which a second repair makes clean.
#[test]
fn repair_survives_crashes() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let mut case = make_case(
        "repair",
        dir.path(),
        CreateOptions {
            size: Some(size),
            cluster_size: 4096,
            ..CreateOptions::default()
        },
        &[(0, 1 << 20)],
        workload(4, size, 80, 16 << 10, None),
    );
    // Crash half-way through the workload: a dirty image with leaked clusters.
    let total = run(&case, FaultPlan::None).storage.mutations();
    let crashed = run(&case, FaultPlan::CrashAtMutation(total / 2));
    let dirty = crashed.storage.live();
    let leaks = check::check(
        &(Arc::new(MemoryStorage::from_bytes(dirty.clone())) as Arc<dyn Storage>),
        Repair::None,
    )
    .unwrap()
    .leaks;
    assert!(leaks > 0, "the crash left no leaks to repair");
    let expected = content(&case, &dirty, None);
    case.initial = dirty;
    case.ops = Vec::new(); // the workload is the repairing open and the clean close

    let clean = run(&case, FaultPlan::None);
    let (mutations, flushes) = (clean.storage.mutations(), clean.storage.flushes());
    assert!(mutations > 0);
    let scratch = dir.path().join("repair.qcow2");
    let mut points = 0;
    let plans = (0..mutations)
        .map(FaultPlan::CrashAtMutation)
        .chain((0..flushes).map(FaultPlan::CrashAtFlush));
    for plan in plans {
        let r = run(&case, plan);
        assert!(r.storage.has_crashed());
        let n = r.storage.unflushed().len();
        let mut images = vec![r.storage.live(), r.storage.power_loss(|_| false)];
        images.push(r.storage.power_loss(|i| i % 2 == 0 || i + 1 == n));
        for (k, bytes) in images.iter().enumerate() {
            verify(
                &case,
                &format!("repair interrupted ({k}) at {plan:?}"),
                (bytes, None),
                &scratch,
                |i, b| expected.get(i).copied().unwrap_or(0) == b,
            );
        }
        points += 1;
    }
    eprintln!(
        "repair: {points} crash points ({mutations} mutations, {flushes} flushes), {leaks} leaks repaired"
    );
}

/// A qemu-made image with compressed clusters (several per host cluster, so refcounts above
/// one) and zero clusters: rewriting, zeroing and discarding them releases shared host
/// clusters and copies decompressed bytes (a COW barrier) at every crash point.
#[test]
fn qemu_made_image_with_compressed_clusters() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.qcow2");
    let size: u64 = 2 << 20;
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    qemu::io(
        &path,
        &[
            "write -c -P 0x21 0 256k".to_string(),
            "write -c -z 256k 64k".to_string(),
            "write -P 0x22 512k 256k".to_string(),
            "write -z 1M 64k".to_string(),
        ],
    );
    let initial = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut ops = workload(5, size, 100, 6 << 10, None);
    ops.extend([
        Op::Write(8 << 10, vec![0x99; 4096]),
        Op::Discard(64 << 10, 64 << 10),
        Op::Flush,
    ]);
    let mut case = Case {
        name: "qemu-made compressed",
        dir: dir.path().to_path_buf(),
        initial,
        base_model: Vec::new(),
        ops,
        passphrase: None,
        data_initial: None,
    };
    case.base_model = content(&case, &case.initial.clone(), None);
    assert!(case.base_model[..256 << 10].iter().all(|&b| b == 0x21));
    assert!(enumerate(&case) > 200);
}

/// Images with an external data file, plain and raw: every mutation of either file and every
/// flush is a crash point (one process: the files crash together; after a power loss each
/// keeps its own subset of unflushed mutations). Writes into unmapped clusters write the
/// rest of the unit and sync it before linking; discards punch the data file before the
/// entry changes; a raw data file is zeroed in place.
#[test]
fn data_file_images_plain_and_raw() {
    if !qemu::require() {
        return;
    }
    for (name, raw, extended) in [
        ("data file, standard L2", false, false),
        ("raw data file, extended L2", true, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let size: u64 = 2 << 20;
        let mut ops = workload(11 + raw as u64, size, 60, 24 << 10, None);
        ops.extend([
            Op::Write(70_001, vec![0x41; 9_000]),
            Op::Discard(0, 128 << 10),
            Op::Flush,
            Op::Write(5_000, vec![0x42; 3_000]),
            Op::Flush,
        ]);
        let case = make_case(
            name,
            dir.path(),
            CreateOptions {
                size: Some(size),
                cluster_size: if extended { 32 << 10 } else { 64 << 10 },
                extended_l2: extended,
                data_file: Some(qcow2_engine::ops::create::NewDataFile {
                    name: DATA_FILE.into(),
                    raw,
                }),
                ..CreateOptions::default()
            },
            &[(0, 256 << 10), (1 << 20, 100_000)],
            ops,
        );
        let n = enumerate(&case);
        assert!(n > 100, "{name}: only {n} crash points");
    }
}
