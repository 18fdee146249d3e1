/*
 * smptest: a small SMP self-test for the dvmm guest (static, runs from the initramfs).
 *
 * Starts one thread per online CPU (or `smptest THREADS`), pins thread i to the i-th
 * online CPU with sched_setaffinity, and has every thread add to two shared counters
 * ITERS times: one protected by a pthread mutex (read, modify, write under the lock),
 * one updated with an atomic fetch-add. Prints one line:
 *
 *   SMPTEST PASS threads=2 cpus=2 iters=20000 mutex=40000 atomic=40000 expected=40000 ran_on=0,1
 *
 * or the same with FAIL (wrong counter, a thread not on its CPU, or a failed call) and
 * exits 0 on PASS, 1 on FAIL. Usage: smptest [THREADS [ITERS]].
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 64

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long mutex_counter;
static atomic_ulong atomic_counter;
static pthread_barrier_t start;
static long iters = 20000;

struct worker {
	pthread_t thread;
	int cpu;      /* the CPU this thread is pinned to */
	int ran_on;   /* sched_getcpu() after pinning */
	int err;      /* errno of a failed sched_setaffinity, 0 if none */
};

static void *work(void *arg)
{
	struct worker *w = arg;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(w->cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		w->err = errno;
	w->ran_on = sched_getcpu();
	pthread_barrier_wait(&start);
	for (long i = 0; i < iters; i++) {
		pthread_mutex_lock(&lock);
		unsigned long v = mutex_counter; /* a lost update shows up without the lock */
		mutex_counter = v + 1;
		pthread_mutex_unlock(&lock);
		atomic_fetch_add_explicit(&atomic_counter, 1, memory_order_relaxed);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct worker w[MAX_THREADS];
	int online[MAX_THREADS];
	int ncpus = 0, nthreads, ok = 1;
	cpu_set_t all;
	char ran[MAX_THREADS * 4 + 1] = "";

	/* The CPUs this process may run on: all online CPUs for init's children. */
	if (sched_getaffinity(0, sizeof(all), &all) != 0) {
		printf("SMPTEST FAIL sched_getaffinity: %s\n", strerror(errno));
		return 1;
	}
	for (int c = 0; c < CPU_SETSIZE && ncpus < MAX_THREADS; c++)
		if (CPU_ISSET(c, &all))
			online[ncpus++] = c;
	nthreads = argc > 1 ? atoi(argv[1]) : ncpus;
	if (argc > 2)
		iters = atol(argv[2]);
	if (nthreads < 1 || nthreads > MAX_THREADS || iters < 1) {
		printf("SMPTEST FAIL usage: smptest [THREADS(1..%d) [ITERS]]\n", MAX_THREADS);
		return 1;
	}
	pthread_barrier_init(&start, NULL, nthreads);
	for (int i = 0; i < nthreads; i++) {
		w[i] = (struct worker){ .cpu = online[i % ncpus], .ran_on = -1 };
		int e = pthread_create(&w[i].thread, NULL, work, &w[i]);
		if (e != 0) {
			printf("SMPTEST FAIL pthread_create: %s\n", strerror(e));
			return 1;
		}
	}
	for (int i = 0; i < nthreads; i++) {
		pthread_join(w[i].thread, NULL);
		if (w[i].err || w[i].ran_on != w[i].cpu) {
			printf("SMPTEST thread %d: pinned to cpu %d, ran on %d (%s)\n", i,
			       w[i].cpu, w[i].ran_on, w[i].err ? strerror(w[i].err) : "ok");
			ok = 0;
		}
		snprintf(ran + strlen(ran), sizeof(ran) - strlen(ran), "%s%d", i ? "," : "",
			 w[i].ran_on);
	}
	unsigned long expected = (unsigned long)nthreads * (unsigned long)iters;
	unsigned long a = atomic_load(&atomic_counter);
	if (mutex_counter != expected || a != expected)
		ok = 0;
	printf("SMPTEST %s threads=%d cpus=%d iters=%ld mutex=%lu atomic=%lu expected=%lu ran_on=%s\n",
	       ok ? "PASS" : "FAIL", nthreads, ncpus, iters, mutex_counter, a, expected, ran);
	return ok ? 0 : 1;
}
