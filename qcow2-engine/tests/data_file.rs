//! External data files (`data_file`, `data_file_raw`), against qemu-img and qemu-io both
//! ways: images qemu makes and fills read back identically through us; our writes, zeroings
//! and discards read back identically through qemu-img, and both checks stay clean; a raw
//! data file stays byte for byte the guest disk; what we create is what qemu-img creates;
//! overlays on data-file bases, and data-file overlays on plain bases; hostile names and
//! entries are clean errors.

#[allow(dead_code)]
mod common;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{our_check_is_clean, run};
use qcow2_engine::{BackingPolicy, Image, OpenOptions, ZeroFlags};

const SIZE: u64 = 4 << 20;

// QEMU opens a relative data file name against its working directory, we against the
// image's directory (as backing names): qemu runs in the image's directory here, where the
// two agree.

/// `qemu-img ARGS` run in `dir`; its stdout.
fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

/// `qemu-io -f qcow2 -c CMD... IMAGE` run in the image's directory.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(img.parent().unwrap()).args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(img));
    assert!(!out.contains("failed"), "qemu-io {cmds:?}: {out}");
}

/// `qemu-img check` (in the image's directory) finds nothing.
fn qemu_check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .current_dir(img.parent().unwrap())
        .args(["check", "--output=json", s(img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{key}: {text}"
        );
    }
}

fn qemu_info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(
        img.parent().unwrap(),
        &["info", "--output=json", s(img)],
    ))
    .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-img makes `name` (4 MiB) with data file `data` and the extra `-o` options, and
/// qemu-io fills it: patterns across and inside clusters, a zeroed and a discarded range.
fn qemu_made(dir: &Path, name: &str, data: &str, extra: &str) -> PathBuf {
    let img = dir.join(name);
    let mut o = format!("data_file={data}");
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", &o, s(&img), "4M"],
    );
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 1000k 300k",
            "write -z 1040k 20k",
            "discard 1152k 64k",
            "write -P 0x33 3m 4k",
        ],
    );
    img
}

/// What qemu-img reads from the image (through its chain and data files).
fn qemu_reads(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("qemu.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(
        img.parent().unwrap(),
        &["convert", "-O", "raw", s(img), s(&raw)],
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// Everything the image reads as, through us.
fn we_read(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn open_rw(path: &Path, dir: &Path) -> Image {
    Image::open(
        path,
        &OpenOptions {
            writable: true,
            backing: BackingPolicy::ConfineTo(dir.to_path_buf()),
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Writes, zeroings (keeping or freeing space) and discards at random places and lengths,
/// aligned and not, mirrored into `model`.
fn random_ops(img: &Image, model: &mut [u8], seed: u64, count: usize) {
    let mut x = seed;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..count {
        let len = match next(4) {
            0 => 512 * (1 + next(8)),
            1 => 1 + next(5000),
            2 => 65536 * (1 + next(3)),
            _ => 1 + next(200_000),
        };
        let off = next(SIZE - len);
        let (o, l) = (off as usize, len as usize);
        match next(5) {
            0 => {
                img.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                model[o..o + l].fill(0);
            }
            1 => {
                img.write_zeroes(off, len, ZeroFlags { no_hole: true })
                    .unwrap();
                model[o..o + l].fill(0);
            }
            2 => {
                // A discard may leave the old bytes or zeros: only whole-cluster discards
                // of an image without a backing file promise zeros, so the model follows
                // what we read back.
                img.discard(off, len).unwrap();
                let mut now = vec![0u8; l];
                img.read_at(&mut now, off).unwrap();
                model[o..o + l].copy_from_slice(&now);
            }
            _ => {
                let byte = (i % 250) as u8 + 1;
                let data: Vec<u8> = (0..l).map(|j| byte ^ (j as u8)).collect();
                img.write_at(&data, off).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
        }
    }
}

/// qemu's images, raw data file and not, standard and extended L2: we read what qemu
/// reads; after our writes, zeroings and discards (a model of them), qemu reads the model,
/// both checks are clean, and a raw data file is the model byte for byte.
#[test]
fn qemu_data_file_images_read_and_write_identically_both_ways() {
    if !qemu::require() {
        return;
    }
    for (case, extra, raw) in [
        ("plain", "", false),
        ("raw", "data_file_raw=on", true),
        ("extended", "extended_l2=on,cluster_size=32k", false),
        (
            "raw-extended",
            "data_file_raw=on,extended_l2=on,cluster_size=32k",
            true,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = format!("{case}.data");
        let path = qemu_made(dir.path(), &format!("{case}.qcow2"), &data, extra);
        let mut model = qemu_reads(&path);
        let img = open_rw(&path, dir.path());
        let df = img.data_file().expect("the data file is open");
        assert_eq!(df.raw, raw, "{case}");
        assert_eq!(df.name, data);
        assert!(
            we_read(&img) == model,
            "{case}: we read otherwise than qemu"
        );
        random_ops(&img, &mut model, 0x5eed ^ raw as u64, 300);
        assert!(we_read(&img) == model, "{case}: we read back otherwise");
        img.resize(SIZE + (1 << 20)).unwrap();
        model.resize((SIZE + (1 << 20)) as usize, 0);
        img.write_at(&[0x77; 3000], SIZE + 1000).unwrap();
        model[SIZE as usize + 1000..SIZE as usize + 4000].fill(0x77);
        img.close().unwrap();
        assert!(qemu_reads(&path) == model, "{case}: qemu reads otherwise");
        qemu_check_clean(&path);
        our_check_is_clean(&path);
        let data_path = dir.path().join(&data);
        if raw {
            assert!(
                std::fs::read(&data_path).unwrap() == model,
                "{case}: the raw data file is not the guest disk"
            );
        }
        // The data file holds the data; the image stays small (metadata only).
        let meta = std::fs::metadata(&path).unwrap().len();
        assert!(meta < 1 << 20, "{case}: the image file holds {meta} bytes");
    }
}

/// `qcow2util create --data-file [--data-file-raw]` writes what `qemu-img create -o
/// data_file=...` writes (the name aside); the images we fill read back through qemu.
#[test]
fn qcow2util_creates_data_file_images_as_qemu_img_does() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (raw, extl2) in [(false, false), (true, false), (false, true), (true, true)] {
        let tag = format!(
            "{}{}",
            if raw { "r" } else { "p" },
            if extl2 { "x" } else { "s" }
        );
        let (ours, theirs) = (
            dir.path().join(format!("o{tag}.qcow2")),
            dir.path().join(format!("q{tag}.qcow2")),
        );
        // Names of one length, so the headers line up byte for byte.
        let (od, qd) = (format!("o{tag}.dat"), format!("q{tag}.dat"));
        let mut args = vec![
            "create".to_string(),
            "-f".into(),
            s(&ours).into(),
            "-s".into(),
            "4M".into(),
            "--data-file".into(),
            od.clone(),
        ];
        let mut o = format!("data_file={qd}");
        if raw {
            args.push("--data-file-raw".into());
            o.push_str(",data_file_raw=on");
        }
        if extl2 {
            args.push("--enable-subcluster".into());
            o.push_str(",extended_l2=on");
        }
        run(Command::new(env!("CARGO_BIN_EXE_qcow2util")).args(&args));
        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "-o", &o, s(&theirs), "4M"],
        );
        // With a raw data file, both preallocate the L2 tables (every cluster mapped).
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        let differ: Vec<usize> = (0..a.len().max(b.len()))
            .filter(|&i| a.get(i) != b.get(i))
            .take(10)
            .collect();
        // Only the one letter of the data file's name that differs ('o' against 'q').
        assert_eq!(differ.len(), 1, "{tag}: bytes {differ:?} differ");
        assert_eq!((a[differ[0]], b[differ[0]]), (b'o', b'q'));
        assert_eq!(
            std::fs::metadata(dir.path().join(&od)).unwrap().len(),
            SIZE,
            "{tag}: the data file is the disk's size"
        );
        let info = qemu_info(&ours);
        assert_eq!(info["format-specific"]["data"]["data-file"], od.as_str());
        assert_eq!(info["format-specific"]["data"]["data-file-raw"], raw);
        let ours_info =
            run(Command::new(env!("CARGO_BIN_EXE_qcow2util")).args(["info", "-f", s(&ours)]));
        let ours_info: serde_json::Value = serde_json::from_str(&ours_info).unwrap();
        assert_eq!(
            ours_info["format-specific"]["data"]["data-file"],
            info["format-specific"]["data"]["data-file"]
        );
        assert_eq!(
            ours_info["format-specific"]["data"]["data-file-raw"],
            info["format-specific"]["data"]["data-file-raw"]
        );
        let img = open_rw(&ours, dir.path());
        let mut model = vec![0u8; SIZE as usize];
        random_ops(&img, &mut model, 77 + raw as u64, 200);
        img.close().unwrap();
        assert!(qemu_reads(&ours) == model, "{tag}: qemu reads otherwise");
        qemu_check_clean(&ours);
        our_check_is_clean(&ours);
        if raw {
            assert!(std::fs::read(dir.path().join(&od)).unwrap() == model);
        }
        // And the other way: qemu-io writes into ours, we read it.
        qemu_io(&ours, &["write -P 0x5c 70000 9000"]);
        model[70000..79000].fill(0x5c);
        let img = Image::open(&ours, &OpenOptions::default()).unwrap();
        assert!(
            we_read(&img) == model,
            "{tag}: we read qemu's write otherwise"
        );
    }
    // Nothing is overwritten: an existing data file is refused, and no image is left.
    let taken = dir.path().join("taken.dat");
    std::fs::write(&taken, b"keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args([
            "create",
            "-f",
            s(&dir.path().join("t.qcow2")),
            "-s",
            "1M",
            "--data-file",
            "taken.dat",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
    assert!(!dir.path().join("t.qcow2").exists());
    // A raw data file cannot lie over a backing file.
    let base = dir.path().join("base.qcow2");
    qemu_img(dir.path(), &["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args([
            "create",
            "-f",
            s(&dir.path().join("u.qcow2")),
            "-s",
            "1M",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "--data-file",
            "u.dat",
            "--data-file-raw",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        !dir.path().join("u.dat").exists(),
        "the data file was not left behind"
    );
}

/// A plain overlay on a data-file base, and an overlay with its own data file on a plain
/// base: we read what qemu reads, write the overlay, and qemu reads the model.
#[test]
fn overlays_on_and_with_data_files() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_made(d, "base.qcow2", "base.data", "");
    let plain_base = d.join("plain.qcow2");
    qemu_img(d, &["create", "-q", "-f", "qcow2", s(&plain_base), "4M"]);
    qemu_io(&plain_base, &["write -P 0x44 0 2m"]);
    let top = d.join("top.qcow2");
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    let top2 = d.join("top2.qcow2");
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "plain.qcow2",
            "-F",
            "qcow2",
            "-o",
            "data_file=top2.data,extended_l2=on",
            s(&top2),
        ],
    );
    for path in [&top, &top2] {
        let mut model = qemu_reads(path);
        let img = open_rw(path, d);
        assert!(
            we_read(&img) == model,
            "{}: we read otherwise",
            path.display()
        );
        random_ops(&img, &mut model, 99, 200);
        img.close().unwrap();
        assert!(
            qemu_reads(path) == model,
            "{}: qemu reads otherwise",
            path.display()
        );
        qemu_check_clean(path);
        our_check_is_clean(path);
    }
    qemu_check_clean(&base);
}

/// Writes the L2 entry of guest cluster `index` of `path` (whose L2 table for it exists).
fn patch_l2(path: &Path, index: u64, word: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut c0 = vec![0u8; 65536];
    f.read_at(&mut c0, 0).unwrap();
    let h = qcow2_engine::format::Header::parse(&c0).unwrap();
    let mut e = [0u8; 8];
    f.read_at(&mut e, h.l1_table_offset).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&word.to_be_bytes(), l2 + index * 8).unwrap();
}

fn open_err(path: &Path, opts: &OpenOptions) -> String {
    match Image::open(path, opts) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Names that escape, name the image itself or nothing, a missing file, entries that do
/// not name their own offset or are compressed, feature bits that disagree: clean errors,
/// found at open or at the read, and reported by check.
#[test]
fn hostile_data_file_names_and_entries_are_clean_errors() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("images");
    std::fs::create_dir(&d).unwrap();
    let confined = OpenOptions {
        backing: BackingPolicy::ConfineTo(d.clone()),
        ..OpenOptions::default()
    };
    let outside = dir.path().join("outside.raw");
    std::fs::write(&outside, vec![0x99u8; SIZE as usize]).unwrap();
    for (name, says) in [
        ("../outside.raw", "'..'"),
        (s(&outside), "absolute"),
        ("missing.raw", "the external data file: cannot resolve"),
        ("self.qcow2", "the image itself"),
    ] {
        let img = d.join("self.qcow2");
        let _ = std::fs::remove_file(&img);
        // qemu-img makes the data file it names; write the name over a plain image instead.
        qemu_img(
            &d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=placeholder.raw",
                s(&img),
                "4M",
            ],
        );
        let mut c0 = std::fs::read(&img).unwrap();
        let mut h = qcow2_engine::format::Header::parse(&c0[..65536]).unwrap();
        h.set_data_file_name(name);
        let bytes = h.to_bytes().unwrap();
        c0[..bytes.len()].copy_from_slice(&bytes);
        std::fs::write(&img, &c0).unwrap();
        let e = open_err(&img, &confined);
        assert!(e.contains(says), "{name}: {e}");
        // Metadata only (info) never opens it.
        let info = qcow2_engine::ops::info::info(&img, false, false, None).unwrap();
        assert_eq!(info.format_specific.data.data_file.as_deref(), Some(name));
        let _ = std::fs::remove_file(d.join("placeholder.raw"));
    }
    // An entry that names another guest cluster's offset, and a compressed entry.
    for (case, word) in [
        ("elsewhere", 0x1_0000u64 | 1 << 63),
        ("compressed", 1u64 << 62 | 0x1_0000),
    ] {
        let img = qemu_made(&d, &format!("{case}.qcow2"), &format!("{case}.data"), "");
        patch_l2(&img, 0, word);
        let opened = Image::open(&img, &confined).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = opened.read_at(&mut buf, 0).unwrap_err().to_string();
        assert!(
            e.contains("data file") || e.contains("compressed"),
            "{case}: {e}"
        );
        drop(opened);
        let storage: std::sync::Arc<dyn qcow2_engine::storage::Storage> =
            std::sync::Arc::new(qcow2_engine::storage::FileStorage::open(&img, false).unwrap());
        let r = qcow2_engine::ops::check::check(&storage, qcow2_engine::ops::check::Repair::None)
            .unwrap();
        assert!(r.corruptions > 0, "{case}: {:?}", r.messages);
    }
    // The raw bit without the data file bit; the data file bit without a name.
    let img = d.join("bits.qcow2");
    qemu_img(&d, &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let mut c0 = std::fs::read(&img).unwrap();
    c0[95] |= 2; // autoclear bit 1
    std::fs::write(&img, &c0).unwrap();
    assert!(open_err(&img, &confined).contains("raw external data"));
    c0[95] &= !2;
    c0[79] |= 4; // incompatible bit 2
    std::fs::write(&img, &c0).unwrap();
    assert!(open_err(&img, &confined).contains("names no data file"));
}
