/* /init of guest/out/idle.cpio: prints one line and sleeps forever.
 *
 * For runs that exercise the guest kernel only (locktorture, `dvmm bench cluster`): the
 * kernel needs an init that waits until the test ends the run, and this one costs
 * nothing to unpack. No libc: two system calls, write and pause. */
static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}

void _start(void)
{
	static const char msg[] = "DVMM-GUEST idle\n";
	sys3(1, 1, (long)msg, sizeof msg - 1); /* write(1, ...): the kernel opened /dev/console */
	for (;;)
		sys3(34, 0, 0, 0); /* pause() */
}
