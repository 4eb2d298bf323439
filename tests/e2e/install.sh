#!/usr/bin/env bash
# Installs the snapshot prerequisites (CRDs, snapshot-controller with distributed
# snapshotting) and qcow2-csi (the Helm chart when helm is installed, else deploy/), then
# waits until every node registered the driver.
#   tests/e2e/install.sh [helm|manifests]
source "$(dirname "$0")/lib.sh"
need kubectl curl

how="${1:-}"
if [ -z "$how" ]; then
  if command -v helm >/dev/null 2>&1; then how=helm; else how=manifests; fi
fi

say "snapshot CRDs and snapshot-controller $SNAPSHOTTER_VERSION"
base="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$SNAPSHOTTER_VERSION"
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  kubectl apply -f "$base/client/config/crd/snapshot.storage.k8s.io_$crd.yaml"
done
kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml"
# Distributed snapshotting: the controller labels each snapshot with its volume's node
# (reading Nodes), and each node's csi-snapshotter takes its own.
if ! kubectl get clusterrole snapshot-controller-runner -o jsonpath='{.rules[*].resources}' \
    | grep -qw nodes; then
  kubectl patch clusterrole snapshot-controller-runner --type=json -p \
    '[{"op":"add","path":"/rules/-","value":{"apiGroups":[""],"resources":["nodes"],"verbs":["get","list","watch"]}}]'
fi
if ! kubectl -n kube-system get deploy snapshot-controller \
    -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q enable-distributed-snapshotting; then
  kubectl -n kube-system patch deploy snapshot-controller --type=json -p \
    '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--enable-distributed-snapshotting"}]'
fi
kubectl -n kube-system rollout status deploy/snapshot-controller --timeout=180s

say "qcow2-csi ($how)"
case "$how" in
  helm)
    need helm
    kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
    kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite
    helm upgrade --install qcow2-csi "$ROOT/charts/qcow2-csi" --namespace "$NAMESPACE" \
      --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --wait --timeout 5m
    ;;
  manifests)
    [ "$NAMESPACE" = qcow2-csi ] || die "deploy/ is rendered for namespace qcow2-csi"
    kubectl apply -f "$ROOT/deploy/qcow2-csi.yaml"
    if ! grep -q "image: $IMAGE\$" "$ROOT/deploy/qcow2-csi.yaml"; then
      kubectl -n "$NAMESPACE" set image daemonset/qcow2-csi-node "qcow2-csi=$IMAGE" "load-nbd=$IMAGE"
    fi
    ;;
  *)
    die "install with helm or manifests, not $how"
    ;;
esac
kubectl -n "$NAMESPACE" rollout status daemonset/qcow2-csi-node --timeout=300s

say "waiting for every node to register qcow2.csi.dev"
nodes=$(kubectl get nodes -o name | wc -l)
for _ in $(seq 60); do
  registered=$(kubectl get csinodes -o jsonpath='{range .items[*]}{.spec.drivers[*].name}{"\n"}{end}' \
    | grep -cx qcow2.csi.dev || true)
  [ "$registered" -eq "$nodes" ] && break
  sleep 2
done
kubectl get csinodes -o jsonpath='{range .items[*]}{.metadata.name}: {.spec.drivers[*].name}{"\n"}{end}'
[ "$registered" -eq "$nodes" ] || die "$registered of $nodes nodes registered the driver"
