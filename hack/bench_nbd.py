#!/usr/bin/env python3
"""NBD export benchmark: `qcow2-csi nbd` against qemu-nbd, qemu-storage-daemon and nbdkit's
file plugin on a raw file (the ceiling), side by side, in one run.

Every server uses the page cache, as a new user would run it: `qcow2-csi nbd` with its
defaults, `qemu-nbd --cache=writeback --aio=threads`, qemu-storage-daemon with
`aio=threads`, `nbdkit file` on a raw file. The qcow2 images are 1 GiB with 64 KiB clusters;
the raw file is 1 GiB (sparse when fresh). Clients, over a unix socket: fio's nbd engine
(4 KiB random writes on a fresh image, 4 KiB random reads of written data at QD32 and QD1,
64 KiB and 1 MiB sequential writes at QD32), `qemu-img bench` (1 MiB sequential writes,
depth 32) and nbdcopy (1 GiB in from a raw file, and out to null:). Caches are dropped
before every run; servers are interleaved; median of N. Prints a Markdown table with
ours / best QEMU and ours / raw.

A second table prices the metrics: `qcow2-csi nbd` with `--metrics-address` (every request
counted, and scraped every second meanwhile) against the same server without, 4 KiB random
reads and writes, interleaved the same way (both `--cache none`).

With `--qos-baseline BIN`, a third table prices QoS with no limit set: `qcow2-csi nbd`
(which, like every CSI volume, carries a QoS state with no limit) against BIN, a build from
before QoS existed, 4 KiB random reads and writes, interleaved the same way. To build one:
  git worktree add /var/tmp/pre-qos 387a77b~1
  cargo build --release -p qcow2-csi --manifest-path /var/tmp/pre-qos/Cargo.toml \
      --target-dir /var/tmp/pre-qos-target

Usage: hack/bench_nbd.py [--dir DIR] [--repeat N] [--qcow2-csi PATH] [--metrics-only]
                         [--only SUBSTRING] [--servers ours,qemu-nbd,qsd,nbdkit]
                         [--qos-baseline BIN [--qos-only]]
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from benchlib import GIB, drop_caches, sh

# The servers of the main table, in the order of its columns.
SERVERS = ("qemu-nbd", "qsd", "nbdkit", "ours")
TITLES = {"qemu-nbd": "qemu-nbd", "qsd": "qemu-storage-daemon", "nbdkit": "nbdkit file (raw)",
          "ours": "qcow2-csi nbd"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a unix socket, stopped on exit. `ours-direct` and `metrics`
    (ours with `--cache none`, without and with metrics) are the metrics table's pair."""

    def __init__(self, kind, image, raw, sock, ours_bin, baseline_bin=None):
        if os.path.exists(sock):
            os.unlink(sock)
        self.scraper = None
        name = ""
        if kind in ("ours", "baseline"):
            binary = baseline_bin if kind == "baseline" else ours_bin
            cmd = [binary, "nbd", "--socket", sock, "--persistent", image]
        elif kind in ("ours-direct", "metrics"):
            cmd = [ours_bin, "nbd", "--socket", sock, "--persistent", "--cache", "none", image]
            if kind == "metrics":
                self.metrics = f"127.0.0.1:{free_port()}"
                cmd[2:2] = ["--metrics-address", self.metrics]
        elif kind == "qemu-nbd":
            cmd = ["qemu-nbd", "-t", "-e", "8", "-f", "qcow2", "--cache=writeback",
                   "--aio=threads", "-k", sock, image]
        elif kind == "qsd":
            name = "img"
            cmd = ["qemu-storage-daemon",
                   "--blockdev", f"driver=file,node-name=file,filename={image},aio=threads,"
                                 "cache.direct=off",
                   "--blockdev", "driver=qcow2,node-name=img,file=file",
                   "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=8",
                   "--export", "type=nbd,id=exp,node-name=img,name=img,writable=on"]
        elif kind == "nbdkit":
            cmd = ["nbdkit", "-f", "-U", sock, "file", raw]
        else:
            raise ValueError(kind)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    sys.exit(f"bench_nbd: {kind} never listened")
                time.sleep(0.02)
        self.uri = f"nbd+unix:///{name}?socket={sock}"
        if kind == "metrics":
            self.stopping = threading.Event()
            self.scraper = threading.Thread(target=self.scrape, daemon=True)
            self.scraper.start()

    def scrape(self):
        """Scrapes every second, as an impatient Prometheus would."""
        while not self.stopping.wait(1.0):
            try:
                urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read()
            except OSError as e:
                sys.exit(f"bench_nbd: scrape failed: {e}")

    def stop(self):
        if self.scraper:
            self.stopping.set()
            self.scraper.join()
        self.proc.terminate()
        self.proc.wait()


def make_images(img, raw, written):
    """A fresh 1 GiB qcow2 image (64 KiB clusters) and raw file; `written`: filled with 1 MiB
    sequential writes (O_DIRECT, so nothing of them stays in the page cache)."""
    for f in (img, raw):
        if os.path.exists(f):
            os.unlink(f)
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, str(GIB)])
    sh(["qemu-img", "create", "-q", "-f", "raw", raw, str(GIB)])
    if written:
        for f, fmt in ((img, "qcow2"), (raw, "raw")):
            sh(["qemu-img", "bench", "-f", fmt, "-t", "none", "-i", "io_uring", "-d", "16",
                "-w", "-s", "1M", "-c", "1024", "--pattern=0xcd", f])


def fio(uri, rw, qd, count=16384, bs="4k"):
    """IOPS of one fio run through the nbd engine, or MiB/s when `bs` is not 4k."""
    out = "fio-out.json"
    sh(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={qd}", f"--number_ios={count}", f"--size={GIB}", "--norandommap",
        "--randrepeat=1", "--output-format=json", f"--output={out}"])
    job = json.load(open(out))["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / (1 << 20)


def nbdcopy(src, dst):
    t0 = time.monotonic()
    sh(["nbdcopy", "--request-size=1048576", src, dst])
    return GIB / (1 << 20) / (time.monotonic() - t0)  # MiB/s


def qemu_img_bench(uri):
    """MiB/s of `qemu-img bench`'s 1 MiB sequential writes at depth 32 over the whole export."""
    r = sh(["qemu-img", "bench", "-f", "raw", "-w", "-d", "32", "-s", "1M", "-c", "1024",
            "--pattern=0xab", uri])
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", r.stdout).group(1))
    return 1024 / secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/qcow2-csi-bench-nbd")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--qcow2-csi", dest="ours", default="target/release/qcow2-csi")
    ap.add_argument("--metrics-only", action="store_true",
                    help="only the metrics on/off table")
    ap.add_argument("--no-metrics", action="store_true", help="skip the metrics table")
    ap.add_argument("--qos-baseline", default="",
                    help="a qcow2-csi built before QoS: adds the no-limit QoS table")
    ap.add_argument("--qos-only", action="store_true", help="only the QoS table")
    ap.add_argument("--only", default="", help="only the rows whose name contains this")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="comma-separated subset of " + ",".join(SERVERS))
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "qemu-storage-daemon", "nbdkit", "fio", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"bench_nbd: {tool} is missing "
                     "(apt-get install qemu-utils nbdkit fio libnbd-bin; qemu-storage-daemon "
                     "comes with qemu-utils, or qemu-system-common before Debian 13)")
    servers = [k for k in args.servers.split(",") if k]
    for k in servers:
        if k not in SERVERS:
            sys.exit(f"bench_nbd: unknown server {k!r}")
    ours_bin = os.path.abspath(args.ours)
    baseline_bin = os.path.abspath(args.qos_baseline) if args.qos_baseline else None
    os.makedirs(args.dir, exist_ok=True)
    os.chdir(args.dir)
    img, raw, sock = (os.path.abspath(n) for n in ("img.qcow2", "img.raw", "nbd.sock"))

    def fresh():
        make_images(img, raw, written=False)

    def filled():
        make_images(img, raw, written=True)

    if not os.path.exists("src.raw"):
        with open("src.raw", "wb") as f:  # 1 GiB without zero blocks: nothing to skip
            for _ in range(1024):
                f.write(os.urandom(1 << 20))

    def cell(prepare, measure, kinds):
        # Interleaved (a, b, c, a, b, c, ...): the VM's disk speed drifts over minutes, and
        # neighbouring runs see the same drift.
        runs = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for kind in runs:
                prepare()
                drop_caches()
                srv = Server(kind, img, raw, sock, ours_bin, baseline_bin)
                try:
                    runs[kind].append(measure(srv.uri))
                finally:
                    srv.stop()
        return {k: statistics.median(v) for k, v in runs.items()}

    rows = [
        ("4K randwrite fresh QD32 (IOPS)", fresh, lambda u: fio(u, "randwrite", 32, 32768)),
        ("4K randread QD32 (IOPS)", filled, lambda u: fio(u, "randread", 32, 65536)),
        ("4K randread QD1 (IOPS)", filled, lambda u: fio(u, "randread", 1, 16384)),
        ("64K seqwrite QD32 (MiB/s)", fresh, lambda u: fio(u, "write", 32, 16384, "64k")),
        ("1M seqwrite QD32 (MiB/s)", fresh, lambda u: fio(u, "write", 32, 1024, "1m")),
        ("qemu-img bench 1M seqwrite depth 32 (MiB/s)", fresh, qemu_img_bench),
        ("nbdcopy 1 GiB into a fresh volume (MiB/s)", fresh, lambda u: nbdcopy("src.raw", u)),
        ("nbdcopy out to null (MiB/s)", filled, lambda u: nbdcopy(u, "null:")),
    ]
    if not (args.metrics_only or args.qos_only):
        print(f"1 GiB images (qcow2: 64 KiB clusters), page cache everywhere; median of "
              f"{args.repeat} interleaved runs; caches dropped before each run.")
        print()
        head = [TITLES[k] for k in servers]
        ratios = "ours" in servers and any(k in servers for k in ("qemu-nbd", "qsd"))
        if ratios:
            head += ["ours / best QEMU"]
        if "ours" in servers and "nbdkit" in servers:
            head += ["ours / raw"]
        print("| test | " + " | ".join(head) + " |")
        print("|---" * (len(head) + 1) + "|")
        for name, prepare, measure in rows:
            if args.only not in name:
                continue
            r = cell(prepare, measure, servers)
            cols = [f"{r[k]:,.0f}" for k in servers]
            if ratios:
                best = max(r[k] for k in ("qemu-nbd", "qsd") if k in r)
                cols.append(f"{r['ours'] / best:.2f}")
            if "ours" in servers and "nbdkit" in servers:
                cols.append(f"{r['ours'] / r['nbdkit']:.2f}")
            print(f"| {name} | " + " | ".join(cols) + " |", flush=True)
    many = 65536
    if baseline_bin:
        # QoS with no limit: this build against one from before QoS.
        print()
        print(f"qcow2-csi nbd with no QoS limit against a build without QoS "
              f"({baseline_bin}), 1 GiB qcow2 image; median of {args.repeat} interleaved "
              f"runs.")
        print()
        print("| pattern | QD | with QoS, no limit (IOPS) | without QoS (IOPS) | with / without |")
        print("|---|---|---|---|---|")
        for name, qd, prepare, measure in [
            ("4K random read, allocated (fio nbd)", "32", filled,
             lambda u: fio(u, "randread", 32, many)),
            ("4K random write, fresh (fio nbd)", "32", fresh,
             lambda u: fio(u, "randwrite", 32, many // 2)),
        ]:
            if args.only not in name:
                continue
            r = cell(prepare, measure, kinds=("ours", "baseline"))
            print(f"| {name} | {qd} | {r['ours']:.0f} | {r['baseline']:.0f} | "
                  f"{r['ours'] / r['baseline']:.3f} |", flush=True)
    if args.no_metrics or args.qos_only:
        return

    # The metrics' price: the same server with and without counting (and scrapes).
    priced = [
        ("4K random read, allocated (fio nbd)", "32", filled,
         lambda u: fio(u, "randread", 32, many)),
        ("4K random read, allocated (fio nbd)", "1", filled,
         lambda u: fio(u, "randread", 1, many // 4)),
        ("4K random write, fresh (fio nbd)", "32", fresh,
         lambda u: fio(u, "randwrite", 32, many // 2)),
    ]
    print()
    print(f"qcow2-csi nbd --cache none with and without --metrics-address (scraped every "
          f"second), 1 GiB qcow2 image; median of {args.repeat} interleaved runs.")
    print()
    print("| pattern | QD | metrics on (IOPS) | metrics off (IOPS) | on / off |")
    print("|---|---|---|---|---|")
    for name, qd, prepare, measure in priced:
        r = cell(prepare, measure, kinds=("metrics", "ours-direct"))
        print(f"| {name} | {qd} | {r['metrics']:.0f} | {r['ours-direct']:.0f} | "
              f"{r['metrics'] / r['ours-direct']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
