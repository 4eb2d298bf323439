#!/usr/bin/env python3
"""Encrypted (LUKS) images, side by side in one run: 4 KiB random writes at QD32.

Three engines on the same pattern (the same random offsets, 1 GiB image, page cache):
- ours on an unencrypted image (`qcow2util bench`),
- ours on an encrypted image made by `qemu-img create -o encrypt.format=luks`,
- QEMU on the same kind of encrypted image: a `qemu-io` script of 32 aio writes per batch
  with the secret object (qemu-img bench has neither a random pattern nor `--object`),
  timed from outside;

each on a fresh image (every write allocates: a whole 64 KiB cluster, or with extended L2
a 2 KiB-aligned subcluster range) and on one written through before (every write lands in
place). A first write into a cluster of an encrypted image also writes the rest of the
cluster as encrypted zeros (its host zeros would decrypt to noise), so fresh standard-L2
images do 16 times the bytes of their unencrypted twin: QEMU does the same. Ours runs with `--flush`, so its time, like qemu-io's, ends durable.
Caches are dropped before every run; the median of `--repeat` runs is reported, with ratios.

Usage: hack/bench_crypto.py [--dir DIR] [--repeat N] [--count N] [--qcow2util PATH]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import time

from benchlib import GIB, drop_caches, sh

PASS = "bench passphrase"
SECRET = f"secret,id=sec0,data={PASS}"
LUKS = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"


def make(path, encrypted, filled, extended):
    if os.path.exists(path):
        os.unlink(path)
    opts = f"cluster_size=64k,extended_l2={'on' if extended else 'off'}"
    opts += ("," + LUKS) if encrypted else ""
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", opts, path, str(GIB)])
    if filled:
        image = ["--image-opts", f"driver=qcow2,file.filename={path}"
                 + (",encrypt.key-secret=sec0" if encrypted else "")]
        # qemu-img bench takes no --object, so qemu-io writes the image through.
        sh(["qemu-io", "--object", SECRET, "-t", "none", "-c", f"write -q -P 0xcd 0 {GIB}"]
           + image)


def ours(util, path, encrypted, count, pass_file):
    cmd = [util, "bench", "-f", path, "-w", "--pattern", "rand", "-s", "4096", "-d", "32",
           "-c", str(count), "--flush", "--output", "json"]
    if encrypted:
        cmd += ["--passphrase-file", pass_file]
    return json.loads(sh(cmd).stdout)["iops"]


def qemu(path, count):
    rng = random.Random(1)
    blocks = GIB // 4096
    lines = []
    for i in range(count):
        lines.append(f"aio_write -q -P 0xab {rng.randrange(blocks) * 4096} 4096")
        if (i + 1) % 32 == 0:
            lines.append("aio_flush")
    lines.append("aio_flush")
    t0 = time.monotonic()
    subprocess.run(["qemu-io", "--object", SECRET, "-t", "writeback", "-i", "io_uring",
                    "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"],
                   input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)
    return count / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp/qcow2-csi-bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--count", type=int, default=30000)
    ap.add_argument("--qcow2util", default="target/release/qcow2util")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    pass_file = os.path.join(args.dir, "pass")
    with open(pass_file, "w") as f:
        f.write(PASS)
    img = os.path.join(args.dir, "c.qcow2")
    print("| image | ours, unencrypted (IOPS) | ours, encrypted (IOPS) | QEMU, encrypted (IOPS) "
          "| encrypted / unencrypted | ours / QEMU, encrypted |")
    print("|---|---|---|---|---|---|")
    for filled, extended in ((False, False), (False, True), (True, False)):
        runs = {"plain": [], "ours": [], "qemu": []}
        for _ in range(args.repeat):
            for kind in runs:
                make(img, kind != "plain", filled, extended)
                drop_caches()
                if kind == "qemu":
                    runs[kind].append(qemu(img, args.count))
                else:
                    runs[kind].append(ours(args.qcow2util, img, kind == "ours", args.count,
                                           pass_file))
        m = {k: statistics.median(v) for k, v in runs.items()}
        name = "written through" if filled else "fresh"
        name += ", extended L2" if extended else ""
        print(f"| {name} | {m['plain']:,.0f} | "
              f"{m['ours']:,.0f} | {m['qemu']:,.0f} | {m['ours'] / m['plain']:.2f} | "
              f"{m['ours'] / m['qemu']:.2f} |", flush=True)
    os.unlink(img)


if __name__ == "__main__":
    main()
