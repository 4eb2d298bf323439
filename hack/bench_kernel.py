#!/usr/bin/env python3
"""Kernel nbd benchmark: `qcow2-csi attach --mode nbd` vs `qemu-nbd -c`, side by side, in
one run, on a real Linux 6.1 nbd driver inside user-mode Linux (hack/uml-run.sh).

Both attach the same kind of image (a fresh 1 GiB qcow2, 64 KiB clusters) as /dev/nbdN with
their default cache mode (the page cache: our `--cache writeback`, qemu-nbd's
`--cache=writeback --aio=threads`); fio (libaio, O_DIRECT) on the block device: 4 KiB random
writes on a fresh image and 4 KiB random reads of written data at QD1 and QD32, 1 MiB
sequential writes and reads at QD4. Median of N runs, alternating servers. The user-mode
kernel has one CPU, shared by fio, the kernel and the server: only the ratios mean anything.
Prints a Markdown table.

Usage: hack/bench_kernel.py [--repeat N] [--runtime SECS] [--qcow2-csi PATH] [--quick]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20

WORKLOADS = [
    # (name, fio rw, block size, queue depth, needs written data, unit)
    ("4K random write, QD1 (fresh image)", "randwrite", "4k", 1, False, "IOPS"),
    ("4K random write, QD32 (fresh image)", "randwrite", "4k", 32, False, "IOPS"),
    ("4K random read, QD1", "randread", "4k", 1, True, "IOPS"),
    ("4K random read, QD32", "randread", "4k", 32, True, "IOPS"),
    ("1M sequential write, QD4", "write", "1m", 4, False, "MiB/s"),
    ("1M sequential read, QD4", "read", "1m", 4, True, "MiB/s"),
]
REGION = 512 * MIB  # what the workloads touch


def sh(args, **kw):
    return subprocess.run(args, check=True, **kw)


class Attached:
    """An image attached as /dev/nbdN by one of the two servers; detached on stop()."""

    def __init__(self, kind, image, ours_bin, n):
        self.kind = kind
        if kind == "ours":
            self.proc = subprocess.Popen(
                [ours_bin, "attach", "--mode", "nbd", "--id", f"bench-{n}", image],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.dev = self.proc.stdout.readline().strip()
            if not self.dev.startswith("/dev/nbd"):
                sys.exit(f"bench_kernel: qcow2-csi attach printed {self.dev!r}")
        else:
            self.dev = free_nbd()
            # The device of the previous run may still be settling: try again for a while.
            for attempt in range(50):
                r = subprocess.run(["qemu-nbd", "-c", self.dev, "-f", "qcow2",
                                    "--cache=writeback", "--aio=threads", image],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                sys.exit(f"bench_kernel: qemu-nbd -c failed: {r.stderr.strip()}")
            name = os.path.basename(self.dev)
            deadline = time.monotonic() + 10
            while not os.path.exists(f"/sys/block/{name}/pid"):
                if time.monotonic() > deadline:
                    sys.exit("bench_kernel: qemu-nbd -c never connected")
                time.sleep(0.02)

    def stop(self):
        if self.kind == "ours":
            self.proc.terminate()
            self.proc.wait()
        else:
            sh(["qemu-nbd", "-d", self.dev], stdout=subprocess.DEVNULL)
            name = os.path.basename(self.dev)
            while os.path.exists(f"/sys/block/{name}/pid"):
                time.sleep(0.02)


def free_nbd():
    """A pre-created nbd device nobody uses, the highest-numbered one (ours are destroyed
    on detach, lowest first: qemu-nbd -c needs an existing node)."""
    free = [int(d[3:]) for d in os.listdir("/sys/block") if d.startswith("nbd")
            and not os.path.exists(f"/sys/block/{d}/pid") and os.path.exists(f"/dev/{d}")]
    if not free:
        sys.exit("bench_kernel: no free nbd device for qemu-nbd -c")
    return f"/dev/nbd{max(free)}"


def fio(dev, rw, bs, qd, runtime):
    out = subprocess.run(
        ["fio", "--name=k", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
         f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={REGION}",
         "--norandommap", "--randrepeat=1", "--time_based", f"--runtime={runtime}",
         "--ramp_time=1", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / MIB


def one(kind, workload, ours_bin, n, runtime, work):
    _, rw, bs, qd, needs_data, _ = workload
    image = os.path.join(work, f"{kind}-{n}.qcow2")
    sh(["qemu-img", "create", "-q", "-f", "qcow2", image, "1G"])
    a = Attached(kind, image, ours_bin, n)
    try:
        if needs_data:
            sh(["fio", "--name=fill", f"--filename={a.dev}", "--ioengine=libaio", "--direct=1",
                "--rw=write", "--bs=1m", "--iodepth=4", f"--size={REGION}"],
               stdout=subprocess.DEVNULL)
        return fio(a.dev, rw, bs, qd, runtime)
    finally:
        a.stop()
        os.unlink(image)


def inside(args):
    # Enough pre-created devices for every run (each of ours is destroyed on detach).
    module = f"/usr/lib/uml/modules/{os.uname().release}/kernel/drivers/block/nbd.ko"
    sh(["rmmod", "nbd"])
    sh(["insmod", module, "nbds_max=128"])
    work = tempfile.mkdtemp(prefix="bench-kernel.", dir=args.dir)
    rows = []
    n = 0
    for w in WORKLOADS:
        results = {"ours": [], "qemu": []}
        for _ in range(args.repeat):
            for kind in ("ours", "qemu"):
                n += 1
                results[kind].append(one(kind, w, args.qcow2_csi, n, args.runtime, work))
        ours = statistics.median(results["ours"])
        qemu = statistics.median(results["qemu"])
        rows.append((w[0], w[5], ours, qemu))
        print(f"# {w[0]}: ours {results['ours']} qemu-nbd {results['qemu']}", file=sys.stderr,
              flush=True)
    os.rmdir(work)
    print(f"| kernel nbd, fio libaio O_DIRECT on /dev/nbdN (median of {args.repeat}, "
          f"{args.runtime} s each) | unit | qcow2-csi attach | qemu-nbd -c | ratio |")
    print("|---|---|---|---|---|")
    for name, unit, ours, qemu in rows:
        print(f"| {name} | {unit} | {ours:,.0f} | {qemu:,.0f} | {ours / qemu:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--runtime", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="one run of 3 s per workload")
    p.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--qcow2-csi", default=os.path.join(HERE, "../target/release/qcow2-csi"))
    args = p.parse_args()
    if args.quick:
        args.repeat, args.runtime = 1, 3
    args.qcow2_csi = os.path.abspath(args.qcow2_csi)
    if os.environ.get("QCOW2_CSI_IN_UML"):
        inside(args)
        return
    cmd = [os.path.join(HERE, "uml-run.sh"), "--mem", "2G", "--", "/usr/bin/python3",
           os.path.abspath(__file__), "--repeat", str(args.repeat), "--runtime",
           str(args.runtime), "--dir", args.dir, "--qcow2-csi", args.qcow2_csi]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
