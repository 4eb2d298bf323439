# shellcheck shell=bash
# Shared settings and helpers for the kind workflows (sourced).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${CLUSTER:-qcow2-csi}"
NAMESPACE="${NAMESPACE:-qcow2-csi}"
# The chart's default image (its appVersion): building with this tag lets deploy/ and the
# chart run unchanged on kind.
IMAGE="${IMAGE:-ghcr.io/qcow2-csi/qcow2-csi:0.1.0}"
SNAPSHOTTER_VERSION="${SNAPSHOTTER_VERSION:-v8.6.0}"
CSI_SANITY_VERSION="${CSI_SANITY_VERSION:-v5.4.0}"
WORK="${WORK:-$ROOT/target/e2e}"
export KUBECONFIG="${KUBECONFIG:-$WORK/kubeconfig}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required (see README, \"Install\")"
  done
}

# The node plugin pod on NODE (or the first one).
plugin_pod() {
  local selector="app.kubernetes.io/name=qcow2-csi,app.kubernetes.io/component=node"
  if [ -n "${1:-}" ]; then
    kubectl -n "$NAMESPACE" get pods -l "$selector" --field-selector "spec.nodeName=$1" \
      -o jsonpath='{.items[0].metadata.name}'
  else
    kubectl -n "$NAMESPACE" get pods -l "$selector" -o jsonpath='{.items[0].metadata.name}'
  fi
}
