//! Shadow page tables on a software-KVM host, across nodes.
//!
//! Without EPT/NPT, KVM runs guest user code natively through *shadow* page tables that
//! it builds from the guest's own page tables and keeps in sync by trapping the
//! guest's writes to them. A write made on another host (another node of the cluster,
//! through the DSM) is never trapped here: KVM would keep using shadow entries built
//! from the old contents (seen: a forked child running on the parent's stack page,
//! programs faulting on their own text, the system-call entry reached without the
//! breakpoint). So whenever this node gives up a page because another node is about to
//! write it, every shadow page table of the VM is dropped: deleting a (dummy) memory
//! slot makes KVM mark all of them obsolete, and they are rebuilt on demand from the
//! current guest page tables. A thread does it, coalescing bursts; the DSM only takes
//! note ([`ShadowSync::stale`]).
//!
//! Hosts with hardware virtualization walk the guest page tables in hardware (EPT/NPT)
//! and need none of this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// The slot of the dummy region.
pub const DUMMY_SLOT: u32 = 31;
/// Its guest-physical address: in the 32-bit MMIO hole, where nothing lives.
pub const DUMMY_GPA: u64 = 0xfe00_0000;

/// Requests and counters of the shadow flush.
#[derive(Default)]
pub struct ShadowSync {
    requested: Mutex<u64>,
    cv: Condvar,
    /// The request count the last finished flush covered.
    done: Mutex<u64>,
    done_cv: Condvar,
    /// Flushes done.
    pub flushes: AtomicU64,
}

impl ShadowSync {
    /// Another node is about to write a page this node had: flush soon.
    pub fn stale(&self) {
        let mut r = crate::lock(&self.requested);
        *r += 1;
        self.cv.notify_one();
    }

    /// Waits (at most `limit`) until every flush requested so far is done. An
    /// interrupt from another node (a TLB shootdown after it changed a page table, say)
    /// is delivered only after this, so the vCPU that handles it cannot use shadow
    /// entries older than the change.
    pub fn wait_flushed(&self, limit: Duration) {
        let want = *crate::lock(&self.requested);
        let mut done = crate::lock(&self.done);
        let deadline = std::time::Instant::now() + limit;
        while *done < want {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            done = self
                .done_cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The flushing thread: until `stopping()`.
    pub fn run(&self, vm: &VmFd, stopping: &dyn Fn() -> bool) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: a fresh private anonymous mapping of one page; checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(kvm_ioctls::Error::last());
        }
        let region = |size: u64| kvm_userspace_memory_region {
            slot: DUMMY_SLOT,
            flags: 0,
            guest_phys_addr: DUMMY_GPA,
            memory_size: size,
            userspace_addr: host as u64,
        };
        let r = (|| {
            // SAFETY: the page stays mapped until this function unmaps it after
            // removing the slot.
            unsafe { vm.set_user_memory_region(region(4096)) }?;
            let mut done = 0u64;
            while !stopping() {
                let mut req = crate::lock(&self.requested);
                while *req == done && !stopping() {
                    req = self
                        .cv
                        .wait_timeout(req, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                done = *req;
                drop(req);
                if stopping() {
                    break;
                }
                // SAFETY: removing and re-adding the dummy slot over the same page.
                unsafe { vm.set_user_memory_region(region(0)) }?;
                // SAFETY: as above.
                unsafe { vm.set_user_memory_region(region(4096)) }?;
                self.flushes.fetch_add(1, Ordering::Relaxed);
                *crate::lock(&self.done) = done;
                self.done_cv.notify_all();
            }
            // SAFETY: removing the slot before its memory goes.
            unsafe { vm.set_user_memory_region(region(0)) }
        })();
        // SAFETY: the mapping made above; the slot no longer refers to it (or never
        // did, if adding it failed).
        unsafe { libc::munmap(host, 4096) };
        r
    }
}
