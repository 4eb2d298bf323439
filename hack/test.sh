#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs missing test dependencies, then runs every
# test with the oracle required (a test that would skip for lack of qemu-img fails instead).
set -euo pipefail
cd "$(dirname "$0")/.."
./hack/test-deps.sh
export QCOW2_CSI_REQUIRE_ALL=1
cargo nextest run --workspace --no-fail-fast "$@"
