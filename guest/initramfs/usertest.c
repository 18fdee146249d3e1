/* usertest: guest user-mode checks and the parallel benchmark of the dvmm guest.
 * Called as `smptest` or `avxtest` (links), it runs smptest.c's or avxtest.c's main
 * instead.
 *
 *   usertest syscalls N      N system calls with checked results, and their round
 *                            trip: USERTEST syscalls=N ok p50_ns=.. p99_ns=..
 *   usertest fork N          fork + exec (/bin/busybox true) + wait, N times
 *   usertest signals         SIGUSR1 handler, SIGSEGV + siglongjmp, alarm + pause,
 *                            SIGTERM to a child
 *   usertest jump ADDR       a child jumps to ADDR (the kernel's system-call entry) with
 *                            RCX/R11 prepared like a real `syscall`: it must die of
 *                            SIGSEGV, and nothing else happens
 *   usertest par T ITERS private|shared
 *                            T threads, thread i pinned to CPU i % ncpus; each does
 *                            ITERS units of work on its own memory (private) or adds
 *                            to counters shared by all (shared):
 *                            PAR mode=.. threads=.. iters=.. secs=.. mops_per_s=.. ran_on=..
 *   usertest pipe ROUNDS     kernel-heavy: two processes pinned to the first and the last
 *                            CPU pass one byte back and forth through two pipes, ROUNDS
 *                            round trips (each: 2 writes, 2 reads, 2 cross-CPU wake-ups)
 *   usertest spawn N         kernel-heavy: a process on the first CPU creates N children
 *                            that each move to the last CPU and exec /bin/busybox true
 *                            (fork, migration, exec, exit, wait)
 *                            both print a PAR line (mops_per_s: millions of round trips
 *                            or children per second)
 *   usertest spin SECS       one thread computes in user mode for SECS seconds, without
 *                            system calls (the clock is read every ~million additions):
 *                            USERTEST spin secs=.. cpu=.. ok
 *
 * Every check prints `USERTEST <name> ... ok` or `USERTEST <name> FAIL ...` and exits
 * 0 or 1. Static, built by guest/initramfs/build.sh. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* A raw system call that also returns RCX and R11 as the CPU left them. */
static long raw_syscall3(long n, long a, long b, long c, uint64_t *rcx, uint64_t *r11)
{
	long ret;
	uint64_t c_out;
	register uint64_t r11_out __asm__("r11");
	__asm__ volatile("syscall"
			 : "=a"(ret), "=c"(c_out), "=r"(r11_out)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "memory");
	*rcx = c_out;
	*r11 = r11_out;
	return ret;
}

static int test_syscalls(long n)
{
	int fd = open("/dev/null", O_WRONLY);
	if (fd < 0) {
		printf("USERTEST syscalls FAIL open /dev/null: %s\n", strerror(errno));
		return 1;
	}
	pid_t pid = getpid();
	uint64_t *lat = calloc((size_t)n, sizeof(uint64_t));
	char buf[64];
	memset(buf, 'x', sizeof buf);
	for (long i = 0; i < n; i++) {
		uint64_t rcx, r11;
		long want, got;
		uint64_t t0 = now_ns();
		switch (i % 3) {
		case 0:
			want = pid;
			got = raw_syscall3(SYS_getpid, 0, 0, 0, &rcx, &r11);
			break;
		case 1:
			want = (i % 64) + 1;
			got = raw_syscall3(SYS_write, fd, (long)buf, want, &rcx, &r11);
			break;
		default:
			want = -EBADF;
			got = raw_syscall3(SYS_close, 100000, 0, 0, &rcx, &r11);
			break;
		}
		uint64_t t1 = now_ns();
		if (lat)
			lat[i] = t1 - t0;
		/* RCX holds the return address, R11 the user RFLAGS (IF set). */
		if (got != want || rcx == 0 || !(r11 & 0x200)) {
			printf("USERTEST syscalls FAIL at %ld: got %ld want %ld rcx %#lx r11 %#lx\n", i, got, want,
			       (unsigned long)rcx, (unsigned long)r11);
			return 1;
		}
	}
	uint64_t p50 = 0, p99 = 0;
	if (lat && n > 0) {
		qsort(lat, (size_t)n, sizeof(uint64_t), cmp_u64);
		p50 = lat[n / 2];
		p99 = lat[(n * 99) / 100];
	}
	printf("USERTEST syscalls=%ld ok p50_ns=%llu p99_ns=%llu\n", n, (unsigned long long)p50,
	       (unsigned long long)p99);
	return 0;
}

static int test_fork(long n)
{
	uint64_t t0 = now_ns();
	for (long i = 0; i < n; i++) {
		pid_t c = fork();
		if (c < 0) {
			printf("USERTEST fork FAIL fork %ld: %s\n", i, strerror(errno));
			return 1;
		}
		if (c == 0) {
			char *argv[] = {"true", NULL};
			execv("/bin/busybox", argv);
			_exit(127);
		}
		int st;
		if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			printf("USERTEST fork FAIL child %ld status %#x\n", i, st);
			return 1;
		}
	}
	uint64_t t1 = now_ns();
	printf("USERTEST fork=%ld ok ms_per_fork_exec=%.1f\n", n, n ? (double)(t1 - t0) / 1e6 / (double)n : 0.0);
	return 0;
}

static volatile sig_atomic_t got_usr1, got_alarm;
static volatile uintptr_t bad_address = 16;
static sigjmp_buf segv_jmp;

static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_alarm(int s) { (void)s; got_alarm = 1; }
static void on_segv(int s) { (void)s; siglongjmp(segv_jmp, 1); }

static int test_signals(void)
{
	signal(SIGUSR1, on_usr1);
	raise(SIGUSR1);
	if (!got_usr1) {
		printf("USERTEST signals FAIL SIGUSR1 not handled\n");
		return 1;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_segv;
	sigaction(SIGSEGV, &sa, NULL);
	if (sigsetjmp(segv_jmp, 1) == 0) {
		*(volatile int *)bad_address = 1;
		printf("USERTEST signals FAIL write to address 16 did not fault\n");
		return 1;
	}
	signal(SIGSEGV, SIG_DFL);
	signal(SIGALRM, on_alarm);
	alarm(1);
	while (!got_alarm)
		pause();
	pid_t c = fork();
	if (c == 0) {
		for (;;)
			pause();
	}
	kill(c, SIGTERM);
	int st;
	if (waitpid(c, &st, 0) != c || !WIFSIGNALED(st) || WTERMSIG(st) != SIGTERM) {
		printf("USERTEST signals FAIL child status %#x\n", st);
		return 1;
	}
	printf("USERTEST signals ok\n");
	return 0;
}

/* The child jumps to the kernel's system-call entry from user mode, with RCX pointing
 * just after a real `syscall` instruction and R11 holding its RFLAGS, as a forger would. */
static int test_jump(uint64_t entry)
{
	pid_t c = fork();
	if (c == 0) {
		__asm__ volatile("lea 1f(%%rip), %%rcx\n\t"
				 "pushfq\n\t"
				 "pop %%r11\n\t"
				 "jmp *%0\n\t"
				 "syscall\n"
				 "1:\n\t"
				 :
				 : "r"(entry)
				 : "rcx", "r11", "memory");
		_exit(0);
	}
	int st;
	if (waitpid(c, &st, 0) != c) {
		printf("USERTEST jump FAIL waitpid: %s\n", strerror(errno));
		return 1;
	}
	if (!WIFSIGNALED(st) || WTERMSIG(st) != SIGSEGV) {
		printf("USERTEST jump FAIL child status %#x (want SIGSEGV)\n", st);
		return 1;
	}
	/* The system is unharmed: system calls still work. */
	if (getppid() <= 0) {
		printf("USERTEST jump FAIL getppid after the jump\n");
		return 1;
	}
	printf("USERTEST jump=SIGSEGV ok\n");
	return 0;
}

/* ---- the parallel benchmark ---- */
#define PRIVATE_WORDS (16 * 1024) /* 128 KiB per thread */

struct par {
	int id;
	int cpu;
	long iters;
	int shared;
	int ran_on;
	uint64_t sum;
};

static uint64_t shared_counters[8] __attribute__((aligned(64)));

static void *par_thread(void *arg)
{
	struct par *p = arg;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(p->cpu, &set);
	sched_setaffinity(0, sizeof set, &set);
	if (p->shared) {
		for (long i = 0; i < p->iters; i++)
			__atomic_fetch_add(&shared_counters[i & 7], 1, __ATOMIC_RELAXED);
	} else {
		uint64_t *mem = malloc(PRIVATE_WORDS * sizeof(uint64_t));
		uint64_t x = (uint64_t)p->id * 0x9e3779b97f4a7c15ull + 1;
		for (long w = 0; w < PRIVATE_WORDS; w++)
			mem[w] = (uint64_t)w;
		/* One unit: 1024 dependent read-modify-writes over the private array. */
		for (long i = 0; i < p->iters; i++) {
			for (int k = 0; k < 1024; k++) {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				mem[x % PRIVATE_WORDS] += x;
			}
		}
		for (long w = 0; w < PRIVATE_WORDS; w++)
			p->sum += mem[w];
		free(mem);
	}
	p->ran_on = sched_getcpu();
	return NULL;
}

static int par(int threads, long iters, int shared)
{
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	pthread_t t[256];
	struct par p[256];
	if (threads < 1 || threads > 256 || ncpu < 1) {
		printf("PAR FAIL bad arguments\n");
		return 1;
	}
	uint64_t t0 = now_ns();
	for (int i = 0; i < threads; i++) {
		p[i] = (struct par){.id = i, .cpu = (int)(i % ncpu), .iters = iters, .shared = shared};
		pthread_create(&t[i], NULL, par_thread, &p[i]);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	double secs = (double)(now_ns() - t0) / 1e9;
	if (shared) {
		uint64_t total = 0;
		for (int i = 0; i < 8; i++)
			total += shared_counters[i];
		if (total != (uint64_t)threads * (uint64_t)iters) {
			printf("PAR FAIL shared total %llu want %llu\n", (unsigned long long)total,
			       (unsigned long long)threads * (unsigned long long)iters);
			return 1;
		}
	}
	/* Work units: private = 1024 updates per iteration; shared = 1 add. */
	double ops = (double)threads * (double)iters * (shared ? 1.0 : 1024.0);
	printf("PAR mode=%s threads=%d iters=%ld secs=%.3f mops_per_s=%.2f ran_on=", shared ? "shared" : "private",
	       threads, iters, secs, ops / secs / 1e6);
	for (int i = 0; i < threads; i++)
		printf("%s%d", i ? "," : "", p[i].ran_on);
	printf("\n");
	return 0;
}

static int pin_to(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

/* Prints the PAR line of a kernel-heavy variant: `units` done in `ns`. */
static void kernel_par(const char *mode, long units, uint64_t ns, int a, int b)
{
	double secs = (double)ns / 1e9;
	printf("PAR mode=%s threads=2 iters=%ld secs=%.3f mops_per_s=%.6f ran_on=%d,%d\n", mode, units,
	       secs, (double)units / secs / 1e6, a, b);
}

static int par_pipe(long rounds)
{
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int ab[2], ba[2];
	if (rounds < 1 || ncpu < 1 || pipe(ab) || pipe(ba)) {
		printf("PAR FAIL pipe setup\n");
		return 1;
	}
	int last = (int)ncpu - 1;
	pid_t child = fork();
	if (child < 0) {
		printf("PAR FAIL fork\n");
		return 1;
	}
	char c = 0;
	if (child == 0) {
		pin_to(last);
		for (long i = 0; i < rounds; i++) {
			if (read(ab[0], &c, 1) != 1 || write(ba[1], &c, 1) != 1)
				_exit(1);
		}
		_exit(sched_getcpu() == last ? 0 : 2);
	}
	pin_to(0);
	/* One round first, so that both sides are in place before the clock starts. */
	if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1) {
		printf("PAR FAIL pipe\n");
		return 1;
	}
	uint64_t t0 = now_ns();
	for (long i = 1; i < rounds; i++) {
		c++;
		char back = 0;
		if (write(ab[1], &c, 1) != 1 || read(ba[0], &back, 1) != 1 || back != c) {
			printf("PAR FAIL pipe round %ld\n", i);
			return 1;
		}
	}
	uint64_t ns = now_ns() - t0;
	int status = 0;
	waitpid(child, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		printf("PAR FAIL pipe child status %d\n", status);
		return 1;
	}
	kernel_par("pipe", rounds - 1, ns, sched_getcpu(), last);
	return 0;
}

static int par_spawn(long n)
{
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	if (n < 1 || ncpu < 1) {
		printf("PAR FAIL spawn arguments\n");
		return 1;
	}
	int last = (int)ncpu - 1;
	pin_to(0);
	uint64_t t0 = now_ns();
	for (long i = 0; i < n; i++) {
		pid_t child = fork();
		if (child < 0) {
			printf("PAR FAIL fork\n");
			return 1;
		}
		if (child == 0) {
			pin_to(last);
			execl("/bin/busybox", "true", (char *)NULL);
			_exit(127);
		}
		int status = 0;
		if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			printf("PAR FAIL spawn child %ld status %d\n", i, status);
			return 1;
		}
	}
	kernel_par("spawn", n, now_ns() - t0, sched_getcpu(), last);
	return 0;
}

/* User-mode work only, for SECS seconds (`dvmm bench idle`: the DSM traffic of a
 * guest with one CPU busy in user mode). */
static int spin(long secs)
{
	uint64_t end = now_ns() + (uint64_t)secs * 1000000000ull;
	volatile uint64_t x = 0;
	while (now_ns() < end)
		for (uint64_t i = 0; i < 1000000; i++)
			x += i;
	printf("USERTEST spin secs=%ld cpu=%d ok\n", secs, sched_getcpu());
	return 0;
}

int smptest_main(int argc, char **argv);
int avxtest_main(int argc, char **argv);

int main(int argc, char **argv)
{
	const char *name = strrchr(argv[0], '/');
	name = name ? name + 1 : argv[0];
	if (!strcmp(name, "smptest"))
		return smptest_main(argc, argv);
	if (!strcmp(name, "avxtest"))
		return avxtest_main(argc, argv);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 2 && !strcmp(argv[1], "syscalls"))
		return test_syscalls(argc > 2 ? atol(argv[2]) : 100000);
	if (argc >= 2 && !strcmp(argv[1], "fork"))
		return test_fork(argc > 2 ? atol(argv[2]) : 100);
	if (argc >= 2 && !strcmp(argv[1], "signals"))
		return test_signals();
	if (argc >= 3 && !strcmp(argv[1], "jump"))
		return test_jump(strtoull(argv[2], NULL, 0));
	if (argc >= 5 && !strcmp(argv[1], "par"))
		return par(atoi(argv[2]), atol(argv[3]), !strcmp(argv[4], "shared"));
	if (argc >= 3 && !strcmp(argv[1], "pipe"))
		return par_pipe(atol(argv[2]));
	if (argc >= 3 && !strcmp(argv[1], "spawn"))
		return par_spawn(atol(argv[2]));
	if (argc >= 3 && !strcmp(argv[1], "spin"))
		return spin(atol(argv[2]));
	fprintf(stderr, "usage: usertest syscalls N | fork N | signals | jump ADDR | par THREADS ITERS private|shared | pipe ROUNDS | spawn N | spin SECS\n");
	return 2;
}
