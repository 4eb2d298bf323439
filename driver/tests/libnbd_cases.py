"""Protocol edge cases through python3-libnbd (and a raw socket where libnbd cannot misbehave
on purpose), against a running `qcow2-csi nbd --socket SOCK --name vol` of SIZE bytes.

Usage: libnbd_cases.py CASE SOCKET SIZE. Exits non-zero with a message when the server does
not answer as the NBD spec says. Run by driver/tests/nbd_libnbd.rs, which checks the image
with qemu-img after each case.
"""

import errno
import os
import socket
import struct
import sys

import nbd

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPTION_REPLY_MAGIC = 0x3E889045565A9


def check(cond, what):
    if not cond:
        sys.exit(f"FAIL: {what}")


def expect_error(fn, want_errno, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd reports the symbolic name ("EINVAL").
        want = errno.errorcode[want_errno]
        check(e.errno in (want, want_errno), f"{what}: errno {e.errno} ({e}), want {want}")
        return
    sys.exit(f"FAIL: {what}: no error")


def handle(sock, name="vol", structured=True, strict=True):
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(structured)
    if not strict:
        h.set_strict_mode(0)  # let bad requests reach the server
    h.connect_unix(sock)
    return h


def pattern(seed, n):
    return bytes((seed + i * 7) % 251 for i in range(n))


def case_oldstyle_export_name(sock, size):
    # Without FIXED_NEWSTYLE libnbd may only use NBD_OPT_EXPORT_NAME.
    h = nbd.NBD()
    h.set_export_name("vol")
    h.set_handshake_flags(0)
    h.connect_unix(sock)
    check(not h.get_structured_replies_negotiated(), "no structured replies via EXPORT_NAME")
    check(h.get_size() == size, "size")
    h.pwrite(pattern(1, 4096), 4096)
    check(h.pread(4096, 4096) == pattern(1, 4096), "read back")
    h.flush()
    h.shutdown()


def case_simple_replies_only(sock, size):
    h = handle(sock, structured=False)
    check(not h.get_structured_replies_negotiated(), "structured replies were not asked for")
    data = pattern(2, 70000)
    h.pwrite(data, 12345)
    check(h.pread(70000, 12345) == data, "read back")
    h.zero(8192, 16384)
    check(h.pread(8192, 16384) == bytes(8192), "zeroed")
    # Block status needs structured replies: the server refuses it.
    check(not h.can_meta_context("base:allocation"), "no metadata context")
    h.shutdown()


def case_structured_and_block_status(sock, size):
    h = nbd.NBD()
    h.set_export_name("vol")
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.connect_unix(sock)
    check(h.get_structured_replies_negotiated(), "structured replies")
    check(h.can_meta_context("base:allocation"), "base:allocation")
    check(h.can_meta_context("qemu:allocation-depth"), "qemu:allocation-depth")
    h.pwrite(pattern(3, 65536), 1 << 20)
    h.pwrite(pattern(4, 65536), 3584 << 10)
    h.trim(2 << 20, 1 << 20)  # libnbd: (count, offset)
    seen = {}

    def cb(meta, offset, entries, err):
        seen[meta] = entries

    h.block_status(4 << 20, 0, cb)
    ba, depth = seen["base:allocation"], seen["qemu:allocation-depth"]

    def flags_at(extents, off):
        pos = 0
        for length, flags in zip(extents[0::2], extents[1::2]):
            if pos <= off < pos + length:
                return flags
            pos += length
        sys.exit(f"FAIL: extents {extents} do not reach {off}")

    hole_zero = nbd.STATE_HOLE | nbd.STATE_ZERO
    check(flags_at(ba, 1 << 20) == hole_zero, f"trimmed range: {ba}")
    check(flags_at(ba, 3584 << 10) == 0, f"written range: {ba}")
    check(flags_at(depth, 1 << 20) == 0 and flags_at(depth, 3584 << 10) == 1, f"depth {depth}")
    check(h.pread(65536, 1 << 20) == bytes(65536), "trimmed reads zeros")
    h.shutdown()


def case_unknown_export(sock, size):
    h = nbd.NBD()
    h.set_export_name("no-such-export")
    try:
        h.connect_unix(sock)
    except nbd.Error as e:
        check("unknown" in str(e).lower() or "export" in str(e).lower(), f"message: {e}")
    else:
        sys.exit("FAIL: connected to an unknown export")
    # The server lists what it has.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(sock)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    check(names == ["vol"], f"list: {names}")
    h.opt_abort()


def case_starttls(sock, size):
    # TLS allowed, not required: STARTTLS is refused and the session goes on in clear.
    h = nbd.NBD()
    h.set_export_name("vol")
    h.set_tls(nbd.TLS_ALLOW)
    h.connect_unix(sock)
    check(not h.get_tls_negotiated(), "no TLS")
    h.pread(512, 0)
    h.shutdown()
    # TLS required: the client gives up with a clear error.
    h = nbd.NBD()
    h.set_export_name("vol")
    h.set_tls(nbd.TLS_REQUIRE)
    try:
        h.connect_unix(sock)
    except nbd.Error:
        pass
    else:
        sys.exit("FAIL: TLS was required and not refused")


def case_out_of_range(sock, size):
    h = handle(sock, strict=False)
    expect_error(lambda: h.pread(4096, size - 512), errno.EINVAL, "read past the end")
    expect_error(lambda: h.pwrite(bytes(4096), size - 512), errno.ENOSPC, "write past the end")
    expect_error(lambda: h.zero(4096, size), errno.ENOSPC, "zero past the end")
    expect_error(lambda: h.trim(4096, size), errno.EINVAL, "trim past the end")
    expect_error(lambda: h.pread(512, 2**63), errno.EINVAL, "offset overflow")
    # Still in sync afterwards.
    h.pwrite(pattern(4, 512), size - 512)
    check(h.pread(512, size - 512) == pattern(4, 512), "last sector")
    h.shutdown()


def case_oversize(sock, size):
    h = handle(sock, strict=False)
    big = 64 << 20
    expect_error(lambda: h.pread(big, 0), errno.EINVAL, "64 MiB read")
    check(h.pread(4096, 0) is not None, "in sync after the refused read")
    h.shutdown()
    # A 64 MiB write cannot be skipped without reading it: the server drops the connection,
    # and keeps serving others.
    h = handle(sock, strict=False)
    try:
        h.pwrite(bytes(big), 0)
    except nbd.Error:
        pass
    else:
        sys.exit("FAIL: a 64 MiB write was accepted")
    h2 = handle(sock)
    check(h2.pread(4096, 0) is not None, "a new connection works")
    h2.shutdown()


def raw_session(sock):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.settimeout(10)
    hello = recv_exact(s, 18)
    magic, ihaveopt, _flags = struct.unpack(">QQH", hello)
    check(magic == NBDMAGIC and ihaveopt == IHAVEOPT, "greeting")
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed")
        buf += chunk
    return buf


def case_unknown_options(sock, size):
    s = raw_session(sock)
    for option in (0x7777, 99, 0xFFFFFFF0):
        s.sendall(struct.pack(">QII", IHAVEOPT, option, 5) + b"hello")
        magic, opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        check(magic == OPTION_REPLY_MAGIC and opt == option, "reply header")
        check(kind == 0x80000001, f"option {option:#x}: reply {kind:#x}, want ERR_UNSUP")
    # Still negotiating: GO to the export works.
    go = struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0)  # name, no info requests
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, len(go)) + go)
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if kind == 1:  # ACK
            break
        check(kind == 3, f"GO reply {kind:#x}")
    s.close()


def case_abrupt_disconnects(sock, size):
    h = handle(sock)
    h.pwrite(pattern(5, 8192), 0)
    h.flush()
    # Mid-request: a WRITE header and half its payload, then gone.
    for cut in (10, 28 + 100, 28 + 4096):
        s = raw_session(sock)
        s.sendall(struct.pack(">QI", IHAVEOPT, 1) + struct.pack(">I", 3) + b"vol")
        recv_exact(s, 10)  # size and flags (NO_ZEROES)
        req = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 1, 0, 8192) + bytes(8192)
        s.sendall(req[:cut])
        s.close()
    # Mid-handshake.
    s = raw_session(sock)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 100) + b"x" * 10)
    s.close()
    # Many requests in flight, then the connection dropped without DISC.
    h2 = handle(sock)
    for i in range(64):
        h2.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(i, 4096))), (1 << 20) + i * 4096)
    h2.aio_pread(nbd.Buffer(65536), 0)
    s = socket.socket(fileno=os.dup(h2.aio_get_fd()))
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    del h2
    # The first connection and the data it flushed are unharmed.
    check(h.pread(8192, 0) == pattern(5, 8192), "flushed data intact")
    h.shutdown()


def case_multi_conn(sock, size):
    hs = [handle(sock) for _ in range(8)]
    for h in hs:
        check(h.can_multi_conn(), "CAN_MULTI_CONN")
    chunk = 256 << 10
    cookies = []
    for i, h in enumerate(hs):
        for j in range(4):
            off = (i * 4 + j) * chunk
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(i * 4 + j, chunk)))
            cookies.append((h, h.aio_pwrite(buf, off)))
    for h, c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
    # A flush on one connection covers the writes completed on all of them...
    hs[3].flush()
    # ...and each connection sees every other's writes.
    for i, h in enumerate(hs):
        k = (i * 5 + 1) % 32
        check(h.pread(chunk, k * chunk) == pattern(k, chunk), f"conn {i} sees region {k}")
    for h in hs:
        h.shutdown()
    # What the image must hold, even after the server is killed (see nbd_libnbd.rs).
    with open(os.environ["EXPECT"], "r+b") as f:
        for k in range(32):
            f.seek(k * chunk)
            f.write(pattern(k, chunk))


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    case, sock, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    CASES[case](sock, size)
    print(f"ok {case}")
