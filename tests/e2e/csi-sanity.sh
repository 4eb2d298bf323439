#!/usr/bin/env bash
# Runs csi-sanity against a node plugin in the cluster. The plugin serves CSI on a unix
# socket only, so csi-sanity runs inside the plugin's container (copied there with kubectl
# cp), where the socket, the staging and the mount directories are the plugin's own.
# csi-sanity is built with Docker (golang image) unless CSI_SANITY points at a binary.
#   tests/e2e/csi-sanity.sh [extra csi-sanity flags, e.g. --ginkgo.focus=Node]
source "$(dirname "$0")/lib.sh"
need kubectl

bin="${CSI_SANITY:-$WORK/csi-sanity}"
if [ ! -x "$bin" ]; then
  need docker
  say "building csi-sanity $CSI_SANITY_VERSION"
  mkdir -p "$(dirname "$bin")"
  docker run --rm -v "$(dirname "$bin"):/out" -e CGO_ENABLED=0 -e GOBIN=/out golang:1.25 \
    go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  [ "$(basename "$bin")" = csi-sanity ] || mv "$(dirname "$bin")/csi-sanity" "$bin"
fi

pod=$(plugin_pod "${NODE:-}")
[ -n "$pod" ] || die "no node plugin pod in namespace $NAMESPACE"
c=(-n "$NAMESPACE" -c qcow2-csi)
say "csi-sanity in $pod"
kubectl cp "$bin" "$NAMESPACE/$pod:/tmp/csi-sanity" -c qcow2-csi
# The directories live under the kubelet directory (Bidirectional, like real volumes).
dir=/var/lib/kubelet/plugins/qcow2.csi.dev/sanity
kubectl exec "${c[@]}" "$pod" -- sh -c "rm -rf $dir && mkdir -p $dir &&
  printf 'readIOPS: \"100\"\nwriteBytesPerSecond: 10M\n' > $dir/mutable.yaml"
rc=0
kubectl exec "${c[@]}" "$pod" -- /tmp/csi-sanity \
  --csi.endpoint=unix:///csi/csi.sock \
  --csi.mountdir="$dir/mount" \
  --csi.stagingdir="$dir/staging" \
  --csi.testvolumesize=67108864 \
  --csi.testvolumeexpandsize=134217728 \
  --csi.testvolumemutableparameters="$dir/mutable.yaml" \
  --ginkgo.junit-report=/tmp/csi-sanity.xml \
  "$@" || rc=$?
kubectl cp "$NAMESPACE/$pod:/tmp/csi-sanity.xml" "$WORK/csi-sanity.xml" -c qcow2-csi >/dev/null 2>&1 || true
kubectl exec "${c[@]}" "$pod" -- sh -c "rm -rf $dir /tmp/csi-sanity"
[ "$rc" -eq 0 ] || die "csi-sanity failed (report: $WORK/csi-sanity.xml)"
say "csi-sanity passed (report: $WORK/csi-sanity.xml)"
