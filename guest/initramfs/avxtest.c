/* avxtest: do guest processes keep their own vector registers across context switches?
 * Linked into /bin/usertest (called as `avxtest`, a link), built by build.sh.
 *
 *   avxtest procs ROUNDS     two processes pinned to the same CPU (0)
 *   avxtest threads ROUNDS   two threads of one process on CPUs 0 and 1, which swap
 *                            CPUs every round (sched_setaffinity in the middle of the
 *                            round: the state is saved on one CPU and restored on the
 *                            other, on another node when each node has one CPU)
 *
 * In every round each side fills all its vector registers (zmm0-31 where the CPU has
 * AVX-512F, else ymm0-15) with a pattern of its own, then, without touching them,
 * passes the turn to the other side through a pipe and blocks until the turn comes
 * back, then checks the registers. The other side runs in between (it fills its own
 * pattern on the same CPU in `procs`), so a kernel that does not save and restore the
 * whole register state lets the patterns mix. The fill, the system calls and the
 * check's store are one assembly block: no compiler code runs in between.
 *
 * The program tests only the CPUID feature bits (AVX, AVX-512F), not OSXSAVE: it is
 * the kind of program that runs natively on a software-KVM host whatever the guest
 * kernel enabled. Output:
 *   AVXTEST mode=procs regs=zmm rounds=N checked=K corrupt=C switches=S [moved=M] us_per_round=T ok|FAIL
 * checked = the checks done (each side checks once a round: 2N), corrupt = the checks
 * that found another value (the first one is described);
 * switches = context switches of the two sides (at least 1 per round and side);
 * moved = rounds a thread found itself on the CPU it asked for (threads).
 * Exit 0 when no round was corrupt and every round switched, 1 otherwise. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXBYTES (32 * 64)

/* One system call done inside the assembly block: number, 3 arguments, result. */
struct call {
	long nr, a0, a1, a2, ret;
};

static int use_zmm;

/* The assembly that does the calls[n] system calls (general registers only; the vector
 * registers stay as they are). */
#define CALLS \
	"mov %[c], %%r12\n\t" \
	"mov %[n], %%r13\n\t" \
	"1: test %%r13, %%r13\n\t" \
	"jz 2f\n\t" \
	"mov 0(%%r12), %%rax\n\t" \
	"mov 8(%%r12), %%rdi\n\t" \
	"mov 16(%%r12), %%rsi\n\t" \
	"mov 24(%%r12), %%rdx\n\t" \
	"syscall\n\t" \
	"mov %%rax, 32(%%r12)\n\t" \
	"add $40, %%r12\n\t" \
	"dec %%r13\n\t" \
	"jmp 1b\n\t" \
	"2:\n\t"

/* Fills ymm0-15 from pat, does the calls, stores ymm0-15 to out. */
static void round_ymm(const uint8_t *pat, uint8_t *out, struct call *calls, long n)
{
#define LY(i) "vmovdqu " #i "*32(%[p]), %%ymm" #i "\n\t"
#define SY(i) "vmovdqu %%ymm" #i ", " #i "*32(%[o])\n\t"
	__asm__ volatile(
		LY(0) LY(1) LY(2) LY(3) LY(4) LY(5) LY(6) LY(7)
		LY(8) LY(9) LY(10) LY(11) LY(12) LY(13) LY(14) LY(15)
		CALLS
		SY(0) SY(1) SY(2) SY(3) SY(4) SY(5) SY(6) SY(7)
		SY(8) SY(9) SY(10) SY(11) SY(12) SY(13) SY(14) SY(15)
		:
		: [p] "r"(pat), [o] "r"(out), [c] "r"(calls), [n] "r"(n)
		: "rax", "rdi", "rsi", "rdx", "rcx", "r11", "r12", "r13", "memory",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

/* The same with zmm0-31. */
__attribute__((target("avx512f")))
static void round_zmm(const uint8_t *pat, uint8_t *out, struct call *calls, long n)
{
#define LZ(i) "vmovdqu64 " #i "*64(%[p]), %%zmm" #i "\n\t"
#define SZ(i) "vmovdqu64 %%zmm" #i ", " #i "*64(%[o])\n\t"
	__asm__ volatile(
		LZ(0) LZ(1) LZ(2) LZ(3) LZ(4) LZ(5) LZ(6) LZ(7)
		LZ(8) LZ(9) LZ(10) LZ(11) LZ(12) LZ(13) LZ(14) LZ(15)
		LZ(16) LZ(17) LZ(18) LZ(19) LZ(20) LZ(21) LZ(22) LZ(23)
		LZ(24) LZ(25) LZ(26) LZ(27) LZ(28) LZ(29) LZ(30) LZ(31)
		CALLS
		SZ(0) SZ(1) SZ(2) SZ(3) SZ(4) SZ(5) SZ(6) SZ(7)
		SZ(8) SZ(9) SZ(10) SZ(11) SZ(12) SZ(13) SZ(14) SZ(15)
		SZ(16) SZ(17) SZ(18) SZ(19) SZ(20) SZ(21) SZ(22) SZ(23)
		SZ(24) SZ(25) SZ(26) SZ(27) SZ(28) SZ(29) SZ(30) SZ(31)
		:
		: [p] "r"(pat), [o] "r"(out), [c] "r"(calls), [n] "r"(n)
		: "rax", "rdi", "rsi", "rdx", "rcx", "r11", "r12", "r13", "memory",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
		  "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
		  "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

static int nbytes(void)
{
	return use_zmm ? 32 * 64 : 16 * 32;
}

/* Side `id`'s pattern for `round`: every byte differs between sides, rounds and
 * registers, and no byte is 0 (the initial state). */
static void pattern(uint8_t *p, int id, long round)
{
	for (int i = 0; i < nbytes(); i++)
		p[i] = (uint8_t)(1 + ((i * 7 + round * 13 + id * 101) % 255));
}

struct side {
	int id;
	int in, out;     /* pipe ends: wait for the turn on `in`, pass it on `out` */
	long rounds;
	int first;       /* waits for the first turn before its first round */
	int migrate;     /* swaps between CPU 0 and 1 every round */
	long checked, corrupt, moved, switches;
	char first_bad[160];
};

static void set_cpu(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	sched_setaffinity(0, sizeof(s), &s);
}

static void run_side(struct side *s)
{
	static __thread uint8_t pat[MAXBYTES] __attribute__((aligned(64)));
	static __thread uint8_t got[MAXBYTES] __attribute__((aligned(64)));
	static __thread cpu_set_t mask;
	char token = 't';
	if (s->first && read(s->in, &token, 1) != 1)
		return;
	for (long r = 0; r < s->rounds; r++) {
		int want = (int)((r + s->id) & 1);
		struct call calls[3];
		int n = 0;
		if (s->migrate) {
			CPU_ZERO(&mask);
			CPU_SET(want, &mask);
			calls[n++] = (struct call){ SYS_sched_setaffinity, 0, sizeof(mask), (long)&mask, 0 };
		}
		calls[n++] = (struct call){ SYS_write, s->out, (long)&token, 1, 0 };
		/* The last round of the side that goes second does not wait: nobody passes
		 * the turn back. */
		int last = r == s->rounds - 1 && s->first;
		if (!last)
			calls[n++] = (struct call){ SYS_read, s->in, (long)&token, 1, 0 };
		pattern(pat, s->id, r);
		memset(got, 0, sizeof(got));
		if (use_zmm)
			round_zmm(pat, got, calls, n);
		else
			round_ymm(pat, got, calls, n);
		for (int i = 0; i < n; i++) {
			if (calls[i].ret < 0) {
				fprintf(stderr, "avxtest: system call %ld failed: %ld\n",
					calls[i].nr, calls[i].ret);
				s->corrupt = -1;
				return;
			}
		}
		if (s->migrate && sched_getcpu() == want)
			s->moved++;
		s->checked++;
		if (memcmp(pat, got, nbytes())) {
			if (!s->corrupt) {
				int i = 0;
				while (pat[i] == got[i])
					i++;
				int w = use_zmm ? 64 : 32;
				snprintf(s->first_bad, sizeof(s->first_bad),
					 "side %d round %ld: %cmm%d byte %d is %#x, not %#x",
					 s->id, r, use_zmm ? 'z' : 'y', i / w, i % w, got[i], pat[i]);
			}
			s->corrupt++;
		}
	}
}

/* The calling thread's context switches so far (voluntary: it blocked; and
 * involuntary: it was preempted, e.g. by the side it woke). */
static long context_switches(void)
{
	FILE *f = fopen("/proc/thread-self/status", "r");
	char line[128];
	long v, sum = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "voluntary_ctxt_switches: %ld", &v) == 1 ||
		    sscanf(line, "nonvoluntary_ctxt_switches: %ld", &v) == 1)
			sum += v;
	fclose(f);
	return sum;
}

static void *side_main(void *arg)
{
	struct side *s = arg;
	long before = context_switches();
	run_side(s);
	s->switches = context_switches() - before;
	return NULL;
}

int avxtest_main(int argc, char **argv)
{
	unsigned a, b, c, d;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 3 || (strcmp(argv[1], "procs") && strcmp(argv[1], "threads"))) {
		fprintf(stderr, "usage: avxtest procs|threads ROUNDS\n");
		return 2;
	}
	long rounds = atol(argv[2]);
	int threads = !strcmp(argv[1], "threads");
	__cpuid(1, a, b, c, d);
	int avx = (c >> 28) & 1;
	__cpuid_count(7, 0, a, b, c, d);
	use_zmm = (b >> 16) & 1;
	if (!avx) {
		printf("AVXTEST mode=%s no AVX on this CPU FAIL\n", argv[1]);
		return 1;
	}
	if (rounds < 1)
		rounds = 1;
	int ab[2], ba[2];
	/* Shared with the child process in `procs`. */
	struct side *s = mmap(NULL, 2 * sizeof(*s), PROT_READ | PROT_WRITE,
			      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (s == MAP_FAILED || pipe(ab) || pipe(ba)) {
		perror("avxtest");
		return 1;
	}
	s[0] = (struct side){ .id = 0, .in = ba[0], .out = ab[1], .rounds = rounds, .migrate = threads };
	s[1] = (struct side){ .id = 1, .in = ab[0], .out = ba[1], .rounds = rounds, .first = 1, .migrate = threads };
	struct timespec t_start, t_end;
	clock_gettime(CLOCK_MONOTONIC, &t_start);
	if (threads) {
		pthread_t t0, t1;
		pthread_create(&t1, NULL, side_main, &s[1]);
		pthread_create(&t0, NULL, side_main, &s[0]);
		pthread_join(t0, NULL);
		pthread_join(t1, NULL);
	} else {
		set_cpu(0);
		pid_t child = fork();
		if (child == 0) {
			side_main(&s[1]);
			_exit(0);
		}
		side_main(&s[0]);
		waitpid(child, NULL, 0);
	}
	clock_gettime(CLOCK_MONOTONIC, &t_end);
	double secs = (t_end.tv_sec - t_start.tv_sec) + (t_end.tv_nsec - t_start.tv_nsec) / 1e9;
	long corrupt = s[0].corrupt + s[1].corrupt;
	long switches = s[0].switches + s[1].switches;
	int ok = corrupt == 0 && s[0].corrupt >= 0 && s[1].corrupt >= 0 &&
		 s[0].switches >= rounds - 1 && s[1].switches >= rounds - 1;
	printf("AVXTEST mode=%s regs=%s rounds=%ld checked=%ld corrupt=%ld switches=%ld",
	       argv[1], use_zmm ? "zmm" : "ymm", rounds, s[0].checked + s[1].checked, corrupt,
	       switches);
	if (threads)
		printf(" moved=%ld", s[0].moved + s[1].moved);
	printf(" us_per_round=%.1f %s\n", secs * 1e6 / rounds, ok ? "ok" : "FAIL");
	for (int i = 0; i < 2; i++)
		if (s[i].first_bad[0])
			printf("AVXTEST first corruption: %s\n", s[i].first_bad);
	return ok ? 0 : 1;
}
