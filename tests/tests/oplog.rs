//! Differential test: the same seeded op log replayed through our engine, through qemu-io and
//! on a raw file must give identical images, and ours must pass `qemu-img check` clean.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2_csi_tests::oplog::{self, Op};
use qcow2_csi_tests::qemu;
use qcow2_engine::{BackingFormat, CreateOptions, Image, OpenOptions, ZeroFlags};

struct Case {
    seed: u64,
    ops: usize,
    size: u64,
    cluster: u64,
    extended_l2: bool,
    overlay: bool,
    /// The run must have grown the refcount table to at least this many clusters.
    min_reftable_clusters: u32,
    /// Both images (and the base) LUKS-encrypted with [`PASS`].
    encrypted: bool,
    /// Both images (not the base) keep their data in an external data file, raw (`true`:
    /// `data_file_raw`, which then must equal the expected raw file) or not.
    data_file: Option<bool>,
}

const PASS: &str = "oplog passphrase";
const SECRET: &str = "secret,id=sec0,data=oplog passphrase";
const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";

fn passphrase(encrypted: bool) -> Option<qcow2_engine::crypto::Passphrase> {
    encrypted.then(|| qcow2_engine::crypto::Passphrase::new(PASS))
}

/// `--image-opts` for an encrypted image (and its encrypted backing file).
fn image_opts(path: &Path, overlay: bool) -> String {
    let mut o = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    );
    if overlay {
        o.push_str(",backing.encrypt.key-secret=sec0");
    }
    o
}

/// qemu-img with the secret object, asserting success.
fn qemu_img_secret(args: &[&str]) -> String {
    // `--object` goes after the subcommand.
    let (sub, rest) = args.split_first().expect("a subcommand");
    let mut v = vec![*sub, "--object", SECRET];
    v.extend_from_slice(rest);
    qemu::img(&v)
}

fn replay_engine(path: &Path, ops: &[Op], encrypted: bool) {
    let opts = OpenOptions {
        passphrase: passphrase(encrypted),
        ..OpenOptions::writable()
    };
    let open = || Image::open(path, &opts).expect("open ours");
    let mut img = open();
    for (i, op) in ops.iter().enumerate() {
        let r = match *op {
            Op::Write { off, len, byte } => img.write_at(&vec![byte; len as usize], off),
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(off, len, ZeroFlags { no_hole: !unmap })
            }
            Op::Discard { off, len } => img.discard(off, len),
            Op::Flush => img.flush(),
            Op::Reopen => {
                img.close().expect("close");
                img = open();
                Ok(())
            }
        };
        r.unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
    }
    img.close().expect("close");
}

/// Reads the whole image through the engine and compares it with the raw file.
fn engine_reads_match(path: &Path, raw: &Path, encrypted: bool) {
    let opts = OpenOptions {
        passphrase: passphrase(encrypted),
        ..OpenOptions::default()
    };
    let img = Image::open(path, &opts).expect("open ours read-only");
    let raw = File::open(raw).expect("raw");
    qcow2_csi_tests::assert_engine_matches_raw(&img, &raw, 0, img.size());
}

fn run(case: Case) {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ours = d.join("ours.qcow2");
    let theirs = d.join("qemu.qcow2");
    let raw = d.join("expected.raw");
    let size = case.size.to_string();
    let cluster = case.cluster.to_string();
    let ext = if case.extended_l2 { "on" } else { "off" };
    let mut opts = format!("cluster_size={cluster},extended_l2={ext}");
    if case.encrypted {
        opts = format!("{opts},{LUKS}");
    }
    let enc = case.encrypted;
    // Absolute names: qemu resolves a relative data file name against its working
    // directory, we against the image's.
    let data_of = |image: &Path| image.with_extension("data");
    let their_opts = match case.data_file {
        None => opts.clone(),
        Some(raw) => format!(
            "{opts},data_file={}{}",
            data_of(&theirs).display(),
            if raw { ",data_file_raw=on" } else { "" }
        ),
    };

    let mut create = CreateOptions {
        size: Some(case.size),
        cluster_size: case.cluster,
        extended_l2: case.extended_l2,
        encryption: enc.then(|| qcow2_engine::ops::create::NewEncryption::New {
            passphrase: qcow2_engine::crypto::Passphrase::new(PASS),
            params: qcow2_engine::crypto::luks::NewHeader {
                iter_time_ms: 10,
                ..Default::default()
            },
        }),
        data_file: case
            .data_file
            .map(|raw| qcow2_engine::ops::create::NewDataFile {
                name: data_of(&ours).display().to_string(),
                raw,
            }),
        ..CreateOptions::default()
    };
    let raw_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw)
        .expect("raw");
    raw_file.set_len(case.size).expect("size raw");
    if case.overlay {
        // A qemu-made base with data around the edges the ops hit; smaller than the overlay.
        let base = d.join("base.qcow2");
        let base_size = case.size / 2 + 4096;
        qemu_img_secret(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opts,
            base.to_str().unwrap(),
            &base_size.to_string(),
        ]);
        let mut cmds = vec![];
        let mut off = 0;
        while off + 200_000 < base_size {
            cmds.push(format!("write -q -P 0xee {off} 150000"));
            off += base_size / 7;
        }
        cmds.push(format!("write -q -P 0xef {} 4096", base_size - 4096));
        let base_raw = d.join("base.raw");
        if enc {
            qemu::io_script_encrypted(&image_opts(&base, false), PASS, &(cmds.join("\n") + "\n"));
            qemu_img_secret(&[
                "convert",
                "--image-opts",
                &image_opts(&base, false),
                "-O",
                "raw",
                base_raw.to_str().unwrap(),
            ]);
        } else {
            qemu::io(&base, &cmds);
            qemu::to_raw(&base, &base_raw);
        }
        let bytes = std::fs::read(&base_raw).expect("base raw");
        raw_file.write_all_at(&bytes, 0).expect("seed raw");
        create.backing = Some(("base.qcow2".into(), BackingFormat::Qcow2));
        qemu_img_secret(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &their_opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            theirs.to_str().unwrap(),
            &size,
        ]);
    } else {
        qemu_img_secret(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &their_opts,
            theirs.to_str().unwrap(),
            &size,
        ]);
    }
    qcow2_engine::create(&ours, &create).expect("create ours");

    let l2_span = case.cluster / if case.extended_l2 { 16 } else { 8 } * case.cluster;
    let ops = oplog::generate(case.seed, case.ops, case.size, l2_span);
    replay_engine(&ours, &ops, enc);
    let script = oplog::qemu_io_script(&ops, case.cluster);
    if enc {
        qemu::io_script_encrypted(&image_opts(&theirs, case.overlay), PASS, &script);
    } else {
        qemu::io_script(&theirs, "qcow2", &script);
    }
    oplog::apply_raw(&raw_file, &ops).expect("raw replay");
    drop(raw_file);

    engine_reads_match(&ours, &raw, enc);
    if case.data_file == Some(true) {
        // A raw data file is the guest disk.
        let expected = std::fs::read(&raw).expect("raw");
        for image in [&ours, &theirs] {
            let data = std::fs::read(data_of(image)).expect("data file");
            assert!(
                data == expected,
                "{} is not the guest disk",
                data_of(image).display()
            );
        }
    }
    if enc {
        let (o, t) = (
            image_opts(&ours, case.overlay),
            image_opts(&theirs, case.overlay),
        );
        let r = format!("driver=raw,file.filename={}", raw.display());
        qemu_img_secret(&["check", "-q", "--image-opts", &o]);
        qemu_img_secret(&["compare", "-q", "--image-opts", &o, &r]);
        qemu_img_secret(&["compare", "-q", "--image-opts", &o, &t]);
    } else {
        qemu::check_clean(&ours);
        qemu::compare(&ours, "qcow2", &raw, "raw");
        qemu::compare(&ours, "qcow2", &theirs, "qcow2");
    }
    let header = Image::open(
        &ours,
        &OpenOptions {
            passphrase: passphrase(enc),
            ..OpenOptions::default()
        },
    )
    .expect("reopen")
    .header();
    assert!(
        header.refcount_table_clusters >= case.min_reftable_clusters,
        "refcount table has {} clusters, expected growth to at least {}",
        header.refcount_table_clusters,
        case.min_reftable_clusters
    );
}

#[test]
fn plain_standard_l2() {
    run(Case {
        seed: 1,
        ops: 3000,
        size: (1 << 30) + 3 * 65536,
        cluster: 65536,
        extended_l2: false,
        overlay: false,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn plain_extended_l2() {
    run(Case {
        seed: 2,
        ops: 3000,
        size: (1 << 30) + 3 * 65536,
        cluster: 65536,
        extended_l2: true,
        overlay: false,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn overlay_standard_l2() {
    run(Case {
        seed: 3,
        ops: 3000,
        size: (1 << 30) + 3 * 65536,
        cluster: 65536,
        extended_l2: false,
        overlay: true,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn overlay_extended_l2() {
    run(Case {
        seed: 4,
        ops: 3000,
        size: (1 << 30) + 3 * 65536,
        cluster: 65536,
        extended_l2: true,
        overlay: true,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

/// 512-byte clusters: a refcount block covers only 128 KiB of file, so the run creates many
/// blocks and grows the refcount table several times.
#[test]
fn tiny_clusters_grow_refcount_structures() {
    run(Case {
        seed: 5,
        ops: 1500,
        size: 48 << 20,
        cluster: 512,
        extended_l2: false,
        overlay: false,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 2,
    });
}

#[test]
fn small_clusters_extended_l2_overlay() {
    run(Case {
        seed: 6,
        ops: 1500,
        size: 96 << 20,
        cluster: 16384,
        extended_l2: true,
        overlay: true,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn two_mib_clusters() {
    run(Case {
        seed: 7,
        ops: 800,
        size: 1 << 30,
        cluster: 2 << 20,
        extended_l2: false,
        overlay: true,
        encrypted: false,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn encrypted_standard_l2() {
    run(Case {
        seed: 21,
        ops: 1500,
        size: 16 << 20,
        cluster: 64 << 10,
        extended_l2: false,
        overlay: false,
        encrypted: true,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn encrypted_overlay_extended_l2() {
    run(Case {
        seed: 22,
        ops: 1500,
        size: 16 << 20,
        cluster: 32 << 10,
        extended_l2: true,
        overlay: true,
        encrypted: true,
        data_file: None,
        min_reftable_clusters: 1,
    });
}

#[test]
fn data_file_standard_l2() {
    run(Case {
        seed: 31,
        ops: 1500,
        size: 16 << 20,
        cluster: 64 << 10,
        extended_l2: false,
        overlay: false,
        encrypted: false,
        data_file: Some(false),
        min_reftable_clusters: 1,
    });
}

#[test]
fn data_file_raw_extended_l2() {
    run(Case {
        seed: 32,
        ops: 1500,
        size: 16 << 20,
        cluster: 32 << 10,
        extended_l2: true,
        overlay: false,
        encrypted: false,
        data_file: Some(true),
        min_reftable_clusters: 1,
    });
}

#[test]
fn data_file_overlay_on_a_plain_base() {
    run(Case {
        seed: 33,
        ops: 1500,
        size: 16 << 20,
        cluster: 64 << 10,
        extended_l2: false,
        overlay: true,
        encrypted: false,
        data_file: Some(false),
        min_reftable_clusters: 1,
    });
}
