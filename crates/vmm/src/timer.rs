//! The LAPIC timer thread: fires the due timers of this node's vCPUs and sleeps until
//! the next deadline (or until a vCPU reprograms its timer).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::vcpu::{VcpuEnv, VcpuHandle};

/// The longest the thread sleeps without looking at the timers again.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// The wake-up channel of the timer thread.
#[derive(Default)]
pub(crate) struct LapicTimer {
    /// Bumped on every timer reprogramming, so a change made while the thread scans
    /// is not missed.
    generation: Mutex<u64>,
    cv: Condvar,
}

impl LapicTimer {
    /// A vCPU (re)programmed its LAPIC timer.
    pub(crate) fn changed(&self) {
        let mut g = crate::lock(&self.generation);
        *g += 1;
        self.cv.notify_all();
    }

    /// Wakes the thread (e.g. to see that the VM is stopping).
    pub(crate) fn wake(&self) {
        self.cv.notify_all();
    }

    /// The thread's body: runs until `env.stopping()`. Only vCPUs with `local[index]`
    /// are this node's.
    pub(crate) fn run(&self, handles: &[Arc<VcpuHandle>], local: &[bool], env: &dyn VcpuEnv) {
        let mut seen = 0u64;
        while !env.stopping() {
            let now = env.now_ns();
            let mut next: Option<u64> = None;
            for h in handles.iter().filter(|h| local[h.index]) {
                let mut l = h.lapic();
                if l.timer_deadline_ns().is_some_and(|d| d <= now) {
                    l.poll_timer(now);
                    drop(l);
                    h.wake();
                    l = h.lapic();
                }
                if let Some(d) = l.timer_deadline_ns() {
                    next = Some(next.map_or(d, |n: u64| n.min(d)));
                }
            }
            let g = crate::lock(&self.generation);
            if *g != seen {
                seen = *g;
                continue;
            }
            let wait = match next {
                Some(d) => Duration::from_nanos(d.saturating_sub(env.now_ns())),
                None => MAX_SLEEP,
            }
            .min(MAX_SLEEP);
            let (g, _) = self
                .cv
                .wait_timeout(g, wait)
                .unwrap_or_else(|p| p.into_inner());
            seen = *g;
        }
    }
}
