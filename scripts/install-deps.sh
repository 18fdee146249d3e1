#!/usr/bin/env bash
# Installs the system packages dvmm's build, guest and tests need, when missing.
# Run as root on a Debian 12 machine of the project's kind (the Rust toolchain is
# expected to be there already).
set -euo pipefail
pkgs=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || pkgs+=("$1"); }
for p in linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev \
         busybox-static cpio xz-utils iproute2 tmux libclang-dev; do
  need "$p"
done
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "deps: installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
[ -e /dev/kvm ] || { echo "deps: /dev/kvm is missing: dvmm needs KVM" >&2; exit 1; }
command -v cargo >/dev/null || { echo "deps: cargo is missing: install a Rust toolchain" >&2; exit 1; }
