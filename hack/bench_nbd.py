#!/usr/bin/env python3
"""NBD export benchmark: `qcow2-csi nbd` vs `qemu-nbd`, side by side, in one run.

Both servers serve the same kind of qcow2 image (1 GiB, 64 KiB clusters) with the same cache
mode (O_DIRECT: our `--cache none`, qemu-nbd's `--cache=none --aio=io_uring`), on a unix
socket. Clients: fio's nbd engine for 4 KiB random writes on a fresh image and 4 KiB random
reads of allocated data (QD1 and QD32), and nbdcopy for 1 MiB sequential copies into and out
of the export. Caches are dropped before every run; median of N. Prints a Markdown table.

A second table prices the metrics: `qcow2-csi nbd` with `--metrics-address` (every request
counted, and scraped every second meanwhile) against the same server without, 4 KiB random
reads and writes, interleaved the same way.

Usage: hack/bench_nbd.py [--dir DIR] [--repeat N] [--qcow2-csi PATH] [--metrics-only]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from benchlib import GIB, drop_caches, sh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a unix socket, stopped on exit."""

    def __init__(self, kind, image, sock, ours_bin):
        if os.path.exists(sock):
            os.unlink(sock)
        self.scraper = None
        if kind in ("ours", "metrics"):
            cmd = [ours_bin, "nbd", "--socket", sock, "--persistent", "--cache", "none", image]
            if kind == "metrics":
                self.metrics = f"127.0.0.1:{free_port()}"
                cmd[2:2] = ["--metrics-address", self.metrics]
        else:
            cmd = ["qemu-nbd", "-t", "-f", "qcow2", "--cache=none", "--aio=io_uring",
                   "-k", sock, image]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"bench_nbd: {kind} never listened")
                time.sleep(0.02)
        self.uri = f"nbd+unix:///?socket={sock}"
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


def fio(uri, rw, qd, count=16384):
    out = "fio-out.json"
    sh(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
        f"--iodepth={qd}", f"--number_ios={count}", f"--size={GIB}", "--norandommap",
        "--randrepeat=1", "--output-format=json", f"--output={out}"])
    job = json.load(open(out))["jobs"][0]
    return job["write" if "write" in rw else "read"]["iops"]


def nbdcopy(src, dst):
    t0 = time.monotonic()
    sh(["nbdcopy", "--request-size=1048576", src, dst])
    return GIB / (1 << 20) / (time.monotonic() - t0)  # MiB/s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/qcow2-csi-bench-nbd")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--qcow2-csi", dest="ours", default="target/release/qcow2-csi")
    ap.add_argument("--metrics-only", action="store_true",
                    help="only the metrics on/off table")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "fio", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"bench_nbd: {tool} is missing (apt-get install qemu-utils fio libnbd-bin)")
    ours_bin = os.path.abspath(args.ours)
    os.makedirs(args.dir, exist_ok=True)
    os.chdir(args.dir)
    img, sock = os.path.abspath("img.qcow2"), os.path.abspath("nbd.sock")

    def fresh():
        if os.path.exists(img):
            os.unlink(img)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", img, str(GIB)])

    def filled():
        fresh()
        sh(["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", "16", "-w",
            "-s", "1M", "-c", "1024", "--pattern=0xcd", img])

    if not os.path.exists("src.raw"):
        with open("src.raw", "wb") as f:  # 1 GiB without zero blocks: nothing to skip
            for _ in range(1024):
                f.write(os.urandom(1 << 20))

    def cell(prepare, measure, kinds=("ours", "qemu")):
        # Interleaved (ours, qemu, ours, qemu, ...): the VM's disk speed drifts over minutes,
        # and back-to-back pairs see the same drift.
        runs = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for kind in runs:
                prepare()
                drop_caches()
                srv = Server(kind, img, sock, ours_bin)
                try:
                    runs[kind].append(measure(srv.uri))
                finally:
                    srv.stop()
        return {k: statistics.median(v) for k, v in runs.items()}

    rows = [
        ("4K random write, fresh (fio nbd)", "1", "IOPS", fresh, lambda u: fio(u, "randwrite", 1)),
        ("4K random write, fresh (fio nbd)", "32", "IOPS", fresh, lambda u: fio(u, "randwrite", 32)),
        ("4K random read, allocated (fio nbd)", "1", "IOPS", filled, lambda u: fio(u, "randread", 1)),
        ("4K random read, allocated (fio nbd)", "32", "IOPS", filled, lambda u: fio(u, "randread", 32)),
        ("1 GiB copy into the export (nbdcopy, 1 MiB)", "-", "MiB/s", fresh,
         lambda u: nbdcopy("src.raw", u)),
        ("1 GiB copy out of the export (nbdcopy, 1 MiB)", "-", "MiB/s", filled,
         lambda u: nbdcopy(u, "null:")),
    ]
    print(f"Images: 1 GiB qcow2, 64 KiB clusters, O_DIRECT; median of {args.repeat} interleaved "
          f"runs; caches dropped before each run.")
    if not args.metrics_only:
        print()
        print("| pattern | QD | unit | qcow2-csi nbd | qemu-nbd | ratio |")
        print("|---|---|---|---|---|---|")
        for name, qd, unit, prepare, measure in rows:
            r = cell(prepare, measure)
            print(f"| {name} | {qd} | {unit} | {r['ours']:.0f} | {r['qemu']:.0f} | "
                  f"{r['ours'] / r['qemu']:.2f} |", flush=True)

    # The metrics' price: the same server with and without counting (and scrapes).
    many = 65536
    priced = [
        ("4K random read, allocated (fio nbd)", "32", filled,
         lambda u: fio(u, "randread", 32, many)),
        ("4K random read, allocated (fio nbd)", "1", filled,
         lambda u: fio(u, "randread", 1, many // 4)),
        ("4K random write, fresh (fio nbd)", "32", fresh,
         lambda u: fio(u, "randwrite", 32, many // 2)),
    ]
    print()
    print("| pattern | QD | metrics on (IOPS) | metrics off (IOPS) | on / off |")
    print("|---|---|---|---|---|")
    for name, qd, prepare, measure in priced:
        r = cell(prepare, measure, kinds=("metrics", "ours"))
        print(f"| {name} | {qd} | {r['metrics']:.0f} | {r['ours']:.0f} | "
              f"{r['metrics'] / r['ours']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
