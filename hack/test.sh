#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs missing test dependencies, gates formatting,
# lints (warnings denied) and the API docs (broken links denied), then runs every test with
# the oracle required (a test that would skip for lack of qemu-img fails instead).
set -euo pipefail
cd "$(dirname "$0")/.."
./hack/test-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
export QCOW2_CSI_REQUIRE_ALL=1
cargo nextest run --workspace --no-fail-fast "$@"
