#!/usr/bin/env python3
"""Where an NBD server's time goes: CPU time, context switches and system calls per request.

Runs one fio workload (the nbd engine, over a unix socket) against each server of
hack/bench_nbd.py while `perf stat` (software counters: task-clock, context switches,
migrations) and, in a second run, `strace -c -f` watch the server process, and prints per
request: server CPU µs, voluntary context switches, and system calls (with the top ones).
Counts, not times, are what to compare: they do not depend on the machine's noise.

Usage: hack/profile_nbd.py [--servers ours,nbdkit,...] [--workload randread1|randread32|
       seqwrite1m|seqwrite64k|randwrite32] [--count N] [--no-strace]
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nbd import GIB, SERVERS, Server, make_images, sh  # noqa: E402

WORKLOADS = {
    # name: (fio rw, bs, iodepth, needs written data)
    "randread1": ("randread", "4k", 1, True),
    "randread32": ("randread", "4k", 32, True),
    "randwrite32": ("randwrite", "4k", 32, False),
    "seqwrite64k": ("write", "64k", 32, False),
    "seqwrite1m": ("write", "1m", 32, False),
}


def watch(tool, pid, out):
    if tool == "perf":
        cmd = ["perf", "stat", "-x", ",", "-e", "task-clock,context-switches,cpu-migrations",
               "-p", str(pid), "-o", out]
    else:
        cmd = ["strace", "-c", "-f", "-p", str(pid), "-o", out]
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/qcow2-csi-bench-nbd")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--workload", default="randread1", choices=sorted(WORKLOADS))
    ap.add_argument("--count", type=int, default=0, help="requests (default: 1 GiB worth, "
                    "at most 32768)")
    ap.add_argument("--qcow2-csi", dest="ours", default="target/release/qcow2-csi")
    ap.add_argument("--no-strace", action="store_true")
    args = ap.parse_args()
    rw, bs, qd, written = WORKLOADS[args.workload]
    size = {"4k": 4 << 10, "64k": 64 << 10, "1m": 1 << 20}[bs]
    count = args.count or min(GIB // size, 32768)
    ours_bin = os.path.abspath(args.ours)
    os.makedirs(args.dir, exist_ok=True)
    os.chdir(args.dir)
    img, raw, sock = (os.path.abspath(n) for n in ("img.qcow2", "img.raw", "nbd.sock"))

    def prepare():
        make_images(img, raw, written)

    def run(uri):
        t0 = time.monotonic()
        sh(["fio", "--name=p", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--number_ios={count}", f"--size={GIB}", "--norandommap",
            "--randrepeat=1", "--output=/dev/null"])
        return time.monotonic() - t0

    print(f"{args.workload}: fio {rw} bs={bs} iodepth={qd}, {count} requests")
    print()
    print("| server | wall s | server CPU µs/req | context switches/req | syscalls/req | top syscalls/req |")
    print("|---|---|---|---|---|---|")
    for kind in args.servers.split(","):
        stats = {}
        for tool in ("perf",) + (() if args.no_strace else ("strace",)):
            prepare()
            srv = Server(kind, img, raw, sock, ours_bin)
            out = f"/tmp/profile-{tool}.txt"
            w = watch(tool, srv.proc.pid, out)
            try:
                wall = run(srv.uri)
            finally:
                w.send_signal(signal.SIGINT)
                w.wait()
                srv.stop()
            text = open(out).read()
            if tool == "perf":
                stats["wall"] = wall
                for line in text.splitlines():
                    f = line.split(",")
                    if len(f) > 3 and f[0].replace(".", "").isdigit():
                        stats[f[2]] = float(f[0])
            else:
                calls = {}
                for line in text.splitlines():
                    m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                    if m and m.group(2) != "total":
                        calls[m.group(2)] = int(m.group(1))
                stats["calls"] = calls
        cpu = stats.get("task-clock", 0) * 1000 / count  # msec -> µs
        cs = stats.get("context-switches", 0) / count
        calls = stats.get("calls", {})
        total = sum(calls.values()) / count if calls else float("nan")
        top = ", ".join(f"{k} {v / count:.2f}" for k, v in
                        sorted(calls.items(), key=lambda kv: -kv[1])[:5])
        print(f"| {kind} | {stats['wall']:.2f} | {cpu:.1f} | {cs:.2f} | {total:.2f} | {top} |",
              flush=True)


if __name__ == "__main__":
    main()
