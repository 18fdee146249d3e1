#!/usr/bin/env bash
# Builds guest/out/disk.img: a small ext4 image (mkfs.ext4 -d) with files the tests
# read from the guest, for `dvmm run --disk` (docs/DISK.md). Called by guest/build.sh;
# cached: a second run with the same inputs does nothing. The image is a template:
# tests and the demo use a copy, so it stays as built.
#   /hello.txt      one line of text
#   /data.bin       1 MiB of a fixed pattern
#   /data.sha256    its checksum, in `sha256sum -c` form
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$here/.." && pwd)/out
img=$out/disk.img
size_mib=${DISK_MIB:-32}

command -v mkfs.ext4 >/dev/null 2>&1 || {
  echo "guest: installing e2fsprogs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq e2fsprogs >/dev/null
}
e2_ver=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || mkfs.ext4 -V 2>&1 | head -1)
key=$(sha256sum "$here/build.sh" | cut -c1-16)-$size_mib-$e2_ver
mkdir -p "$out"
if [ -f "$img" ] && [ "$(cat "$out/disk.key" 2>/dev/null)" = "$key" ]; then
  echo "guest: disk image is up to date ($img)"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "hello from the host's disk image" > "$root/hello.txt"
# A fixed pattern (the same bytes on every build), so the tests know what to expect:
# the numbers 0..131071, eight digits each.
seq -f "%08g" 0 131071 | tr -d '\n' > "$root/data.bin"
(cd "$root" && sha256sum data.bin > data.sha256)
rm -f "$img.tmp"
# No journal resize or lazy init surprises: a fixed UUID and timestamp make the image
# reproducible; lazy_itable_init=0 so the guest kernel starts no background zeroing.
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L dvmm-disk -U 6d76646d-6469-736b-0000-000000000001 \
  -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 -d "$root" "$img.tmp" "${size_mib}M"
mv "$img.tmp" "$img"
echo "$key" > "$out/disk.key"
echo "guest: built $img (${size_mib} MiB ext4)"
