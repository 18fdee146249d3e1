#!/usr/bin/env bash
# Builds the dvmm guest kernel (unmodified Linux 6.1 from Debian's linux-source-6.1)
# into guest/out/vmlinux, then the initramfs guest/out/initramfs.cpio.gz (see
# guest/initramfs/build.sh). Installs what it needs when missing. Cached: a second run
# with the same config, script and source does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
build=$here/build
jobs=${JOBS:-$(( $(nproc) + 1 ))}

need_pkgs=()
[ -f /usr/src/linux-source-6.1.tar.xz ] || need_pkgs+=(linux-source-6.1)
for tool in gcc make flex bison bc xz cpio; do
  command -v $tool >/dev/null 2>&1 || need_pkgs+=($tool)
done
[ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need_pkgs+=(libssl-dev)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh && file -b /bin/busybox 2>/dev/null | grep -q static || need_pkgs+=(busybox-static)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  # xz comes from xz-utils, make from make, gcc from build-essential
  pkgs=$(printf '%s\n' "${need_pkgs[@]}" | sed -e 's/^xz$/xz-utils/' -e 's/^gcc$/build-essential/' | sort -u | tr '\n' ' ')
  echo "guest: installing $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $pkgs >/dev/null
fi

src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || echo unknown)
# The key covers the config and this script up to the initramfs section below.
key=$(cat "$here/dvmm.config" <(sed '/^# ---- initramfs/,$d' "$here/build.sh") | sha256sum | cut -c1-16)-$src_ver
mkdir -p "$out"
if [ -f "$out/vmlinux" ] && [ "$(cat "$out/vmlinux.key" 2>/dev/null)" = "$key" ]; then
  echo "guest: vmlinux is up to date ($out/vmlinux)"
else
  srcdir=$build/linux-source-6.1
  if [ ! -f "$srcdir/Makefile" ]; then
    echo "guest: unpacking linux-source-6.1 $src_ver"
    rm -rf "$build"; mkdir -p "$build"
    tar -C "$build" -xf /usr/src/linux-source-6.1.tar.xz
  fi
  echo "guest: configuring (tinyconfig + guest/dvmm.config)"
  make -C "$srcdir" -s tinyconfig >/dev/null
  "$srcdir/scripts/kconfig/merge_config.sh" -m -O "$srcdir" "$srcdir/.config" "$here/dvmm.config" >/dev/null
  make -C "$srcdir" -s olddefconfig >/dev/null
  # Every option of the fragment must have survived olddefconfig.
  missing=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) grep -qx "$line" "$srcdir/.config" || { echo "guest: option not applied: $line" >&2; missing=1; } ;;
      "# CONFIG_"*" is not set") grep -qx "$line" "$srcdir/.config" || grep -q "^${line#\# }" "$srcdir/.config" || true ;;
    esac
  done < "$here/dvmm.config"
  [ $missing -eq 0 ] || { echo "guest: config fragment not fully applied" >&2; exit 1; }
  echo "guest: building vmlinux with -j$jobs (a few minutes)"
  make -C "$srcdir" -s -j"$jobs" vmlinux
  cp "$srcdir/vmlinux" "$out/vmlinux.tmp"
  strip --strip-debug "$out/vmlinux.tmp" 2>/dev/null || true
  mv "$out/vmlinux.tmp" "$out/vmlinux"
  cp "$srcdir/.config" "$out/config"
  echo "$key" > "$out/vmlinux.key"
  echo "guest: built $out/vmlinux"
fi
# ---- initramfs (not part of the kernel's cache key) ----
# busybox, /init and smptest: guest/initramfs/build.sh has its own cache key, so that a
# change there does not rebuild the kernel.
"$here/initramfs/build.sh"
# The kernel's symbols, next to it: `dvmm stats` names hot guest pages with them.
if [ -f "$build/linux-source-6.1/System.map" ] && ! cmp -s "$build/linux-source-6.1/System.map" "$out/System.map"; then
  cp "$build/linux-source-6.1/System.map" "$out/System.map"
fi
# The ext4 disk image for --disk (guest/disk/build.sh, its own cache key).
"$here/disk/build.sh"
