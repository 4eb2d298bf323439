#!/usr/bin/env bash
# Runs one command as root inside user-mode Linux: Debian's `user-mode-linux` package, a
# Linux 6.1 kernel that runs as an ordinary process and ships nbd.ko. The host's filesystem
# is the kernel's root (hostfs), so our binaries, mkfs, fio and qemu-img run unchanged, as
# root with every capability, against a real nbd driver.
#
#   hack/uml-run.sh [--mem 1G] [--timeout SECS] [--env NAME=VALUE]... -- COMMAND [ARGS...]
#
# Inside: proc, sysfs, a tmpfs on /run and /dev/shm, devtmpfs on /dev (the kernel makes
# /dev/nbdN itself; no udev), the nbd module loaded, the working directory kept, the
# environment reset to PATH, HOME, TMPDIR, QCOW2_CSI_IN_UML=1 and the --env pairs.
# COMMAND's output is printed when the kernel halts, and the kernel log too when COMMAND
# failed (or always with UML_SHOW_KERNEL_LOG=1). When COMMAND hangs, a watchdog inside
# notes the tasks blocked in the kernel, with their stacks, 20 s before the timeout.
#
# Exit status: COMMAND's; 125 when the kernel could not run it (missing package, boot
# failure, timeout).
set -euo pipefail

mem=1G
timeout_s=1200
envs=()
while (($#)); do
  case "$1" in
    --mem) mem="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "uml-run: unknown option $1" >&2; exit 125 ;;
  esac
done
(($#)) || { echo "uml-run: no command" >&2; exit 125; }

kernel=$(command -v linux.uml || true)
if [ -z "$kernel" ]; then
  echo "uml-run: linux.uml is missing (apt-get install user-mode-linux kmod)" >&2
  exit 125
fi
if ! command -v insmod >/dev/null 2>&1 && [ ! -x /usr/sbin/insmod ] && [ ! -x /sbin/insmod ]; then
  echo "uml-run: insmod is missing (apt-get install kmod)" >&2
  exit 125
fi

# The run directory must be on the host's filesystem, which the kernel sees as its root.
run=$(mktemp -d "${TMPDIR:-/tmp}/uml-run.XXXXXX")
# However this script ends (a test runner's timeout kills it), the kernel ends with it.
trap 'pkill -KILL -f "init=$run/init" 2>/dev/null || true; rm -rf "$run"' EXIT
trap 'exit 125' TERM INT HUP
printf '%q ' "$@" >"$run/command"
: >"$run/env"
for e in "${envs[@]}"; do printf '%q\n' "$e" >>"$run/env"; done
if [ -n "${QCOW2_CSI_REQUIRE_ALL:-}" ]; then
  printf '%q\n' "QCOW2_CSI_REQUIRE_ALL=$QCOW2_CSI_REQUIRE_ALL" >>"$run/env"
fi

# The watchdog's moment: 20 s before the timeout (a quarter before, for short ones).
if ((timeout_s > 80)); then watchdog_s=$((timeout_s - 20)); else watchdog_s=$((timeout_s * 3 / 4)); fi

cat >"$run/init" <<EOF
#!/bin/sh
# PID 1 inside the user-mode kernel.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 run /run
mkdir -p /run/lock
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
[ -e /dev/nbd0 ] || mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modules=/usr/lib/uml/modules/\$(uname -r)/kernel/drivers/block
insmod \$modules/nbd.ko nbds_max=16 >$run/insmod.log 2>&1 || echo "insmod nbd failed" >>$run/insmod.log
insmod \$modules/loop.ko >>$run/insmod.log 2>&1 || true
hostname uml
ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || true
cd $(printf '%q' "$PWD")
# Shortly before the host's timeout kills the kernel, say what is stuck: every task asleep
# in the kernel (D state) with its kernel stack, and the kernel log. (sysrq-t/w crash this
# kernel when a worker thread is blocked, so the stacks come from /proc.)
(
  sleep $watchdog_s
  {
    echo "--- uml-run: still running after ${watchdog_s} s; tasks blocked in the kernel:"
    ps -eo pid,stat,wchan:32,args | awk 'NR == 1 || \$2 ~ /^D/'
    for s in /proc/[0-9]*/stat; do
      pid=\${s#/proc/}; pid=\${pid%/stat}
      case "\$(cut -d' ' -f3 \$s 2>/dev/null)" in
        D) echo "-- \$pid \$(cat /proc/\$pid/comm 2>/dev/null):"; cat /proc/\$pid/stack 2>/dev/null ;;
      esac
    done
  } >$run/hung.log 2>&1
  dmesg >$run/kernel.log 2>&1
) </dev/null >/dev/null 2>&1 &
(
  set -a
  while IFS= read -r line; do eval "export \$line"; done <$run/env
  export QCOW2_CSI_IN_UML=1 HOME=/root TMPDIR=$(printf '%q' "${TMPDIR:-/tmp}") RUST_BACKTRACE=1
  eval "exec \$(cat $run/command)"
) >$run/out.log 2>&1 </dev/null
echo \$? >$run/rc.tmp
dmesg >$run/kernel.log 2>&1
# Only the host's filesystem: a plain sync would wait on a device whose server is gone.
sync -f $run/rc.tmp
mv $run/rc.tmp $run/rc
sync -f $run/rc
halt -f
EOF
chmod +x "$run/init"

set +e
timeout --kill-after=10 "$timeout_s" "$kernel" "mem=$mem" root=/dev/root rootfstype=hostfs \
  rootflags=/ rw "init=$run/init" "uml_dir=$run" con=null con0=fd:0,fd:1 </dev/null >"$run/console.log" 2>&1
booted=$?
set -e

cat "$run/out.log" 2>/dev/null || true
rc=125
[ -f "$run/rc" ] && rc=$(cat "$run/rc")
if [ "$rc" != 0 ] || [ -n "${UML_SHOW_KERNEL_LOG:-}" ]; then
  echo "--- uml-run: kernel exit $booted, command exit $rc; insmod:" >&2
  cat "$run/insmod.log" >&2 2>/dev/null || true
  cat "$run/hung.log" >&2 2>/dev/null || true
  echo "--- kernel log:" >&2
  # What the kernel said once it started COMMAND (the boot messages are noise), with nbd's
  # once-a-second "Possible stuck request" lines cut to the first few and a count.
  if grep -q 'as init process' "$run/kernel.log" 2>/dev/null; then
    sed -n '/as init process/,$p' "$run/kernel.log"
  elif [ -s "$run/kernel.log" ]; then
    cat "$run/kernel.log" # the boot messages have left the ring buffer
  else
    cat "$run/console.log"
  fi | awk '/Possible stuck request/ { if (++stuck > 5) next } { print }
            END { if (stuck > 5) printf "[%d more \"Possible stuck request\" lines]\n", stuck - 5 }' \
    | tail -n 300 >&2
fi
exit "$rc"
