//! [`PageBuf`]: an owned, 4 KiB, 4096-byte aligned buffer.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::frame::PAGE_SIZE;

/// Freed page buffers kept for reuse (at most [`POOL_PAGES`]): a node streaming pages
/// allocates and frees one per frame on different threads, and the allocator's
/// aligned path (plus zeroing) cost more than the copy itself.
static POOL: Mutex<Vec<PoolPage>> = Mutex::new(Vec::new());
/// The most buffers [`POOL`] keeps (4 MiB).
const POOL_PAGES: usize = 1024;

/// A pooled buffer: the address of an allocation of [`PAGE_LAYOUT`] that no
/// [`PageBuf`] owns.
struct PoolPage(NonNull<u8>);
// SAFETY: a pooled buffer is plain memory owned by the pool alone; moving its address
// between threads is what the global allocator allows for any allocation.
unsafe impl Send for PoolPage {}

fn pool() -> std::sync::MutexGuard<'static, Vec<PoolPage>> {
    // The pool holds addresses only; a panic while it was locked cannot leave one
    // half-added, so a poisoned lock is still consistent.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Layout of one page buffer: 4096 bytes, 4096-byte aligned.
const PAGE_LAYOUT: Layout = match Layout::from_size_align(PAGE_SIZE, PAGE_SIZE) {
    Ok(layout) => layout,
    // Evaluated at compile time: 4096 is a power of two and fits, so this arm is
    // unreachable; a const panic would fail the build, never a running node.
    Err(_) => panic!("invalid page layout"),
};

/// An owned, zero-initialised, 4 KiB buffer aligned to 4096 bytes.
///
/// Dropped buffers go back to a small process-wide pool; [`PageBuf::recycled`] takes
/// one from it without zeroing, for callers that overwrite all 4 KiB.
///
/// Received page payloads are read straight from the socket into a `PageBuf`, so a
/// DSM runtime can hand its address to `UFFDIO_COPY` (which wants a page-aligned
/// source) without another copy.
///
/// ```
/// use transport::PageBuf;
/// let mut page = PageBuf::new();
/// assert_eq!(page.len(), 4096);
/// assert_eq!(page.as_ptr() as usize % 4096, 0);
/// page[0] = 7;
/// assert_eq!(page.as_slice()[0], 7);
/// ```
pub struct PageBuf {
    ptr: NonNull<u8>,
}

// SAFETY: `PageBuf` uniquely owns its allocation (like `Box<[u8; 4096]>`); nothing else
// aliases the pointer, so moving it to another thread is sound.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is `Sync`; mutation needs `&mut`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// Size of a page buffer in bytes (4096).
    pub const SIZE: usize = PAGE_SIZE;

    /// Allocates a zeroed, page-aligned buffer.
    pub fn new() -> Self {
        let pooled = pool().pop(); // the lock is released here
        match pooled {
            Some(PoolPage(ptr)) => {
                let mut page = PageBuf { ptr };
                page.as_mut_slice().fill(0);
                page
            }
            None => {
                // SAFETY: PAGE_LAYOUT has a non-zero size.
                let raw = unsafe { alloc::alloc_zeroed(PAGE_LAYOUT) };
                let Some(ptr) = NonNull::new(raw) else {
                    alloc::handle_alloc_error(PAGE_LAYOUT)
                };
                PageBuf { ptr }
            }
        }
    }

    /// A buffer from the pool with whatever bytes its last owner left in it (zeroes
    /// if the pool is empty): for callers that overwrite all 4 KiB right away, such
    /// as a frame read from a socket or a copy of a mapped page.
    pub fn recycled() -> Self {
        let pooled = pool().pop(); // the lock is released here
        match pooled {
            Some(PoolPage(ptr)) => PageBuf { ptr },
            None => PageBuf::new(),
        }
    }

    /// Copies `src` into a new buffer; `None` unless `src` is exactly 4096 bytes long.
    pub fn from_slice(src: &[u8]) -> Option<Self> {
        if src.len() != PAGE_SIZE {
            return None;
        }
        let mut page = PageBuf::recycled();
        page.copy_from_slice(src);
        Some(page)
    }

    /// The contents as a slice.
    pub fn as_slice(&self) -> &[u8] {
        self
    }

    /// The contents as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }

    /// Address of the first byte (4096-aligned), e.g. the `src` of `UFFDIO_COPY`.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable address of the first byte (4096-aligned).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Always 4096.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        PAGE_SIZE
    }
}

impl Default for PageBuf {
    fn default() -> Self {
        PageBuf::new()
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to PAGE_SIZE initialised (zeroed at allocation) bytes that
        // this value owns and that live as long as `self`; the borrow ties them to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), PAGE_SIZE) }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees the access is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), PAGE_SIZE) }
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for PageBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Clone for PageBuf {
    fn clone(&self) -> Self {
        let mut page = PageBuf::recycled();
        page.copy_from_slice(self);
        page
    }
}

impl PartialEq for PageBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for PageBuf {}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBuf")
            .field("ptr", &self.ptr)
            .field("head", &&self[..8])
            .finish_non_exhaustive()
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let mut pool = pool();
        if pool.len() < POOL_PAGES {
            pool.push(PoolPage(self.ptr));
            return;
        }
        drop(pool);
        // SAFETY: `ptr` was returned by `alloc_zeroed(PAGE_LAYOUT)` and is freed exactly
        // once, here, with the same layout (it is not in the pool: that push returned).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), PAGE_LAYOUT) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buf_is_aligned_zeroed_and_owned() {
        let mut a = PageBuf::new();
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert!(a.iter().all(|&b| b == 0));
        a[4095] = 9;
        let b = a.clone();
        assert_eq!(a, b);
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert!(PageBuf::from_slice(&[0u8; 10]).is_none());
        let c = PageBuf::from_slice(&[3u8; 4096]).unwrap();
        assert!(c.iter().all(|&x| x == 3));
    }

    #[test]
    fn freed_buffers_are_reused_and_new_ones_are_zeroed() {
        // Other tests share the pool: fill a few, free them, and check that buffers
        // taken afterwards come back zeroed from `new` however they were left.
        let dirty: Vec<PageBuf> = (0..8)
            .map(|_| PageBuf::from_slice(&[0xa5; 4096]).unwrap())
            .collect();
        drop(dirty);
        for _ in 0..8 {
            let p = PageBuf::new();
            assert!(
                p.iter().all(|&b| b == 0),
                "a page from new() must be zeroed"
            );
            assert_eq!(p.as_ptr() as usize % 4096, 0);
        }
    }
}
