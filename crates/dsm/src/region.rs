//! The guest-RAM mapping of one node process, registered with userfaultfd.

use std::io;

use dsm_proto::{PageId, PAGE_SIZE};

use crate::uffd::{Uffd, UffdError};
use crate::DsmError;

/// One anonymous private mapping of `pages` 4 KiB pages (`MAP_NORESERVE`), registered
/// with its own userfaultfd for MISSING and write-protect faults.
///
/// Every page starts missing: the first access of any thread (or of KVM on behalf of a
/// vCPU) raises a fault that the [`Dsm`](crate::Dsm) runtime resolves. The runtime is the
/// only one that changes the mapping (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`,
/// `UFFDIO_WRITEPROTECT`, `madvise(MADV_DONTNEED)`); the host pointer ([`Region::as_ptr`])
/// may be given to KVM as guest RAM (`KVM_SET_USER_MEMORY_REGION`) or used directly.
#[derive(Debug)]
pub struct Region {
    base: *mut u8,
    pages: u64,
    uffd: Uffd,
}

// SAFETY: the mapping is process-wide memory; `Region` only hands out its address and
// performs thread-safe system calls on it and on its userfaultfd.
unsafe impl Send for Region {}
// SAFETY: as above; no method mutates Rust-visible state.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `pages` pages and registers them with a new userfaultfd (MISSING + WP).
    pub fn new(pages: u64) -> Result<Region, DsmError> {
        let len = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l > 0)
            .ok_or(DsmError::Config(format!("bad region size: {pages} pages")))?;
        let uffd = Uffd::new()?;
        // SAFETY: anonymous mapping at a kernel-chosen address; no existing memory is
        // affected. The result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DsmError::Mmap(io::Error::last_os_error()));
        }
        // 4 KiB pages only: the protocol is page granular, and a transparent huge page
        // would be split by the first MADV_DONTNEED anyway. Advisory: ignore failure.
        // SAFETY: advice on the mapping just created.
        unsafe {
            libc::madvise(base, len, libc::MADV_NOHUGEPAGE);
        }
        let region = Region {
            base: base.cast::<u8>(),
            pages,
            uffd,
        };
        region.uffd.register(region.base as u64, len as u64)?;
        Ok(region)
    }

    /// Host address of the first page.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        // Checked to fit in `new`.
        (self.pages as usize) * PAGE_SIZE
    }

    /// Always false (a region has at least one page).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Host address of `page` (not checked; callers validate the page first).
    pub fn page_addr(&self, page: PageId) -> u64 {
        self.base as u64 + page * PAGE_SIZE as u64
    }

    /// The page that contains host address `addr`, if it is inside the region.
    pub fn page_of(&self, addr: u64) -> Option<PageId> {
        let off = addr.checked_sub(self.base as u64)?;
        let page = off / PAGE_SIZE as u64;
        (page < self.pages).then_some(page)
    }

    /// The userfaultfd the region is registered with. Installing pages through it
    /// bypasses the coherence protocol: only for regions no [`Dsm`](crate::Dsm) drives
    /// (e.g. the bench floor of `testlab`).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Drops the local copy of `page`: the next access is a MISSING fault again.
    pub(crate) fn zap(&self, page: PageId) -> Result<(), DsmError> {
        self.zap_range(page, 1)
    }

    /// Drops the local copies of `count` pages from `page` on, with one system call.
    pub(crate) fn zap_range(&self, page: PageId, count: u64) -> Result<(), DsmError> {
        if count == 0 || page.saturating_add(count) > self.pages() {
            return Err(DsmError::Config(format!(
                "zap of {count} pages from page {page} outside the {} pages of the region",
                self.pages()
            )));
        }
        // SAFETY: the range lies inside our own mapping (checked above); MADV_DONTNEED
        // on private anonymous memory only discards its contents (the protocol says
        // they are stale or were handed over), it never invalidates the mapping itself.
        let rc = unsafe {
            libc::madvise(
                self.page_addr(page) as *mut libc::c_void,
                PAGE_SIZE * count as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc < 0 {
            return Err(DsmError::Uffd(UffdError::Ioctl {
                op: "madvise(MADV_DONTNEED)",
                addr: self.page_addr(page),
                source: io::Error::last_os_error(),
            }));
        }
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; the region is being
        // dropped, so nobody uses it through this object any more (users of the raw
        // pointer must not outlive the region, as documented on `as_ptr`'s users).
        unsafe {
            libc::munmap(self.base.cast::<libc::c_void>(), self.len());
        }
    }
}
