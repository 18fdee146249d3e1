#!/usr/bin/env bash
# Builds guest/out/initramfs.cpio.gz: Debian's static busybox (busybox-static), the
# /init script of this directory and the test programs (static C); and
# guest/out/idle.cpio, whose /init only waits (for kernel-only runs such as
# locktorture). Called by guest/build.sh after the kernel; cached: a second run with
# the same inputs does nothing. See docs/GUEST-USERMODE.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(cd "$here/.." && pwd)/out
busybox=/bin/busybox

need_pkgs=()
{ [ -x $busybox ] && file -b $busybox 2>/dev/null | grep -q static; } || need_pkgs+=(busybox-static)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(build-essential)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need_pkgs+=(libc6-dev)
command -v cpio >/dev/null 2>&1 || need_pkgs+=(cpio)
command -v file >/dev/null 2>&1 || need_pkgs+=(file)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "guest: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

bb_ver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum $busybox | cut -c1-16)
cc_ver=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
key=$(cat "$here/build.sh" "$here/init" "$here/power-button" "$here"/*.c | sha256sum | cut -c1-16)-$bb_ver-$cc_ver
mkdir -p "$out"
if [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/idle.cpio" ] && [ "$(cat "$out/initramfs.key" 2>/dev/null)" = "$key" ]; then
  echo "guest: initramfs is up to date ($out/initramfs.cpio.gz)"
  exit 0
fi

echo "guest: building initramfs (busybox $bb_ver, smptest)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc}
cp $busybox "$root/bin/busybox"
# No symlink per applet: Debian's busybox shell runs every applet by name itself
# (FEATURE_SH_STANDALONE, through /proc/self/exe), and each of its ~270 symlinks cost
# the guest kernel ~75 ms to create at unpack time on a software-KVM host (20 s in
# all). Only the shell's own path exists.
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/init" "$root/init"
# One static program for the test tools (each static glibc copy costs the guest ~3 s
# to unpack): /bin/smptest and /bin/avxtest are links to /bin/usertest, which runs
# smptest's or avxtest's main when called by that name.
gcc -static -O2 -pthread -Wall -Wextra -c -Dmain=smptest_main -o "$root/smptest.o" "$here/smptest.c"
gcc -static -O2 -pthread -Wall -Wextra -c -o "$root/avxtest.o" "$here/avxtest.c"
gcc -static -O2 -pthread -Wall -Wextra -s -o "$root/bin/usertest" "$here/usertest.c" "$root/smptest.o" "$root/avxtest.o"
rm -f "$root/smptest.o" "$root/avxtest.o"
ln -s usertest "$root/bin/smptest"
ln -s usertest "$root/bin/avxtest"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
# The ACPI power button's action for busybox acpid (started by /init).
mkdir -p "$root/etc/acpi/PWRF"
install -m 0755 "$here/power-button" "$root/etc/acpi/PWRF/00000080"
# The kernel opens /dev/console for /init before anything is mounted (its built-in
# initramfs has one too; this one is kept for kernels without it).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out/initramfs.cpio.tmp"
# The guest unpacks with the kernel's inflate, which is slow on a software KVM host
# (see docs/GUEST-USERMODE.md): a low level keeps the unpack time down.
gzip -n -${GZIP_LEVEL:-1} < "$out/initramfs.cpio.tmp" > "$out/initramfs.cpio.gz.tmp"
rm -f "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
# The idle initramfs: one static program without libc as /init.
idle=$(mktemp -d)
gcc -static -nostdlib -O2 -fno-stack-protector -fno-asynchronous-unwind-tables -Wall -s \
  -o "$idle/init" "$here/idle.c"
(cd "$idle" && echo init | cpio -o -H newc -R 0:0 --quiet) > "$out/idle.cpio.tmp"
rm -rf "$idle"
mv "$out/idle.cpio.tmp" "$out/idle.cpio"
echo "$key" > "$out/initramfs.key"
echo "guest: built $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)"
