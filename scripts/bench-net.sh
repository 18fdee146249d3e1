#!/usr/bin/env bash
# Throughput of the guest network, host -> guest (docs/OPERATIONS.md; docs/PERFORMANCE.md
# "Network").
#
# Boots the project's guest on 2 nodes x 1 vCPU with `--net` and has it fetch a 64 MiB
# file over HTTP from the host (busybox httpd on the host's end of the TAP, busybox
# wget in the guest, written to /dev/null), once from vCPU 0 (node 0, where the device
# is) and once from vCPU 1 (node 1: the socket buffers are homed there, the device's
# worker on node 0 reaches them through the DSM). The floor is the same fetch on the
# host over loopback, measured in the same run; the ratios are guest / host.
set -euo pipefail
cd "$(dirname "$0")/.."
dvmm=target/release/dvmm
host_ip=172.30.213.1
port=18080
dir=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
httpd_pid=
run_pid=
cleanup() {
  [ -n "$httpd_pid" ] && kill "$httpd_pid" 2>/dev/null || true
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$dir/www"
head -c 64M /dev/urandom > "$dir/www/64m"

# The host floor: the same transfer over loopback.
busybox httpd -f -p 127.0.0.1:$port -h "$dir/www" & httpd_pid=$!
sleep 0.5
t0=$(date +%s.%N)
busybox wget -q -O /dev/null "http://127.0.0.1:$port/64m"
t1=$(date +%s.%N)
kill "$httpd_pid"; wait "$httpd_pid" 2>/dev/null || true; httpd_pid=
floor=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", 64 * 1.048576 / (b - a)}')

get="wget+-q+-O+/dev/null+http://$host_ip:$port/64m"
script="dvmm.script=sleep+5;taskset+-c+0+time+$get;taskset+-c+1+time+$get;poweroff+-f"
"$dvmm" run --nodes 2 --vcpus 2 --memory 1G --kernel guest/out/vmlinux \
  --initrd guest/out/initramfs.cpio.gz --net --timeout 1800 \
  --cmdline "$script" >"$dir/out" 2>"$dir/err" </dev/null & run_pid=$!
tap=dvmm$run_pid
# The host's end of the TAP exists once node 0 has made it: serve the file there.
for _ in $(seq 1 600); do
  ip -4 addr show dev "$tap" 2>/dev/null | grep -q "$host_ip" && break
  kill -0 "$run_pid" 2>/dev/null || break
  sleep 0.5
done
busybox httpd -f -p "$host_ip:$port" -h "$dir/www" & httpd_pid=$!
wait "$run_pid" || { run_pid=; echo "bench-net: the run failed:" >&2; tail -5 "$dir/err" >&2; exit 1; }
run_pid=
# busybox time: "real<TAB>0m 5.12s"
mapfile -t secs < <(sed -n 's/^real\t\([0-9]*\)m \([0-9.]*\)s.*/\1 \2/p' "$dir/out" | awk '{printf "%.2f\n", $1 * 60 + $2}')
[ "${#secs[@]}" -eq 2 ] || { echo "bench-net: expected 2 timed fetches:" >&2; grep -n "real\|DVMM-GUEST\|wget" "$dir/out" >&2; exit 1; }
grep -q "DVMM-GUEST exit=0 cmd=taskset -c 1" "$dir/out" || { echo "bench-net: a fetch failed:" >&2; grep -n "DVMM-GUEST" "$dir/out" >&2; exit 1; }
i=0
for what in "host -> guest vCPU 0 (node 0)" "host -> guest vCPU 1 (node 1)"; do
  mb=$(awk -v s="${secs[$i]}" 'BEGIN {printf "%.1f", 64 * 1.048576 / s}')
  ratio=$(awk -v a="$mb" -v b="$floor" 'BEGIN {printf "%.4f", a / b}')
  echo "bench-net: $what: 64 MiB in ${secs[$i]} s = $mb MB/s (host loopback $floor MB/s, ratio $ratio)"
  i=$((i + 1))
done
echo "bench-net: $(grep -o "net rx_packets=.*" "$dir/err" | head -1)"
