//! Helpers shared by the driver's integration tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with `sh -c`; asserts it succeeded and returns its stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `qcow2-csi nbd`; killed when dropped.
pub struct Served {
    child: Child,
    pub socket: PathBuf,
    /// Where the server says it listens (the socket path, or ADDR:PORT with `--bind`).
    pub endpoint: String,
    /// Where it serves metrics (ADDR:PORT), with `--metrics-address`.
    pub metrics: Option<String>,
}

impl Served {
    /// Serves `image` on a unix socket next to it, with `--persistent`.
    pub fn start(image: &Path, extra: &[&str]) -> Served {
        let socket = image.with_extension("sock");
        let mut args: Vec<&str> = vec!["--socket", socket.to_str().unwrap(), "--persistent"];
        args.extend_from_slice(extra);
        let mut served = Served::spawn(image, &args);
        served.socket = socket;
        served
    }

    /// Runs `qcow2-csi nbd ARGS IMAGE` and returns once it listens (it says where on its
    /// first stderr line; the rest of its stderr is passed through).
    pub fn spawn(image: &Path, args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2-csi"))
            .arg("nbd")
            .args(args)
            .arg(image)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qcow2-csi nbd");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        let endpoint = first
            .trim()
            .rsplit_once(" on ")
            .map(|(_, e)| e.to_string())
            .unwrap_or_else(|| panic!("the server did not start: {first}"));
        let metrics = args.contains(&"--metrics-address").then(|| {
            let mut line = String::new();
            stderr.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix("qcow2-csi: metrics at http://")
                .and_then(|a| a.strip_suffix("/metrics"))
                .unwrap_or_else(|| panic!("no metrics address: {line}"))
                .to_string()
        });
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
            }
        });
        Served {
            child,
            socket: PathBuf::from(&endpoint),
            endpoint,
            metrics,
        }
    }

    /// Waits up to `limit` for the server to exit by itself; its status, or `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// SIGTERM, then wait: the server drains and closes the image cleanly.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit status {status}");
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why root tests that attach devices (loop devices, FUSE, mounts) cannot run on this host,
/// if they cannot: not root, no `/dev/fuse` or `/dev/loop-control`, or one of `tools`
/// missing.
pub fn root_attach_missing(tools: &[&str]) -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("needs root (loop devices, mounts)".into());
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        return Some("needs /dev/fuse and /dev/loop-control".into());
    }
    tools
        .iter()
        .find(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|t| format!("{t} is not installed"))
}

/// Whether a test `missing` nothing runs; else it skips with the reason, unless
/// `QCOW2_CSI_REQUIRE_ALL` is set (CI), where that is a failure naming `what`.
pub fn runnable(what: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
                "{what} cannot run: {why} (QCOW2_CSI_REQUIRE_ALL is set)"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Whether `tool` runs; if not, the test skips with a reason, unless
/// `QCOW2_CSI_REQUIRE_ALL` is set (CI), where a missing tool is a failure.
pub fn require_tool(tool: &str, package: &str) -> bool {
    if Command::new(tool).arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("QCOW2_CSI_REQUIRE_ALL").is_none(),
        "{tool} is required (QCOW2_CSI_REQUIRE_ALL is set)"
    );
    eprintln!("skipped: {tool} ({package}) is not installed");
    false
}

/// Runs qemu-io commands (one `-c` each) on an NBD URI as a raw device; asserts none failed
/// and no pattern check missed. Returns qemu-io's output.
pub fn qemu_io_uri(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// GET http://ADDRESS/metrics: the body (Prometheus text); panics unless the answer is 200.
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample of `name` whose labels include `labels` (the first one), in the
/// Prometheus text `text`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let has =
                |(k, v): &(&str, &str)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
            (n == name && labels.iter().all(has)).then(|| value.parse().ok())?
        })
}

/// `promtool check metrics` on a scrape: panics with its report unless it passes. Skips
/// (false) where promtool is missing, unless `QCOW2_CSI_REQUIRE_ALL` is set.
pub fn promtool_check_metrics(text: &str) -> bool {
    use std::io::Write;
    if !require_tool("promtool", "prometheus") {
        return false;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}
