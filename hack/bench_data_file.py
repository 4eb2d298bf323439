#!/usr/bin/env python3
"""A qcow2 image whose data is a raw external data file (`data_file_raw`), side by side with
the raw file itself, in one run: 4 KiB random reads at QD1 and QD32 with O_DIRECT.

The image is made by `qemu-img create -o data_file=...,data_file_raw=on` (which maps every
cluster), the data file then filled with 1 GiB of random bytes (it is the guest disk). Read:
- the raw file by fio (io_uring, direct),
- the image by us (`qcow2util bench --direct`: the L2 lookup, then the read of the data file),
- the image by QEMU (a qemu-io script of aio reads, `-t none`, timed from outside).
`qcow2util bench` waits for each batch of reads before the next (docs/benchmarks.md,
"Batched reads"), where fio keeps its depth in flight: so one client for both, too, fio's
nbd engine at QD32 against `qcow2-csi nbd --cache none` serving the raw file
(`--format raw`) and serving the image.
Caches are dropped before every run; the median of `--repeat` runs is reported, with ratios.

Usage: hack/bench_data_file.py [--dir DIR] [--repeat N] [--count N] [--qcow2util PATH]
                               [--qcow2-csi PATH]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import time

from benchlib import GIB, drop_caches, sh


def make(d):
    img, data = os.path.join(d, "df.qcow2"), os.path.join(d, "df.data")
    for p in (img, data):
        if os.path.exists(p):
            os.unlink(p)
    # qemu-img opens a relative data file name against its working directory.
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=df.data,data_file_raw=on",
        img, str(GIB)], cwd=d)
    sh(["fio", "--name=fill", f"--filename={data}", "--rw=write", "--bs=1M", f"--size={GIB}",
        "--refill_buffers", "--end_fsync=1", "--output-format=json"])
    return img, data


def raw(data, qd, count):
    out = json.loads(sh(["fio", "--name=raw", f"--filename={data}", "--rw=randread", "--bs=4096",
                         "--direct=1", "--ioengine=io_uring", f"--iodepth={qd}",
                         f"--number_ios={count}", f"--size={GIB}", "--norandommap",
                         "--randrepeat=1", "--output-format=json"]).stdout)
    return out["jobs"][0]["read"]["iops"]


def ours(util, img, qd, count):
    out = sh([util, "bench", "-f", img, "--pattern", "rand", "-s", "4096", "-d", str(qd),
              "-c", str(count), "--direct", "--output", "json"])
    return json.loads(out.stdout)["iops"]


def qemu(img, qd, count):
    rng = random.Random(1)
    lines = []
    for i in range(count):
        off = rng.randrange(GIB // 4096) * 4096
        if qd == 1:
            lines.append(f"read -q {off} 4096")
        else:
            lines.append(f"aio_read -q {off} 4096")
            if (i + 1) % qd == 0:
                lines.append("aio_flush")
    script = "\n".join(lines) + "\naio_flush\n"
    t0 = time.monotonic()
    subprocess.run(["qemu-io", "-f", "qcow2", "-t", "none", "-i", "io_uring", img],
                   input=script, check=True, capture_output=True, text=True,
                   cwd=os.path.dirname(img))
    return count / (time.monotonic() - t0)


def nbd(csi, path, fmt, count, d):
    sock = os.path.join(d, "bench.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    server = subprocess.Popen([csi, "nbd", "--socket", sock, "--persistent", "--cache", "none",
                               "--format", fmt, path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        drop_caches()
        out = os.path.join(d, "fio.json")
        sh(["fio", "--name=nbd", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
            "--rw=randread", "--bs=4k", "--iodepth=32", f"--size={GIB}",
            f"--number_ios={count}", "--norandommap", "--randrepeat=1",
            "--output-format=json", f"--output={out}"])
        with open(out) as f:
            return json.load(f)["jobs"][0]["read"]["iops"]
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/var/tmp/qcow2-bench-df")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--qcow2util", default="target/release/qcow2util")
    ap.add_argument("--qcow2-csi", default="target/release/qcow2-csi")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    img, data = make(args.dir)

    def median(fn):
        runs = []
        for _ in range(args.repeat):
            drop_caches()
            runs.append(fn())
        return statistics.median(runs)

    print("| QD | raw file (IOPS) | ours, data-file-raw image (IOPS) | QEMU, same image (IOPS) "
          "| ours / raw | ours / QEMU |")
    print("|---|---|---|---|---|---|")
    for qd in (1, 32):
        r = median(lambda: raw(data, qd, args.count))
        o = median(lambda: ours(args.qcow2util, img, qd, args.count))
        q = median(lambda: qemu(img, qd, args.count))
        print(f"| {qd} | {r:,.0f} | {o:,.0f} | {q:,.0f} | {o / r:.2f} | {o / q:.2f} |")
    r = median(lambda: nbd(args.qcow2_csi, data, "raw", args.count, args.dir))
    o = median(lambda: nbd(args.qcow2_csi, img, "qcow2", args.count, args.dir))
    print()
    print("| through `qcow2-csi nbd`, fio's nbd engine, QD32 | raw file (IOPS) "
          "| data-file-raw image (IOPS) | image / raw |")
    print("|---|---|---|---|")
    print(f"| 4 KiB random reads | {r:,.0f} | {o:,.0f} | {o / r:.2f} |")
    for p in (img, data):
        os.unlink(p)


if __name__ == "__main__":
    main()
