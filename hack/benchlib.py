"""Helpers shared by the benchmark scripts (hack/bench.py, hack/bench_nbd.py)."""

import os
import subprocess

GIB = 1 << 30


def sh(args, **kw):
    """Runs a command, failing on a non-zero exit; returns the completed process."""
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def drop_caches():
    """Syncs and drops the page cache, so every run starts cold (needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: caches stay warm (the scripts say so)
