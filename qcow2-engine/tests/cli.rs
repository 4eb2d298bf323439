//! `qcow2util` end to end: create, info, map and dd, checked against qemu-img.

// The workspace's qemu oracle helpers, shared by path (the tests crate depends on this one).
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn util(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args(args)
        .output()
        .expect("run qcow2util")
}

fn ok(args: &[&str]) -> String {
    let out = util(args);
    assert!(
        out.status.success(),
        "qcow2util {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn create_info_map() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    ok(&["create", "-f", s(&base), "-s", "1G", "--enable-subcluster"]);
    ok(&["create", "-f", s(&top), "-b", "base.qcow2", "-F", "qcow2"]);
    qemu::io(&base, &["write -q -P 1 0 64k".into()]);
    qemu::io(
        &top,
        &["write -q -P 2 1M 4k".into(), "write -q -z 2M 64k".into()],
    );

    let ours: serde_json::Value = serde_json::from_str(&ok(&["info", "-f", s(&top)])).unwrap();
    let theirs = qemu::info(&top);
    for key in [
        "virtual-size",
        "format",
        "cluster-size",
        "dirty-flag",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
    ] {
        assert_eq!(ours[key], theirs[key], "info key {key}");
    }
    for key in [
        "compat",
        "lazy-refcounts",
        "refcount-bits",
        "corrupt",
        "extended-l2",
    ] {
        assert_eq!(
            ours["format-specific"]["data"][key], theirs["format-specific"]["data"][key],
            "{key}"
        );
    }
    let detail: serde_json::Value =
        serde_json::from_str(&ok(&["info", "-f", s(&top), "--detail", "--pretty"])).unwrap();
    assert_eq!(detail["chain"][0]["format"], "qcow2");
    // One data cluster (the 4k write); the zeroed range is a zero flag without a host cluster.
    assert_eq!(detail["metadata"]["allocated-bytes"], 65536);

    let map: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["map", "-f", s(&top), "--output", "json"])).unwrap();
    let qmap = qemu::map(&top);
    let strip = |m: &[serde_json::Value]| -> Vec<(u64, u64, u64, bool, bool)> {
        m.iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["present"].as_bool().unwrap(),
                    e["data"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&map), strip(&qmap));
    assert!(ok(&["map", "-f", s(&top)]).contains("Offset"));
}

#[test]
fn dd_round_trips_a_gib_bit_exactly() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(1 << 30).unwrap();
    // 1 MiB of pseudo-random data every 7 MiB, holes between, a partial block at the end:
    // sparse across the whole GiB, yet each copy on disk is about 150 MiB (CI disks can be
    // small, and the tests run side by side).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..146u64 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&chunk, i * (7 << 20) + i).unwrap();
    }
    f.write_all_at(&[0xee; 777], (1 << 30) - 777).unwrap();
    drop(f);
    for sub in [false, true] {
        let q = dir.path().join(format!("mid-{sub}.qcow2"));
        let back = dir.path().join(format!("out-{sub}.raw"));
        let mut args = vec!["dd", "-i", s(&raw), "-o", s(&q), "-O", "qcow2"];
        if sub {
            args.push("--enable-subcluster");
        }
        ok(&args);
        qemu::check_clean(&q);
        qemu::compare(&q, "qcow2", &raw, "raw");
        ok(&[
            "dd",
            "-i",
            s(&q),
            "-f",
            "qcow2",
            "-o",
            s(&back),
            "-O",
            "raw",
        ]);
        assert!(
            std::fs::read(&raw).unwrap() == std::fs::read(&back).unwrap(),
            "round trip differs"
        );
        let alloc = std::fs::metadata(&q).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&alloc) * 512 < 200 << 20,
            "qcow2 output is not sparse"
        );
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&back).unwrap();
    }
}

#[test]
fn errors_are_one_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    let out = util(&["info", "-f", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("qcow2util: error: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );

    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, vec![0x42; 4096]).unwrap();
    let out = util(&["info", "-f", s(&junk)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a qcow2 image"));

    let img = dir.path().join("a.qcow2");
    ok(&["create", "-f", s(&img), "-s", "1M"]);
    let out = util(&["create", "-f", s(&img), "-s", "1M"]);
    assert_eq!(out.status.code(), Some(1), "must not overwrite");
    let out = util(&["create", "-f", s(&dir.path().join("b.qcow2")), "-s", "1X"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = util(&[
        "create",
        "-f",
        s(&dir.path().join("c.qcow2")),
        "-b",
        "a.qcow2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-F"));
    // A crashed create leaves no half image behind: nothing but the finished files here.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("creating"))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    ok(&["create", "-f", s(&img), "-s", "16M"]);
    let out = util(&["check", "-f", s(&img)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found on the image."));
    let out = util(&["check", "-f", s(&img), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check-errors"], 0);
    assert_eq!(v["total-clusters"], 256);
    assert_eq!(v["format"], "qcow2");

    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    assert_eq!(util(&["check", "-f", s(&raw)]).status.code(), Some(63));
    let missing = dir.path().join("missing.qcow2");
    assert_eq!(util(&["check", "-f", s(&missing)]).status.code(), Some(1));

    // A leak beyond the data: exit 3, repaired by -r leaks to exit 0.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let len = f.metadata().unwrap().len().next_multiple_of(65536);
    f.set_len(len + 65536).unwrap();
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, 48).unwrap();
    let mut rb = [0u8; 8];
    f.read_exact_at(&mut rb, u64::from_be_bytes(rt)).unwrap();
    f.write_all_at(
        &1u16.to_be_bytes(),
        u64::from_be_bytes(rb) + 2 * (len / 65536),
    )
    .unwrap();
    drop(f);
    let out = util(&["check", "-f", s(&img)]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Leaked cluster"));
    assert_eq!(
        util(&["check", "-f", s(&img), "-r", "leaks"]).status.code(),
        Some(0)
    );
    assert_eq!(util(&["check", "-f", s(&img)]).status.code(), Some(0));
}

#[test]
fn bench_reports_and_memory_stays_bounded_on_a_4_tib_image() {
    // The acceptance bound for memory: a 4 TiB image worked over a 1 GiB region keeps the
    // process under 64 MiB of RSS with the default caches. One 4 KiB write per cluster of the
    // region allocates 16384 clusters and fills every L2 entry the region has.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    ok(&["create", "-f", s(&img), "-s", "4T"]);
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "-f",
            s(&img),
            "-s",
            "4k",
            "--range",
            "1G",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let write = run(&["-w", "-S", "64k", "-d", "16", "-c", "16384"]);
    assert_eq!(write["ops"], 16384);
    assert!(write["iops"].as_f64().unwrap() > 0.0);
    let read = run(&["--pattern", "rand", "-d", "16", "-c", "16384"]);
    assert_eq!(read["ops"], 16384);
    for r in [&write, &read] {
        let rss_mib = r["max_rss_kib"].as_u64().unwrap() as f64 / 1024.0;
        assert!(rss_mib < 64.0, "peak RSS {rss_mib:.1} MiB on a 4 TiB image");
    }
    // Every written cluster is really there: 16384 clusters of data plus metadata.
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "-f", s(&img)])).unwrap();
    assert!(info["actual-size"].as_u64().unwrap() >= 16384 * 4096);
    let out = util(&[
        "bench",
        "-f",
        s(&img),
        "-s",
        "4k",
        "--range",
        "8T",
        "-c",
        "1",
    ]);
    assert!(!out.status.success(), "a range past the end is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit"));
}
