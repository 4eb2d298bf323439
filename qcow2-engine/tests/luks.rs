//! QEMU's LUKS encryption, read with qemu-img as the oracle (issue 21, first part): images
//! that `qemu-img create -o encrypt.format=luks` makes with its defaults and common options
//! unlock with the passphrase; their data clusters, written by qemu-io, decrypt to what was
//! written; data we encrypt into a cluster reads back through qemu-io; a wrong passphrase
//! and hostile headers are clear errors.

#[allow(dead_code)]
mod common;
#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use common::{our_check_is_clean, run};

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use qcow2_engine::Error;
use qcow2_engine::crypto::Cipher;
use qcow2_engine::crypto::luks::{EXT_CRYPTO_HEADER, Header};
use qcow2_engine::format::Header as Qcow2Header;

const PASS: &str = "correct horse battery staple";
const SECRET: &str = "secret,id=sec0,data=correct horse battery staple";

/// `--image-opts` for an encrypted image with the secret `sec0`.
fn opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    )
}

/// `qemu-img check` with the secret of the image `--image-opts` `image_opts` names: exit 0,
/// so no corruption and no leak.
fn qemu_check_clean(image_opts: &str) {
    run(Command::new("qemu-img").args([
        "check",
        "-q",
        "--object",
        SECRET,
        "--image-opts",
        image_opts,
    ]));
}

/// An encrypted 1 MiB image made by qemu-img with `-o` `extra`, with 64 KiB of `pattern`
/// written at guest offset 0 by qemu-io.
fn make(dir: &Path, name: &str, extra: &str, pattern: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o])
        .arg(&path)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &opts(&path), "-c"])
        .arg(format!("write -P {pattern:#x} 0 64k")));
    path
}

/// The image's LUKS header region (offset, length) and its parsed header.
fn header_of(path: &Path) -> (u64, u64, Header) {
    let file = std::fs::File::open(path).unwrap();
    let mut cluster0 = vec![0u8; 64 << 10];
    file.read_exact_at(&mut cluster0, 0).unwrap();
    let q = Qcow2Header::parse(&cluster0).unwrap();
    assert_eq!(q.crypt_method, 2, "LUKS");
    let ext = q
        .unknown_extensions
        .iter()
        .find(|e| e.kind == EXT_CRYPTO_HEADER)
        .expect("the encryption header extension");
    let offset = u64::from_be_bytes(ext.data[..8].try_into().unwrap());
    let length = u64::from_be_bytes(ext.data[8..16].try_into().unwrap());
    let mut b = vec![0u8; 4096];
    file.read_exact_at(&mut b, offset).unwrap();
    (offset, length, Header::parse(&b, length).unwrap())
}

fn unlock(path: &Path, pass: &str) -> Result<(Header, qcow2_engine::crypto::Key), Error> {
    let (offset, _, h) = header_of(path);
    let file = std::fs::File::open(path).unwrap();
    let key = h.unlock(pass.as_bytes(), &mut |at, buf| {
        file.read_exact_at(buf, offset + at)
            .map_err(|e| Error::InvalidImage(e.to_string()))
    })?;
    Ok((h, key))
}

/// Host offset of guest offset 0, from the image's L1 and L2 tables (qemu-img map gives no
/// offsets for encrypted images).
fn host_of_guest_zero(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    let mut cluster0 = vec![0u8; 64 << 10];
    file.read_exact_at(&mut cluster0, 0).unwrap();
    let q = Qcow2Header::parse(&cluster0).unwrap();
    let entry = |at: u64| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00
    };
    let l2 = entry(q.l1_table_offset);
    assert_ne!(l2, 0, "guest 0 has an L2 table");
    let host = entry(l2);
    assert_ne!(host, 0, "guest 0 is allocated");
    host
}

#[test]
fn qemu_luks_images_unlock_and_their_clusters_decrypt_both_ways() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (extra, cipher, hash)) in [
        ("", "aes-xts-plain64", "sha256"),
        ("encrypt.cipher-alg=aes-128", "aes-xts-plain64", "sha256"),
        ("encrypt.hash-alg=sha1", "aes-xts-plain64", "sha1"),
        ("encrypt.hash-alg=sha512", "aes-xts-plain64", "sha512"),
        ("encrypt.ivgen-alg=plain", "aes-xts-plain", "sha256"),
    ]
    .into_iter()
    .enumerate()
    {
        let path = make(dir.path(), &format!("enc{i}.qcow2"), extra, 0x5a);
        let (h, key) = unlock(&path, PASS).unwrap_or_else(|e| panic!("{extra}: {e}"));
        assert_eq!(
            format!("{}-{}", h.cipher_name, h.cipher_mode),
            cipher,
            "{extra}"
        );
        assert_eq!(format!("{:?}", h.hash).to_lowercase(), hash, "{extra}");
        let expected_key = if extra.contains("aes-128") { 32 } else { 64 };
        assert_eq!(key.len(), expected_key, "{extra}");
        let cipher = Cipher::for_header(&h, &key).unwrap();

        // qemu-io's write decrypts to the pattern.
        let host = host_of_guest_zero(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut data = vec![0u8; 64 << 10];
        file.read_exact_at(&mut data, host).unwrap();
        assert!(
            data.iter().any(|&b| b != 0x5a),
            "{extra}: stored in the clear"
        );
        cipher.decrypt(host, &mut data);
        assert!(data.iter().all(|&b| b == 0x5a), "{extra}: decrypted wrong");

        // What we encrypt into the cluster, qemu-io reads.
        let mut ours = vec![0xa5u8; 64 << 10];
        cipher.encrypt(host, &mut ours);
        file.write_all_at(&ours, host).unwrap();
        drop(file);
        run(Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &opts(&path), "-c"])
            .arg("read -P 0xa5 0 64k"));
        qemu_check_clean(&opts(&path));

        // A wrong passphrase opens nothing, and says so.
        let e = unlock(&path, "wrong").unwrap_err();
        assert!(
            e.to_string()
                .contains("opens none of the image's LUKS key slots"),
            "{e}"
        );
    }
}

#[test]
fn hostile_luks_headers_are_clear_errors() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = make(dir.path(), "h.qcow2", "", 0x11);
    let (offset, length, _) = header_of(&path);
    let file = std::fs::File::open(&path).unwrap();
    let mut good = vec![0u8; 4096];
    file.read_exact_at(&mut good, offset).unwrap();
    let slot0 = 208;
    /// What is broken, how, and what the error must say.
    type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, &'static str);
    let cases: Vec<Case> = vec![
        ("bad magic", Box::new(|b| b[0] = b'X'), "no LUKS magic"),
        (
            "a key slot outside the region",
            Box::new(move |b| b[slot0 + 40..slot0 + 44].copy_from_slice(&u32::MAX.to_be_bytes())),
            "outside the",
        ),
        (
            "huge iterations",
            Box::new(move |b| b[slot0 + 4..slot0 + 8].copy_from_slice(&u32::MAX.to_be_bytes())),
            "iterations",
        ),
        (
            "huge stripes",
            Box::new(move |b| b[slot0 + 44..slot0 + 48].copy_from_slice(&u32::MAX.to_be_bytes())),
            "stripes",
        ),
        (
            "an unknown cipher mode",
            Box::new(|b| {
                b[40..72].fill(0);
                b[40..55].copy_from_slice(b"cbc-essiv:sha25");
            }),
            "unsupported",
        ),
        (
            "an unknown hash",
            Box::new(|b| b[72..78].copy_from_slice(b"md5\0\0\0")),
            "md5",
        ),
        (
            "a garbled slot state",
            Box::new(move |b| b[slot0..slot0 + 4].copy_from_slice(&7u32.to_be_bytes())),
            "key slot state",
        ),
        ("too short", Box::new(|b| b.truncate(100)), "shorter than"),
    ];
    for (what, mutate, says) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let e = Header::parse(&b, length).unwrap_err();
        assert!(e.to_string().contains(says), "{what}: {e}");
    }
}

fn open(path: &Path, pass: Option<&str>, writable: bool) -> Result<qcow2_engine::Image, Error> {
    qcow2_engine::Image::open(
        path,
        &qcow2_engine::OpenOptions {
            writable,
            passphrase: pass.map(qcow2_engine::crypto::Passphrase::new),
            ..Default::default()
        },
    )
}

/// An encrypted image written by qemu-io at odd offsets, and an encrypted overlay on it with
/// more writes, read through `Image` with the passphrase: byte for byte what
/// `qemu-img convert` with the secret gives. Without the passphrase, with a wrong one, or
/// writable without one: clear errors.
#[test]
fn encrypted_images_and_overlays_read_as_qemu_reads_them() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make(dir.path(), "base.qcow2", "", 0x33);
    for cmd in [
        "write -P 0x44 1000 5000",
        "write -P 0x55 70000 200000",
        "write -z 80000 512",
    ] {
        run(Command::new("qemu-io").args([
            "--object",
            SECRET,
            "--image-opts",
            &opts(&base),
            "-c",
            cmd,
        ]));
    }
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "--object", SECRET, "-o"])
        .arg(format!(
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             backing_file={},backing_fmt=qcow2",
            base.display()
        ))
        .arg(&top)
        .arg("1M"));
    let top_opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0,\
         backing.encrypt.key-secret=sec0",
        top.display()
    );
    run(Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &top_opts, "-c"])
        .arg("write -P 0x66 300001 12345"));
    for (path, image_opts) in [(&base, opts(&base)), (&top, top_opts.clone())] {
        let raw = dir.path().join("expected.raw");
        run(Command::new("qemu-img")
            .args([
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &image_opts,
                "-O",
                "raw",
            ])
            .arg(&raw));
        let expected = std::fs::read(&raw).unwrap();
        let img = open(path, Some(PASS), false).unwrap();
        let mut got = vec![0u8; expected.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(
            got == expected,
            "{}: differs from qemu-img convert",
            path.display()
        );
        // Unaligned reads, and a batch.
        let mut piece = vec![0u8; 7777];
        img.read_at(&mut piece, 299_999).unwrap();
        assert_eq!(piece, expected[299_999..299_999 + 7777]);
        let (mut a, mut b) = (vec![0u8; 513], vec![0u8; 4096]);
        let mut reqs = [
            qcow2_engine::image::ReadRequest::new(&mut a, 999),
            qcow2_engine::image::ReadRequest::new(&mut b, 69_632),
        ];
        img.read_batch(&mut reqs);
        assert!(reqs.iter().all(|r| r.result.is_ok()));
        assert_eq!(a, expected[999..999 + 513]);
        assert_eq!(b, expected[69_632..69_632 + 4096]);
    }
    for (pass, writable, says) in [
        (None, false, "its passphrase is needed"),
        (
            Some("wrong"),
            false,
            "opens none of the image's LUKS key slots",
        ),
        (None, true, "its passphrase is needed"),
    ] {
        let e = open(&top, pass, writable).unwrap_err();
        assert!(e.to_string().contains(says), "{pass:?} {writable}: {e}");
    }
    // Opening changed nothing.
    qemu_check_clean(&top_opts);
}

/// `qcow2util info` on encrypted images, without the passphrase, shows what `qemu-img info`
/// shows: `encrypted`, and the LUKS fields (algorithms, uuid, offsets, iterations, slots).
/// `detached-header` (QEMU 8 and later) is left out of the comparison.
#[test]
fn info_shows_the_encryption_as_qemu_img_does() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in ["", "encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha512"]
        .into_iter()
        .enumerate()
    {
        let path = make(dir.path(), &format!("info{i}.qcow2"), extra, 0x11);
        let qemu: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)))
        .unwrap();
        let ours: serde_json::Value =
            serde_json::from_str(&run(Command::new(env!("CARGO_BIN_EXE_qcow2util"))
                .args(["info", "-f"])
                .arg(&path)))
            .unwrap();
        assert_eq!(ours["encrypted"], true);
        assert_eq!(ours["encrypted"], qemu["encrypted"]);
        let strip = |v: &serde_json::Value| {
            let mut e = v["format-specific"]["data"]["encrypt"].clone();
            e.as_object_mut().unwrap().remove("detached-header");
            e
        };
        assert_eq!(strip(&ours), strip(&qemu), "{extra}");
        // The data stays locked without the passphrase.
        let out = Command::new(env!("CARGO_BIN_EXE_qcow2util"))
            .args(["info", "--detail", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("passphrase is needed"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Writes, zeroings and discards through `Image` on encrypted images that qemu-img made
/// (defaults; AES-128 with plain IVs; extended L2 with 32 KiB clusters) and on an encrypted
/// overlay: at sector-aligned and unaligned offsets, inside and across clusters, over
/// qemu-io's data, zero clusters and unallocated ones. `qemu-img convert` with the secret
/// reads exactly the model the same operations give, `qemu-img check` and our check find
/// the images clean, and nothing written is in the clear.
#[test]
fn we_write_encrypted_images_and_qemu_reads_them() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 1usize << 20;
    for (i, extra) in [
        "",
        "encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=plain",
        "extended_l2=on,cluster_size=32k",
    ]
    .into_iter()
    .enumerate()
    {
        let base = make(dir.path(), &format!("w{i}.qcow2"), extra, 0x33);
        let top = dir.path().join(format!("w{i}-top.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--object", SECRET, "-o"])
            .arg(format!(
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
                 backing_file={},backing_fmt=qcow2{}",
                base.display(),
                if extra.contains("extended") {
                    ",extended_l2=on,cluster_size=32k"
                } else {
                    ""
                }
            ))
            .arg(&top)
            .arg("1M"));
        let top_opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0,\
             backing.encrypt.key-secret=sec0",
            top.display()
        );
        // The model starts as qemu-io left the base: 64 KiB of 0x33.
        let mut model = vec![0u8; size];
        model[..64 << 10].fill(0x33);
        let mut seed = 0x1234_5678_u64 + i as u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (path, image_opts, ops) in [(&base, opts(&base), 0), (&top, top_opts.clone(), 1)] {
            let img = open(path, Some(PASS), true).unwrap();
            // Fixed cases first: unaligned inside a sector, across sectors and clusters,
            // whole clusters, into qemu-io's data; then random ones.
            let mut cases: Vec<(u8, u64, u64)> = vec![
                (0, 3, 5),
                (0, 1000, 5000),
                (0, 65_000, 70_000),
                (0, 131_072, 65_536),
                (1, 4_096, 8_192),
                (1, 200_001, 1_000),
                (2, 70_000, 1_000),
                (2, 262_144, 65_536),
                (0, 512 * 7, 512 * 3),
            ];
            for _ in 0..60 {
                let kind = (next() % 4) as u8;
                let off = next() % size as u64;
                let len = (next() % 100_000).min(size as u64 - off).max(1);
                cases.push((kind.min(2), off, len));
            }
            for (n, (kind, off, len)) in cases.into_iter().enumerate() {
                let range = off as usize..(off + len) as usize;
                match kind {
                    0 => {
                        let byte = (n as u8).wrapping_mul(37).wrapping_add(ops + 1) | 1;
                        let data = vec![byte; len as usize];
                        img.write_at(&data, off).unwrap();
                        model[range].fill(byte);
                    }
                    1 => {
                        img.write_zeroes(off, len, Default::default()).unwrap();
                        model[range].fill(0);
                    }
                    _ => {
                        img.discard(off, len).unwrap();
                        model[range].fill(0);
                    }
                }
            }
            let mut got = vec![0u8; size];
            img.read_at(&mut got, 0).unwrap();
            assert!(got == model, "{extra}: our reads differ from the model");
            img.close().unwrap();

            let raw = dir.path().join("written.raw");
            run(Command::new("qemu-img")
                .args([
                    "convert",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &image_opts,
                    "-O",
                    "raw",
                ])
                .arg(&raw));
            let qemu_reads = std::fs::read(&raw).unwrap();
            assert!(
                qemu_reads == model,
                "{extra} {}: qemu-img reads something else than what we wrote",
                path.display()
            );
            qemu_check_clean(&image_opts);
            our_check_is_clean(path);
            // No data byte of ours is stored in the clear: no sector of the file is one
            // repeated nonzero byte.
            let file = std::fs::read(path).unwrap();
            let plain = file
                .chunks(512)
                .filter(|s| s[0] != 0 && s.iter().all(|&b| b == s[0]))
                .count();
            assert_eq!(plain, 0, "{extra} {}: plaintext sectors", path.display());
        }
    }
}

/// A qemu-made encrypted image is clean to our check too: its LUKS header region is
/// metadata, not a leak, and a repair leaves it alone.
#[test]
fn our_check_counts_the_encryption_header() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = make(dir.path(), "c.qcow2", "", 0x21);
    our_check_is_clean(&path);
    let storage: std::sync::Arc<dyn qcow2_engine::storage::Storage> =
        std::sync::Arc::new(qcow2_engine::storage::FileStorage::open(&path, true).unwrap());
    let report =
        qcow2_engine::ops::check::check(&storage, qcow2_engine::ops::check::Repair::All).unwrap();
    assert_eq!(
        report.leaks_fixed + report.corruptions_fixed,
        0,
        "{report:?}"
    );
    drop(storage);
    run(Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &opts(&path), "-c"])
        .arg("read -P 0x21 0 64k"));
}

/// Threads writing their own 100-byte pieces of shared sectors of an encrypted image (each
/// write a read-modify-write of whole sectors underneath), while another thread rewrites
/// whole sectors elsewhere in the same clusters: no thread's bytes are lost.
#[test]
fn unaligned_writes_to_shared_sectors_lose_nothing() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = make(dir.path(), "rmw.qcow2", "", 0x00);
    let img = open(&path, Some(PASS), true).unwrap();
    let threads = 6u64;
    let rounds = 40u8;
    std::thread::scope(|s| {
        for t in 0..threads {
            let img = &img;
            s.spawn(move || {
                for r in 1..=rounds {
                    for piece in 0..20u64 {
                        let off = (piece * threads + t) * 100;
                        img.write_at(&[r.wrapping_add(t as u8); 100], off).unwrap();
                    }
                }
            });
        }
        let img = &img;
        s.spawn(move || {
            for r in 0..200u32 {
                let off = 16_384 + u64::from(r % 64) * 512;
                img.write_at(&[0xee; 1024], off).unwrap();
            }
        });
    });
    for t in 0..threads {
        for piece in 0..20u64 {
            let off = (piece * threads + t) * 100;
            let mut got = [0u8; 100];
            img.read_at(&mut got, off).unwrap();
            assert!(
                got.iter().all(|&b| b == rounds.wrapping_add(t as u8)),
                "thread {t}, piece {piece}: {:?}",
                &got[..8]
            );
        }
    }
    img.close().unwrap();
    qemu_check_clean(&opts(&path));
}

fn qcow2util(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args(args)
        .output()
        .unwrap()
}

/// `qcow2util create --encrypt` with QEMU's defaults and with options: qemu-img finds the
/// encryption it asked for, the layout is QEMU's (the same header cluster, refcounts and L1
/// as `qemu-img create` gives, the LUKS region in the same place and the same file
/// length), qemu-io and we read each other's writes, and both checks are clean.
#[test]
fn qcow2util_creates_encrypted_images_qemu_opens() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, PASS).unwrap();
    let pass_arg = pass_file.display().to_string();
    for (i, (ours, theirs, algs)) in [
        (vec![], "", ("aes-256", "sha256", "plain64")),
        (
            vec![
                "--encrypt-cipher",
                "aes-128",
                "--encrypt-hash",
                "sha512",
                "--encrypt-ivgen",
                "plain",
            ],
            "encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha512,encrypt.ivgen-alg=plain",
            ("aes-128", "sha512", "plain"),
        ),
        (
            vec!["--enable-subcluster", "--cluster-size", "32K"],
            "extended_l2=on,cluster_size=32k",
            ("aes-256", "sha256", "plain64"),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("c{i}.qcow2"));
        let p = path.display().to_string();
        let mut args = vec![
            "create",
            "-f",
            &p,
            "-s",
            "3M",
            "--encrypt",
            "--passphrase-file",
            &pass_arg,
            "--encrypt-iter-time",
            "10",
        ];
        args.extend(ours.iter().copied());
        let out = qcow2util(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)))
        .unwrap();
        assert_eq!(info["encrypted"], true);
        let enc = &info["format-specific"]["data"]["encrypt"];
        assert_eq!(enc["format"], "luks");
        assert_eq!(enc["cipher-alg"], algs.0, "{ours:?}");
        assert_eq!(enc["hash-alg"], algs.1);
        assert_eq!(enc["ivgen-alg"], algs.2);
        assert_eq!(enc["cipher-mode"], "xts");

        // QEMU's layout, byte for byte outside the random LUKS region.
        let qemu_made = dir.path().join(format!("q{i}.qcow2"));
        let mut o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_string();
        if !theirs.is_empty() {
            o = format!("{o},{theirs}");
        }
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o])
            .arg(&qemu_made)
            .arg("3M"));
        let (a, b) = (
            std::fs::read(&path).unwrap(),
            std::fs::read(&qemu_made).unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{ours:?}: file length");
        let (offset, length, _) = header_of(&path);
        assert_eq!(
            (offset, length),
            (header_of(&qemu_made).0, header_of(&qemu_made).1)
        );
        assert!(
            a[..offset as usize] == b[..offset as usize],
            "{ours:?}: metadata differs from qemu-img's"
        );

        // Each reads the other's writes.
        run(Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &opts(&path), "-c"])
            .arg("write -P 0x71 65000 70000"));
        let img = open(&path, Some(PASS), true).unwrap();
        let mut got = vec![0u8; 70_000];
        img.read_at(&mut got, 65_000).unwrap();
        assert!(got.iter().all(|&b| b == 0x71));
        img.write_at(&[0x72; 3000], 1_000_001).unwrap();
        img.close().unwrap();
        run(Command::new("qemu-io")
            .args(["--object", SECRET, "--image-opts", &opts(&path), "-c"])
            .arg("read -P 0x72 1000001 3000"));
        qemu_check_clean(&opts(&path));
        our_check_is_clean(&path);
    }

    // The passphrase never comes from argv, and a missing one is a clear error.
    let p = dir.path().join("none.qcow2").display().to_string();
    let out = qcow2util(&["create", "-f", &p, "-s", "1M", "--encrypt"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--encrypt needs --passphrase-file"));
    assert!(!Path::new(&p).exists());
}

/// An overlay made with `SameKeyAs` its encrypted base shares its key: one passphrase
/// opens the chain (one PBKDF2 for both layers), QEMU reads it, and the base's data shows
/// through under the overlay's writes.
#[test]
fn layers_sharing_a_key_open_as_one_chain() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make(dir.path(), "base.qcow2", "", 0x44);
    let top = dir.path().join("top.qcow2");
    qcow2_engine::create(
        &top,
        &qcow2_engine::CreateOptions {
            backing: Some((
                base.display().to_string(),
                qcow2_engine::BackingFormat::Qcow2,
            )),
            encryption: Some(qcow2_engine::ops::create::NewEncryption::SameKeyAs(
                base.clone(),
            )),
            ..Default::default()
        },
    )
    .unwrap();
    let (bo, bl, _) = header_of(&base);
    let (to, tl, _) = header_of(&top);
    let region = |p: &Path, o: u64, l: u64| {
        let f = std::fs::File::open(p).unwrap();
        let mut b = vec![0u8; l as usize];
        f.read_exact_at(&mut b, o).unwrap();
        b
    };
    assert!(region(&base, bo, bl) == region(&top, to, tl));
    let img = open(&top, Some(PASS), true).unwrap();
    img.write_at(&[0x45; 4096], 8192).unwrap();
    let mut got = vec![0u8; 65_536];
    img.read_at(&mut got, 0).unwrap();
    assert!(got[..8192].iter().all(|&b| b == 0x44));
    assert!(got[8192..12_288].iter().all(|&b| b == 0x45));
    assert!(got[12_288..].iter().all(|&b| b == 0x44));
    img.close().unwrap();
    let top_opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0,backing.encrypt.key-secret=sec0",
        top.display()
    );
    run(Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &top_opts, "-c"])
        .arg("read -P 0x45 8192 4096"));
    // A plain image has no key to share.
    let plain = dir.path().join("plain.qcow2");
    qcow2_engine::create(
        &plain,
        &qcow2_engine::CreateOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let e = qcow2_engine::create(
        &dir.path().join("x.qcow2"),
        &qcow2_engine::CreateOptions {
            size: Some(1 << 20),
            encryption: Some(qcow2_engine::ops::create::NewEncryption::SameKeyAs(plain)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not LUKS-encrypted"), "{e}");
}

/// The encryption header extension itself pointing somewhere wrong: past the end of the
/// file, at an offset inside a cluster, onto the header cluster, over the L1 table, or too
/// short for a header. Each is a clear error at open, for reading and writing, and our
/// check reports what it can without panicking.
#[test]
fn hostile_encryption_header_pointers_are_clear_errors() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = make(dir.path(), "p.qcow2", "", 0x11);
    let bytes = std::fs::read(&good).unwrap();
    let q = Qcow2Header::parse(&bytes[..65_536]).unwrap();
    let (offset, length, _) = header_of(&good);
    // Where the extension's 16 bytes of data are in cluster 0.
    let ext_at = (q.header_length as usize..4096)
        .step_by(8)
        .find(|&at| bytes[at..at + 4] == EXT_CRYPTO_HEADER.to_be_bytes())
        .unwrap()
        + 8;
    for (what, new_offset, new_length, says) in [
        ("past the end", offset + (1 << 30), length, "not inside"),
        ("inside a cluster", offset + 512, length, "not a cluster"),
        ("on the header", 0, length, "not a cluster after the header"),
        ("over the L1 table", q.l1_table_offset, length, "overlaps"),
        ("too short", offset, 100, "not inside"),
    ] {
        let path = dir.path().join("hostile.qcow2");
        let mut b = bytes.clone();
        b[ext_at..ext_at + 8].copy_from_slice(&new_offset.to_be_bytes());
        b[ext_at + 8..ext_at + 16].copy_from_slice(&new_length.to_be_bytes());
        std::fs::write(&path, &b).unwrap();
        for writable in [false, true] {
            let e = open(&path, Some(PASS), writable).unwrap_err();
            let text = e.to_string();
            // The L1 overlap is found by the metadata map, which read-only opens skip
            // only when the LUKS header there fails to parse first.
            assert!(
                text.contains(says) || (what == "over the L1 table" && text.contains("LUKS")),
                "{what} (writable {writable}): {text}"
            );
        }
        let storage: std::sync::Arc<dyn qcow2_engine::storage::Storage> =
            std::sync::Arc::new(qcow2_engine::storage::FileStorage::open(&path, false).unwrap());
        let report =
            qcow2_engine::ops::check::check(&storage, qcow2_engine::ops::check::Repair::None);
        if let Ok(r) = report {
            assert!(
                r.corruptions + r.leaks + r.check_errors > 0 || what == "too short",
                "{what}: {r:?}"
            );
        }
    }
}

/// Growing an encrypted image: the new space reads as zeros, takes writes, and qemu-img
/// sees the new size and the data; both checks stay clean.
#[test]
fn encrypted_images_grow() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = make(dir.path(), "g.qcow2", "", 0x61);
    let img = open(&path, Some(PASS), true).unwrap();
    img.resize(5 << 20).unwrap();
    let mut got = vec![1u8; 8192];
    img.read_at(&mut got, (4 << 20) + 100).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    img.write_at(&[0x62; 10_000], (4 << 20) + 333).unwrap();
    img.close().unwrap();
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&path)))
    .unwrap();
    assert_eq!(info["virtual-size"], 5 << 20);
    run(Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &opts(&path)])
        .args(["-c", "read -P 0x61 0 64k", "-c"])
        .arg(format!("read -P 0x62 {} 10000", (4 << 20) + 333)));
    qemu_check_clean(&opts(&path));
    our_check_is_clean(&path);
}

/// `qcow2util dd --encrypt` makes an encrypted copy qemu-img reads as the input; `dd` back
/// out of it, `map` and `bench` take the passphrase; without it they refuse.
#[test]
fn dd_map_and_bench_take_the_passphrase() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, PASS).unwrap();
    let pf = pass_file.display().to_string();
    let raw = dir.path().join("in.raw");
    let mut bytes = vec![0u8; 3 << 20];
    for (i, b) in bytes[100_000..1_300_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let enc = dir.path().join("enc.qcow2");
    let (r, e) = (raw.display().to_string(), enc.display().to_string());
    let ok = |args: &[&str]| {
        let out = qcow2util(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "dd",
        "-i",
        &r,
        "-o",
        &e,
        "-O",
        "qcow2",
        "--encrypt",
        "--encrypt-iter-time",
        "10",
        "--passphrase-file",
        &pf,
    ]);
    let back = dir.path().join("qemu.raw");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts(&enc),
            "-O",
            "raw",
        ])
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "qemu-img reads another content"
    );
    let file = std::fs::read(&enc).unwrap();
    assert!(
        !file.windows(64).any(|w| w == &bytes[200_000..200_064]),
        "plaintext in the encrypted copy"
    );
    let out = dir.path().join("out.raw");
    ok(&[
        "dd",
        "-f",
        "qcow2",
        "-i",
        &e,
        "-o",
        &out.display().to_string(),
        "-O",
        "raw",
        "--passphrase-file",
        &pf,
    ]);
    assert!(std::fs::read(&out).unwrap() == bytes);
    let map = ok(&[
        "map",
        "-f",
        &e,
        "--output",
        "json",
        "--passphrase-file",
        &pf,
    ]);
    assert!(map.contains("\"data\":true"), "{map}");
    let bench = Command::new(env!("CARGO_BIN_EXE_qcow2util"))
        .args([
            "bench",
            "-f",
            &e,
            "-c",
            "100",
            "--passphrase-env",
            "QCOW2_TEST_PASS",
        ])
        .env("QCOW2_TEST_PASS", PASS)
        .output()
        .unwrap();
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let bench = String::from_utf8_lossy(&bench.stdout);
    assert!(bench.contains("IOPS") || bench.contains("iops"), "{bench}");
    let refused = qcow2util(&["map", "-f", &e]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("passphrase"));
}
