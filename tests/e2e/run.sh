#!/usr/bin/env bash
# The whole local workflow on kind (needs Docker, kind, kubectl; helm optional):
# cluster, image, install, example flows, csi-sanity, and with E2E=1 the Kubernetes
# external-storage suite. The cluster is deleted at the end unless KEEP=1.
#   tests/e2e/run.sh        (make kind-e2e)
source "$(dirname "$0")/lib.sh"
need kind kubectl docker curl
here="$ROOT/tests/e2e"

"$here/cluster.sh" up
[ "${KEEP:-0}" = 1 ] || trap '"$here/cluster.sh" down' EXIT
"$here/cluster.sh" image
"$here/install.sh" "${INSTALL:-}"
"$here/examples.sh"
"$here/csi-sanity.sh"
if [ "${E2E:-0}" = 1 ]; then
  "$here/k8s-e2e.sh"
fi
say "kind workflow passed"
