//! `qcow2util check` against `qemu-img check` on damaged images: the same counters (JSON keys),
//! the same exit status, and repairs that leave qemu-img satisfied.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_csi_tests::qemu;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ours() -> PathBuf {
    // The tests crate has no binary of its own: qcow2util sits next to the test executable.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("qcow2util");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (cargo build)",
        bin.display()
    );
    bin
}

/// (exit status, JSON) of a check run.
fn run(cmd: &mut Command) -> (i32, serde_json::Value) {
    let out = cmd.output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

fn theirs_check(p: &Path, repair: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "--output=json"]);
    if let Some(r) = repair {
        cmd.args(["-r", r]);
    }
    run(cmd.arg(p))
}

fn ours_check(p: &Path, repair: Option<&str>) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(ours());
    cmd.args(["check", "--output", "json", "-f", s(p)]);
    if let Some(r) = repair {
        cmd.args(["-r", r]);
    }
    run(&mut cmd)
}

const KEYS: [&str; 10] = [
    "check-errors",
    "corruptions",
    "leaks",
    "leaks-fixed",
    "corruptions-fixed",
    "allocated-clusters",
    "total-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "image-end-offset",
];

fn assert_same(what: &str, a: &(i32, serde_json::Value), b: &(i32, serde_json::Value)) {
    assert_eq!(a.0, b.0, "{what}: exit status (ours {}, qemu {})", a.1, b.1);
    for k in KEYS {
        assert_eq!(
            a.1.get(k),
            b.1.get(k),
            "{what}: key {k} (ours {}, qemu {})",
            a.1,
            b.1
        );
    }
}

struct Img {
    path: PathBuf,
}

impl Img {
    fn new(dir: &Path, name: &str, opts: &str, io: &[&str]) -> Img {
        let path = dir.join(name);
        qemu::img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&path), "16M"]);
        let cmds: Vec<String> = io.iter().map(|c| c.to_string()).collect();
        qemu::io(&path, &cmds);
        Img { path }
    }

    fn u64_at(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        u64::from_be_bytes(b)
    }

    fn poke(&self, at: u64, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    }

    fn refblock0(&self) -> u64 {
        self.u64_at(self.u64_at(48))
    }

    fn l2(&self) -> u64 {
        self.u64_at(self.u64_at(40)) & 0x00ff_ffff_ffff_fe00
    }

    fn copy(&self, name: &str) -> PathBuf {
        let p = self.path.with_file_name(name);
        std::fs::copy(&self.path, &p).unwrap();
        p
    }
}

/// Compares check, `-r leaks` and `-r all` on copies of the image.
fn compare_all(img: &Img) {
    let name = img.path.file_name().unwrap().to_str().unwrap().to_string();
    assert_same(
        &name,
        &ours_check(&img.path, None),
        &theirs_check(&img.path, None),
    );
    for r in ["leaks", "all"] {
        let (a, b) = (img.copy("a.qcow2"), img.copy("b.qcow2"));
        let mine = ours_check(&a, Some(r));
        let qemus = theirs_check(&b, Some(r));
        assert_eq!(
            mine.0, qemus.0,
            "{name} -r {r}: exit status ({} vs {})",
            mine.1, qemus.1
        );
        if mine.0 == 0 {
            qemu::check_clean(&a);
            qemu::compare(&a, "qcow2", &b, "qcow2");
        }
    }
}

#[test]
fn check_matches_qemu_img() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = [
        "write -P 1 0 192k",
        "write -P 2 1M 64k",
        "write -P 3 128k 64k",
    ];

    compare_all(&Img::new(d, "clean.qcow2", "cluster_size=64k", &write));
    compare_all(&Img::new(d, "empty.qcow2", "cluster_size=64k", &[]));
    compare_all(&Img::new(
        d,
        "ext.qcow2",
        "extended_l2=on,cluster_size=64k",
        &["write -P 1 0 3k", "write -z 8k 4k", "write -P 2 70k 60k"],
    ));

    // A leak: a refcount for a cluster nobody uses, inside the file.
    let leak = Img::new(d, "leak.qcow2", "cluster_size=64k", &write);
    let rb = leak.refblock0();
    leak.poke(rb + 2 * 3, &1u16.to_be_bytes()); // cluster 3 is the L1 table: now refcount 1 -> ok
    let end = std::fs::metadata(&leak.path).unwrap().len() / 65536;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leak.path)
        .unwrap()
        .set_len((end + 2) * 65536)
        .unwrap();
    leak.poke(rb + 2 * end, &1u16.to_be_bytes());
    leak.poke(rb + 2 * (end + 1), &3u16.to_be_bytes());
    compare_all(&leak);

    // A refcount too low (and the COPIED flag then disagrees).
    let low = Img::new(d, "low.qcow2", "cluster_size=64k", &write);
    let data = low.u64_at(low.l2()) & 0x00ff_ffff_ffff_fe00;
    low.poke(low.refblock0() + 2 * (data >> 16), &0u16.to_be_bytes());
    compare_all(&low);

    // A refcount too high on a data cluster: a leak plus a wrong COPIED flag.
    let high = Img::new(d, "high.qcow2", "cluster_size=64k", &write);
    let data = high.u64_at(high.l2()) & 0x00ff_ffff_ffff_fe00;
    high.poke(high.refblock0() + 2 * (data >> 16), &2u16.to_be_bytes());
    compare_all(&high);

    // A data cluster far beyond the end of the file.
    let far = Img::new(d, "far.qcow2", "cluster_size=64k", &write);
    far.poke(far.l2(), &((1u64 << 40) | 1 << 63).to_be_bytes());
    compare_all(&far);

    // The dirty bit on a clean image (lazy refcounts leave such images).
    let dirty = Img::new(
        d,
        "dirty.qcow2",
        "cluster_size=64k,lazy_refcounts=on",
        &write,
    );
    dirty.poke(72 + 7, &[1]);
    compare_all(&dirty);

    // Compressed clusters and an internal snapshot share clusters.
    let snap = Img::new(d, "snap.qcow2", "cluster_size=4k", &["write -P 7 0 64k"]);
    qemu::img(&["snapshot", "-c", "s1", s(&snap.path)]);
    qemu::io(
        &snap.path,
        &[
            "write -P 8 16k 8k".to_string(),
            "write -c -P 9 1M 64k".to_string(),
        ],
    );
    compare_all(&snap);
}
