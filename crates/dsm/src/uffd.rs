//! A minimal userfaultfd binding: the ioctls the DSM runtime needs, nothing more.
//!
//! Hand-rolled on `libc` rather than the `userfaultfd` crate: that crate's write-protect
//! support (`linux5_7` feature) generates its bindings with bindgen at build time (needs
//! libclang on every build machine) and it has no way to pass `UFFDIO_COPY_MODE_WP`,
//! which the runtime needs to install read-only copies atomically.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;

/// Feature bit: write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_THREAD_ID`: page-fault events carry the faulting thread's id (used when
/// offered: `dvmm stats` shows which vCPUs wait for a page).
pub const FEATURE_THREAD_ID: u64 = 1 << 8;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;

const COPY_MODE_DONTWAKE: u64 = 1 << 0;
const COPY_MODE_WP: u64 = 1 << 1;
const ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// Bits of the `ioctls` mask returned by `UFFDIO_REGISTER` (`1 << _UFFDIO_*`).
const IOCTL_WAKE: u64 = 1 << 0x02;
const IOCTL_COPY: u64 = 1 << 0x03;
const IOCTL_ZEROPAGE: u64 = 1 << 0x04;
const IOCTL_WRITEPROTECT: u64 = 1 << 0x06;

/// `uffd_msg.event` of a page fault.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `uffd_msg.arg.pagefault.flags`: the fault was a write.
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `uffd_msg.arg.pagefault.flags`: the fault was a write-protect fault.
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault view of the union is used.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFD_API << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFD_API << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());

/// Most events [`Uffd::read_faults`] reads at once.
pub const READ_BATCH: usize = 16;

/// A page fault read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (page aligned by the kernel unless EXACT_ADDRESS was requested).
    pub address: u64,
    /// The access was a write.
    pub write: bool,
    /// Write-protect fault (on a present, write-protected page), as opposed to MISSING.
    pub wp: bool,
    /// The faulting thread's id (0 when the kernel does not report it).
    pub tid: u32,
}

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The userfaultfd system call failed.
    #[error("userfaultfd() failed: {0} (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(io::Error),
    /// The API handshake failed.
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(io::Error),
    /// The kernel lacks a needed feature.
    #[error("userfaultfd lacks {what} (kernel features {features:#x}); the DSM needs MISSING + WP on anonymous memory (Linux >= 5.7)")]
    Missing {
        /// Which feature or ioctl.
        what: &'static str,
        /// Features the kernel reported.
        features: u64,
    },
    /// An ioctl failed.
    #[error("{op} failed at {addr:#x}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Start address of the range.
        addr: u64,
        /// The error.
        source: io::Error,
    },
}

/// An open, API-initialised userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn raw_uffd() -> Result<OwnedFd, UffdError> {
    // SAFETY: plain system call with flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Create(io::Error::last_os_error()));
    }
    let fd = RawFd::try_from(fd).map_err(|_| UffdError::Create(io::Error::other("bad fd")))?;
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: &OwnedFd, features: u64) -> Result<UffdioApi, UffdError> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a pointer to a `struct uffdio_api`, which `a` is (repr C,
    // same layout); it lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut a as *mut UffdioApi) };
    if r < 0 {
        return Err(UffdError::Api(io::Error::last_os_error()));
    }
    Ok(a)
}

impl Uffd {
    /// Opens a userfaultfd (non-blocking, close-on-exec) with the write-protect feature,
    /// after probing that the kernel offers it.
    pub fn new() -> Result<Uffd, UffdError> {
        // The API ioctl may be issued only once per descriptor: probe on a throwaway one.
        let probe = raw_uffd()?;
        let offered = api(&probe, 0)?.features;
        drop(probe);
        if offered & FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::Missing {
                what: "the write-protect feature (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
                features: offered,
            });
        }
        let fd = raw_uffd()?;
        api(
            &fd,
            FEATURE_PAGEFAULT_FLAG_WP | (offered & FEATURE_THREAD_ID),
        )?;
        Ok(Uffd { fd })
    }

    /// Registers `[start, start+len)` for MISSING and WP faults and checks that the
    /// ioctls the runtime uses are available on it.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`, matched by `r`.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_REGISTER as _,
                &mut r as *mut UffdioRegister,
            )
        };
        if rc < 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_REGISTER(MISSING|WP)",
                addr: start,
                source: io::Error::last_os_error(),
            });
        }
        for (bit, what) in [
            (IOCTL_COPY, "UFFDIO_COPY"),
            (IOCTL_ZEROPAGE, "UFFDIO_ZEROPAGE"),
            (IOCTL_WAKE, "UFFDIO_WAKE"),
            (IOCTL_WRITEPROTECT, "UFFDIO_WRITEPROTECT"),
        ] {
            if r.ioctls & bit == 0 {
                return Err(UffdError::Missing {
                    what,
                    features: r.ioctls,
                });
            }
        }
        Ok(())
    }

    fn ioctl<T>(
        &self,
        req: u64,
        arg: &mut T,
        op: &'static str,
        addr: u64,
    ) -> Result<(), UffdError> {
        loop {
            // SAFETY: callers pass the argument struct matching `req` (private helper).
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(UffdError::Ioctl {
                op,
                addr,
                source: e,
            });
        }
    }

    /// `UFFDIO_COPY` of one page from `src` to the missing page at `dst`, write-protected
    /// if `wp`, waking the waiters if `wake`.
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes; `dst` must be a registered range.
    pub unsafe fn copy(
        &self,
        src: *const u8,
        dst: u64,
        len: u64,
        wp: bool,
        wake: bool,
    ) -> Result<(), UffdError> {
        let mode = if wp { COPY_MODE_WP } else { 0 } | if wake { 0 } else { COPY_MODE_DONTWAKE };
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode,
            copy: 0,
        };
        loop {
            match self.ioctl(UFFDIO_COPY, &mut c, "UFFDIO_COPY", dst) {
                Ok(()) => return Ok(()),
                // A partial copy (EAGAIN) can only happen on multi-page copies or while
                // the mapping changes; retry the remainder.
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) && c.copy >= 0 =>
                {
                    let done = c.copy as u64;
                    c.dst += done;
                    c.src += done;
                    c.len -= done.min(c.len);
                    c.copy = 0;
                    if c.len == 0 {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `UFFDIO_ZEROPAGE` (maps the shared zero page; only for writable installs).
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<(), UffdError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: if wake { 0 } else { ZEROPAGE_MODE_DONTWAKE },
            zeropage: 0,
        };
        self.ioctl(UFFDIO_ZEROPAGE, &mut z, "UFFDIO_ZEROPAGE", dst)
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`wp`) or unprotect the range; unprotecting wakes
    /// write-protect waiters only if `wake`.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        wp: bool,
        wake: bool,
    ) -> Result<(), UffdError> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if wp {
                WRITEPROTECT_MODE_WP
            } else if wake {
                0
            } else {
                WRITEPROTECT_MODE_DONTWAKE
            },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut w, "UFFDIO_WRITEPROTECT", start)
    }

    /// `UFFDIO_WAKE` of every thread waiting on a fault in the range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut r, "UFFDIO_WAKE", start)
    }

    /// Reads up to [`READ_BATCH`] pending events without blocking (the descriptor is
    /// non-blocking): page faults go to `out`; other events are ignored. Returns the
    /// number of events read (0 if there was nothing to read).
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        let mut msgs = [UffdMsg::default(); READ_BATCH];
        let size = std::mem::size_of_val(&msgs);
        loop {
            // SAFETY: reads at most `size` bytes into `msgs`, a plain-data array.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast::<libc::c_void>(),
                    size,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(0),
                    _ => return Err(e),
                }
            }
            let count = usize::try_from(n).unwrap_or(0) / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..count] {
                if m.event == EVENT_PAGEFAULT {
                    out.push(Fault {
                        address: m.address,
                        write: m.flags & (PAGEFAULT_FLAG_WRITE | PAGEFAULT_FLAG_WP) != 0,
                        wp: m.flags & PAGEFAULT_FLAG_WP != 0,
                        // The kernel fills `ptid` only with FEATURE_THREAD_ID (else 0).
                        tid: u32::try_from(m.ptid).unwrap_or(0),
                    });
                }
            }
            return Ok(count);
        }
    }

    /// The raw descriptor, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/userfaultfd.h> on x86_64.
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
