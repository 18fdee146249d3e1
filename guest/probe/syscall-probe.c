/*
 * syscall-probe: what this host's KVM does when guest user mode (CPL3) executes
 * `syscall` (see docs/GUEST-USERMODE.md; built and run by guest/probe/run.sh).
 *
 * A one-vCPU VM with a Linux-like GDT (kernel CS 0x10, user CS 0x33), IDT, TSS and page
 * tables (kernel mapped supervisor-only at 0xffffffff80200000, user code at 0x100000).
 * The guest kernel (syscall-probe.S) programs EFER.SCE/STAR/LSTAR/SFMASK and iretq's
 * to user code that executes `syscall`. Every exit is printed with the vCPU state; for
 * the exception handlers also the exception frame (error code, rip, cs, rflags, rsp,
 * ss). Expected on a correct KVM: "io port e1" at LSTAR with cs 0x10 (CPL0),
 * rcx = user rip after the syscall, r11 = user rflags.
 *
 * Knobs (environment): STAR=hex overrides the guest's STAR after it is written;
 * HWBP=1 sets a KVM_GUESTDBG_USE_HW_BP breakpoint at LSTAR (FIX=1 then moves the vCPU
 * to CPL0 at the debug exit); FILTER=msr denies reads of that MSR with an MSR filter
 * (user-space MSR exits); NOCPUID=1 skips KVM_SET_CPUID2.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MEM (8 << 20)
#define KBASE 0xffffffff80200000ULL
#define die(s) do { perror(s); exit(1); } while (0)
static int vcpu; static struct kvm_run *run;
static uint64_t getmsr(uint32_t i) {
	struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = { .h.nmsrs = 1, .e.index = i };
	if (ioctl(vcpu, KVM_GET_MSRS, &m) != 1) return ~0ULL;
	return m.e.data;
}
static void setmsr(uint32_t i, uint64_t v) {
	struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = { .h.nmsrs = 1, .e.index = i, .e.data = v };
	if (ioctl(vcpu, KVM_SET_MSRS, &m) != 1) printf("set msr %x failed\n", i);
}
static void dump(const char *why) {
	struct kvm_regs r; struct kvm_sregs s;
	ioctl(vcpu, KVM_GET_REGS, &r); ioctl(vcpu, KVM_GET_SREGS, &s);
	printf("%s: rip %llx rsp %llx rflags %llx rax %llx rcx %llx r11 %llx rdi %llx\n   cs %x(dpl%d l%d) ss %x(dpl%d) cr3 %llx efer %llx gsbase %llx kgsbase %llx star %llx lstar %llx sfmask %llx\n",
	       why, r.rip, r.rsp, r.rflags, r.rax, r.rcx, r.r11, r.rdi, s.cs.selector, s.cs.dpl, s.cs.l, s.ss.selector, s.ss.dpl,
	       s.cr3, s.efer, s.gs.base, getmsr(0xc0000102), getmsr(0xc0000081), getmsr(0xc0000082), getmsr(0xc0000084));
}
static struct kvm_segment seg(uint16_t sel, int code, int dpl) {
	struct kvm_segment x = { .base = 0, .limit = 0xffffffff, .selector = sel, .present = 1, .dpl = dpl, .s = 1, .g = 1 };
	x.type = code ? 11 : 3; x.l = code; x.db = !code;
	return x;
}
int main(int argc, char **argv) {
	int kvm = open("/dev/kvm", O_RDWR); if (kvm < 0) die("kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	uint8_t *mem = mmap(0, MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region reg = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &reg)) die("region");
	if (getenv("FILTER")) {
		struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR, .args[0] = KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL };
		if (ioctl(vm, KVM_ENABLE_CAP, &cap)) perror("usmsr");
		static uint8_t deny[1] = { 0 }; /* bitmap: 0 = deny */
		struct kvm_msr_filter f = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
		uint32_t base = strtoul(getenv("FILTER"), 0, 16);
		f.ranges[0] = (struct kvm_msr_filter_range){ .flags = KVM_MSR_FILTER_READ | (getenv("FW") ? KVM_MSR_FILTER_WRITE : 0), .nmsrs = 1, .base = base, .bitmap = deny };
		if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &f)) perror("filter");
	}
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0); if (vcpu < 0) die("vcpu");
	int sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (!getenv("NOCPUID")) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + 256 * sizeof(struct kvm_cpuid_entry2));
		c->nent = 256;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c)) die("supported cpuid");
		for (unsigned i = 0; i < c->nent; i++)
			if (c->entries[i].function == 0x80000001) printf("cpuid 80000001 edx %x (syscall bit %d)\n", c->entries[i].edx, (c->entries[i].edx >> 11) & 1);
		if (ioctl(vcpu, KVM_SET_CPUID2, c)) die("set cpuid");
	}
	run = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	uint64_t *pt = (uint64_t *)mem;
	/* PML4 0x1000; PDPT low 0x2000; PD low 0x3000 (0-2M user identity via PT? use 2M page user) */
	pt[0x1000/8 + 0] = 0x2000 | 7;
	pt[0x2000/8 + 0] = 0x3000 | 7;
	pt[0x3000/8 + 0] = 0x0 | 0x87;            /* 0-2M: user, rw, 2M page */
	pt[0x1000/8 + 511] = 0x4000 | 3;          /* kernel: supervisor */
	pt[0x4000/8 + 510] = 0x5000 | 3;
	pt[0x5000/8 + 1] = 0x200000 | 0x83;       /* 0xffffffff80200000 -> 0x200000 */
	/* GDT at 0x6000 (Linux layout), TSS at 0x7000, IDT at 0x8000 */
	uint64_t *gdt = (uint64_t *)(mem + 0x6000);
	gdt[2] = 0x00af9b000000ffffULL; gdt[3] = 0x00cf93000000ffffULL;
	gdt[4] = 0x00cffb000000ffffULL; gdt[5] = 0x00cff3000000ffffULL; gdt[6] = 0x00affb000000ffffULL;
	uint64_t tss = 0x7000;
	gdt[8] = 0x0000890000000067ULL | ((tss & 0xffffff) << 16) | ((tss >> 24) << 56); gdt[9] = 0;
	*(uint64_t *)(mem + 0x7000 + 4) = KBASE + 0x1f0000; /* rsp0 -> GPA 0x3f0000 (mapped? no) */
	/* use a kernel stack inside the kernel 2M page: KBASE+0x100000 */
	*(uint64_t *)(mem + 0x7000 + 4) = KBASE + 0x100000;
	FILE *f = fopen("kernel.bin", "rb"); fread(mem + 0x200000, 1, 4096, f); fclose(f);
	f = fopen("user.bin", "rb"); fread(mem + 0x100000, 1, 4096, f); fclose(f);
	uint64_t *idt = (uint64_t *)(mem + 0x8000);
	struct { int vec, off, dpl; } h[] = { {14, PF, 0}, {13, GP, 0}, {6, UD, 0}, {0x80, I80, 3} };
	for (unsigned i = 0; i < 4; i++) {
		uint64_t a = KBASE + h[i].off;
		idt[h[i].vec * 2] = (a & 0xffff) | (0x10ULL << 16) | ((uint64_t)(0x8e | (h[i].dpl << 5)) << 40) | (((a >> 16) & 0xffff) << 48);
		idt[h[i].vec * 2 + 1] = a >> 32;
	}
	struct kvm_sregs s; ioctl(vcpu, KVM_GET_SREGS, &s);
	s.cs = seg(0x10, 1, 0); s.ds = s.es = s.fs = s.gs = s.ss = seg(0x18, 0, 0);
	s.tr = (struct kvm_segment){ .base = tss, .limit = 0x67, .selector = 0x40, .type = 11, .present = 1 };
	s.gdt.base = 0x6000; s.gdt.limit = 0x4f; s.idt.base = 0x8000; s.idt.limit = 0xfff;
	s.cr0 = 0x80050033; s.cr3 = 0x1000; s.cr4 = 0x20 | 0x80 | 0x200 | 0x400; s.efer = 0x500 | 0x800;
	if (argc > 1 && strchr(argv[1], 's')) s.efer |= 1; /* SCE from the VMM */
	s.gs.base = 0x1111000;
	if (ioctl(vcpu, KVM_SET_SREGS, &s)) die("sregs");
	struct kvm_regs r = { .rip = KBASE, .rsp = KBASE + 0x100000, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &r)) die("regs");
	setmsr(0xc0000102, 0x2222000);
	if (getenv("HWBP")) {
		struct kvm_guest_debug d = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP };
		d.arch.debugreg[0] = KBASE + SYSENTRY; d.arch.debugreg[7] = 0x1;
		if (ioctl(vcpu, KVM_SET_GUEST_DEBUG, &d)) perror("guest debug");
	}
	for (int n = 0; n < 12; n++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("run");
		switch (run->exit_reason) {
		case KVM_EXIT_IO: { char b[32];
			if (run->io.port == 0xe0) {
				if (getenv("STAR")) setmsr(0xc0000081, strtoull(getenv("STAR"), 0, 16));
				if (getenv("EFER")) { struct kvm_sregs t; ioctl(vcpu, KVM_GET_SREGS, &t); t.efer = strtoull(getenv("EFER"), 0, 16); if (ioctl(vcpu, KVM_SET_SREGS, &t)) perror("efer"); }
			} sprintf(b, "io port %x", run->io.port); dump(b);
			struct kvm_regs rr; ioctl(vcpu, KVM_GET_REGS, &rr);
			if (rr.rsp >= KBASE && rr.rsp < KBASE + 0x100000) { uint64_t *fr = (uint64_t *)(mem + 0x200000 + (rr.rsp - KBASE));
				printf("   frame: %llx %llx %llx %llx %llx %llx\n", (unsigned long long)fr[0], (unsigned long long)fr[1], (unsigned long long)fr[2], (unsigned long long)fr[3], (unsigned long long)fr[4], (unsigned long long)fr[5]); }
			break; }
		case KVM_EXIT_DEBUG: {
			printf("debug exit pc %llx exc %d dr6 %llx\n", run->debug.arch.pc, run->debug.arch.exception, run->debug.arch.dr6);
			dump("debug");
			struct kvm_sregs t; ioctl(vcpu, KVM_GET_SREGS, &t);
			if (t.cs.dpl == 3 && getenv("FIX")) {
				t.cs = seg(0x10, 1, 0); t.ss = seg(0x18, 0, 0);
				if (ioctl(vcpu, KVM_SET_SREGS, &t)) perror("fix sregs");
				struct kvm_regs rr; ioctl(vcpu, KVM_GET_REGS, &rr); rr.rflags |= 0x10000; ioctl(vcpu, KVM_SET_REGS, &rr);
				dump("fixed");
			}
			break; }
		case KVM_EXIT_X86_RDMSR: printf("rdmsr exit %x\n", run->msr.index); dump("rdmsr"); run->msr.error = 0; run->msr.data = 0; break;
		case KVM_EXIT_X86_WRMSR: printf("wrmsr exit %x %llx\n", run->msr.index, run->msr.data); run->msr.error = 0; break;
		case KVM_EXIT_HLT: dump("hlt"); return 0;
		case KVM_EXIT_INTERNAL_ERROR: printf("internal error sub %d\n", run->internal.suberror); dump("ierr"); return 1;
		case KVM_EXIT_SHUTDOWN: dump("shutdown"); return 1;
		default: printf("exit %d\n", run->exit_reason); dump("?"); return 1;
		}
	}
	return 0;
}
