//! The `qcow2-csi nbd` command's listening options: `--bind` (TCP), `--shared`,
//! `--persistent` and `--discard`, each checked through a real client and `qemu-img`.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)]
mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Served, qemu_io_uri};

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("vol.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    p
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

#[test]
fn bind_serves_over_tcp() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let served = Served::spawn(&img, &["--bind", "127.0.0.1:0", "--persistent"]);
    let port = served.endpoint.rsplit_once(':').unwrap().1.to_string();
    assert_ne!(port, "0", "the real port is reported");
    let uri = format!("nbd://127.0.0.1:{port}");
    qemu_io_uri(&uri, &["write -P 0x5a 12345 100000"]);
    qemu_io_uri(&uri, &["read -P 0x5a 12345 100000", "read -P 0 0 12345"]);
    served.stop();
    qemu::check_clean(&img);
    qemu::io(
        &img,
        &[
            "read -P 0x5a 12345 100000".into(),
            "read -P 0 112345 4096".into(),
        ],
    );
}

#[test]
fn without_persistent_the_server_exits_clean_after_the_last_client() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let socket = dir.path().join("s.sock");
    let mut served = Served::spawn(&img, &["--socket", socket.to_str().unwrap()]);
    qemu_io_uri(&unix_uri(&socket), &["write -P 0x11 0 1M"]);
    let status = served
        .wait_exit(Duration::from_secs(10))
        .expect("the server exits once its only client left");
    assert!(status.success(), "exit status {status}");
    assert!(!socket.exists(), "the socket file is removed");
    qemu::check_clean(&img);
    qemu::io(&img, &["read -P 0x11 0 1M".into()]);
}

#[test]
fn shared_caps_the_clients_connected_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut served = Served::start(&img, &["--shared", "1"]);
    let greeting = |s: &mut UnixStream, wait: Duration| -> bool {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).is_ok()
    };
    let mut first = UnixStream::connect(&served.socket).unwrap();
    assert!(greeting(&mut first, Duration::from_secs(5)));
    // The second client is not served while the first is connected...
    let mut second = UnixStream::connect(&served.socket).unwrap();
    assert!(!greeting(&mut second, Duration::from_millis(500)));
    // ...and is as soon as the first leaves.
    drop(first);
    assert!(greeting(&mut second, Duration::from_secs(5)));
    drop(second);
    assert!(served.wait_exit(Duration::from_millis(300)).is_none());
    served.stop();
}

/// Data written, then discarded and zeroed with holes allowed, through the export; returns
/// the bytes of the range still backed by host clusters afterwards (an `offset` in `qemu-img
/// map`: data, or zeros kept allocated).
fn allocated_after_discards(discard: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    qemu::io(&img, &["write -P 0x77 0 4M".into()]);
    let served = Served::start(&img, &["--discard", discard]);
    let uri = served.uri();
    qemu_io_uri(&uri, &["discard 0 2M", "write -z -u 2M 2M"]);
    // Whatever the policy, zeroed bytes read as zeros; discarded ones are unspecified.
    qemu_io_uri(&uri, &["read -P 0 2M 2M"]);
    served.stop();
    qemu::check_clean(&img);
    qemu::map(&img)
        .iter()
        .filter(|e| e.get("offset").is_some() && e["start"].as_u64().unwrap() < 4 << 20)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn discard_unmap_frees_and_ignore_keeps_the_space() {
    if !qemu::require() {
        return;
    }
    assert_eq!(allocated_after_discards("unmap"), 0);
    assert_eq!(allocated_after_discards("ignore"), 4 << 20);
}

#[test]
fn discard_ignore_leaves_discarded_data_in_place() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    qemu::io(&img, &["write -P 0x77 0 1M".into()]);
    let served = Served::start(&img, &["--discard", "ignore"]);
    qemu_io_uri(&served.uri(), &["discard 0 1M", "read -P 0x77 0 1M"]);
    served.stop();
    qemu::check_clean(&img);
}

#[test]
fn socket_and_bind_are_exclusive_and_one_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .arg("nbd")
            .args(args)
            .arg(&img)
            .output()
            .unwrap()
    };
    let none = run(&[]);
    assert!(!none.status.success());
    let both = run(&["--socket", "/tmp/x.sock", "--bind", "127.0.0.1:0"]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    let zero = run(&["--socket", "/tmp/x.sock", "--shared", "0"]);
    assert!(!zero.status.success());
}

/// Runs fio's nbd engine against `uri` with `args` and returns its job's JSON report.
fn fio_nbd(uri: &str, dir: &Path, args: &[&str]) -> serde_json::Value {
    let json = dir.join("fio.json");
    let out = Command::new("fio")
        .arg(format!("--output={}", json.display()))
        .args(["--ioengine=nbd", "--output-format=json"])
        .args(args)
        .arg(format!("--uri={uri}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fio: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    fio["jobs"][0].clone()
}

/// `--metrics-address`: fio's nbd engine sends one request per I/O, and the export's
/// counters show exactly what fio reports it did; the scrape passes `promtool check metrics`.
#[test]
fn metrics_count_every_request_fio_sends() {
    if !qemu::require() || !support::require_tool("fio", "fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let served = Served::start(&img, &["--metrics-address", "127.0.0.1:0"]);
    let address = served.metrics.clone().unwrap();
    let before = support::scrape(&address);
    let ops = |text: &str, op: &str| {
        let labels = [("volume", "vol.qcow2"), ("op", op)];
        support::sample(text, "qcow2_csi_volume_io_operations_total", &labels).unwrap()
    };
    assert_eq!(ops(&before, "write"), 0.0);
    let job = &fio_nbd(
        &served.uri(),
        dir.path(),
        &[
            "--name=metrics",
            "--rw=randrw",
            "--rwmixread=40",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--io_size=24M",
        ],
    );
    let after = support::scrape(&address);
    for op in ["read", "write"] {
        let ios = job[op]["total_ios"].as_f64().unwrap();
        let bytes = job[op]["io_bytes"].as_f64().unwrap();
        assert!(ios > 1000.0, "{op}: {ios}");
        assert_eq!(ops(&after, op), ios, "{op} requests");
        let labels = [("volume", "vol.qcow2"), ("op", op)];
        let counted = support::sample(&after, "qcow2_csi_volume_io_bytes_total", &labels);
        assert_eq!(counted, Some(bytes), "{op} bytes");
        let count = "qcow2_csi_volume_io_duration_seconds_count";
        assert_eq!(support::sample(&after, count, &labels), Some(ios));
        let errors = support::sample(&after, "qcow2_csi_volume_io_errors_total", &labels);
        assert_eq!(errors, Some(0.0));
    }
    let in_flight = support::sample(&after, "qcow2_csi_volume_io_in_flight", &[]);
    assert_eq!(in_flight, Some(0.0));
    support::promtool_check_metrics(&after);
    served.stop();
    qemu::check_clean(&img);
}

/// QoS flags: fio's measured rate through the export is the limit, within 5 % (fio's ramp
/// time excludes the one-second burst), for an IOPS limit on reads and a byte limit on
/// writes; a refused value is named.
#[test]
fn qos_limits_hold_fio_to_the_limit() {
    if !qemu::require() || !support::require_tool("fio", "fio") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let measure = |flags: &[&str], rw: &str, bs: &str| -> f64 {
        let served = Served::start(&img, flags);
        let job = fio_nbd(
            &served.uri(),
            dir.path(),
            &[
                "--name=qos",
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                "--iodepth=32",
                "--size=64M",
                "--time_based",
                "--ramp_time=2",
                "--runtime=5",
            ],
        );
        served.stop();
        let side = &job[if rw.contains("read") { "read" } else { "write" }];
        if bs == "4k" {
            side["iops"].as_f64().unwrap()
        } else {
            side["bw_bytes"].as_f64().unwrap() / f64::from(1 << 20)
        }
    };
    let iops = measure(&["--read-iops", "1000"], "randread", "4k");
    assert!((950.0..=1050.0).contains(&iops), "1000 IOPS limit: {iops}");
    let mib = measure(&["--write-bytes-per-second", "20M"], "write", "64k");
    assert!((19.0..=21.0).contains(&mib), "20 MiB/s limit: {mib}");
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
        .args(["nbd", "--socket"])
        .arg(dir.path().join("x.sock"))
        .args(["--read-iops", "1k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readIOPS") && err.contains("1k"), "{err}");
    qemu::check_clean(&img);
}

/// `--passphrase-file` serves a qemu-made LUKS image (and an encrypted overlay on it):
/// writes through the export are encrypted where qemu-io with the secret reads them, and
/// the export without the passphrase, or with a wrong one, refuses to start.
#[test]
fn passphrase_file_serves_an_encrypted_image_and_a_wrong_one_refuses() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    let secret = "secret,id=sec0,data=s3cret";
    let luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    for (img, backing) in [(&base, None), (&top, Some(&base))] {
        let mut args = vec!["create", "-q", "-f", "qcow2", "--object", secret, "-o"];
        let o = match backing {
            None => luks.to_string(),
            Some(b) => format!("{luks},backing_file={},backing_fmt=qcow2", b.display()),
        };
        args.push(&o);
        args.extend([img.to_str().unwrap(), "16M"]);
        qemu::img(&args);
    }
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "s3cret").unwrap();
    let socket = dir.path().join("s.sock");
    let served = Served::spawn(
        &top,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--persistent",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    qemu_io_uri(&unix_uri(&socket), &["write -P 0x6b 4096 1M"]);
    qemu_io_uri(
        &unix_uri(&socket),
        &["read -P 0x6b 4096 1M", "read -P 0 0 4096"],
    );
    served.stop();
    let bytes = std::fs::read(&top).unwrap();
    assert!(
        !bytes.windows(4096).any(|w| w.iter().all(|&b| b == 0x6b)),
        "plaintext in the layer"
    );
    let out = Command::new("qemu-io")
        .args(["--object", secret, "--image-opts"])
        .arg(qemu::secret_opts(&top))
        .args(["-c", "read -P 0x6b 4096 1M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&pass, "wrong").unwrap();
    for extra in [&["--passphrase-file", pass.to_str().unwrap()][..], &[]] {
        let out = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .args(["nbd", "--socket", socket.to_str().unwrap()])
            .args(extra)
            .arg(&top)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("passphrase"), "{err}");
    }
}
