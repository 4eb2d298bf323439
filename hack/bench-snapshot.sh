#!/usr/bin/env bash
# CreateSnapshot and restore latency of the CSI plugin next to qemu-img create -b and a full
# copy (driver/examples/snapshot_bench.rs). ROUNDS (default 15); BENCH_DIR for the scratch files.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "bench-snapshot needs qemu-img (qemu-utils)" >&2; exit 1; }
cargo build --release -p qcow2-csi --bin qcow2-csi --example snapshot_bench
BENCH_DIR="${BENCH_DIR:-/tmp}" target/release/examples/snapshot_bench target/release/qcow2-csi "${ROUNDS:-15}"
