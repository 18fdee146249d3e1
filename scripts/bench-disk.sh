#!/usr/bin/env bash
# Throughput of the virtio disk (docs/DISK.md; docs/PERFORMANCE.md "Disk").
#
# Boots the project's guest on 2 nodes x 1 vCPU with a scratch raw image of 192 MiB and
# runs, with direct I/O (no guest page cache), 64 MiB of sequential writes and then
# reads in 1 MiB requests from vCPU 0 (node 0, where the device is) and from vCPU 1
# (node 1: the buffers are homed there and the device's worker on node 0 reaches them
# through the DSM). The floor is the host's own direct-I/O throughput on the same file
# system, measured in the same run; the ratios are guest / host.
set -euo pipefail
cd "$(dirname "$0")/.."
dvmm=target/release/dvmm
dir=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'rm -rf "$dir"' EXIT
img=$dir/bench.img
truncate -s 192M "$img"

host() { # $1: read|write -> MB/s of the host's dd on a file next to the image
  local f=$dir/host.bin out
  if [ "$1" = write ]; then
    out=$(dd if=/dev/zero of="$f" bs=1M count=64 oflag=direct conv=fsync 2>&1)
  else
    out=$(dd if="$f" of=/dev/null bs=1M count=64 iflag=direct 2>&1)
  fi
  echo "$out" | sed -n 's/.*copied, \([0-9.]*\) s.*/\1/p' | awk '{printf "%.1f", 64 * 1.048576 / $1}'
}

script="dvmm.script=taskset+-c+0+time+dd+if=/dev/zero+of=/dev/vda+bs=1M+count=64+oflag=direct+conv=fsync"
script+=";taskset+-c+1+time+dd+if=/dev/zero+of=/dev/vda+bs=1M+count=64+seek=64+oflag=direct+conv=fsync"
script+=";taskset+-c+0+time+dd+if=/dev/vda+of=/dev/null+bs=1M+count=64+iflag=direct"
script+=";taskset+-c+1+time+dd+if=/dev/vda+of=/dev/null+bs=1M+count=64+skip=64+iflag=direct"
script+=";poweroff+-f"
"$dvmm" run --nodes 2 --vcpus 2 --memory 1G --kernel guest/out/vmlinux \
  --initrd guest/out/initramfs.cpio.gz --disk "$img" --timeout 1200 \
  --cmdline "$script" >"$dir/out" 2>"$dir/err" || {
  echo "bench-disk: the run failed:" >&2; tail -5 "$dir/err" >&2; exit 1; }
# busybox time: "real<TAB>0m 5.12s"
mapfile -t secs < <(sed -n 's/^real\t\([0-9]*\)m \([0-9.]*\)s.*/\1 \2/p' "$dir/out" | awk '{printf "%.2f\n", $1 * 60 + $2}')
[ "${#secs[@]}" -eq 4 ] || { echo "bench-disk: expected 4 timed dd runs:" >&2; grep -n "real\|DVMM-GUEST" "$dir/out" >&2; exit 1; }
hw=$(host write); hr=$(host read)
i=0
for what in "write vCPU 0 (node 0)" "write vCPU 1 (node 1)" "read  vCPU 0 (node 0)" "read  vCPU 1 (node 1)"; do
  mb=$(awk -v s="${secs[$i]}" 'BEGIN {printf "%.1f", 64 * 1.048576 / s}')
  case "$what" in write*) floor=$hw ;; *) floor=$hr ;; esac
  ratio=$(awk -v a="$mb" -v b="$floor" 'BEGIN {printf "%.3f", a / b}')
  echo "bench-disk: $what: 64 MiB in ${secs[$i]} s = $mb MB/s (host direct I/O $floor MB/s, ratio $ratio)"
  i=$((i + 1))
done
echo "bench-disk: $(grep -o "disk requests=.*" "$dir/err" | head -1)"
