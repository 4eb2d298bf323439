#!/usr/bin/env python3
"""Side-by-side benchmark: our engine vs QEMU's qcow2 vs the raw file, in one run.

Every cell runs the same pattern on a fresh image (writes) or the same filled image (reads)
on the same filesystem: our engine through `qcow2util bench` (writes: a thread per request in
flight; reads: up to 4 threads, each submitting its share of the queue depth as one io_uring
batch), QEMU through `qemu-img bench` (sequential and strided patterns) or `qemu-io` command
scripts (random patterns; QD32 as batches of 32 aio requests), and the raw file through fio
(io_uring). Caches are dropped before every cell. Prints a Markdown table with ratios.

Timing: qemu-img bench stops its clock before closing the image, so sequential and strided
cells time the requests only, for all three. qemu-io is timed from outside, open and closing
flush included, so random-write cells include a final flush for all three (`--flush`,
fio's `end_fsync`).

`--dd` times the conversion instead: `qcow2util dd` against `qemu-img convert -t writeback`,
1 GiB of random bytes from a raw file into a new qcow2 image, both ending durable.

Usage: hack/bench.py [--dir DIR] [--repeat N] [--quick] [--qcow2util PATH] [--only TEXT]
                     [--no-memory] [--dd]
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import GIB, drop_caches, sh


class Bench:
    def __init__(self, args):
        self.dir = args.dir
        self.util = args.qcow2util
        self.repeat = args.repeat

    def path(self, name):
        return os.path.join(self.dir, name)

    def fresh_qcow2(self, name, ext, size=GIB):
        p = self.path(name)
        if os.path.exists(p):
            os.unlink(p)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"cluster_size=64k,extended_l2={'on' if ext else 'off'}", p, str(size)])
        return p

    def fresh_raw(self, name, size=GIB):
        p = self.path(name)
        if os.path.exists(p):
            os.unlink(p)
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    # --- the three engines -------------------------------------------------------------

    def ours(self, img, cell):
        cmd = [self.util, "bench", "-f", img, "-s", str(cell["bs"]), "-d", str(cell["qd"]),
               "-c", str(cell["count"]), "--output", "json", "--pattern", cell["pattern"]]
        if cell["step"]:
            cmd += ["-S", str(cell["step"])]
        if cell["write"]:
            cmd.append("-w")
        if cell["direct"]:
            cmd.append("--direct")
        if cell["pattern"] == "rand" and cell["write"]:
            cmd.append("--flush")  # qemu-io's time includes its closing flush
        out = json.loads(sh(cmd).stdout)
        return out["iops"]

    def qemu(self, img, cell):
        cache = "none" if cell["direct"] else "writeback"
        if cell["pattern"] == "seq":
            cmd = ["qemu-img", "bench", "-f", "qcow2", "-t", cache, "-i", "io_uring",
                   "-d", str(cell["qd"]), "-s", str(cell["bs"]), "-c", str(cell["count"]),
                   "-S", str(cell["step"] or cell["bs"])]
            if cell["write"]:
                cmd += ["-w", "--pattern=0xab"]
            out = sh(cmd + [img]).stdout
            secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
            return cell["count"] / secs
        # Random: a qemu-io command script, timed from outside (open and close included).
        rng = random.Random(1)
        blocks = GIB // cell["bs"]
        lines = []
        verb = "write -q -P 0xab" if cell["write"] else "read -q"
        for i in range(cell["count"]):
            off = rng.randrange(blocks) * cell["bs"]
            if cell["qd"] == 1:
                lines.append(f"{verb} {off} {cell['bs']}")
            else:
                lines.append(f"aio_{verb} {off} {cell['bs']}")
                if (i + 1) % cell["qd"] == 0:
                    lines.append("aio_flush")
        if cell["qd"] > 1:
            lines.append("aio_flush")
        script = "\n".join(lines) + "\n"
        t0 = time.monotonic()
        subprocess.run(["qemu-io", "-f", "qcow2", "-t", cache, "-i", "io_uring", img],
                       input=script, check=True, capture_output=True, text=True)
        return cell["count"] / (time.monotonic() - t0)

    def raw(self, img, cell):
        rw = {("seq", True): "write", ("seq", False): "read",
              ("rand", True): "randwrite", ("rand", False): "randread"}[(cell["pattern"], cell["write"])]
        if cell["step"] and cell["step"] > cell["bs"]:
            rw += f":{cell['step'] - cell['bs']}"
        cmd = ["fio", "--name=raw", f"--filename={img}", f"--rw={rw}", f"--bs={cell['bs']}",
               f"--direct={1 if cell['direct'] else 0}", "--ioengine=io_uring",
               f"--iodepth={cell['qd']}", f"--number_ios={cell['count']}", f"--size={GIB}",
               "--norandommap", "--randrepeat=1", "--fallocate=none", "--output-format=json"]
        if cell["pattern"] == "rand" and cell["write"]:
            cmd.append("--end_fsync=1")  # as qemu-io's closing flush
        out = json.loads(sh(cmd).stdout)
        job = out["jobs"][0]
        return job["write" if cell["write"] else "read"]["iops"]

    # --- cells ---------------------------------------------------------------------------

    def median(self, fn):
        return statistics.median(fn() for _ in range(self.repeat))

    def run_cell(self, cell, filled):
        """IOPS for (ours, qemu) per extended-L2 setting, and raw."""
        result = {}
        for ext in (False, True):
            for engine in ("ours", "qemu"):
                def once():
                    if cell["write"]:
                        img = self.fresh_qcow2("w.qcow2", ext)
                    else:
                        img = filled[ext]
                    drop_caches()
                    return getattr(self, engine)(img, cell)
                result[(engine, ext)] = self.median(once)

        def raw_once():
            img = self.fresh_raw("w.raw") if cell["write"] else filled["raw"]
            drop_caches()
            return self.raw(img, cell)
        result["raw"] = self.median(raw_once)
        return result

    def fill(self):
        """Fully written images for the read cells (1 MiB sequential writes, like the baselines)."""
        filled = {}
        for ext in (False, True):
            img = self.fresh_qcow2(f"filled-{int(ext)}.qcow2", ext)
            sh(["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-d", "16",
                "-w", "-s", "1M", "-c", "1024", "--pattern=0xcd", img])
            filled[ext] = img
        raw = self.fresh_raw("filled.raw")
        sh(["fio", "--name=fill", f"--filename={raw}", "--rw=write", "--bs=1M", f"--size={GIB}",
            "--direct=1", "--ioengine=io_uring", "--iodepth=16", "--output-format=json"])
        filled["raw"] = raw
        return filled

    def convert(self):
        """Median seconds of `qcow2util dd` and `qemu-img convert -t writeback` of a 1 GiB
        raw file of random bytes into a new qcow2 image, interleaved, caches dropped. Both
        end durable: dd ends with an fdatasync, qemu-img flushes the image as it closes it."""
        src = self.path("src.raw")
        if not os.path.exists(src):
            with open(src, "wb") as f:
                for _ in range(1024):
                    f.write(os.urandom(1 << 20))
        out = self.path("out.qcow2")
        times = {"ours": [], "qemu": []}
        cmds = {"ours": [self.util, "dd", "-i", src, "-o", out, "-O", "qcow2"],
                "qemu": ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", src, out]}
        for _ in range(self.repeat):
            for k in times:
                if os.path.exists(out):
                    os.unlink(out)
                drop_caches()
                t0 = time.monotonic()
                sh(cmds[k])
                times[k].append(time.monotonic() - t0)
        os.unlink(out)
        return statistics.median(times["ours"]), statistics.median(times["qemu"])

    def memory(self):
        """Peak RSS of our engine on a 4 TiB image worked over a 1 GiB region."""
        img = self.path("big.qcow2")
        if os.path.exists(img):
            os.unlink(img)
        sh([self.util, "create", "-f", img, "-s", "4T"])
        out = json.loads(sh([self.util, "bench", "-f", img, "-w", "--pattern", "rand",
                             "-s", "4k", "--range", "1G", "-d", "32", "-c", "65536",
                             "--output", "json"]).stdout)
        reread = json.loads(sh([self.util, "bench", "-f", img, "--pattern", "rand",
                                "-s", "4k", "--range", "1G", "-d", "32", "-c", "65536",
                                "--output", "json"]).stdout)
        os.unlink(img)
        return out["max_rss_kib"], reread["max_rss_kib"]


def cells(quick, only=""):
    def c(name, bs, qd, pattern="seq", step=None, write=True, count=16384):
        return dict(name=name, bs=bs, qd=qd, pattern=pattern, step=step, write=write, count=count)
    out = [
        c("4K random write, fresh", 4096, 1, "rand"),
        c("4K random write, fresh", 4096, 32, "rand"),
        c("4K strided alloc (1/cluster)", 4096, 32, step=65536),
        c("64K seq write", 65536, 1),
        c("64K seq write", 65536, 32),
        c("1M seq write", 1 << 20, 1, count=1024),
        c("1M seq write", 1 << 20, 32, count=1024),
        c("4K random read, allocated", 4096, 1, "rand", write=False),
        c("4K random read, allocated", 4096, 32, "rand", write=False),
        c("4K seq read, allocated", 4096, 32, write=False, count=65536),
    ]
    if quick:
        out = [x for x in out if x["qd"] == 32 or x["name"].startswith("4K random write")]
    return [x for x in out if only in f"{x['name']} QD{x['qd']}"]


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    fs = " ".join(sh(["df", "--output=fstype,source", "."]).stdout.split("\n")[1].split())
    qemu = sh(["qemu-img", "--version"]).stdout.split("\n")[0]
    fio = sh(["fio", "--version"]).stdout.strip()
    return (f"{os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, filesystem {fs}; "
            f"{qemu}; {fio}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/qcow2-csi-bench")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (median)")
    ap.add_argument("--quick", action="store_true", help="QD32 cells and random writes only")
    ap.add_argument("--qcow2util", default="target/release/qcow2util")
    ap.add_argument("--only", default="", help="only the cells whose 'name QDn' contains this")
    ap.add_argument("--no-memory", action="store_true", help="skip the 4 TiB memory check")
    ap.add_argument("--dd", action="store_true",
                    help="only the conversion row: qcow2util dd vs qemu-img convert")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "fio"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (apt-get install qemu-utils fio)")
    args.qcow2util = os.path.abspath(args.qcow2util)
    os.makedirs(args.dir, exist_ok=True)
    os.chdir(args.dir)
    b = Bench(args)
    print(f"Machine: {machine()}")
    print(f"Images: 1 GiB, 64 KiB clusters, in {args.dir}; median of {args.repeat}; "
          f"caches dropped before each run{'' if os.geteuid() == 0 else ' (NOT: not root)'}.")
    print()
    if args.dd:
        ours, qemu = b.convert()
        print("| 1 GiB raw (random bytes) → qcow2, ending durable | ours (s) | qemu-img convert "
              "-t writeback (s) | ours / QEMU (speed) |")
        print("|---|---|---|---|")
        print(f"| qcow2util dd vs qemu-img convert | {ours:.2f} | {qemu:.2f} | {qemu / ours:.2f} |")
        return
    filled = b.fill()
    rows = []
    print("| pattern | QD | cache | ext L2 | ours IOPS | QEMU IOPS | raw IOPS | ours/QEMU | ours/raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in cells(args.quick, args.only):
        for direct in (True, False):
            cell = dict(cell, direct=direct)
            r = b.run_cell(cell, filled)
            for ext in (False, True):
                ours, qemu, raw = r[("ours", ext)], r[("qemu", ext)], r["raw"]
                row = (f"| {cell['name']} | {cell['qd']} | {'none' if direct else 'writeback'} | "
                       f"{'on' if ext else 'off'} | {ours:.0f} | {qemu:.0f} | {raw:.0f} | "
                       f"{ours / qemu:.2f} | {ours / raw:.2f} |")
                print(row, flush=True)
                rows.append(row)
    if args.no_memory:
        return
    rss_write, rss_read = b.memory()
    print()
    print(f"Memory: 4 TiB image, 4K random writes then reads over a 1 GiB region at QD32: "
          f"peak RSS {rss_write / 1024:.1f} MiB (writes), {rss_read / 1024:.1f} MiB (reads).")


if __name__ == "__main__":
    main()
