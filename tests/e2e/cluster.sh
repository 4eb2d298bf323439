#!/usr/bin/env bash
# Creates (up) or deletes (down) the kind cluster, builds the image and loads it (image).
#   tests/e2e/cluster.sh up | image | down
source "$(dirname "$0")/lib.sh"

case "${1:-}" in
  up)
    need kind kubectl docker
    mkdir -p "$WORK"
    if kind get clusters | grep -qx "$CLUSTER"; then
      say "kind cluster $CLUSTER exists"
      kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
    else
      say "creating kind cluster $CLUSTER"
      kind create cluster --name "$CLUSTER" --config "$ROOT/tests/e2e/kind-config.yaml" \
        --kubeconfig "$KUBECONFIG" --wait 120s
    fi
    ;;
  image)
    need kind docker
    say "building $IMAGE"
    docker build -t "$IMAGE" "$ROOT"
    say "loading $IMAGE into $CLUSTER"
    kind load docker-image "$IMAGE" --name "$CLUSTER"
    ;;
  down)
    need kind
    kind delete cluster --name "$CLUSTER"
    ;;
  *)
    echo "usage: $0 up|image|down" >&2
    exit 2
    ;;
esac
