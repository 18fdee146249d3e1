//! The host end of the virtio network device: a TAP interface.
//!
//! [`Tap::create`] opens `/dev/net/tun` (non-blocking) and makes a new TAP interface
//! (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): every frame read from or
//! written to the descriptor is preceded by a 12-byte virtio-net header (`TUNSETVNETHDRSZ`
//! 12, the header of a VERSION_1 device), and no offloads are enabled (`TUNSETOFFLOAD` 0),
//! so the frames the host hands over are whole and fully checksummed. A name that exists
//! already is refused: `/sys/class/net/NAME` is checked first, and `IFF_TUN_EXCL` makes
//! the kernel refuse too (a plain `TUNSETIFF` would attach to an existing persistent TAP).
//! The interface is not persistent: it disappears when the descriptor closes (the [`Tap`]
//! is dropped, or the process ends).
//!
//! [`Tap::configure_host`] gives the host side an IPv4 address and brings the link up
//! (`SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCSIFFLAGS` on an `AF_INET` datagram socket).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The longest interface name the kernel takes (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

/// The size of the virtio-net header before each frame on the TAP descriptor (`struct
/// virtio_net_hdr_mrg_rxbuf`: the header of a VERSION_1 device).
pub const VNET_HDR_LEN: usize = 12;

/// Why a TAP interface cannot be created or configured. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not one the kernel takes.
    #[error("invalid TAP name {0:?}: use 1 to 15 bytes, without '/', ':' or white space")]
    Name(String),
    /// An interface of that name exists already.
    #[error("network interface {0} already exists: choose another TAP name")]
    Exists(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// Creating an interface needs privileges this process lacks.
    #[error(
        "cannot create TAP {0}: permission denied (creating a TAP needs root or CAP_NET_ADMIN)"
    )]
    Permission(String),
    /// The kernel refused to create the interface.
    #[error("cannot create TAP {name}: {source}")]
    Create {
        /// The interface.
        name: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The interface exists but could not be set up.
    #[error("cannot configure TAP {name} ({what}): {source}")]
    Configure {
        /// The interface.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// Checks that `name` is a name the kernel takes for a new interface: 1 to 15 bytes, not
/// "." or "..", without '/', ':', white space or control characters.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let bad_char = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.contains(bad_char);
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

/// Whether an interface called `name` exists (as `/sys/class/net` shows).
pub fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .symlink_metadata()
        .is_ok()
}

/// An `ifreq` naming interface `name` (at most [`MAX_NAME_LEN`] bytes), the rest zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a byte array and a union of integers, socket
    // addresses and pointers), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name is at most 15 bytes: the 16th stays the terminating NUL.
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// An IPv4 `sockaddr` (port 0).
fn inet_sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16-byte plain-data structures (the
    // transmute checks the sizes); every bit pattern is a valid `sockaddr`, and an
    // AF_INET `sockaddr` is by definition a `sockaddr_in`.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The netmask of a prefix of `prefix_len` bits (at most 32).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

/// A TAP interface created by this process; it disappears when dropped.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the TAP interface `name` (see the module's documentation): a one-line
    /// error if the name is invalid, the interface exists already, or the kernel refuses.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        if interface_exists(name) {
            return Err(TapError::Exists(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = ifreq(name);
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
        // The flags field is a C short; IFF_TUN_EXCL is its top bit.
        req.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`; `req` is a valid, initialised
        // `ifreq` that outlives the call, and `file` is an open /dev/net/tun descriptor.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                // IFF_TUN_EXCL: created meanwhile (or another kind of interface).
                Some(libc::EBUSY | libc::EEXIST) => TapError::Exists(name.to_string()),
                Some(libc::EPERM | libc::EACCES) => TapError::Permission(name.to_string()),
                _ => TapError::Create {
                    name: name.to_string(),
                    source: e,
                },
            });
        }
        // From here on, dropping `tap` removes the interface.
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to
        // `hdr_len`, alive across the call; the descriptor is an attached TAP.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(r, "TUNSETVNETHDRSZ")?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value (the offload flags, here
        // none); no memory is passed. The descriptor is an attached TAP.
        let r = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                0 as libc::c_ulong,
            )
        };
        tap.check(r, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's index.
    pub fn if_index(&self) -> io::Result<u32> {
        let name = CString::new(self.name.as_str())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `name` is a NUL-terminated string alive across the call, which only
        // reads it.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => Err(io::Error::last_os_error()),
            index => Ok(index),
        }
    }

    /// Gives the host side `addr`/`prefix_len` and brings the link up.
    pub fn configure_host(&self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), TapError> {
        let sock = self.inet_socket()?;
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_addr = inet_sockaddr(addr);
        // SAFETY: SIOCSIFADDR reads one `ifreq` (name and an AF_INET address), valid and
        // alive across the call; `sock` is an open socket.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) };
        self.check(r, "SIOCSIFADDR")?;
        req.ifr_ifru.ifru_netmask = inet_sockaddr(netmask(prefix_len));
        // SAFETY: as above, with the netmask (SIOCSIFNETMASK).
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) };
        self.check(r, "SIOCSIFNETMASK")?;
        self.link_up(&sock)
    }

    /// Brings the link up without giving it an address.
    pub fn set_up(&self) -> Result<(), TapError> {
        let sock = self.inet_socket()?;
        self.link_up(&sock)
    }

    /// Sets `IFF_UP` through `sock`.
    fn link_up(&self, sock: &OwnedFd) -> Result<(), TapError> {
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS writes the flags into the `ifreq`, valid and alive across
        // the call; `sock` is an open socket.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        self.check(r, "SIOCGIFFLAGS")?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the flags (and any value of
        // the short is valid anyway).
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the `ifreq`, valid and alive across the call.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
        self.check(r, "SIOCSIFFLAGS")
    }

    /// An AF_INET datagram socket for the interface ioctls.
    fn inet_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: socket has no memory arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        self.check(fd, "socket")?;
        // SAFETY: `fd` is a new descriptor (checked above) that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// An error for step `what` if a system call returned a negative value.
    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r >= 0 {
            return Ok(());
        }
        Err(TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        })
    }

    /// Reads one frame, with its virtio-net header first; `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame, with its virtio-net header first, gathered from `bufs`.
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    pub(crate) fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Fails a test that cannot run without root (rather than pass without checking).
    pub(crate) fn require_root() {
        assert!(
            is_root(),
            "this test needs root (it creates TAP interfaces); run it as root"
        );
    }

    /// A fresh interface name for a test: `dvt<pid>x<n>` (at most 15 bytes).
    pub(crate) fn test_name() -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dvt{}x{}",
            std::process::id() % 10_000_000,
            NEXT.fetch_add(1, Ordering::Relaxed) % 100
        );
        assert!(name.len() <= MAX_NAME_LEN, "{name}");
        name
    }

    /// Removes interface `name` if it is (still) there: attaches to it and clears its
    /// persistence, so that it goes away with the descriptor.
    fn remove_leftover(name: &str) {
        if !interface_exists(name) {
            return;
        }
        let Ok(file) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        else {
            return;
        };
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes `req`, a valid `ifreq` alive across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } == 0 {
            // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
            unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) };
        }
    }

    /// Turns IPv6 off on interface `name` (before its link goes up): with no IPv4
    /// address either, the host gives it no address and sends nothing on it by itself.
    /// (A host without IPv6 has nothing to turn off.)
    pub(crate) fn no_ipv6(name: &str) {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    }

    /// Waits (a few seconds at most) until interface `name` is gone; false if it stays.
    pub(crate) fn wait_gone(name: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while interface_exists(name) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Makes sure a test's interface is gone when the test ends, even when it fails:
    /// waits for it to vanish, and removes it if it did not.
    pub(crate) struct TapGuard(pub String);

    impl Drop for TapGuard {
        fn drop(&mut self) {
            if !wait_gone(&self.0) {
                remove_leftover(&self.0);
            }
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in [
            "",
            "0123456789abcdef",
            "a/b",
            "a b",
            "a\tb",
            "a\nb",
            ".",
            "..",
            "a:1",
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(matches!(e, TapError::Name(_)), "{bad:?}: {e}");
            let msg = e.to_string();
            assert_eq!(msg.lines().count(), 1, "{msg}");
            assert!(msg.contains("invalid TAP name"), "{msg}");
            // Creating refuses them before touching the system.
            assert!(
                matches!(Tap::create(bad), Err(TapError::Name(_))),
                "{bad:?}"
            );
        }
        for good in ["dvmm4194304", "0123456789abcde", "tap-0_x.y"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn tap_is_created_once_and_removed_on_drop() {
        require_root();
        let name = test_name();
        let _guard = TapGuard(name.clone());
        let tap = Tap::create(&name).unwrap();
        assert_eq!(tap.name(), name);
        assert!(interface_exists(&name));
        // The kernel's view: a TAP with the virtio-net header and no packet information.
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        assert_eq!(flags & want, want, "tun_flags {flags:#x}");
        assert_eq!(flags & libc::IFF_PERSIST as u32, 0, "tun_flags {flags:#x}");
        assert!(tap.if_index().unwrap() > 0);
        // Nothing to read yet: the descriptor does not block.
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // The link goes up (and has no address).
        no_ipv6(&name);
        tap.set_up().unwrap();
        let up = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let up = u32::from_str_radix(up.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(up & libc::IFF_UP as u32, 0);
        let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        assert!(
            !inet6
                .lines()
                .any(|l| l.split_whitespace().last() == Some(name.as_str())),
            "{name} has an IPv6 address:\n{inet6}"
        );
        // A second TAP of the same name is refused, in one line naming it.
        let e = Tap::create(&name).unwrap_err();
        assert!(matches!(e, TapError::Exists(_)), "{e}");
        let msg = e.to_string();
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(
            msg.contains(&name) && msg.contains("already exists"),
            "{msg}"
        );
        // The first one is unharmed.
        assert!(interface_exists(&name));
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(tap);
        assert!(
            wait_gone(&name),
            "{name} is still there after the TAP was dropped"
        );
    }

    #[test]
    fn existing_interfaces_are_refused() {
        require_root();
        let e = Tap::create("lo").unwrap_err();
        assert!(matches!(e, TapError::Exists(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "network interface lo already exists: choose another TAP name"
        );
    }
}
