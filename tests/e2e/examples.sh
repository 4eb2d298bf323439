#!/usr/bin/env bash
# Runs the flows of deploy/examples against the installed driver and checks each result:
# a filesystem volume, a snapshot under a running writer, a larger restore, a clone,
# online expansion, a raw block volume, an encrypted volume, and deleting a source that others depend on. Deletes everything afterwards (KEEP=1 keeps it).
source "$(dirname "$0")/lib.sh"
need kubectl

ex="$ROOT/deploy/examples"
ns="${EXAMPLES_NAMESPACE:-qcow2-examples}"
k() { kubectl -n "$ns" "$@"; }

cleanup() {
  [ "${KEEP:-0}" = 1 ] && return
  kubectl delete namespace "$ns" --wait=true --timeout=180s >/dev/null 2>&1 || true
}
trap cleanup EXIT

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -

say "filesystem volume: pvc.yaml + pod.yaml"
k apply -f "$ex/pvc.yaml" -f "$ex/pod.yaml"
k wait pod/qcow2-app --for=condition=Ready --timeout=180s
[ "$(k exec qcow2-app -- cat /data/hello)" = "written by qcow2-app" ] || die "qcow2-app lost its file"
node=$(k get pod qcow2-app -o jsonpath='{.spec.nodeName}')
pv=$(k get pvc qcow2-pvc -o jsonpath='{.spec.volumeName}')
topology=$(kubectl get pv "$pv" \
  -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')
[ "$topology" = "$node" ] || die "the volume's topology ($topology) is not its pod's node ($node)"
echo "bound on $node"

say "snapshot.yaml while qcow2-app runs"
k apply -f "$ex/snapshot.yaml"
k wait volumesnapshot/qcow2-snapshot --for=jsonpath='{.status.readyToUse}'=true --timeout=180s

say "restore.yaml: a 2Gi volume from the 1Gi snapshot, beside its source"
k apply -f "$ex/restore.yaml"
k wait pod/qcow2-restore-reader --for=condition=Ready --timeout=180s
[ "$(k logs qcow2-restore-reader)" = "written by qcow2-app" ] || die "the restore lost the file"
[ "$(k get pod qcow2-restore-reader -o jsonpath='{.spec.nodeName}')" = "$node" ] \
  || die "the restore is not on its snapshot's node"
size=$(k exec qcow2-restore-reader -- df -k /data | awk 'NR==2 {print $2}')
[ "$size" -gt $((1536 * 1024)) ] || die "the restore's filesystem was not grown: ${size} KiB"

say "clone.yaml: a clone of qcow2-pvc"
k apply -f "$ex/clone.yaml"
k wait pod/qcow2-clone-reader --for=condition=Ready --timeout=180s
[ "$(k logs qcow2-clone-reader)" = "written by qcow2-app" ] || die "the clone lost the file"

say "online expansion: pvc-expanded.yaml (1Gi -> 2Gi while qcow2-app runs)"
k apply -f "$ex/pvc-expanded.yaml"
k wait pvc/qcow2-pvc --for=jsonpath='{.status.capacity.storage}'=2Gi --timeout=180s
size=$(k exec qcow2-app -- df -k /data | awk 'NR==2 {print $2}')
[ "$size" -gt $((1536 * 1024)) ] || die "the filesystem did not grow: ${size} KiB"
echo "filesystem now ${size} KiB"

say "block.yaml: a raw block volume"
k apply -f "$ex/block.yaml"
k wait pod/qcow2-block-app --for=condition=Ready --timeout=180s
got=$(k exec qcow2-block-app -- sh -c 'dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -c 14')
[ "$got" = "raw block data" ] || die "the block volume reads back '$got'"

say "encrypted.yaml: an encrypted volume (its Secret and the provisioner's Role in $ns)"
k apply -f "$ex/encrypted.yaml"
k wait pod/qcow2-encrypted-writer --for=condition=Ready --timeout=180s
[ "$(k exec qcow2-encrypted-writer -- cat /data/hello)" = "stored encrypted" ] \
  || die "the encrypted volume lost its file"

say "deleting the source while its snapshot, restore and clone live"
k delete pod qcow2-app --wait=true
k delete pvc qcow2-pvc --wait=true
k exec qcow2-restore-reader -- cat /data/hello >/dev/null
k exec qcow2-clone-reader -- cat /data/hello >/dev/null

say "all example flows passed"
