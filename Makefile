# dvmm: a distributed virtual machine monitor.
#   make demo   installs what is missing, builds everything, boots the guest
#   make test   runs the whole test suite

CARGO ?= cargo
DVMM := target/release/dvmm

.PHONY: all deps build guest guest-bzimage distro-kernel demo test test-rust test-heavy test-bzimage test-distro clippy check-dsm bench bench-distro bench-xsave bench-disk bench-idle bench-net clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --all-targets

guest: deps
	@guest/build.sh

# The same kernel as a bzImage, guest/out/bzImage: links the kernel's boot stub and its
# compressed payload around the vmlinux `make guest` built (nothing else is rebuilt).
guest-bzimage: guest
	$(MAKE) -C guest/build/linux-source-6.1 -s bzImage
	cp guest/build/linux-source-6.1/arch/x86/boot/bzImage guest/out/bzImage

# The VMM unpacks that bzImage into the very vmlinux it was made from (no guest boot).
test-bzimage: guest-bzimage
	$(CARGO) test --release -p dvmm-vmm --lib a_real_bzimage_unpacks_to_its_vmlinux -- --ignored

# Debian's stock kernel (the package linux-image-amd64 depends on) in guest/distro/:
# vmlinuz as shipped and the vmlinux extracted from it (docs/COMPAT.md).
distro-kernel: guest
	@scripts/fetch-distro-kernel.sh

# That kernel booted on 2 nodes to user space, as bzImage and as vmlinux (~15 minutes
# per boot on a software-KVM host).
test-distro: build guest distro-kernel
	$(CARGO) test --release -p dvmm --test distro -- --ignored --test-threads=1

# The bzImage boot against its own vmlinux: time to `smp: Brought up` (goal <= 1.2x).
bench-distro: build guest distro-kernel
	$(DVMM) bench boot --shapes 2x1 --kernels guest/distro/vmlinux,guest/distro/vmlinuz

# What the emulated XSAVE/XRSTOR costs a guest context switch (software-KVM hosts).
bench-xsave: build guest
	@scripts/bench-xsave.sh

# The DSM traffic of an idle 2-node guest, and with one CPU busy in user mode, with and
# without the NUMA topology (read live from the nodes' control sockets).
bench-idle: build guest
	$(DVMM) bench idle

# Host -> guest throughput of the guest network (64 MiB over HTTP, from each node).
bench-net: build guest
	@scripts/bench-net.sh

# Sequential read and write of the virtio disk from a vCPU on each of 2 nodes.
bench-disk: build guest
	@scripts/bench-disk.sh

# The guest on a 2-node local cluster (one vCPU per node process), at a busybox shell
# prompt on the console, with a disk (a copy of guest/out/disk.img made on the first
# demo and kept: mount -t ext4 /dev/vda /mnt). Leave with `poweroff -f` in the guest,
# or Ctrl-A x.
demo: build guest
	@[ -f guest/out/demo-disk.img ] || cp guest/out/disk.img guest/out/demo-disk.img
	$(DVMM) run --nodes 2 --vcpus 2 --memory 1G --initrd guest/out/initramfs.cpio.gz --disk guest/out/demo-disk.img

# The whole suite: lints, unit tests, the DSM model check (small configuration),
# multi-process DSM tests, and real guest boots under KVM.
test: build guest clippy test-rust

test-rust:
	$(CARGO) test --release --workspace -- --test-threads=1

# Heavier guest runs kept out of the default suite (2 nodes x 4 vCPUs smptest).
test-heavy: build guest
	$(CARGO) test --release -p dvmm --test programs --test locktorture -- --ignored --test-threads=1

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# The exhaustive DSM check on the full configuration (3 nodes x 2 pages x 2 ops).
check-dsm:
	@scripts/check-dsm.sh

# Benchmarks (numbers for docs/PERFORMANCE.md).
bench: build guest
	$(DVMM) bench boot
	$(DVMM) bench ssi
	$(DVMM) bench dsm --nodes 3
	$(DVMM) bench cluster

clean:
	$(CARGO) clean
	rm -rf guest/out guest/build
