#!/usr/bin/env bash
# Installs what the test suite needs when it is missing (Debian/Ubuntu): the qemu-img/qemu-io
# oracle, nbdinfo (libnbd-bin) and cargo-nextest. Safe to run repeatedly; does nothing when all is present.
set -euo pipefail

need_pkgs=()
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
if ((${#need_pkgs[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing test dependencies: ${need_pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
