//! What the crash-safety barriers cost: runs write-heavy workloads twice on the same kind of
//! fresh image, once as shipped and once on a storage whose `fdatasync` is a no-op (the
//! ordering without its barriers), and prints both times and the number of syncs. Both runs
//! end with one real `fdatasync`, so both pay for getting the data to the disk once.
//!
//! `cargo run --release -p qcow2-engine --example barrier_cost [DIR]`

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use qcow2_engine::storage::{FileStorage, Storage};
use qcow2_engine::{BackingFormat, CreateOptions, Image, OpenOptions};

/// A file whose flushes are counted, and optionally skipped.
#[derive(Debug)]
struct Counted {
    file: FileStorage,
    skip_sync: bool,
    syncs: AtomicU64,
}

impl Storage for Counted {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.punch_hole(offset, len)
    }
    fn flush(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if self.skip_sync {
            Ok(())
        } else {
            self.file.flush()
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// A deterministic permutation of `0..n` (multiplicative, n a power of two).
fn scatter(i: u64, n: u64) -> u64 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7) % n
}

fn run(
    dir: &Path,
    name: &str,
    skip_sync: bool,
    backing: Option<&str>,
    work: impl Fn(&Image),
) -> (f64, u64) {
    let extended = backing == Some("base.qcow2 (extended L2)");
    let backing = backing.map(|b| b.trim_end_matches(" (extended L2)"));
    let path = dir.join(format!("{name}-{skip_sync}.qcow2"));
    let _ = std::fs::remove_file(&path);
    let opts = CreateOptions {
        size: Some(4 << 30),
        backing: backing.map(|b| (b.to_string(), BackingFormat::Qcow2)),
        extended_l2: extended,
        ..CreateOptions::default()
    };
    qcow2_engine::create(&path, &opts).expect("create");
    let storage = Arc::new(Counted {
        file: FileStorage::open(&path, true).expect("open"),
        skip_sync,
        syncs: AtomicU64::new(0),
    });
    let img = Image::open_storage(storage.clone(), Some(&path), &OpenOptions::writable())
        .expect("open image");
    let start = Instant::now();
    work(&img);
    img.close().expect("close");
    storage.file.flush().expect("final sync");
    let took = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).expect("remove");
    (took, storage.syncs.load(Ordering::Relaxed))
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let dir = tempfile::tempdir_in(dir).expect("scratch directory");
    let d = dir.path();
    let base = d.join("base.qcow2");
    qcow2_engine::create(
        &base,
        &CreateOptions {
            size: Some(4 << 30),
            ..CreateOptions::default()
        },
    )
    .expect("base");
    {
        let img = Image::open(&base, &OpenOptions::writable()).expect("base");
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..256u64 {
            img.write_at(&chunk, i << 20).expect("fill base");
        }
        img.close().expect("close base");
    }

    let buf4k = vec![0xa5u8; 4096];
    let buf64k = vec![0xa5u8; 65536];
    type Work<'a> = (&'a str, Option<&'a str>, Box<dyn Fn(&Image) + 'a>);
    let workloads: Vec<Work<'_>> = vec![
        (
            "4 KiB random allocating writes, 16384 clusters",
            None,
            Box::new(|img: &Image| {
                for i in 0..16384 {
                    let c = scatter(i, 65536);
                    img.write_at(&buf4k, c << 16).expect("write");
                }
            }),
        ),
        (
            "64 KiB sequential writes, 1 GiB",
            None,
            Box::new(|img: &Image| {
                for i in 0..16384u64 {
                    img.write_at(&buf64k, i << 16).expect("write");
                }
            }),
        ),
        (
            "4 KiB writes into an overlay (COW from backing), 4096 clusters",
            Some("base.qcow2"),
            Box::new(|img: &Image| {
                for i in 0..4096 {
                    let c = scatter(i, 4096);
                    img.write_at(&buf4k, (c << 16) + 4096).expect("write");
                }
            }),
        ),
        (
            "the same into an extended-L2 overlay (4 KiB-aligned: no COW)",
            Some("base.qcow2 (extended L2)"),
            Box::new(|img: &Image| {
                for i in 0..4096 {
                    let c = scatter(i, 4096);
                    img.write_at(&buf4k, (c << 16) + 4096).expect("write");
                }
            }),
        ),
        (
            "4 KiB random writes with a flush every 64 writes",
            None,
            Box::new(|img: &Image| {
                for i in 0..16384 {
                    img.write_at(&buf4k, scatter(i, 65536) << 16)
                        .expect("write");
                    if i % 64 == 63 {
                        img.flush().expect("flush");
                    }
                }
            }),
        ),
    ];
    println!(
        "| workload | with barriers (s) | syncs | without barriers (s) | syncs | cost |\n|---|---|---|---|---|---|"
    );
    for (name, backing, work) in &workloads {
        let (with, n_with) = run(d, "w", false, *backing, work);
        let (without, n_without) = run(d, "n", true, *backing, work);
        println!(
            "| {name} | {with:.2} | {n_with} | {without:.2} | {n_without} | {:+.0}% |",
            (with / without - 1.0) * 100.0
        );
    }
}
