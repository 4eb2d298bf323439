#!/usr/bin/env bash
# Seeds for the fuzz targets: small qemu-made images of every kind the engine reads (the
# fuzzer mutates them into hostile ones), and a few operation scripts.
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/open_image
mkdir -p "$out" corpus/ops
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
make() { # name, create options, qemu-io commands...
    local name=$1 opts=$2; shift 2
    qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" 1M
    for c in "$@"; do qemu-io -f qcow2 -c "$c" "$tmp/$name" >/dev/null; done
    cp "$tmp/$name" "$out/$name"
}
make v3-512 cluster_size=512 "write -P 1 0 8k" "write -z 16k 4k" "discard 2k 1k"
make v2-512 cluster_size=512,compat=0.10 "write -P 2 4k 8k"
make v3-4k-rc1 cluster_size=4k,refcount_bits=1 "write -P 3 0 64k"
make v3-4k-rc64 cluster_size=4k,refcount_bits=64 "write -P 4 100k 20k"
make ext-16k cluster_size=16k,extended_l2=on "write -P 5 0 3k" "write -z 8k 2k"
make lazy-512 cluster_size=512,lazy_refcounts=on "write -P 6 0 4k"
qemu-img create -q -f qcow2 -o cluster_size=4k "$tmp/snap" 1M
qemu-io -f qcow2 -c "write -P 7 0 8k" "$tmp/snap" >/dev/null
qemu-img snapshot -c s1 "$tmp/snap"
qemu-io -f qcow2 -c "write -P 8 4k 8k" "$tmp/snap" >/dev/null
cp "$tmp/snap" "$out/snapshot"
head -c 1M /dev/urandom >"$tmp/raw"
qemu-img convert -c -O qcow2 -o cluster_size=4k "$tmp/raw" "$tmp/comp" 2>/dev/null
head -c 65536 "$tmp/comp" >"$out/compressed-head"
qemu-img create -q -f qcow2 -o cluster_size=4k "$tmp/bm" 1M
qemu-img bitmap --add "$tmp/bm" b0
cp "$tmp/bm" "$out/bitmap"
qemu-img create -q -f qcow2 -o cluster_size=4k -b snap -F qcow2 "$tmp/overlay"
cp "$tmp/overlay" "$out/overlay"
for i in 1 2 3 4 5 6 7 8; do head -c $((64 * i)) /dev/urandom >"corpus/ops/random-$i"; done
ls -l "$out" corpus/ops
