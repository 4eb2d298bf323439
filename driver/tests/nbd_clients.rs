//! `qcow2-csi nbd` against real NBD clients (qemu-io, qemu-img, nbdinfo) and against a raw
//! client in this file for the protocol's edge cases. After each, `qemu-img check` on the
//! served image.

#[path = "../../tests/src/qemu.rs"]
#[allow(dead_code)]
mod qemu;
#[allow(dead_code)] // each test binary uses part of the helpers
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qcow2_csi::nbd::proto::{
    self, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Request, cmd, cmd_flag, errno, handshake, opt,
    rep,
};
use support::{Served, qemu_io_uri};

fn qcow2(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        p.to_str().unwrap(),
        "64M",
    ]);
    p
}

/// The same requests through our export and on a raw file by qemu-io: identical content.
fn exercise(image: &Path) {
    let dir = image.parent().unwrap();
    let cmds = [
        "write -P 0xab 1000 70000",
        "write -P 0xcd 131073 3",
        "write -z 4096 8192",
        "write -z -u 196608 65536",
        "discard 65536 65536",
        "write -P 0x11 1048575 131073",
        "aio_write -P 0x22 4194304 65536",
        "aio_write -P 0x33 4259840 4096",
        "aio_flush",
        "write -P 0x44 67104768 4096",
    ];
    let served = Served::start(image, &[]);
    qemu_io_uri(&served.uri(), &cmds);
    qemu_io_uri(
        &served.uri(),
        &[
            "read -P 0xab 1000 3096",
            "read -P 0 4096 8192",
            "read -P 0xcd 131073 3",
            "read -P 0x11 1048575 131073",
            "read -P 0x44 67104768 4096",
        ],
    );
    // The reference: the same requests on a raw file by qemu-io. Discarded and zeroed
    // ranges read zeros on both (our discard never exposes backing data).
    let raw = dir.join(format!(
        "{}.reference.raw",
        image.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let raw_uri = raw.to_str().unwrap().to_string();
    qemu_io_uri(&raw_uri, &cmds);
    qemu::compare(Path::new(&served.uri()), "raw", Path::new(&raw_uri), "raw");
    served.stop();
    qemu::check_clean(image);
}

#[test]
fn qemu_io_reads_back_what_it_wrote_plain_extended_and_overlay() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("plain.qcow2", "cluster_size=64k"),
        ("ext.qcow2", "cluster_size=64k,extended_l2=on"),
    ] {
        let img = qcow2(dir.path(), name, opts);
        exercise(&img);
    }
    // An overlay: what we do not overwrite still reads from the base.
    let base = qcow2(dir.path(), "base.qcow2", "cluster_size=64k");
    qemu::io(&base, &["write -P 0x5a 0 8M".to_string()]);
    let top = dir.path().join("top.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let served = Served::start(&top, &[]);
    qemu_io_uri(
        &served.uri(),
        &["write -P 0x66 70000 100", "discard 2097152 65536"],
    );
    qemu_io_uri(
        &served.uri(),
        &[
            "read -P 0x5a 0 70000",
            "read -P 0x66 70000 100",
            "read -P 0x5a 70100 100000",
            "read -P 0 2097152 65536",
        ],
    );
    served.stop();
    qemu::check_clean(&top);
}

#[test]
fn qemu_img_converts_to_and_from_the_export() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2", "cluster_size=64k");
    qemu::io(
        &src,
        &[
            "write -P 0x12 0 3M".to_string(),
            "write -P 0x34 10M 1M".to_string(),
            "write -z 20M 4M".to_string(),
            "write -P 0x56 63M 1M".to_string(),
        ],
    );
    let dst = qcow2(dir.path(), "dst.qcow2", "cluster_size=64k");
    let served = Served::start(&dst, &[]);
    qemu::img(&[
        "convert",
        "-n",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &served.uri(),
    ]);
    qemu::compare(&src, "qcow2", Path::new(&served.uri()), "raw");
    let back = dir.path().join("back.raw");
    qemu::img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &served.uri(),
        back.to_str().unwrap(),
    ]);
    served.stop();
    qemu::check_clean(&dst);
    qemu::compare(&src, "qcow2", &back, "raw");
    qemu::compare(&src, "qcow2", &dst, "qcow2");
}

#[test]
fn nbdinfo_sees_the_advertised_features() {
    if !support::require_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "img.qcow2", "cluster_size=64k");
    let served = Served::start(&img, &["--name", "vol1"]);
    let out = Command::new("nbdinfo")
        .args([
            "--json",
            &format!("nbd+unix:///vol1?socket={}", served.socket.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol1");
    assert_eq!(e["export-size"], 64 << 20);
    for yes in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_eq!(e[yes], true, "{yes}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let list = Command::new("nbdinfo")
        .args(["--list", "--json", &served.uri()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "vol1");
    served.stop();

    let ro = Served::start(&img, &["--read-only"]);
    let out = Command::new("nbdinfo")
        .args(["--json", &ro.uri()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    assert_eq!(v["exports"][0]["can_trim"], false);
    ro.stop();
    qemu::check_clean(&img);
}

// --- a raw client for the edge cases ---------------------------------------------------------

struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects and completes the greeting with the given client flags.
    fn connect(socket: &Path, client_flags: u32) -> Client {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(proto::be64(&hello[0..8]), NBDMAGIC);
        assert_eq!(proto::be64(&hello[8..16]), IHAVEOPT);
        assert_eq!(
            u16::from_be_bytes([hello[16], hello[17]]),
            handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES
        );
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Client { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(proto::be64(&h[0..8]), OPTION_REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    /// `OPT_GO` for `name`; returns the final reply type.
    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(opt::GO, &d);
        loop {
            let (o, kind, _) = self.option_reply();
            assert_eq!(o, opt::GO);
            if kind != rep::INFO {
                return kind;
            }
        }
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let mut m = r.encode().to_vec();
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (cookie, error), then `data_len` bytes of data if no error.
    fn simple(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = proto::be64(&h[8..16]);
        let mut d = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (cookie, error, d)
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn protocol_edge_cases_get_the_spec_answers_and_keep_the_stream_in_sync() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "img.qcow2", "cluster_size=64k");
    let served = Served::start(&img, &["--name", "vol"]);
    let sock = served.socket.clone();
    let flags = u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);

    // Unknown option, STARTTLS, LIST with data, unknown export: errors, and the next option
    // still parses.
    let mut c = Client::connect(&sock, flags);
    c.option(42, b"some payload");
    assert_eq!(
        c.option_reply(),
        (42, rep::ERR_UNSUP, b"option 42 is not supported".to_vec())
    );
    c.option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().1, rep::ERR_UNSUP);
    c.option(opt::LIST, b"x");
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);
    c.option(opt::LIST, &[]);
    let (_, kind, d) = c.option_reply();
    assert_eq!((kind, &d[4..]), (rep::SERVER, &b"vol"[..]));
    assert_eq!(c.option_reply().1, rep::ACK);
    assert_eq!(c.go("nope"), rep::ERR_UNKNOWN);
    assert_eq!(c.go("vol"), rep::ACK);

    // Transmission with simple replies.
    let size = 64u64 << 20;
    c.request(cmd::WRITE, cmd_flag::FUA, 1, 4096, 512, &[0x77; 512]);
    assert_eq!(c.simple(0), (1, 0, vec![]));
    c.request(cmd::READ, 0, 2, 4096, 512, &[]);
    assert_eq!(c.simple(512), (2, 0, vec![0x77; 512]));
    // Out of range: EINVAL for reads, ENOSPC for writes (whose payload is still consumed).
    c.request(cmd::READ, 0, 3, size - 256, 512, &[]);
    assert_eq!(c.simple(512).1, errno::EINVAL);
    c.request(cmd::WRITE, 0, 4, size - 256, 512, &[0x99; 512]);
    assert_eq!(c.simple(0).1, errno::ENOSPC);
    c.request(cmd::READ, 0, 5, u64::MAX - 10, 512, &[]);
    assert_eq!(c.simple(512).1, errno::EINVAL);
    // Oversize read, unknown command, unknown flag.
    c.request(cmd::READ, 0, 6, 0, 64 << 20, &[]);
    assert_eq!(c.simple(0).1, errno::EINVAL);
    c.request(99, 0, 7, 0, 0, &[]);
    assert_eq!(c.simple(0).1, errno::EINVAL);
    c.request(cmd::WRITE_ZEROES, 1 << 9, 8, 0, 512, &[]);
    assert_eq!(c.simple(0).1, errno::EINVAL);
    // FAST_ZERO: whole clusters are a flag update (fast); a partial cluster would mean
    // writing zeros, so the client is told ENOTSUP and the range is left alone.
    c.request(cmd::WRITE, 0, 20, 65536, 65536, &[0x42; 65536]);
    assert_eq!(c.simple(0).1, 0);
    c.request(
        cmd::WRITE_ZEROES,
        cmd_flag::FAST_ZERO,
        21,
        65536 + 512,
        512,
        &[],
    );
    assert_eq!(c.simple(0).1, errno::ENOTSUP);
    c.request(cmd::READ, 0, 22, 65536 + 512, 512, &[]);
    assert_eq!(
        c.simple(512).2,
        vec![0x42; 512],
        "a refused fast zero changes nothing"
    );
    c.request(
        cmd::WRITE_ZEROES,
        cmd_flag::FAST_ZERO,
        23,
        65536,
        65536,
        &[],
    );
    assert_eq!(c.simple(0).1, 0);
    c.request(cmd::READ, 0, 24, 65536, 65536, &[]);
    assert_eq!(c.simple(65536).2, vec![0; 65536]);
    // Still in sync: the data written first is intact and nothing leaked from bad requests.
    c.request(cmd::READ, 0, 9, 4096, 512, &[]);
    assert_eq!(c.simple(512), (9, 0, vec![0x77; 512]));
    c.request(cmd::FLUSH, 0, 10, 0, 0, &[]);
    assert_eq!(c.simple(0), (10, 0, vec![]));
    c.request(cmd::DISC, 0, 11, 0, 0, &[]);
    assert!(c.closed());

    // Old-style EXPORT_NAME (with the 124 zero bytes when NO_ZEROES is not set).
    let mut c = Client::connect(&sock, u32::from(handshake::FIXED_NEWSTYLE));
    c.option(opt::EXPORT_NAME, b"vol");
    let mut r = [0u8; 134];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(proto::be64(&r[0..8]), size);
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(cmd::READ, 0, 1, 4096, 4, &[]);
    assert_eq!(c.simple(4), (1, 0, vec![0x77; 4]));
    // An unknown export through EXPORT_NAME can only be answered by closing.
    let mut c = Client::connect(&sock, flags);
    c.option(opt::EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Unknown client flags, a bad request magic, an oversized option: closed.
    let mut c = Client::connect(&sock, 1 << 7);
    assert!(c.closed());
    let mut c = Client::connect(&sock, flags);
    assert_eq!(c.go("vol"), rep::ACK);
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
    let mut c = Client::connect(&sock, flags);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert!(c.closed());
    // Abrupt disconnect in the middle of a WRITE payload, and during the handshake.
    let mut c = Client::connect(&sock, flags);
    assert_eq!(c.go("vol"), rep::ACK);
    c.request(cmd::WRITE, 0, 1, 0, 65536, &[0x55; 1000]);
    drop(c);
    drop(Client::connect(&sock, flags));

    // The server is still serving, with the data intact.
    qemu_io_uri(
        &format!("nbd+unix:///vol?socket={}", sock.display()),
        &["read -P 0x77 4096 512"],
    );
    served.stop();
    qemu::check_clean(&img);
}

#[test]
fn acknowledged_writes_survive_sigkill_without_flush() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "img.qcow2", "cluster_size=64k");
    let served = Served::start(&img, &[]);
    let mut c = Client::connect(
        &served.socket,
        u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES),
    );
    assert_eq!(c.go(""), rep::ACK);
    // Allocating writes spread over the image, each acknowledged, never flushed.
    for i in 0..64u64 {
        let data = vec![i as u8 + 1; 4096];
        c.request(cmd::WRITE, 0, i, i * 1_000_000 + 123, 4096, &data);
        assert_eq!(c.simple(0), (i, 0, vec![]));
    }
    served.kill9();
    // The dirty image is repaired by the next read-write open; every acknowledged write is
    // there.
    assert_eq!(
        qemu::check_no_corruption(&img),
        qemu::check_no_corruption(&img)
    );
    let served = Served::start(&img, &[]);
    let uri = served.uri();
    for i in 0..64u64 {
        let cmd = format!("read -P {} {} 4096", i + 1, i * 1_000_000 + 123);
        qemu_io_uri(&uri, &[&cmd]);
    }
    served.stop();
    qemu::check_clean(&img);
}

fn nbdinfo_map(uri: &str, context: &str) -> String {
    let out = Command::new("nbdinfo")
        .args([&format!("--map={context}"), uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo --map={context}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `nbdinfo --map` lines: (offset, length, flags).
fn parse_map(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Our `base:allocation` says what `qemu-img map` says on every byte: a hole where it has no
/// data, zero where it reads zeros.
fn assert_agrees_with_qemu_img_map(image: &Path, base_allocation: &str) {
    let ours = parse_map(base_allocation);
    assert!(!ours.is_empty(), "no extents in {base_allocation:?}");
    for e in qemu::map(image) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        for &(off, n, flags) in &ours {
            if off < start + len && start < off + n {
                let (hole, z) = (flags & 1 != 0, flags & 2 != 0);
                assert_eq!(
                    (hole, z),
                    (!data, zero),
                    "{}: at {off:#x}+{n:#x} ours {flags}, qemu-img map {e}",
                    image.display()
                );
            }
        }
    }
}

#[test]
fn block_status_matches_qemu_nbd_on_the_same_images() {
    if !support::require_tool("nbdinfo", "libnbd-bin") {
        return;
    }
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2(dir.path(), "base.qcow2", "cluster_size=64k");
    qemu::io(
        &base,
        &[
            "write -P 1 0 1M".to_string(),
            "write -P 2 8M 64k".to_string(),
        ],
    );
    for (name, opts) in [
        ("top.qcow2", "cluster_size=64k"),
        ("top-ext.qcow2", "cluster_size=64k,extended_l2=on"),
    ] {
        let top = dir.path().join(name);
        qemu::img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ]);
        qemu::io(
            &top,
            &[
                "write -P 3 512k 1M".to_string(),
                "write -P 4 3M 4k".to_string(),
                "write -z 16M 1M".to_string(),
                "discard 8M 64k".to_string(),
            ],
        );
        let served = Served::start(&top, &[]);
        let ours = [
            nbdinfo_map(&served.uri(), "base:allocation"),
            nbdinfo_map(&served.uri(), "qemu:allocation-depth"),
        ];
        served.stop();
        assert_agrees_with_qemu_img_map(&top, &ours[0]);
        let socket = dir.path().join("qemu-nbd.sock");
        let mut qnbd = Command::new("qemu-nbd")
            .args(["-t", "-r", "-A", "-f", "qcow2", "-k"])
            .arg(&socket)
            .arg(&top)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let theirs = [
            nbdinfo_map(&uri, "base:allocation"),
            nbdinfo_map(&uri, "qemu:allocation-depth"),
        ];
        qnbd.kill().unwrap();
        qnbd.wait().unwrap();
        assert_eq!(ours, theirs, "{name}: block status differs from qemu-nbd's");
        qemu::check_clean(&top);
    }
    // The plain base image too.
    let served = Served::start(&base, &[]);
    let map = nbdinfo_map(&served.uri(), "base:allocation");
    served.stop();
    assert_agrees_with_qemu_img_map(&base, &map);
}

#[test]
fn metadata_contexts_need_structured_replies_and_block_status_needs_a_context() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "img.qcow2", "cluster_size=64k");
    let served = Served::start(&img, &[]);
    let flags = u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
    let query = |queries: &[&str]| {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    };
    let mut c = Client::connect(&served.socket, flags);
    c.option(opt::LIST_META_CONTEXT, &query(&[]));
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);
    c.option(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, rep::ACK);
    // LIST with nothing lists both; "base:" is a wildcard for LIST; unknown names are ignored.
    c.option(opt::LIST_META_CONTEXT, &query(&[]));
    let (_, k1, d1) = c.option_reply();
    let (_, k2, d2) = c.option_reply();
    assert_eq!((k1, &d1[4..]), (rep::META_CONTEXT, &b"base:allocation"[..]));
    assert_eq!(
        (k2, &d2[4..]),
        (rep::META_CONTEXT, &b"qemu:allocation-depth"[..])
    );
    assert_eq!(c.option_reply().1, rep::ACK);
    c.option(opt::LIST_META_CONTEXT, &query(&["base:", "x:y"]));
    assert_eq!(&c.option_reply().2[4..], b"base:allocation");
    assert_eq!(c.option_reply().1, rep::ACK);
    c.option(opt::SET_META_CONTEXT, &query(&["nope:nothing"]));
    assert_eq!(c.option_reply().1, rep::ACK, "nothing selected");
    assert_eq!(c.go(""), rep::ACK);
    // Block status with no context selected: EINVAL in a structured error chunk.
    c.request(cmd::BLOCK_STATUS, 0, 5, 0, 65536, &[]);
    let mut h = [0u8; 20];
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), proto::reply::ERROR);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    c.s.read_exact(&mut body).unwrap();
    assert_eq!(
        u32::from_be_bytes(body[0..4].try_into().unwrap()),
        errno::EINVAL
    );
    drop(c);
    served.stop();
    qemu::check_clean(&img);
}

#[test]
fn eight_connections_write_concurrently_and_a_flush_on_one_covers_them_all() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "img.qcow2", "cluster_size=64k");
    let served = Served::start(&img, &[]);
    let flags = u32::from(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let sock = served.socket.clone();
            s.spawn(move || {
                let mut c = Client::connect(&sock, flags);
                assert_eq!(c.go(""), rep::ACK);
                // Pipelined: all 64 requests sent before any reply is read; interleaved
                // 4 KiB pieces, so the connections keep allocating the same clusters.
                for i in 0..64u64 {
                    let off = (i * 8 + t) * 4096;
                    c.request(cmd::WRITE, 0, i, off, 4096, &[t as u8 + 1; 4096]);
                }
                let mut seen = std::collections::HashSet::new();
                for _ in 0..64 {
                    let (cookie, error, _) = c.simple(0);
                    assert_eq!(error, 0);
                    assert!(seen.insert(cookie), "cookie {cookie} answered twice");
                }
            });
        }
    });
    // Another connection flushes and sees everything the others had acknowledged.
    let mut c = Client::connect(&served.socket, flags);
    assert_eq!(c.go(""), rep::ACK);
    c.request(cmd::FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(c.simple(0), (1, 0, vec![]));
    c.request(cmd::READ, 0, 2, 0, 64 * 8 * 4096, &[]);
    let (_, error, data) = c.simple(64 * 8 * 4096);
    assert_eq!(error, 0);
    for (k, block) in data.chunks(4096).enumerate() {
        let want = (k % 8) as u8 + 1;
        assert!(block.iter().all(|&b| b == want), "block {k}");
    }
    drop(c);
    served.stop();
    qemu::check_clean(&img);
}

#[test]
fn nbdcopy_round_trips_a_gib() {
    if !support::require_tool("nbdcopy", "libnbd-bin") {
        return;
    }
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 1 GiB, mostly holes, with data spread over it (nbdcopy copies data and skips zeros).
    let src = dir.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(1 << 30).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..256u64 {
        let block: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &block, i * (4 << 20) + i * 4096).unwrap();
    }
    drop(f);
    let img = dir.path().join("img.qcow2");
    qemu::img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1G"]);
    let served = Served::start(&img, &[]);
    let run = |from: &str, to: &str| {
        let out = Command::new("nbdcopy").args([from, to]).output().unwrap();
        assert!(
            out.status.success(),
            "nbdcopy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(src.to_str().unwrap(), &served.uri());
    let back = dir.path().join("back.raw");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    run(&served.uri(), back.to_str().unwrap());
    served.stop();
    qemu::check_clean(&img);
    qemu::compare(&src, "raw", &back, "raw");
    qemu::compare(&src, "raw", &img, "qcow2");
}

#[test]
fn raw_files_are_served_too() {
    if !qemu::require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served_file = dir.path().join("disk.raw");
    let reference = dir.path().join("reference.raw");
    for f in [&served_file, &reference] {
        std::fs::File::create(f).unwrap().set_len(32 << 20).unwrap();
    }
    let cmds = [
        "write -P 0xab 1000 70000",
        "write -z 4096 8192",
        "discard 1048576 65536",
        "write -P 0x11 33550336 4096",
    ];
    for cache in ["writeback", "none"] {
        let served = Served::start(&served_file, &["--format", "raw", "--cache", cache]);
        qemu_io_uri(&served.uri(), &cmds);
        qemu_io_uri(
            &served.uri(),
            &["read -P 0xab 1000 3096", "read -P 0 4096 8192"],
        );
        served.stop();
    }
    qemu_io_uri(reference.to_str().unwrap(), &cmds);
    qemu::compare(&served_file, "raw", &reference, "raw");
}
