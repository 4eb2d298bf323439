#!/usr/bin/env bash
# Runs the Kubernetes external-storage e2e suite against qcow2-csi, with the capabilities
# declared in tests/e2e/test-driver.yaml. Downloads e2e.test and ginkgo for the cluster's
# Kubernetes version (dl.k8s.io) once. Serial and disruptive tests are skipped unless
# E2E_SKIP is set otherwise.
#   tests/e2e/k8s-e2e.sh [extra ginkgo flags]
source "$(dirname "$0")/lib.sh"
need kubectl curl tar

version=$(kubectl version -o json | sed -n 's/.*"gitVersion": *"\(v[0-9.]*\).*/\1/p' | tail -1)
[ -n "$version" ] || die "cannot read the server's Kubernetes version"
dir="$WORK/kubernetes-test-$version"
if [ ! -x "$dir/kubernetes/test/bin/e2e.test" ]; then
  say "downloading the e2e suite for $version"
  mkdir -p "$dir"
  arch=$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/')
  curl -fsSL "https://dl.k8s.io/$version/kubernetes-test-linux-$arch.tar.gz" | tar -xz -C "$dir"
fi
bin="$dir/kubernetes/test/bin"
skip="${E2E_SKIP:-\[Disruptive\]|\[Serial\]}"
say "External.Storage for qcow2.csi.dev (skipping: $skip)"
"$bin/ginkgo" -p -v --timeout=2h \
  --focus='External.Storage.*qcow2.csi.dev' --skip="$skip" \
  --junit-report="$WORK/k8s-e2e.xml" "$@" \
  "$bin/e2e.test" -- \
  -storage.testdriver="$ROOT/tests/e2e/test-driver.yaml" \
  -kubeconfig="$KUBECONFIG" -report-dir="$WORK"
