//! A real process killed with SIGKILL at spread-out moments while it writes an image
//! (`qcow2util dd` raw → qcow2): `qemu-img check` must find no corruption, every cluster must
//! hold either the source bytes or zeros (never anything else), and our read-write open must
//! repair the leaks so that `qemu-img check` is clean.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qcow2_engine::{Image, OpenOptions};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 96 << 20;
const CHUNK: usize = 64 << 10;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dd(src: &Path, out: &Path, cluster: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2util"));
    cmd.args(["dd", "-i", s(src), "-f", "raw", "-o", s(out), "-O", "qcow2"])
        .args(["--cluster-size", cluster])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Every 512-byte sector of the image equals the source or is all zeros (a killed `pwrite`
/// may have landed in part).
fn only_source_or_zeros(src: &Path, img: &Path) {
    let raw = img.with_extension("raw");
    let _ = std::fs::remove_file(&raw);
    qemu::to_raw(img, &raw);
    let (a, b) = (
        std::fs::File::open(src).unwrap(),
        std::fs::File::open(&raw).unwrap(),
    );
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for off in (0..SIZE).step_by(CHUNK) {
        a.read_exact_at(&mut x, off).unwrap();
        b.read_exact_at(&mut y, off).unwrap();
        for (i, (x, y)) in x.chunks(512).zip(y.chunks(512)).enumerate() {
            assert!(
                x == y || y.iter().all(|&v| v == 0),
                "{}: sector at {:#x} holds neither the source nor zeros",
                img.display(),
                off + i as u64 * 512
            );
        }
    }
    std::fs::remove_file(&raw).unwrap();
}

#[test]
fn killed_writer_leaves_no_corruption() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(SIZE).unwrap();
    let mut chunk = vec![0u8; CHUNK];
    for off in (0..SIZE).step_by(CHUNK) {
        if rng.random_range(0..5) > 0 {
            rng.fill(&mut chunk[..]);
            f.write_all_at(&chunk, off).unwrap();
        }
    }
    drop(f);

    let mut interrupted = 0;
    for (i, cluster) in [
        "64K", "4K", "64K", "512", "64K", "4K", "64K", "2M", "64K", "4K",
    ]
    .iter()
    .enumerate()
    {
        // How long a whole copy takes with this geometry, then kill at a spread-out fraction.
        let full = dir.path().join(format!("full{i}.qcow2"));
        let start = Instant::now();
        assert!(dd(&src, &full, cluster).status().unwrap().success());
        let took = start.elapsed();
        std::fs::remove_file(&full).unwrap();
        let out = dir.path().join(format!("killed{i}.qcow2"));
        let mut child = dd(&src, &out, cluster).spawn().unwrap();
        let frac = 0.1 + 0.8 * (i as f64) / 10.0 + rng.random_range(0.0..0.05);
        std::thread::sleep(Duration::from_secs_f64(took.as_secs_f64() * frac));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if !out.exists() {
            continue; // killed before the image was complete: atomic create left nothing
        }
        if status.success() {
            continue;
        }
        interrupted += 1;
        qemu::check_no_corruption(&out);
        only_source_or_zeros(&src, &out);
        let img = Image::open(&out, &OpenOptions::writable()).unwrap();
        img.close().unwrap();
        qemu::check_clean(&out);
        only_source_or_zeros(&src, &out);
    }
    assert!(
        interrupted >= 5,
        "only {interrupted} of 10 kills landed while the copy was running"
    );
}
