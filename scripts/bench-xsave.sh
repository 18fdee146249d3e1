#!/usr/bin/env bash
# What the emulated XSAVE/XRSTOR costs a guest context switch on a software-KVM host
# (docs/COMPAT.md, "Extended state"; docs/PERFORMANCE.md).
#
# Boots the project's guest on 1 node with 1 vCPU and runs `avxtest procs ROUNDS` (two
# processes on one vCPU passing the turn through pipes: 2 context switches a round),
# once with the emulated XSAVE (the default) and once with `noxsave` (the kernel then
# saves only the FXSAVE image, which the backend runs itself), REPS times, alternately.
# Prints each run's microseconds per round and the VMM's emulated exits, then the
# medians, the cost per context switch ((xsave - noxsave) / 2) and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-2000}
reps=${REPS:-2}
dvmm=target/release/dvmm
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

run() { # $1: label, $2: extra command line
  local out="$log/$1.out" err="$log/$1.err"
  "$dvmm" run --nodes 1 --vcpus 1 --memory 1G --kernel guest/out/vmlinux \
    --initrd guest/out/initramfs.cpio.gz --timeout 900 \
    --cmdline "$2 dvmm.script=avxtest+procs+$rounds;poweroff+-f" >"$out" 2>"$err" || {
    echo "bench-xsave: the $1 run failed:" >&2; tail -5 "$err" >&2; exit 1; }
  local us emulated
  us=$(sed -n 's/^AVXTEST .*us_per_round=\([0-9.]*\).*/\1/p' "$out")
  emulated=$(sed -n 's/.*stats vcpu0 .* emulated=\([0-9]*\).*/\1/p' "$err" | tail -1)
  [ -n "$us" ] || { echo "bench-xsave: no avxtest line in the $1 run" >&2; exit 1; }
  echo "$1 us_per_round=$us emulated_exits=${emulated:-?} ($(grep -o 'corrupt=[0-9]*' "$out"))"
  echo "$us" >>"$log/$1.us"
}

median() { sort -g "$1" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo "bench-xsave: avxtest procs $rounds, 1 node x 1 vCPU, $reps runs each"
for _ in $(seq "$reps"); do
  run xsave ""
  run noxsave "noxsave"
done
x=$(median "$log/xsave.us")
n=$(median "$log/noxsave.us")
awk -v x="$x" -v n="$n" 'BEGIN {
  printf "XSAVE-BENCH us_per_round xsave=%.1f noxsave=%.1f per_switch_us=%.1f ratio=%.2f\n",
    x, n, (x - n) / 2, x / n }'
