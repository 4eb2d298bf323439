#!/usr/bin/env bash
# Builds qcow2util and shows it working on a fresh image: create, write through dd, info, map.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin qcow2util
bin=target/release/qcow2util
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== create a 1 GiB image with subclusters"
"$bin" create -f "$work/disk.qcow2" -s 1G --enable-subcluster
echo "== fill a raw file with some data and convert it (zero blocks are skipped)"
truncate -s 64M "$work/data.raw"
printf 'hello from qcow2-csi\n' | dd of="$work/data.raw" conv=notrunc status=none
head -c 1048576 /dev/urandom | dd of="$work/data.raw" bs=1M seek=10 conv=notrunc status=none
"$bin" dd -i "$work/data.raw" -o "$work/data.qcow2" -O qcow2
echo "== info"
"$bin" info -f "$work/data.qcow2" --pretty
echo "== map"
"$bin" map -f "$work/data.qcow2"
echo "== overlay on top, and its chain"
"$bin" create -f "$work/overlay.qcow2" -b data.qcow2 -F qcow2
"$bin" info -f "$work/overlay.qcow2" --detail --pretty
echo "== round trip back to raw"
"$bin" dd -i "$work/overlay.qcow2" -f qcow2 -o "$work/back.raw" -O raw
cmp "$work/data.raw" "$work/back.raw" && echo "round trip: identical"

echo
echo "== the CSI plugin: qcow2-csi serve with local defaults, driven by examples/csi_client.rs"
cargo build --release --bin qcow2-csi --example csi_client
state="$work/state"
sock="unix://$work/csi.sock"
target/release/qcow2-csi serve --endpoint "$sock" --node-id "$(hostname)" --state-dir "$state" --kubelet-dir "$work" 2>"$work/plugin.log" &
plugin=$!
trap 'kill $plugin 2>/dev/null || true; rm -rf "$work"' EXIT
client=target/release/examples/csi_client
for _ in $(seq 100); do "$client" "$sock" info >/dev/null 2>&1 && break; sleep 0.1; done
"$client" "$sock" info
"$client" "$sock" create demo-volume 1073741824
"$client" "$sock" list
vol=$("$client" "$sock" list | awk '{print $1}')
echo "== the volume's head layer"
"$bin" info -f "$state"/layers/*.qcow2 --pretty
staged=0
if [ "$(id -u)" -eq 0 ] && command -v nbdfuse >/dev/null && [ -e /dev/fuse ]; then
  staged=1
  echo "== stage it (export, attach, mkfs, mount), write a file"
  mkdir -p "$work/staging"
  "$client" "$sock" stage "$vol" "$work/staging"
  echo "written through the filesystem on $vol" > "$work/staging/hello.txt"
  sync
  df -h "$work/staging" | tail -1
else
  echo "(stage skipped: needs root, nbdfuse and /dev/fuse)"
fi
echo "== snapshot it (while staged, the export pivots onto a new head), restore the snapshot"
snap=$("$client" "$sock" snapshot "$vol" demo-snapshot | awk '{print $1}')
"$client" "$sock" snapshots
restored=$("$client" "$sock" restore demo-restore "$snap" | awk '{print $1}')
if [ "$staged" -eq 1 ]; then
  echo "after the snapshot" > "$work/staging/later.txt"
  "$client" "$sock" unstage "$vol" "$work/staging"
  echo "== stage the restore: the file from before the snapshot, not the one after"
  mkdir -p "$work/restored"
  "$client" "$sock" stage "$restored" "$work/restored"
  ls "$work/restored"
  cat "$work/restored/hello.txt"
  "$client" "$sock" unstage "$restored" "$work/restored"
fi
echo "== the layers: the volume's chain and the restore's"
"$bin" info -f "$state/layers/$(sed -n 's/.*"head": "\(.*\)".*/\1/p' "$state/volumes/$restored.json")" --detail --pretty | head -20
"$client" "$sock" delete-snapshot "$snap"
"$client" "$sock" delete "$restored"
"$client" "$sock" delete "$vol"
echo "layers left: $(find "$state/layers" -mindepth 1 -maxdepth 1 | wc -l)"
kill -TERM $plugin && wait $plugin
echo "== plugin log"
cat "$work/plugin.log"
