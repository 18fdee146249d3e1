#!/usr/bin/env bash
# Fetches Debian's stock kernel, the image package that `linux-image-amd64` depends on,
# into guest/distro/: vmlinuz (the bzImage as shipped), vmlinux (the ELF inside it,
# extracted with the kernel tree's own scripts/extract-vmlinux, independent of the
# VMM's unpacker), config and VERSION. Needs `make guest` first (for that script).
set -euo pipefail
cd "$(dirname "$0")/.."
out=guest/distro
extract=guest/build/linux-source-6.1/scripts/extract-vmlinux
if [ -f "$out/vmlinuz" ] && [ -f "$out/vmlinux" ]; then
  echo "distro: $(cat "$out/VERSION" 2>/dev/null) is in $out"
  exit 0
fi
command -v apt-get >/dev/null || { echo "distro: needs apt-get (a Debian machine)" >&2; exit 1; }
[ -x "$extract" ] || { echo "distro: $extract is missing: run \`make guest\` first" >&2; exit 1; }
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "distro: apt knows no linux-image-amd64" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
echo "distro: downloading $pkg"
(cd "$tmp" && apt-get download -qq "$pkg" 2>&1 | grep -v "unsandboxed" || true)
deb=$(ls "$tmp"/*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || { echo "distro: apt-get download $pkg fetched nothing" >&2; exit 1; }
dpkg-deb -x "$deb" "$tmp/x"
mkdir -p "$out"
cp "$tmp"/x/boot/vmlinuz-* "$out/vmlinuz.tmp"
cp "$tmp"/x/boot/config-* "$out/config"
"$extract" "$out/vmlinuz.tmp" > "$out/vmlinux.tmp"
[ "$(head -c 5 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = "7f454c4602" ] || { echo "distro: extracting the vmlinux failed" >&2; exit 1; }
mv "$out/vmlinux.tmp" "$out/vmlinux"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$pkg" > "$out/VERSION"
echo "distro: $pkg in $out (vmlinuz, vmlinux, config)"
