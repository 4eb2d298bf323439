//! The hostile-image corpus: one named test per crafted image (the classes of qemu-iotests 080
//! and 060, and the backing-file attacks). Each image must give a clear error naming the
//! problem, through the library and through `qcow2util info` and `dd`, within 1 s and with a
//! bounded address space (the CLI runs under `ulimit -v`: 80 MiB, where a normal run needs
//! 16), never a panic or a hang, and must never be modified by a read-only open.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qcow2_engine::format::Header;
use qcow2_engine::{BackingPolicy, Error, Image, OpenOptions};

const LIMIT: Duration = Duration::from_secs(1);
/// Address-space limit for the CLI, in KiB.
const ADDRESS_SPACE_KIB: u64 = 80 << 10;

/// A qemu-made image with one L2 table and two data clusters, in a fresh directory.
struct Crafted {
    dir: tempfile::TempDir,
    path: PathBuf,
    header: Header,
}

impl Crafted {
    fn new(create: &[&str]) -> Option<Crafted> {
        if !qemu::require() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evil.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.push(path.to_str().unwrap());
        args.push("4M");
        qemu::img(&args);
        qemu::io(&path, &["write -P 0x11 0 128k".to_string()]);
        let header = header_of(&path);
        Some(Crafted { dir, path, header })
    }

    fn poke(&self, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    fn read_u64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut b, at)
            .unwrap();
        u64::from_be_bytes(b)
    }

    fn l2_table(&self) -> u64 {
        self.read_u64(self.header.l1_table_offset) & 0x00ff_ffff_ffff_fe00
    }

    fn refblock0(&self) -> u64 {
        self.read_u64(self.header.refcount_table_offset)
    }
}

fn header_of(path: &Path) -> Header {
    let bytes = std::fs::read(path).unwrap();
    Header::parse(&bytes[..bytes.len().min(2 << 20)]).unwrap()
}

/// Where the refusal must happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Opening fails (read-only and read-write).
    Open,
    /// Opening works; reading the guest data fails.
    Read,
    /// Opening the backing chain fails; `info` (which never follows the backing name) works.
    Backing,
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < LIMIT, "{what} took {took:?}");
    out
}

fn read_all(img: &Image) -> qcow2_engine::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < img.size() {
        let n = (img.size() - off).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Runs qcow2util under the address-space limit; returns (exit code, stderr).
fn util(args: &[&str]) -> (i32, String) {
    let out = timed(&format!("qcow2util {args:?}"), || {
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {ADDRESS_SPACE_KIB}; exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_qcow2util"))
            .args(args)
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked"),
        "qcow2util {args:?} panicked: {err}"
    );
    (out.status.code().unwrap_or(-1), err)
}

fn assert_mentions(what: &str, msg: &str, needle: &str) {
    assert!(
        msg.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: expected an error about {needle:?}, got: {msg}"
    );
}

/// The image must be refused at `stage` with an error mentioning `needle`, everywhere.
fn refused(c: &Crafted, stage: Stage, needle: &str) {
    refused_with(c, stage, needle, &OpenOptions::default());
}

fn refused_with(c: &Crafted, stage: Stage, needle: &str, opts: &OpenOptions) {
    let before = std::fs::read(&c.path).unwrap();
    let p = &c.path;
    match stage {
        Stage::Open | Stage::Backing => {
            let e = timed("open", || Image::open(p, opts)).expect_err("opened");
            assert_mentions("open", &e.to_string(), needle);
            let rw = OpenOptions {
                writable: true,
                ..opts.clone()
            };
            let e = timed("open rw", || Image::open(p, &rw)).expect_err("opened rw");
            assert_mentions("open rw", &e.to_string(), needle);
        }
        Stage::Read => {
            let img = timed("open", || Image::open(p, opts)).expect("opens read-only");
            let e = timed("read", || read_all(&img)).expect_err("read everything");
            assert_mentions("read", &e.to_string(), needle);
        }
    }
    let out = c.dir.path().join("out.raw");
    let _ = std::fs::remove_file(&out);
    let (code, err) = util(&["dd", "-i", s(p), "-f", "qcow2", "-o", s(&out), "-O", "raw"]);
    assert_eq!(code, 1, "dd: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "dd error is one line: {err}"
    );
    assert_mentions("dd", &err, needle);
    assert!(!out.exists(), "a failed dd left its output behind");
    let (code, err) = util(&["info", "-f", s(p)]);
    if stage == Stage::Open {
        assert_eq!(code, 1, "info: {err}");
        assert_mentions("info", &err, needle);
    } else {
        assert_eq!(
            code, 0,
            "info must work without reading data or following the backing: {err}"
        );
    }
    assert_eq!(
        std::fs::read(&c.path).unwrap(),
        before,
        "a read-only use modified the image"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// Header fields (offsets from the qcow2 specification).
const BACKING_OFFSET: u64 = 8;
const BACKING_SIZE: u64 = 16;
const CLUSTER_BITS: u64 = 20;
const SIZE: u64 = 24;
const L1_SIZE: u64 = 36;
const L1_OFFSET: u64 = 40;
const REFTABLE_OFFSET: u64 = 48;
const REFTABLE_CLUSTERS: u64 = 56;
const NB_SNAPSHOTS: u64 = 60;
const SNAPSHOTS_OFFSET: u64 = 64;
const INCOMPAT: u64 = 72;
const REFCOUNT_ORDER: u64 = 96;
const HEADER_LENGTH: u64 = 100;
const COMPRESSION_TYPE: u64 = 104;

macro_rules! crafted {
    ($($opt:expr),*) => {
        match Crafted::new(&[$($opt),*]) {
            Some(c) => c,
            None => return,
        }
    };
}

#[test]
fn bad_magic() {
    let c = crafted!();
    c.poke(0, b"QFI\x00");
    refused(&c, Stage::Open, "magic");
}

#[test]
fn unsupported_version() {
    let c = crafted!();
    c.poke(4, &4u32.to_be_bytes());
    refused(&c, Stage::Open, "version 4");
}

#[test]
fn truncated_header() {
    let c = crafted!();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&c.path)
        .unwrap()
        .set_len(50)
        .unwrap();
    refused(&c, Stage::Open, "header");
}

#[test]
fn cluster_bits_out_of_range() {
    let c = crafted!();
    c.poke(CLUSTER_BITS, &22u32.to_be_bytes());
    refused(&c, Stage::Open, "cluster");
}

#[test]
fn huge_header_length() {
    let c = crafted!();
    c.poke(HEADER_LENGTH, &0x7fff_fff8u32.to_be_bytes());
    refused(&c, Stage::Open, "header_length");
}

#[test]
fn misaligned_header_length() {
    let c = crafted!();
    c.poke(HEADER_LENGTH, &109u32.to_be_bytes());
    refused(&c, Stage::Open, "header_length");
}

#[test]
fn huge_extension_length() {
    let c = crafted!();
    let at = u64::from(c.header.header_length);
    c.poke(at, &0x1234_5678u32.to_be_bytes());
    c.poke(at + 4, &0xffff_fff0u32.to_be_bytes());
    refused(&c, Stage::Open, "extension");
}

#[test]
fn extension_runs_past_the_cluster() {
    let c = crafted!();
    let at = u64::from(c.header.header_length);
    c.poke(at, &0x1234_5678u32.to_be_bytes());
    c.poke(at + 4, &(65536 - at as u32 - 4).to_be_bytes());
    refused(&c, Stage::Open, "extension");
}

#[test]
fn unknown_compression_type() {
    let c = crafted!();
    c.poke(COMPRESSION_TYPE, &[7]);
    refused(&c, Stage::Open, "compression type");
}

#[test]
fn refcount_order_above_six() {
    let c = crafted!();
    c.poke(REFCOUNT_ORDER, &7u32.to_be_bytes());
    refused(&c, Stage::Open, "refcount_order");
}

#[test]
fn zero_refcount_table_clusters() {
    let c = crafted!();
    c.poke(REFTABLE_CLUSTERS, &0u32.to_be_bytes());
    refused(&c, Stage::Open, "reference count table");
}

#[test]
fn huge_refcount_table() {
    let c = crafted!();
    c.poke(REFTABLE_CLUSTERS, &0xffff_ffffu32.to_be_bytes());
    refused(&c, Stage::Open, "too large");
}

#[test]
fn misaligned_refcount_table() {
    let c = crafted!();
    c.poke(REFTABLE_OFFSET, &0x1_0200u64.to_be_bytes());
    refused(&c, Stage::Open, "reference count table");
}

#[test]
fn refcount_table_offset_overflows() {
    let c = crafted!();
    c.poke(REFTABLE_OFFSET, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    refused(&c, Stage::Open, "reference count table");
}

#[test]
fn huge_l1_table() {
    let c = crafted!();
    c.poke(L1_SIZE, &0x0fff_ffffu32.to_be_bytes());
    refused(&c, Stage::Open, "L1 table too large");
}

#[test]
fn misaligned_l1_table() {
    let c = crafted!();
    c.poke(L1_OFFSET, &(c.header.l1_table_offset + 8).to_be_bytes());
    refused(&c, Stage::Open, "L1 table");
}

#[test]
fn l1_table_offset_overflows() {
    let c = crafted!();
    c.poke(L1_OFFSET, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    refused(&c, Stage::Open, "L1 table");
}

#[test]
fn l1_too_small_for_the_virtual_size() {
    let c = crafted!();
    c.poke(SIZE, &(1u64 << 40).to_be_bytes());
    refused(&c, Stage::Open, "too small");
}

#[test]
fn too_many_snapshots() {
    let c = crafted!();
    c.poke(NB_SNAPSHOTS, &0x0010_0000u32.to_be_bytes());
    refused(&c, Stage::Open, "snapshots");
}

#[test]
fn misaligned_snapshot_table() {
    let c = crafted!();
    c.poke(NB_SNAPSHOTS, &1u32.to_be_bytes());
    c.poke(SNAPSHOTS_OFFSET, &0x1_0008u64.to_be_bytes());
    refused(&c, Stage::Open, "snapshot table");
}

#[test]
fn unknown_incompatible_bit() {
    let c = crafted!();
    c.poke(INCOMPAT, &(1u64 << 20).to_be_bytes());
    refused(&c, Stage::Open, "bit 20");
}

#[test]
fn external_data_file_bit() {
    let c = crafted!();
    c.poke(INCOMPAT, &4u64.to_be_bytes());
    refused(&c, Stage::Open, "external data file");
}

#[test]
fn corrupt_bit_is_read_only() {
    let c = crafted!();
    c.poke(INCOMPAT, &2u64.to_be_bytes());
    let before = std::fs::read(&c.path).unwrap();
    let img = Image::open(&c.path, &OpenOptions::default()).unwrap();
    read_all(&img).unwrap();
    drop(img);
    match Image::open(&c.path, &OpenOptions::writable()) {
        Err(Error::Corrupt(m)) => assert_mentions("rw open", &m, "read-only"),
        other => panic!("expected a corrupt-image refusal, got {other:?}"),
    }
    assert_eq!(std::fs::read(&c.path).unwrap(), before);
}

#[test]
fn l1_entry_with_reserved_bits() {
    let c = crafted!();
    c.poke(
        c.header.l1_table_offset,
        &(c.l2_table() | 0x0100_0000_0000_0000).to_be_bytes(),
    );
    refused(&c, Stage::Open, "reserved bits");
}

#[test]
fn l2_table_overlapping_the_header() {
    let c = crafted!();
    // Cluster 0 cannot be named (offset 0 means "no table"); 512 bytes in is misaligned and
    // must be refused as such, and the L1 table itself as an L2 table as an overlap.
    c.poke(
        c.header.l1_table_offset,
        &(0x200u64 | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Open, "not cluster-aligned");
}

#[test]
fn l2_table_overlapping_the_l1_table() {
    let c = crafted!();
    let l1 = c.header.l1_table_offset;
    c.poke(l1, &(l1 | 1 << 63).to_be_bytes());
    refused(&c, Stage::Open, "overlaps the L1 table");
}

#[test]
fn l2_table_overlapping_the_refcount_table() {
    let c = crafted!();
    c.poke(
        c.header.l1_table_offset,
        &(c.header.refcount_table_offset | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Open, "overlaps the refcount table");
}

#[test]
fn l2_table_far_beyond_the_end() {
    let c = crafted!();
    c.poke(
        c.header.l1_table_offset,
        &(0x00f0_0000_0000_0000u64 | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Open, "beyond");
}

#[test]
fn l2_entry_with_reserved_bits() {
    let c = crafted!();
    let l2 = c.l2_table();
    let e = c.read_u64(l2);
    c.poke(l2, &(e | 0x0200_0000_0000_0000).to_be_bytes());
    refused(&c, Stage::Read, "reserved bits");
}

#[test]
fn l2_entry_misaligned() {
    let c = crafted!();
    let l2 = c.l2_table();
    let e = c.read_u64(l2);
    c.poke(l2, &(e + 0x200).to_be_bytes());
    refused(&c, Stage::Read, "not cluster-aligned");
}

#[test]
fn l2_entry_far_beyond_the_end() {
    let c = crafted!();
    c.poke(
        c.l2_table(),
        &(0x00f0_0000_0000_0000u64 | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Read, "beyond");
}

#[test]
fn l2_entry_pointing_into_the_l1_table() {
    let c = crafted!();
    c.poke(
        c.l2_table(),
        &(c.header.l1_table_offset | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Read, "L1 table");
}

#[test]
fn l2_entry_pointing_into_the_refcount_table() {
    let c = crafted!();
    c.poke(
        c.l2_table(),
        &(c.header.refcount_table_offset | 1 << 63).to_be_bytes(),
    );
    refused(&c, Stage::Read, "refcount table");
}

#[test]
fn l2_entry_pointing_into_a_refcount_block() {
    let c = crafted!();
    c.poke(c.l2_table(), &(c.refblock0() | 1 << 63).to_be_bytes());
    refused(&c, Stage::Read, "refcount block");
}

#[test]
fn l2_entry_pointing_into_its_own_table() {
    let c = crafted!();
    let l2 = c.l2_table();
    c.poke(l2, &(l2 | 1 << 63).to_be_bytes());
    refused(&c, Stage::Read, "L2 table");
}

#[test]
fn extended_l2_entry_both_allocated_and_zero() {
    let c = crafted!("-o", "extended_l2=on,cluster_size=64k");
    let l2 = c.l2_table();
    c.poke(l2 + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
    refused(&c, Stage::Read, "subcluster");
}

#[test]
fn refcount_block_at_offset_zero_is_never_allocated_over_the_header() {
    // The refcount table loses its first block: every cluster of the first group looks free,
    // cluster 0 (the header) included. Reads still work; a read-write open must refuse
    // before anything can be allocated over the header (QEMU launchpad #1728615), and
    // `check -r all` rebuilds the refcounts.
    let c = crafted!();
    c.poke(c.header.refcount_table_offset, &0u64.to_be_bytes());
    let before = std::fs::read(&c.path).unwrap();
    let img = Image::open(&c.path, &OpenOptions::default()).unwrap();
    read_all(&img).unwrap();
    drop(img);
    let e = timed("open rw", || Image::open(&c.path, &OpenOptions::writable()))
        .expect_err("read-write open refused");
    assert_mentions(
        "open rw",
        &e.to_string(),
        "holds the header but its refcount is 0",
    );
    assert_eq!(std::fs::read(&c.path).unwrap(), before);
    let (code, _) = util(&["check", "-f", s(&c.path)]);
    assert_eq!(code, 2, "check reports the corruption");
    let (code, err) = util(&["check", "-f", s(&c.path), "-r", "all"]);
    assert_eq!(code, 0, "repair: {err}");
    qemu::check_clean(&c.path);
    let img = Image::open(&c.path, &OpenOptions::writable()).unwrap();
    img.write_at(&[1; 4096], 2 << 20).unwrap();
    img.close().unwrap();
    qemu::check_clean(&c.path);
}

#[test]
fn data_write_onto_metadata_marks_the_image_corrupt() {
    // An L2 entry aimed at the refcount block opens read-write; the first write through it is
    // refused with EIO-style corruption, the corrupt bit is set, and the block is intact.
    let c = crafted!();
    let rb = c.refblock0();
    c.poke(c.l2_table(), &(rb | 1 << 63).to_be_bytes());
    let block_before = std::fs::read(&c.path).unwrap()[rb as usize..rb as usize + 65536].to_vec();
    let img = Image::open(&c.path, &OpenOptions::writable()).unwrap();
    assert!(matches!(img.write_at(&[9; 512], 0), Err(Error::Corrupt(_))));
    // Every later write is refused too.
    assert!(matches!(
        img.write_at(&[9; 512], 3 << 20),
        Err(Error::Corrupt(_))
    ));
    drop(img);
    let after = std::fs::read(&c.path).unwrap();
    assert_eq!(&after[rb as usize..rb as usize + 65536], &block_before[..]);
    assert_ne!(
        header_of(&c.path).incompatible_features & 2,
        0,
        "corrupt bit"
    );
    assert!(Image::open(&c.path, &OpenOptions::writable()).is_err());
}

#[test]
fn backing_name_too_long() {
    let c = crafted!();
    c.poke(BACKING_OFFSET, &0x1000u64.to_be_bytes());
    c.poke(BACKING_SIZE, &2000u32.to_be_bytes());
    refused(&c, Stage::Open, "backing");
}

#[test]
fn backing_name_outside_the_header_cluster() {
    let c = crafted!();
    c.poke(BACKING_OFFSET, &0x2_0000u64.to_be_bytes());
    c.poke(BACKING_SIZE, &8u32.to_be_bytes());
    refused(&c, Stage::Open, "backing");
}

/// An overlay in `c`'s directory named `top.qcow2` whose backing name is `name`.
fn overlay(c: &Crafted, name: &str) -> Crafted {
    let path = c.dir.path().join("top.qcow2");
    let _ = std::fs::remove_file(&path);
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2",
    ];
    args.extend([path.to_str().unwrap(), "4M"]);
    qemu::img(&args);
    Crafted {
        dir: tempfile::tempdir().unwrap(),
        header: header_of(&path),
        path,
    }
}

fn confined(c: &Crafted) -> OpenOptions {
    OpenOptions {
        backing: BackingPolicy::ConfineTo(c.dir.path().to_path_buf()),
        ..OpenOptions::default()
    }
}

#[test]
fn backing_absolute_name_under_confinement() {
    let c = crafted!();
    let top = overlay(&c, "/etc/passwd");
    let e = Image::open(&top.path, &confined(&c)).expect_err("opened");
    assert_mentions("open", &e.to_string(), "absolute");
}

#[test]
fn backing_name_with_dotdot_under_confinement() {
    let c = crafted!();
    let top = overlay(&c, "../evil.qcow2");
    let e = Image::open(&top.path, &confined(&c)).expect_err("opened");
    assert_mentions("open", &e.to_string(), "'..'");
}

#[test]
fn backing_symlink_out_of_the_confinement() {
    let c = crafted!();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("secret.qcow2");
    std::fs::copy(&c.path, &target).unwrap();
    std::os::unix::fs::symlink(&target, c.dir.path().join("link.qcow2")).unwrap();
    let top = overlay(&c, "link.qcow2");
    let e = Image::open(&top.path, &confined(&c)).expect_err("opened");
    assert_mentions("open", &e.to_string(), "outside the allowed directory");
}

#[test]
fn backing_json_name() {
    let c = crafted!();
    let top = overlay(&c, r#"json:{"driver":"file","filename":"/etc/passwd"}"#);
    refused(&top, Stage::Backing, "json:");
}

#[test]
fn backing_protocol_name() {
    let c = crafted!();
    let top = overlay(&c, "nbd://127.0.0.1:10809/x");
    refused(&top, Stage::Backing, "protocol");
}

#[test]
fn backing_without_a_format_is_not_probed() {
    let c = crafted!();
    let top = overlay(&c, "evil.qcow2");
    // Hide the backing-format extension (0xe2792aca) behind an unknown magic.
    let bytes = std::fs::read(&top.path).unwrap();
    let at = (0..4096)
        .find(|&i| bytes[i..i + 4] == 0xe279_2acau32.to_be_bytes())
        .unwrap();
    top.poke(at as u64, &0x1234_5678u32.to_be_bytes());
    let e = Image::open(&top.path, &OpenOptions::default()).expect_err("opened");
    assert_mentions("open", &e.to_string(), "backing format");
    // Only on explicit request, the format is guessed (here: qcow2, from the magic).
    let probing = OpenOptions {
        probe_backing_format: true,
        ..OpenOptions::default()
    };
    let img = Image::open(&top.path, &probing).unwrap();
    let mut b = [0u8; 4];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11; 4]);
}

#[test]
fn backing_loop_to_itself() {
    let c = crafted!();
    let top = overlay(&c, "top.qcow2");
    let e = timed("open", || Image::open(&top.path, &OpenOptions::default())).expect_err("opened");
    assert_mentions("open", &e.to_string(), "loops");
    let out = c.dir.path().join("o.raw");
    let (code, err) = util(&[
        "dd",
        "-i",
        s(&top.path),
        "-f",
        "qcow2",
        "-o",
        s(&out),
        "-O",
        "raw",
    ]);
    assert_eq!(code, 1);
    assert_mentions("dd", &err, "loops");
}

#[test]
fn backing_loop_through_two_images() {
    let c = crafted!();
    let a = c.dir.path().join("a.qcow2");
    let b = c.dir.path().join("b.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&a),
        "4M",
    ]);
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "4M",
    ]);
    let e = timed("open", || Image::open(&a, &OpenOptions::default())).expect_err("opened");
    assert_mentions("open", &e.to_string(), "loops");
}

#[test]
fn backing_chain_deeper_than_the_limit() {
    let c = crafted!();
    let mut prev = "evil.qcow2".to_string();
    for i in 0..40 {
        let name = format!("l{i}.qcow2");
        let p = c.dir.path().join(&name);
        qemu::img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &prev,
            "-F",
            "qcow2",
            s(&p),
            "4M",
        ]);
        prev = name;
    }
    let top = c.dir.path().join(&prev);
    let e = timed("open", || Image::open(&top, &OpenOptions::default())).expect_err("opened");
    assert_mentions("open", &e.to_string(), "deeper than 32");
}

#[test]
fn largest_legal_tables_stay_within_bounds() {
    // QEMU's limits, all used: a 32 MiB L1 whose 4 Mi entries name distinct L2 tables, and an
    // 8 MiB refcount table naming 1 Mi distinct refcount blocks (512-byte clusters). The
    // engine keeps the L1 and refcount table (as QEMU does) plus 4 bytes per table in its
    // overlap map: it must open and read within the same 1 s and 80 MiB as everything else.
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&p),
        "128G",
    ]);
    let h = header_of(&p);
    let l1_entries = u64::from(h.l1_size);
    assert_eq!(l1_entries, 4 << 20);
    let rt_off = (h.l1_table_offset + l1_entries * 8).next_multiple_of(512);
    let rt_clusters = (8u64 << 20) / 512;
    let rt_entries = rt_clusters * 512 / 8;
    let blocks = rt_off + rt_clusters * 512;
    let tables = blocks + rt_entries * 512;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&rt_off.to_be_bytes(), REFTABLE_OFFSET)
        .unwrap();
    f.write_all_at(&(rt_clusters as u32).to_be_bytes(), REFTABLE_CLUSTERS)
        .unwrap();
    let rt: Vec<u8> = (0..rt_entries)
        .flat_map(|i| (blocks + i * 512).to_be_bytes())
        .collect();
    f.write_all_at(&rt, rt_off).unwrap();
    let l1: Vec<u8> = (0..l1_entries)
        .flat_map(|i| ((tables + i * 512) | 1 << 63).to_be_bytes())
        .collect();
    f.write_all_at(&l1, h.l1_table_offset).unwrap();
    drop(f);

    let img = timed("open", || Image::open(&p, &OpenOptions::default())).unwrap();
    let mut buf = vec![1u8; 1 << 20];
    timed("read", || img.read_at(&mut buf, 0)).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(img);
    let (code, err) = util(&["info", "-f", s(&p)]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn one_l2_table_named_by_every_l1_entry() {
    // Opening refuses the shared table at once; checking it must not walk it 4 Mi times.
    let c = crafted!();
    let l1 = c.header.l1_table_offset;
    let entry = (c.l2_table() | 1 << 63).to_be_bytes();
    let n = u64::from(c.header.l1_size).max(64);
    c.poke(L1_SIZE, &(n as u32).to_be_bytes());
    let all: Vec<u8> = (0..n).flat_map(|_| entry).collect();
    c.poke(l1, &all);
    refused(&c, Stage::Open, "share the L2 table");
    let (code, err) = util(&["check", "-f", s(&c.path)]);
    assert_eq!(code, 2, "{err}");

    // The same with QEMU's largest L1: each table is walked once, however often it is named.
    let n: u64 = 4 << 20;
    c.poke(SIZE, &(n << 29).to_be_bytes());
    c.poke(L1_SIZE, &(n as u32).to_be_bytes());
    let all: Vec<u8> = (0..n).flat_map(|_| entry).collect();
    c.poke(l1, &all);
    let (code, err) = util(&["check", "-f", s(&c.path)]);
    assert_eq!(code, 2, "{err}");
    assert_mentions("check", &err, "ERROR cluster");
}

/// `c`'s image made to keep its data in an external data file named `name` (the header
/// rewritten: the data-file bit and the name extension), `raw` adding the raw-data bit.
fn with_data_file(c: &Crafted, name: &str, raw: bool) {
    let mut h = c.header.clone();
    h.incompatible_features |= qcow2_engine::format::header::incompat::DATA_FILE;
    if raw {
        h.autoclear_features |= qcow2_engine::format::header::autoclear::RAW_DATA;
    }
    h.set_data_file_name(name);
    c.poke(0, &h.to_bytes().unwrap());
}

#[test]
fn data_file_name_with_dotdot_under_confinement() {
    let c = crafted!();
    with_data_file(&c, "../evil.data", false);
    let e = Image::open(&c.path, &confined(&c)).expect_err("opened");
    assert_mentions("open", &e.to_string(), "'..'");
}

#[test]
fn data_file_absolute_name_under_confinement() {
    let c = crafted!();
    with_data_file(&c, "/etc/passwd", true);
    let e = Image::open(&c.path, &confined(&c)).expect_err("opened");
    assert_mentions("open", &e.to_string(), "absolute");
}

#[test]
fn data_file_missing() {
    let c = crafted!();
    with_data_file(&c, "missing.data", false);
    // Like a missing backing file: the image cannot be used, `info` still works.
    refused(&c, Stage::Backing, "external data file");
}

#[test]
fn data_file_is_the_image_itself() {
    let c = crafted!();
    with_data_file(&c, "evil.qcow2", true);
    refused(&c, Stage::Backing, "the image itself");
}

#[test]
fn data_file_entry_names_another_guest_cluster() {
    let c = crafted!();
    let data = c.dir.path().join("evil.data");
    std::fs::write(&data, vec![0x5au8; 4 << 20]).unwrap();
    with_data_file(&c, "evil.data", false);
    // Guest cluster 0's entry points at cluster 1's offset in the data file.
    c.poke(c.l2_table(), &(0x1_0000u64 | 1 << 63).to_be_bytes());
    refused(&c, Stage::Read, "not at its own offset");
}
