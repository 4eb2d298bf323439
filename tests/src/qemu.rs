//! Running qemu-img and qemu-io, the format oracle.
//!
//! Tests call [`require`] first: without the tools they skip with a printed reason, except
//! when `QCOW2_CSI_REQUIRE_ALL=1` (set by `make test` and CI), where a missing tool fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether qemu-img and qemu-io are available; prints why not, or panics under CI.
pub fn require() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
            "qemu-img/qemu-io are required (QCOW2_CSI_REQUIRE_ALL is set)"
        );
        eprintln!("SKIP: qemu-img/qemu-io not installed (run `make test` to install them)");
    }
    ok
}

fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"))
}

/// Runs `qemu-img` with `args` and asserts success; returns stdout.
pub fn img(args: &[&str]) -> String {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    let out = run(cmd);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img` and returns the raw output (for checks that expect failure).
pub fn img_output(args: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    run(cmd)
}

/// [`check_no_corruption`] run in `dir`: qemu opens a relative external data file name
/// against its working directory (we against the image's).
pub fn check_no_corruption_in(dir: &Path, path: &Path) -> u64 {
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(dir)
        .args(["check", "--output=json", path.to_str().expect("utf-8 path")]);
    let out = run(cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check {} exited {:?}: {text}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("check json");
    for key in ["check-errors", "corruptions"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{key} in {text}"
        );
    }
    v.get("leaks").and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Runs qemu-io commands (one `-c` each) on a qcow2 image and asserts none failed.
pub fn io(path: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    assert_qemu_io_ok(
        &run(cmd),
        &format!("qemu-io {cmds:?} on {}", path.display()),
    );
}

/// qemu-io exits 0 even when a command fails; failures show in its output.
fn assert_qemu_io_ok(out: &Output, what: &str) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("failed") || l.contains("error"))
        .take(5)
        .collect();
    assert!(
        out.status.success() && failing.is_empty(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        failing.join(" | ")
    );
}

/// Feeds a qemu-io script (one command per line) on stdin; faster than thousands of `-c`.
pub fn io_script(path: &Path, format: &str, script: &str) {
    let p = path.to_str().expect("utf-8 path");
    io_script_args(&["-f", format, p], script);
}

/// [`io_script`] on a LUKS-encrypted image given by `--image-opts` `opts` (whose secret
/// is `sec0`), with its passphrase `secret`.
pub fn io_script_encrypted(opts: &str, secret: &str, script: &str) {
    let object = format!("secret,id=sec0,data={secret}");
    io_script_args(&["--object", &object, "--image-opts", opts], script);
}

fn io_script_args(args: &[&str], script: &str) {
    use std::io::Write;
    let mut child = Command::new("qemu-io")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("qemu-io");
    assert_qemu_io_ok(&out, &format!("qemu-io script with {args:?}"));
}

/// Runs `qemu-img check --output=json`, asserts the exit code is one of `allowed` and that
/// the counters in `zero_keys` are 0; returns the parsed report.
fn check(path: &Path, allowed: &[i32], zero_keys: &[&str]) -> serde_json::Value {
    check_with(path, None, allowed, zero_keys)
}

/// `--image-opts` for `path` and its backing chain with secret `sec0` for each encrypted
/// layer (qemu opens a backing file with its own options).
pub fn secret_opts(path: &Path) -> String {
    let mut o = format!(
        "driver=qcow2,file.filename={}",
        path.to_str().expect("utf-8 path")
    );
    for (depth, layer) in chain_info(path).iter().enumerate() {
        if layer["encrypted"] == true {
            o.push_str(&format!(
                ",{}encrypt.key-secret=sec0",
                "backing.".repeat(depth)
            ));
        }
    }
    o
}

/// [`check`] of a LUKS-encrypted image whose passphrase is `secret`.
fn check_with(
    path: &Path,
    secret: Option<&str>,
    allowed: &[i32],
    zero_keys: &[&str],
) -> serde_json::Value {
    let p = path.to_str().expect("utf-8 path");
    let out = match secret {
        None => img_output(&["check", "--output=json", p]),
        Some(pass) => img_output(&[
            "check",
            "--output=json",
            "--object",
            &format!("secret,id=sec0,data={pass}"),
            "--image-opts",
            &secret_opts(path),
        ]),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code().is_some_and(|c| allowed.contains(&c)),
        "qemu-img check {} exited {:?}: {text}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("check json");
    for key in zero_keys {
        assert_eq!(
            v.get(*key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{key} in {text}"
        );
    }
    v
}

/// `qemu-img check --output=json`: asserts exit 0 and no errors, corruptions or leaks.
pub fn check_clean(path: &Path) {
    check(path, &[0], &["check-errors", "corruptions", "leaks"]);
}

/// [`check_clean`] of an image that may be LUKS-encrypted with passphrase `secret`.
pub fn check_clean_with(path: &Path, secret: Option<&str>) {
    check_with(
        path,
        secret,
        &[0],
        &["check-errors", "corruptions", "leaks"],
    );
}

/// `qemu-img check`: no errors and no corruptions; leaked clusters are allowed (exit 0 or 3).
/// Returns the number of leaks.
pub fn check_no_corruption(path: &Path) -> u64 {
    check_no_corruption_with(path, None)
}

/// [`check_no_corruption`] of an image that may be LUKS-encrypted with passphrase `secret`.
pub fn check_no_corruption_with(path: &Path, secret: Option<&str>) -> u64 {
    let v = check_with(path, secret, &[0, 3], &["check-errors", "corruptions"]);
    v.get("leaks").and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Converts an image to a raw file with qemu-img.
pub fn to_raw(image: &Path, raw: &Path) {
    img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().expect("utf-8"),
        raw.to_str().expect("utf-8"),
    ]);
}

/// `qemu-img compare` of two images (format of each given); asserts identical content.
pub fn compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = img_output(&[
        "compare",
        "-f",
        a_fmt,
        "-F",
        b_fmt,
        a.to_str().expect("utf-8"),
        b.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {} differs: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img map --output=json` parsed.
pub fn map(path: &Path) -> Vec<serde_json::Value> {
    let text = img(&["map", "--output=json", path.to_str().expect("utf-8")]);
    serde_json::from_str(&text).expect("map json")
}

/// `qemu-img info --output=json` parsed.
pub fn info(path: &Path) -> serde_json::Value {
    let text = img(&["info", "--output=json", path.to_str().expect("utf-8")]);
    serde_json::from_str(&text).expect("info json")
}

/// `qemu-img info` of an image another process has open for writing (`-U`: no lock).
pub fn info_shared(path: &Path) -> serde_json::Value {
    let text = img(&["info", "-U", "--output=json", path.to_str().expect("utf-8")]);
    serde_json::from_str(&text).expect("info json")
}

/// `qemu-img info -U --backing-chain --output=json` of `path`: one entry per layer, top
/// first (the image may be open elsewhere).
fn chain_info(path: &Path) -> Vec<serde_json::Value> {
    let text = img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        path.to_str().expect("utf-8"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("info json");
    match v {
        serde_json::Value::Array(layers) => layers,
        other => panic!("one entry per layer, got {other}"),
    }
}

/// The files of `path`'s backing chain, top first (the image may be open elsewhere).
pub fn backing_chain(path: &Path) -> Vec<PathBuf> {
    chain_info(path)
        .iter()
        .map(|l| PathBuf::from(l["filename"].as_str().expect("a filename")))
        .collect()
}

/// The disk size (`actual-size`) of each layer of `path`'s backing chain, top first.
pub fn chain_disk_sizes(path: &Path) -> Vec<f64> {
    chain_info(path)
        .iter()
        .map(|l| l["actual-size"].as_f64().expect("an actual-size"))
        .collect()
}
