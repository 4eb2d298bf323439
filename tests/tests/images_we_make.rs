//! Images our engine creates and writes satisfy QEMU: same bytes as `qemu-img create`,
//! `qemu-img check` clean, `qemu-img info` fields, and QEMU can keep working on them.

use std::path::{Path, PathBuf};

use qcow2_csi_tests::qemu;
use qcow2_engine::format::header::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, autoclear, incompat};
use qcow2_engine::{BackingFormat, CreateOptions, Error, Image, OpenOptions, ZeroFlags};

const GIB: u64 = 1 << 30;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ours(dir: &Path, name: &str, opts: CreateOptions) -> PathBuf {
    let p = dir.join(name);
    qcow2_engine::create(&p, &opts).unwrap_or_else(|e| panic!("create {name}: {e}"));
    p
}

fn has_ext(path: &Path, kind: u32) -> bool {
    let b = std::fs::read(path).unwrap();
    let mut off = 112;
    while off + 8 <= b.len() {
        let k = u32::from_be_bytes(b[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
        if k == 0 {
            return false;
        }
        if k == kind {
            return true;
        }
        off += 8 + len.next_multiple_of(8);
    }
    false
}

#[test]
fn create_is_byte_identical_to_qemu_img() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = ours(
        d,
        "base.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    for (size, ext) in [
        (GIB, false),
        (32 * GIB - 1, false),
        (32 * GIB, true),
        (4 << 40, false),
        (4 << 40, true),
        (16 << 40, true),
    ] {
        let name = format!("o-{size}-{ext}.qcow2");
        let p = ours(
            d,
            &name,
            CreateOptions {
                size: Some(size),
                extended_l2: ext,
                ..Default::default()
            },
        );
        let q = d.join(format!("q-{name}"));
        let e = if ext { "on" } else { "off" };
        qemu::img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("extended_l2={e}"),
            s(&q),
            &size.to_string(),
        ]);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(&q).unwrap(),
            "{name} differs from qemu-img's"
        );
        qemu::check_clean(&p);
        let info = qemu::info(&p);
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16);
        assert_eq!(info["format-specific"]["data"]["extended-l2"], ext);
        assert!(has_ext(&p, EXT_FEATURE_TABLE));
    }
    // Overlays, relative and absolute, qcow2 and raw backing.
    let raw = d.join("base.raw");
    std::fs::File::create(&raw).unwrap().set_len(GIB).unwrap();
    for (name, backing, fmt) in [
        ("rel.qcow2", "base.qcow2".to_string(), BackingFormat::Qcow2),
        ("abs.qcow2", s(&base).to_string(), BackingFormat::Qcow2),
        ("raw.qcow2", "base.raw".to_string(), BackingFormat::Raw),
    ] {
        let p = ours(
            d,
            name,
            CreateOptions {
                backing: Some((backing.clone(), fmt)),
                ..Default::default()
            },
        );
        let q = d.join(format!("q-{name}"));
        qemu::img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &backing,
            "-F",
            fmt.name(),
            s(&q),
        ]);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(&q).unwrap(),
            "{name} differs from qemu-img's"
        );
        qemu::check_clean(&p);
        let info = qemu::info(&p);
        assert_eq!(info["backing-filename"], backing.as_str());
        assert_eq!(info["backing-filename-format"], fmt.name());
        assert!(has_ext(&p, EXT_BACKING_FORMAT));
    }
}

#[test]
fn qemu_keeps_working_on_our_images() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for ext in [false, true] {
        let p = ours(
            d,
            &format!("w-{ext}.qcow2"),
            CreateOptions {
                size: Some(GIB),
                extended_l2: ext,
                ..Default::default()
            },
        );
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        img.write_at(&[0x11; 1 << 20], 0).unwrap();
        img.write_at(&[0x22; 3000], (512 << 20) - 1000).unwrap();
        img.write_zeroes(4096, 8192, ZeroFlags::default()).unwrap();
        img.close().unwrap();
        qemu::check_clean(&p);
        qemu::io(
            &p,
            &[
                "read -q -P 0x11 0 4k".into(),
                "read -q -P 0 4k 8k".into(),
                "read -q -P 0x11 12k 1012k".into(),
                format!("read -q -P 0x22 {} 3000", (512 << 20) - 1000),
            ],
        );
        qemu::io(
            &p,
            &[
                "write -q -P 0xcc 0 1M".into(),
                "write -q -P 0xcd 700M 64k".into(),
            ],
        );
        qemu::check_clean(&p);
        qemu::img(&["resize", "-q", s(&p), "+1G"]);
        qemu::check_clean(&p);
        let img = Image::open(&p, &OpenOptions::writable()).unwrap();
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 700 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0xcd));
        img.write_at(&[0x33; 65536], 1800 << 20).unwrap();
        img.close().unwrap();
        qemu::check_clean(&p);
        qemu::io(&p, &[format!("read -q -P 0x33 {} 64k", 1800u64 << 20)]);
    }
}

#[test]
fn our_resize_relocates_the_l1_table() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = ours(
        dir.path(),
        "g.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    let old_l1 = img.header().l1_table_offset;
    img.resize(5 << 40).unwrap();
    assert_ne!(
        img.header().l1_table_offset,
        old_l1,
        "a bigger L1 must move"
    );
    img.write_at(&[8; 4096], 3 << 40).unwrap();
    assert!(img.resize(GIB).is_err(), "shrinking is refused");
    img.close().unwrap();
    qemu::check_clean(&p);
    assert_eq!(qemu::info(&p)["virtual-size"], 5u64 << 40);
    qemu::io(
        &p,
        &[
            "read -q -P 7 0 4k".into(),
            format!("read -q -P 8 {} 4k", 3u64 << 40),
        ],
    );
}

#[test]
fn discard_punches_host_holes_and_overlay_reads_zeros() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = ours(
        d,
        "b.qcow2",
        CreateOptions {
            size: Some(64 << 20),
            ..Default::default()
        },
    );
    let img = Image::open(&base, &OpenOptions::writable()).unwrap();
    img.write_at(&vec![0xab; 16 << 20], 0).unwrap();
    img.flush().unwrap();
    let before = img.allocated_bytes().unwrap().unwrap();
    img.discard(0, 8 << 20).unwrap();
    // Released clusters are punched once the unlinks are durable: at the next flush.
    img.flush().unwrap();
    let after = img.allocated_bytes().unwrap().unwrap();
    assert!(
        before - after >= 7 << 20,
        "discard freed {} bytes only",
        before - after
    );
    img.close().unwrap();
    qemu::check_clean(&base);

    let top = ours(
        d,
        "t.qcow2",
        CreateOptions {
            backing: Some(("b.qcow2".into(), BackingFormat::Qcow2)),
            ..Default::default()
        },
    );
    let img = Image::open(&top, &OpenOptions::writable()).unwrap();
    img.write_at(&[0xcd; 65536], 10 << 20).unwrap();
    img.discard(9 << 20, 2 << 20).unwrap();
    img.discard(12 << 20, 1000).unwrap();
    img.close().unwrap();
    qemu::check_clean(&top);
    qemu::io(
        &top,
        &[
            format!("read -q -P 0 {} 2M", 9 << 20),
            format!("read -q -P 0 {} 1000", 12 << 20),
            format!("read -q -P 0xab {} 1000", (12 << 20) + 1000),
        ],
    );
}

fn poke(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

#[test]
fn feature_bits_are_honoured() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Unknown incompatible bit: refused, named from the feature table when it has a name.
    let p = ours(
        d,
        "u.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    poke(&p, 72, &(1u64 << 5).to_be_bytes());
    match Image::open(&p, &OpenOptions::default()) {
        Err(Error::Unsupported(m)) => assert!(m.contains("bit 5"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Extended L2 entry name is in the table: a known bit, so the image opens.
    // Corrupt bit: read-only works, read-write is refused. Dirty bit: read-only works without
    // touching the image; read-write repairs first and the clean close clears the bit.
    for bit in [incompat::CORRUPT, incompat::DIRTY] {
        let p = ours(
            d,
            &format!("b{bit}.qcow2"),
            CreateOptions {
                size: Some(GIB),
                ..Default::default()
            },
        );
        poke(&p, 72, &bit.to_be_bytes());
        let before = std::fs::read(&p).unwrap();
        assert!(Image::open(&p, &OpenOptions::default()).is_ok());
        assert_eq!(std::fs::read(&p).unwrap(), before, "read-only open wrote");
        let rw = Image::open(&p, &OpenOptions::writable());
        if bit == incompat::CORRUPT {
            assert!(matches!(rw, Err(Error::Corrupt(_))), "{rw:?}");
            continue;
        }
        let img = rw.unwrap();
        img.write_at(&[7; 4096], 0).unwrap();
        img.close().unwrap();
        let h = Image::open(&p, &OpenOptions::default()).unwrap().header();
        assert_eq!(h.incompatible_features & incompat::DIRTY, 0);
        qemu::check_clean(&p);
    }
    // Autoclear bits (here: a qemu bitmap) are cleared on read-write open; the bitmaps we
    // cannot maintain are dropped and their clusters released, so nothing leaks.
    let p = ours(
        d,
        "bm.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    qemu::img(&["bitmap", "--add", s(&p), "b0"]);
    assert_ne!(
        Image::open(&p, &OpenOptions::default())
            .unwrap()
            .header()
            .autoclear_features
            & autoclear::BITMAPS,
        0
    );
    let img = Image::open(&p, &OpenOptions::writable()).unwrap();
    assert_eq!(img.header().autoclear_features, 0);
    img.write_at(&[1; 512], 0).unwrap();
    img.close().unwrap();
    let h = Image::open(&p, &OpenOptions::default()).unwrap().header();
    assert_eq!(h.autoclear_features, 0);
    assert!(
        h.unknown_extensions.iter().all(|e| e.kind != 0x2385_2875),
        "the stale bitmaps extension is dropped"
    );
    qemu::check_clean(&p);
    assert!(
        qemu::info(&p)
            .pointer("/format-specific/data/bitmaps")
            .is_none()
    );
}

#[test]
fn backing_policy_and_loops() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = ours(
        d,
        "a.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    let b = ours(
        d,
        "b.qcow2",
        CreateOptions {
            backing: Some(("a.qcow2".into(), BackingFormat::Qcow2)),
            ..Default::default()
        },
    );
    // Make a point back at b: a loop.
    qemu::img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    match Image::open(&b, &OpenOptions::default()) {
        Err(e) => assert!(e.to_string().contains("loop"), "{e}"),
        Ok(_) => panic!("a backing loop opened"),
    }
    // top's backing file.
    ours(
        d,
        "c.qcow2",
        CreateOptions {
            size: Some(GIB),
            ..Default::default()
        },
    );
    let top = ours(
        d,
        "top.qcow2",
        CreateOptions {
            backing: Some(("c.qcow2".into(), BackingFormat::Qcow2)),
            ..Default::default()
        },
    );
    let deny = OpenOptions {
        backing: qcow2_engine::BackingPolicy::Deny,
        ..OpenOptions::default()
    };
    assert!(Image::open(&top, &deny).is_err());
    let elsewhere = tempfile::tempdir().unwrap();
    let confined = OpenOptions {
        backing: qcow2_engine::BackingPolicy::ConfineTo(elsewhere.path().into()),
        ..OpenOptions::default()
    };
    assert!(Image::open(&top, &confined).is_err());
    let here = OpenOptions {
        backing: qcow2_engine::BackingPolicy::ConfineTo(d.into()),
        ..OpenOptions::default()
    };
    assert!(Image::open(&top, &here).is_ok());
}

/// Flattening the middle of a chain: `convert` makes a standalone copy of the backing chain,
/// and `set_backing_file_unsafe` points the top at it. The top reads the same bytes before
/// and after (qemu-img compare), QEMU sees the new chain, and check is clean.
#[test]
fn a_top_rebased_onto_a_flattened_copy_of_its_chain_reads_the_same() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = ours(
        d,
        "layer-a.qcow2",
        CreateOptions {
            size: Some(16 << 20),
            ..CreateOptions::default()
        },
    );
    qemu::io(
        &base,
        &["write -P 0x11 0 4M".into(), "write -P 0x12 8M 1M".into()],
    );
    let mid = ours(
        d,
        "layer-b.qcow2",
        CreateOptions {
            backing: Some(("layer-a.qcow2".into(), BackingFormat::Qcow2)),
            ..CreateOptions::default()
        },
    );
    qemu::io(
        &mid,
        &["write -P 0x21 1M 1M".into(), "write -z 8M 64k".into()],
    );
    let top = ours(
        d,
        "layer-c.qcow2",
        CreateOptions {
            size: Some(32 << 20),
            backing: Some(("layer-b.qcow2".into(), BackingFormat::Qcow2)),
            ..CreateOptions::default()
        },
    );
    qemu::io(&top, &["write -P 0x31 3M 512k".into()]);
    let before = d.join("before.raw");
    qemu::to_raw(&top, &before);

    // The copy of the chain under the top, then the top pointed at it.
    let flat = d.join("layer-f.qcow2");
    qcow2_engine::ops::convert::convert(
        &mid,
        &flat,
        &qcow2_engine::ops::convert::ConvertOptions {
            input_format: BackingFormat::Qcow2,
            output_format: BackingFormat::Qcow2,
            create: CreateOptions::default(),
            l2_cache_bytes: None,
            compress: false,
            input_passphrase: None,
            output_passphrase: None,
        },
        |_, _| {},
    )
    .unwrap();
    let img = Image::open(&top, &OpenOptions::writable()).unwrap();
    // A longer name does not fit in place.
    assert!(
        img.set_backing_file_unsafe("layer-longer-name.qcow2", "qcow2")
            .is_err()
    );
    img.set_backing_file_unsafe("layer-f.qcow2", "qcow2")
        .unwrap();
    img.close().unwrap();

    let info = qemu::info(&top);
    assert_eq!(info["backing-filename"], "layer-f.qcow2");
    assert_eq!(qemu::backing_chain(&top), [top.clone(), flat.clone()]);
    qemu::check_clean(&top);
    qemu::check_clean(&flat);
    qemu::compare(&top, "qcow2", &before, "raw");
}
