//! `qcow2util dd -c`: compressed clusters we write (zlib and zstd, several streams packed
//! into each host cluster) read back through qemu-img exactly as the input, both checks
//! find the refcounts right (one reference per stream), and rewriting or discarding them
//! (by qemu-io or by us) keeps them right.

#[allow(dead_code)]
mod common;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use common::{our_check_is_clean, run};

use std::path::Path;
use std::process::Command;

/// 6 MiB + 4.5 KiB of input: clusters of text (compressible), random bytes (not), zeros,
/// and a short last cluster.
fn input(path: &Path) {
    let mut seed = 7u64;
    let mut bytes = Vec::new();
    for i in 0..96 {
        let cluster: Vec<u8> = match i % 4 {
            0 | 1 => format!("cluster {i}: the quick brown fox jumps over the lazy dog. ")
                .into_bytes()
                .into_iter()
                .cycle()
                .take(65_536)
                .collect(),
            2 => (0..65_536)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect(),
            _ => vec![0u8; 65_536],
        };
        bytes.extend(cluster);
    }
    bytes.extend(b"tail ".iter().cycle().take(4608));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn dd_writes_compressed_clusters_qemu_reads() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    input(&raw);
    let plain = dir.path().join("plain.qcow2");
    run(Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args(["dd", "-O", "qcow2", "-i"])
        .arg(&raw)
        .arg("-o")
        .arg(&plain));
    let plain_len = std::fs::metadata(&plain).unwrap().len();
    for (kind, cluster, extra) in [
        ("zlib", "64K", &[][..]),
        ("zstd", "64K", &[][..]),
        ("zlib", "4K", &[][..]),
        ("zstd", "32K", &["--enable-subcluster"][..]),
    ] {
        let out = dir.path().join(format!("c-{kind}-{cluster}.qcow2"));
        run(Command::new(env!("CARGO_BIN_EXE_qcow2util"))
            .args([
                "dd",
                "-c",
                "--compression-type",
                kind,
                "--cluster-size",
                cluster,
            ])
            .args(extra)
            .args(["-O", "qcow2", "-i"])
            .arg(&raw)
            .arg("-o")
            .arg(&out));
        let what = format!("{kind} {cluster} {extra:?}");
        qemu::compare(&out, "qcow2", &raw, "raw");
        qemu::check_clean(&out);
        our_check_is_clean(&out);
        let info = qemu::info(&out);
        assert_eq!(
            info["format-specific"]["data"]["compression-type"], kind,
            "{what}"
        );
        // The text clusters are compressed, and the image is far smaller.
        let map = qemu::map(&out);
        let compressed: u64 = map
            .iter()
            .filter(|e| e["compressed"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert!(
            compressed >= 3 << 20,
            "{what}: {compressed} bytes compressed"
        );
        let len = std::fs::metadata(&out).unwrap().len();
        assert!(len < plain_len * 7 / 10, "{what}: {len} vs {plain_len}");

        // qemu-io rewrites into a compressed cluster and discards another; we do the
        // same elsewhere: every shared host cluster keeps the right count.
        qemu::io(
            &out,
            &[
                "write -P 0x5a 70000 1000".to_string(),
                "discard 0 65536".to_string(),
            ],
        );
        qemu::check_clean(&out);
        let img = qcow2_engine::Image::open(&out, &qcow2_engine::OpenOptions::writable()).unwrap();
        img.write_at(&[0x6b; 3000], 4 * 65_536 + 10).unwrap();
        img.discard(5 * 65_536, 65_536).unwrap();
        let mut got = vec![0u8; 100];
        img.read_at(&mut got, 8 * 65_536).unwrap();
        assert_eq!(&got[..8], b"cluster ");
        img.close().unwrap();
        qemu::check_clean(&out);
        our_check_is_clean(&out);
        qemu::io(
            &out,
            &[
                "read -P 0x5a 70000 1000".to_string(),
                format!("read -P 0x6b {} 3000", 4 * 65_536 + 10),
                format!("read -P 0 {} 65536", 5 * 65_536),
            ],
        );
    }
    // Raw output cannot be compressed, and nothing is left behind.
    let bad = dir.path().join("bad.raw");
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args(["dd", "-c", "-O", "raw", "-i"])
        .arg(&raw)
        .arg("-o")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only qcow2 output"));
    assert!(!bad.exists());
}
