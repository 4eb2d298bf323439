#!/usr/bin/env bash
# Installs what the test suite needs when it is missing (Debian/Ubuntu): the qemu-img/qemu-io
# oracle, the NBD clients (libnbd-bin, python3-libnbd, nbdfuse), fuse3, xfsprogs, fio,
# promtool (Debian's prometheus package),
# user-mode Linux with kmod (the kernel-nbd tests run inside it), cargo-nextest,
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
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
command -v fsfreeze >/dev/null 2>&1 || need_pkgs+=(util-linux)
# promtool: the chart's alerts and the plugin's live /metrics are checked with it.
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
# A Linux 6.1 kernel run as a process, with nbd.ko: the kernel-nbd tests (hack/uml-run.sh).
command -v linux.uml >/dev/null 2>&1 || need_pkgs+=(user-mode-linux)
[ -x /usr/sbin/insmod ] || [ -x /sbin/insmod ] || need_pkgs+=(kmod)
command -v ps >/dev/null 2>&1 || need_pkgs+=(procps)
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
