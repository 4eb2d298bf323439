//! Bounded runs of the fuzz targets in the normal test suite: the committed regression inputs
//! (`fuzz/regressions/`), qemu-made seed images of every kind, deterministic mutations of
//! those seeds aimed at the header and the tables, and seeded random operation sequences. The
//! long runs are `cargo fuzz` (see `docs/testing.md`).

use std::path::{Path, PathBuf};

use qcow2_csi_tests::{fuzz, qemu};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| {
                let p = e.unwrap().path();
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn open_image_regressions() {
    for (path, bytes) in regressions("open_image") {
        eprintln!("{}", path.display());
        fuzz::open_image(&bytes);
    }
}

#[test]
fn ops_regressions() {
    for (path, bytes) in regressions("ops") {
        eprintln!("{}", path.display());
        fuzz::ops(&bytes);
    }
}

/// Small qemu-made images of the kinds `fuzz/make-seeds.sh` seeds the fuzzer with.
fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let cases: [(&str, &[&str]); 6] = [
        (
            "cluster_size=512",
            &["write -P 1 0 8k", "write -z 16k 4k", "discard 2k 1k"],
        ),
        ("cluster_size=512,compat=0.10", &["write -P 2 4k 8k"]),
        ("cluster_size=4k,refcount_bits=1", &["write -P 3 0 64k"]),
        ("cluster_size=4k,refcount_bits=64", &["write -P 4 100k 20k"]),
        (
            "cluster_size=16k,extended_l2=on",
            &["write -P 5 0 3k", "write -z 8k 2k"],
        ),
        (
            "cluster_size=512,lazy_refcounts=on",
            &["write -P 6 0 4k", "write -c -P 7 64k 4k"],
        ),
    ];
    for (i, (opts, io)) in cases.iter().enumerate() {
        let p = dir.join(format!("seed{i}.qcow2"));
        qemu::img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            p.to_str().unwrap(),
            "1M",
        ]);
        qemu::io(&p, &io.iter().map(|c| c.to_string()).collect::<Vec<_>>());
        out.push(std::fs::read(&p).unwrap());
    }
    // A LUKS-encrypted image (AES-128: a 1 MiB header region, most of the file, so the
    // mutations anywhere land in its header and key material), with data written.
    let storage = std::sync::Arc::new(qcow2_engine::storage::MemoryStorage::new());
    let pass = || qcow2_engine::crypto::Passphrase::new(fuzz::PASSPHRASE);
    qcow2_engine::create_on(
        storage.clone(),
        None,
        &qcow2_engine::CreateOptions {
            size: Some(256 << 10),
            cluster_size: 4096,
            encryption: Some(qcow2_engine::ops::create::NewEncryption::New {
                passphrase: pass(),
                params: qcow2_engine::crypto::luks::NewHeader {
                    aes_key_bytes: 16,
                    iter_time_ms: 1,
                    ..Default::default()
                },
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let img = qcow2_engine::Image::open_storage(
        storage.clone(),
        None,
        &qcow2_engine::OpenOptions {
            passphrase: Some(pass()),
            ..qcow2_engine::OpenOptions::writable()
        },
    )
    .unwrap();
    img.write_at(&[0x42; 10_000], 3_000).unwrap();
    img.close().unwrap();
    // The seed unlocks with the passphrase the fuzz target tries, so mutants get that far.
    let reopened = qcow2_engine::Image::open_storage(
        std::sync::Arc::new(qcow2_engine::storage::MemoryStorage::from_bytes(
            storage.to_bytes(),
        )),
        None,
        &qcow2_engine::OpenOptions {
            passphrase: Some(pass()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut got = [0u8; 16];
    reopened.read_at(&mut got, 5_000).unwrap();
    assert_eq!(got, [0x42; 16]);
    out.push(storage.to_bytes());
    out
}

#[test]
fn open_image_seeds_and_mutations() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let interesting = [0u8, 1, 0x7f, 0x80, 0xfe, 0xff];
    let mut runs = 0;
    for seed in seeds(dir.path()) {
        fuzz::open_image(&seed);
        for _ in 0..150 {
            let mut m = seed.clone();
            for _ in 0..rng.random_range(1..4) {
                // Mostly the header cluster and the first tables; sometimes anywhere.
                let at = if rng.random_bool(0.7) {
                    rng.random_range(0..m.len().min(4096))
                } else {
                    rng.random_range(0..m.len())
                };
                m[at] = if rng.random_bool(0.5) {
                    interesting[rng.random_range(0..interesting.len())]
                } else {
                    m[at] ^ (1 << rng.random_range(0..8))
                };
            }
            if rng.random_bool(0.1) {
                m.truncate(rng.random_range(0..m.len()));
            }
            fuzz::open_image(&m);
            runs += 1;
        }
    }
    assert!(runs >= 1050);
}

#[test]
fn random_operation_sequences() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..150 {
        let len = rng.random_range(8..600);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        fuzz::ops(&data);
    }
}
