#!/usr/bin/env bash
# Builds and runs the syscall probe (see syscall-probe.c): plain, with int $0x80 first,
# and with a hardware breakpoint at LSTAR. Needs /dev/kvm, gcc and binutils.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
build() { # $1: extra assembler define
  gcc -c $1 -o guest.o "$here/syscall-probe.S"
  objcopy -O binary -j .text guest.o kernel.bin
  objcopy -O binary -j .user guest.o user.bin
  off() { printf '0x%s' "$(nm guest.o | awk -v s="$1" '$3 == s { print $1 }')"; }
  gcc -O1 -o probe "$here/syscall-probe.c" -DPF="$(off pf_handler)" -DGP="$(off gp_handler)" \
    -DUD="$(off ud_handler)" -DI80="$(off int80_handler)" -DSYSENTRY="$(off sysentry)"
}
build ""
echo "== syscall from CPL3"; ./probe
echo "== syscall from CPL3, hardware breakpoint at LSTAR"; HWBP=1 FIX=1 ./probe
build "-DUSER_INT80"
echo "== int \$0x80 from CPL3"; ./probe
