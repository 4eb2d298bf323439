#!/usr/bin/env bash
# Installs what the test suite needs when it is missing (Debian/Ubuntu): the qemu-img/qemu-io
# oracle, the NBD clients (libnbd-bin, python3-libnbd, nbdfuse), fuse3, xfsprogs, cargo-nextest,
# and the deploy-file checkers (kubernetes-validate, helm-python-sdk, hadolint) in a Python
# venv at .venv-tools. Safe to run repeatedly; does nothing when all is present.
set -euo pipefail

need_pkgs=()
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need_pkgs+=(libnbd-bin)
command -v nbdfuse >/dev/null 2>&1 || need_pkgs+=(nbdfuse)
# The system interpreter's binding (a pyenv or venv python3 on PATH would not see it).
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need_pkgs+=(python3-libnbd)
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v mkfs.xfs >/dev/null 2>&1 || need_pkgs+=(xfsprogs)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
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

# The deploy checkers, pinned; rebuilt when hack/tools-requirements.txt changes.
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-tools"
if ! cmp -s "$root/hack/tools-requirements.txt" "$venv/requirements.txt"; then
  echo "installing the deploy checkers into .venv-tools"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/hack/tools-requirements.txt"
  cp "$root/hack/tools-requirements.txt" "$venv/requirements.txt"
fi
