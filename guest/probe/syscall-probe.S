/*
 * Guest code of the syscall probe (see syscall-probe.c and docs/GUEST-USERMODE.md).
 * .text is the "kernel": loaded at GPA 0x200000, mapped supervisor-only at
 * KBASE = 0xffffffff80200000, entered at CPL0 in long mode. It sets EFER.SCE, STAR,
 * LSTAR and SFMASK the way Linux's syscall_init does, reports on port 0xe0, and iretq's
 * to the "user" code (.user, at 0x100000, user-accessible). Each handler reports on its
 * own port: 0xe1 syscall entry (LSTAR), 0xe2 #PF, 0xe3 #GP, 0xe4 #UD, 0xe5 int $0x80.
 * With USER_INT80 the user code starts with int $0x80 instead of syscall.
 */
	.code64
	.globl kstart
	.text
kstart:
	/* EFER.SCE, STAR, LSTAR, SFMASK like Linux syscall_init */
	mov $0xc0000080, %ecx
	rdmsr
	or $1, %eax
	wrmsr
	mov $0xc0000081, %ecx
	xor %eax, %eax
	mov $0x00230010, %edx
	wrmsr
	mov $0xc0000082, %ecx
	lea sysentry(%rip), %rax
	mov %rax, %rdx
	shr $32, %rdx
	wrmsr
	mov $0xc0000084, %ecx
	mov $0x47700, %eax
	xor %edx, %edx
	wrmsr
	/* report: port 0xe0 = "ready" */
	mov $0, %eax
	out %al, $0xe0
	/* iretq to user */
	pushq $0x2b
	pushq $0x180000
	pushq $0x202
	pushq $0x33
	pushq $0x100000
	iretq
sysentry:
	out %al, $0xe1          /* syscall arrived */
	/* return with sysretq */
	sysretq
pf_handler:
	mov %cr2, %rax
	out %al, $0xe2
	hlt
gp_handler:
	out %al, $0xe3
	hlt
ud_handler:
	out %al, $0xe4
	hlt
int80_handler:
	out %al, $0xe5
	iretq
	.globl kend
kend:
	.globl pf_off, gp_off, ud_off, i80_off
	.set pf_off, pf_handler - kstart
	.set gp_off, gp_handler - kstart
	.set ud_off, ud_handler - kstart
	.set i80_off, int80_handler - kstart

	.section .user, "ax"
	.globl ustart
ustart:
#ifdef USER_INT80
	mov $0x4321, %eax
	int $0x80
#endif
	mov $0x1234, %eax
	mov $0x5678, %edi
	syscall
	mov $0x9999, %eax
	syscall
1:	jmp 1b
