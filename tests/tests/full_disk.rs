//! A full host filesystem under the engine: at every storage mutation of a workload the disk
//! fills (every later write fails with `ENOSPC`), the failed guest operation is retried once
//! space returns, and the workload goes on. Required at every point: the error keeps its
//! `ENOSPC` (the driver pauses on it), the retried operation succeeds, the guest content is
//! the model's, and `qemu-img check` finds the image clean: no corruption and no leak.

use std::sync::Arc;

use qcow2_csi_tests::qemu;
use qcow2_engine::storage::{FaultPlan, FaultStorage, MemoryStorage};
use qcow2_engine::{CreateOptions, Image, OpenOptions, ZeroFlags, create_on};

const SIZE: u64 = 64 << 20;

#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    /// Compressed clusters (`qcow2util dd -c`), from a cluster boundary.
    Compressed(u64, Vec<u8>),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write(off, d) => write!(f, "Write({off:#x}, {} bytes)", d.len()),
            Op::Zero(off, len, no_hole) => write!(f, "Zero({off:#x}, {len:#x}, {no_hole})"),
            Op::Discard(off, len) => write!(f, "Discard({off:#x}, {len:#x})"),
            Op::Flush => write!(f, "Flush"),
            Op::Compressed(off, d) => write!(f, "Compressed({off:#x}, {} bytes)", d.len()),
        }
    }
}

impl Op {
    fn apply(&self, img: &Image) -> qcow2_engine::Result<()> {
        match self {
            Op::Write(off, d) => img.write_at(d, *off),
            Op::Zero(off, len, no_hole) => {
                img.write_zeroes(*off, *len, ZeroFlags { no_hole: *no_hole })
            }
            Op::Discard(off, len) => img.discard(*off, *len),
            Op::Flush => img.flush(),
            Op::Compressed(off, d) => img.write_compressed(d, *off),
        }
    }

    fn model(&self, m: &mut [u8]) {
        match self {
            Op::Write(off, d) | Op::Compressed(off, d) => {
                m[*off as usize..*off as usize + d.len()].copy_from_slice(d);
            }
            Op::Zero(off, len, _) | Op::Discard(off, len) => {
                m[*off as usize..(*off + *len) as usize].fill(0);
            }
            Op::Flush => {}
        }
    }
}

/// Allocating writes (new clusters, a second L2 table, unaligned edges), a rewrite in place,
/// zeroes kept allocated and not, a discard, flushes.
fn workload() -> Vec<Op> {
    vec![
        Op::Write(1000, vec![1; 70_000]),
        Op::Write(600 << 10, vec![2; 200_000]),
        Op::Flush,
        Op::Write(40 << 20, vec![3; 4096]), // another L2 table
        Op::Write(1000, vec![4; 5000]),     // in place
        Op::Zero(600 << 10, 64 << 10, true),
        Op::Zero(40 << 20, 4096, false),
        Op::Discard(0, 64 << 10),
        Op::Write(20 << 20, vec![5; 300_000]),
        Op::Flush,
    ]
}

fn fresh(extended_l2: bool) -> Vec<u8> {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: Some(SIZE),
        extended_l2,
        ..CreateOptions::default()
    };
    create_on(mem.clone(), None, &opts).unwrap();
    mem.to_bytes()
}

fn is_enospc(e: &qcow2_engine::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Closes `img` after a workload on `fault` (a close that finds the disk full leaks what it
/// could not give back and leaves the image dirty: the next read-write open reclaims it),
/// then requires `qemu-img check` clean (written to `path`, removed after) and the guest
/// content `model`. `after` says what happened, for the messages.
fn close_clean(
    img: Image,
    fault: &Arc<FaultStorage>,
    model: &[u8],
    path: &std::path::Path,
    after: &str,
) {
    if let Err(e) = img.close() {
        assert!(is_enospc(&e), "close after {after}: {e}");
        fault.set_plan(FaultPlan::None);
        Image::open_storage(fault.clone(), None, &OpenOptions::writable())
            .unwrap()
            .close()
            .unwrap();
    }
    std::fs::write(path, fault.live()).unwrap();
    qemu::check_clean(path);
    let reopened = Image::open_storage(
        Arc::new(MemoryStorage::from_bytes(fault.live())),
        None,
        &OpenOptions::default(),
    )
    .unwrap();
    let mut got = vec![0u8; SIZE as usize];
    reopened.read_at(&mut got, 0).unwrap();
    assert!(got == model, "guest content differs after {after}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_disk_full_at_any_write_loses_nothing_once_the_operation_is_retried() {
    if !qemu::require() {
        return;
    }
    for extended_l2 in [false, true] {
        let n = fill_at_every_mutation(
            &fresh(extended_l2),
            &workload(),
            &format!("extended L2 {extended_l2}"),
        );
        assert!(n > 10, "the disk must have filled at many points ({n})");
    }
}

/// Runs `ops` on `image` once with the disk filling at each storage mutation in turn (0, 1,
/// 2, ... until a run no longer fills): an operation that fails must fail with `ENOSPC` and
/// succeed when tried again once space returns; every run ends in [`close_clean`] with the
/// model's content. Returns how many mutation points filled the disk.
fn fill_at_every_mutation(image: &[u8], ops: &[Op], what: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0u64;
    loop {
        let fault = Arc::new(FaultStorage::new(
            image.to_vec(),
            FaultPlan::FullFromMutation(n),
        ));
        let img = Image::open_storage(fault.clone(), None, &OpenOptions::writable()).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut filled = false;
        for op in ops {
            if let Err(e) = op.apply(&img) {
                assert!(is_enospc(&e), "{what}, mutation {n}, {op:?}: {e}");
                filled = true;
                fault.set_plan(FaultPlan::None); // space returns
                op.apply(&img)
                    .unwrap_or_else(|e| panic!("{what}, retry after mutation {n}, {op:?}: {e}"));
            }
            op.model(&mut model);
        }
        close_clean(
            img,
            &fault,
            &model,
            &dir.path().join(format!("full-{n}.qcow2")),
            &format!("a full disk at mutation {n} ({what})"),
        );
        if !filled {
            return n;
        }
        n += 1;
    }
}

/// Compressed writes (`qcow2util dd -c`) on a disk that fills at any mutation: the write
/// fails with `ENOSPC` and marks nothing busy for good (the retry would wait forever), the
/// retry succeeds once space returns, and the image is clean with the model's content.
#[test]
fn compressed_writes_on_a_full_disk_lose_nothing_once_retried() {
    if !qemu::require() {
        return;
    }
    let cs = 64usize << 10;
    // Compressible clusters (a repeated sentence), incompressible ones (a xorshift stream),
    // a zero cluster, then a rewrite of clusters the first call placed.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let text = |i: usize| -> Vec<u8> {
        format!("cluster {i} says the same thing again and again. ")
            .into_bytes()
            .into_iter()
            .cycle()
            .take(cs)
            .collect()
    };
    let mut first = Vec::new();
    for i in 0..6 {
        first.extend(if i == 3 { noise(cs) } else { text(i) });
    }
    first.extend(vec![0u8; cs]);
    let second: Vec<u8> = (10..14).flat_map(text).collect();
    let rewrite: Vec<u8> = (20..22).flat_map(text).collect();
    // Each write is flushed, the flush retried like the write.
    let ops = [
        Op::Compressed(0, first),
        Op::Flush,
        Op::Compressed(1 << 20, second),
        Op::Flush,
        Op::Compressed(0, rewrite),
        Op::Flush,
    ];
    let n = fill_at_every_mutation(&fresh(false), &ops, "compressed writes");
    assert!(n > 5, "the disk must have filled at many points ({n})");
}
