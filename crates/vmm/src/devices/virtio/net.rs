//! The virtio network device (device ID 1) on a host TAP interface ([`Net`], a
//! [`VirtioDevice`]; [`MmioNet`] on its transport).
//!
//! The device offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` (a fixed, locally
//! administered address, [`GUEST_MAC`]) and `VIRTIO_NET_F_STATUS` (the link is always
//! up), and no offloads: every frame carries a 12-byte `virtio_net_hdr` without checksum
//! or segmentation requests, and frames are whole and fully checksummed both ways. Queue
//! 0 receives ([`RX`]), queue 1 transmits ([`TX`]), 256 entries each.
//!
//! The worker thread ("virtio-net") waits on the transport's wake-up eventfd and on the
//! TAP descriptor:
//!
//! * transmit: a notified chain is gathered (the header first; readable descriptors only)
//!   and written to the TAP in one `writev`, with a clean header; the chain goes back
//!   with used length 0;
//! * receive: while the driver has receive chains available, a frame read from the TAP
//!   (header first) is copied into the next chain with a header of no flags and
//!   `num_buffers` 1, and the chain goes back with the header's and the frame's length.
//!   With no chain available, the worker stops reading the TAP (and stops waiting on it)
//!   until the driver notifies the receive queue: the frames wait in the host kernel's
//!   queue, none is read to be dropped.
//!
//! Bad chains (shorter than the header, a device-writable descriptor in a transmit chain
//! or a read-only one in a receive chain, outside guest memory, a frame longer than the
//! receive chain, a transmit header asking for an offload) are counted as errors and
//! returned with used length 0. The counters ([`NetStats`]) can be read while the device
//! runs.

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_S_LINK_UP,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::mmio::{Chain, VirtioDevice, VirtioMmio, Worker, QUEUE_SIZE_MAX, SIGNAL_BATCH};
use super::stream::Stream;
use super::tap::{self, Tap, VNET_HDR_LEN};

/// The guest's MAC address: locally administered (bit 1 of the first byte), unicast.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The receive queue.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;

/// The size of each queue (`QueueNumMax`).
const QUEUE_SIZE: u16 = QUEUE_SIZE_MAX;

/// The longest frame (without the virtio-net header) the device moves: 64 KiB and an
/// Ethernet header with a VLAN tag. Without offloads the frames are at most the MTU
/// and an Ethernet header.
pub const MAX_FRAME_LEN: usize = 65550;

/// The shortest frame the device transmits: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;

/// The length of the configuration space: `mac[6]`, `status` (little-endian u16).
const CONFIG_LEN: usize = 8;

/// The counters of a network device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Frames the guest sent that the TAP took.
    pub tx_packets: u64,
    /// Bytes of the frames delivered to the guest (without the virtio-net header).
    pub rx_bytes: u64,
    /// Bytes of the frames the TAP took (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames lost: read from the TAP but not delivered (longer than the receive chain,
    /// an offload the guest did not ask for, the queue reset meanwhile), or sent by the
    /// guest but refused by the TAP (e.g. its link is down).
    pub dropped: u64,
    /// Malformed chains (see the module's documentation).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rx_packets: AtomicU64,
    tx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
}

/// Problems the device warns about, once each.
#[derive(Debug, Clone, Copy)]
enum Problem {
    RxChain,
    TxChain,
    TxHeader,
    RxHeader,
    TapRead,
    TapWrite,
}

/// The virtio network device on a TAP interface.
pub struct Net {
    tap: Tap,
    config: [u8; CONFIG_LEN],
    counters: Counters,
    /// The TAP cannot be read any more (the interface went away): the worker stops
    /// waiting on it.
    tap_failed: AtomicBool,
    /// The problems already warned about (bits of [`Problem`]).
    warned: AtomicU32,
}

/// The virtio network device on its virtio-mmio transport.
pub type MmioNet = VirtioMmio<Net>;

impl Net {
    /// The device on `tap` (created by [`Tap::create`]), with the guest's address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            tap,
            config,
            counters: Counters::default(),
            tap_failed: AtomicBool::new(false),
            warned: AtomicU32::new(0),
        }
    }

    /// The TAP interface behind the device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        let c = &self.counters;
        NetStats {
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// True the first time `problem` happens.
    fn first(&self, problem: Problem) -> bool {
        let bit = 1u32 << (problem as u32);
        self.warned.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A malformed chain: counted, and warned about once.
    fn bad_chain(&self, problem: Problem, why: &str) {
        Self::count(&self.counters.errors, 1);
        if self.first(problem) {
            let queue = match problem {
                Problem::RxChain => "receive",
                _ => "transmit",
            };
            tracing::warn!("virtio-net: {queue} chain refused: {why}");
        }
    }

    /// The device-writable buffers of a receive chain, checked.
    fn rx_buffers(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Stream, &'static str> {
        let mut dst = Stream::default();
        for desc in chain {
            if !desc.is_write_only() {
                return Err("a read-only descriptor");
            }
            if !in_memory(mem, desc.addr(), desc.len()) {
                return Err("a buffer outside guest memory");
            }
            dst.push(desc.addr(), desc.len());
        }
        if dst.len < VNET_HDR_LEN as u64 {
            return Err("shorter than the virtio-net header");
        }
        Ok(dst)
    }

    /// The readable buffers of a transmit chain, checked.
    fn tx_buffers(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Stream, &'static str> {
        let mut src = Stream::default();
        for desc in chain {
            if desc.is_write_only() {
                return Err("a device-writable descriptor");
            }
            if !in_memory(mem, desc.addr(), desc.len()) {
                return Err("a buffer outside guest memory");
            }
            src.push(desc.addr(), desc.len());
        }
        if src.len < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
            return Err("shorter than the virtio-net header and an Ethernet header");
        }
        if src.len > (VNET_HDR_LEN + MAX_FRAME_LEN) as u64 {
            return Err("longer than the largest frame");
        }
        Ok(src)
    }

    /// Sends the frame of one transmit chain to the TAP.
    fn send(&self, mem: &GuestMemoryMmap, chain: Chain<'_>, frame: &mut [u8]) {
        let src = match Self::tx_buffers(mem, chain) {
            Ok(src) => src,
            Err(why) => return self.bad_chain(Problem::TxChain, why),
        };
        let mut hdr = [0u8; VNET_HDR_LEN];
        // Checked to be in guest memory; usize: at most the largest frame.
        let len = src.len as usize - VNET_HDR_LEN;
        let Some(frame) = frame.get_mut(..len) else {
            return self.bad_chain(Problem::TxChain, "longer than the largest frame");
        };
        if !src.read(mem, 0, &mut hdr) || !src.read(mem, VNET_HDR_LEN as u64, frame) {
            return self.bad_chain(Problem::TxChain, "guest memory cannot be read");
        }
        // No offload was negotiated: no checksum to complete, no segmentation.
        if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0
            || hdr[1] != VIRTIO_NET_HDR_GSO_NONE as u8
        {
            Self::count(&self.counters.errors, 1);
            if self.first(Problem::TxHeader) {
                tracing::warn!(
                    "virtio-net: transmit header asks for an offload that was not negotiated (flags {:#x}, gso_type {:#x}): frame refused",
                    hdr[0],
                    hdr[1]
                );
            }
            return;
        }
        // The TAP gets a clean header: nothing of the guest's but the frame.
        let clean = [0u8; VNET_HDR_LEN];
        match self
            .tap
            .write_vectored(&[IoSlice::new(&clean), IoSlice::new(frame)])
        {
            Ok(n) if n == VNET_HDR_LEN + len => {
                Self::count(&self.counters.tx_packets, 1);
                Self::count(&self.counters.tx_bytes, len as u64);
            }
            Ok(n) => {
                Self::count(&self.counters.dropped, 1);
                if self.first(Problem::TapWrite) {
                    tracing::warn!(
                        "virtio-net: TAP {} took {n} of {} bytes",
                        self.tap.name(),
                        VNET_HDR_LEN + len
                    );
                }
            }
            Err(e) => {
                Self::count(&self.counters.dropped, 1);
                if self.first(Problem::TapWrite) {
                    tracing::warn!(
                        "virtio-net: writing to TAP {} failed: {e} (frames are dropped)",
                        self.tap.name()
                    );
                }
            }
        }
    }

    /// Serves the transmit queue: a ring's worth of chains at most, then the receive
    /// side has its turn.
    fn transmit(&self, worker: &mut Worker<'_, Self>, frame: &mut [u8]) {
        worker.drain(TX, u32::from(QUEUE_SIZE), |w, chain| {
            let head = chain.head_index();
            self.send(w.mem(), chain, frame);
            w.complete(TX, head, |_| Ok(0))
        });
    }

    /// Moves frames from the TAP into receive chains until the TAP has none left, the
    /// driver has no chain left (`rx.blocked`), the queue stops, or a ring's worth of
    /// chains was used (then the transmit side has its turn: the TAP is still readable).
    fn receive(&self, worker: &mut Worker<'_, Self>, rx: &mut RxState) {
        let mut unsignalled = 0u32;
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = worker.pop(RX) else {
                // No buffer: the driver notifies when it adds some (and may have just).
                if worker.enable_notification(RX) {
                    continue;
                }
                rx.blocked = true;
                break;
            };
            let head = chain.head_index();
            let dst = match Self::rx_buffers(worker.mem(), chain) {
                Ok(dst) => dst,
                Err(why) => {
                    self.bad_chain(Problem::RxChain, why);
                    if !worker.complete(RX, head, |_| Ok(0)) {
                        break;
                    }
                    unsignalled += 1;
                    continue;
                }
            };
            let n = match self.tap.read(&mut rx.buf) {
                Ok(n) => n,
                Err(e) => {
                    // The chain waits for the next frame.
                    worker.unpop(RX);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            // The interface went away: stop waiting on it.
                            self.tap_failed.store(true, Ordering::Relaxed);
                            if self.first(Problem::TapRead) {
                                tracing::warn!(
                                    "virtio-net: reading from TAP {} failed: {e} (the guest receives nothing more)",
                                    self.tap.name()
                                );
                            }
                            break;
                        }
                    }
                }
            };
            let hdr_ok = n >= VNET_HDR_LEN
                && rx.buf[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 == 0
                && rx.buf[1] == VIRTIO_NET_HDR_GSO_NONE as u8;
            if !hdr_ok {
                // Not for a guest without offloads (the TAP has none enabled).
                Self::count(&self.counters.dropped, 1);
                if self.first(Problem::RxHeader) {
                    tracing::warn!(
                        "virtio-net: TAP {} gave a frame with an offload the guest cannot take: dropped",
                        self.tap.name()
                    );
                }
                worker.unpop(RX);
                continue;
            }
            let frame_len = n - VNET_HDR_LEN;
            if n as u64 > dst.len {
                Self::count(&self.counters.dropped, 1);
                self.bad_chain(
                    Problem::RxChain,
                    "shorter than the frame received (frame dropped)",
                );
                if !worker.complete(RX, head, |_| Ok(0)) {
                    break;
                }
                unsignalled += 1;
                continue;
            }
            // The header the guest sees: no flags, no segmentation, one buffer.
            rx.buf[..VNET_HDR_LEN].fill(0);
            rx.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let data = &rx.buf[..n];
            let mut written = false;
            let returned = worker.complete(RX, head, |mem| {
                written = dst.write(mem, 0, data);
                // n fits: at most the buffer's length.
                Ok(if written { n as u32 } else { 0 })
            });
            if written {
                Self::count(&self.counters.rx_packets, 1);
                Self::count(&self.counters.rx_bytes, frame_len as u64);
            } else {
                Self::count(&self.counters.dropped, 1);
            }
            if !returned {
                break;
            }
            unsignalled += 1;
            if unsignalled >= SIGNAL_BATCH {
                worker.signal(RX);
                unsignalled = 0;
            }
        }
        if unsignalled > 0 {
            worker.signal(RX);
        }
    }
}

/// Whether `len` bytes at `addr` lie in guest memory.
fn in_memory(mem: &GuestMemoryMmap, addr: vm_memory::GuestAddress, len: u32) -> bool {
    usize::try_from(len).is_ok_and(|l| GuestMemoryBackend::check_range(mem, addr, l))
}

/// The receive side of the worker.
struct RxState {
    /// One frame from the TAP, with its header.
    buf: Vec<u8>,
    /// The driver had no receive chain left: the TAP is not read until it notifies.
    blocked: bool,
}

impl VirtioDevice for Net {
    const NAME: &'static str = "virtio-net";
    const DEVICE_ID: u32 = VIRTIO_ID_NET;

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn run(&self, worker: &mut Worker<'_, Self>) {
        let mut rx = RxState {
            buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            blocked: false,
        };
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        loop {
            let read_tap =
                worker.has_queue(RX) && !rx.blocked && !self.tap_failed.load(Ordering::Relaxed);
            let events = worker.wait(read_tap.then(|| self.tap.as_fd()));
            if events.stop {
                return;
            }
            if events.kicked(TX) {
                self.transmit(worker, &mut frame);
            }
            if events.kicked(RX) {
                // New receive chains (or a queue that just went live).
                rx.blocked = false;
                worker.disable_notification(RX);
            }
            let tap_ok = !self.tap_failed.load(Ordering::Relaxed);
            if (events.fd_ready || events.kicked(RX))
                && worker.has_queue(RX)
                && !rx.blocked
                && tap_ok
            {
                self.receive(worker, &mut rx);
            }
        }
    }
}

impl VirtioMmio<Net> {
    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        self.device().stats()
    }
}

/// The guest's network as the VMM sets it up: a TAP on the host with the host's address,
/// the guest's address given to the guest kernel (`ip=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The TAP interface's name (created by the VMM, removed when it ends).
    pub tap: String,
    /// The host's address on the TAP.
    pub host_addr: Ipv4Addr,
    /// The prefix length of the subnet (8 to 30).
    pub prefix_len: u8,
    /// The guest's address, in the host's subnet.
    pub guest_addr: Ipv4Addr,
}

/// The host's default address and prefix on the TAP.
pub const DEFAULT_HOST: &str = "172.30.213.1/24";
/// The guest's default address.
pub const DEFAULT_GUEST: &str = "172.30.213.2";

/// The default TAP name of the VMM process `pid`: `dvmm<pid>` (at most 11 bytes).
pub fn default_tap_name(pid: u32) -> String {
    format!("dvmm{pid}")
}

/// Parses `ADDR/PREFIX` (e.g. "172.30.213.1/24").
pub fn parse_host(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("'{s}' is not an IPv4 address with a prefix length (e.g. {DEFAULT_HOST})");
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr = addr.parse::<Ipv4Addr>().map_err(|_| bad())?;
    let prefix = prefix.parse::<u8>().map_err(|_| bad())?;
    Ok((addr, prefix))
}

/// Parses an IPv4 address (e.g. "172.30.213.2").
pub fn parse_guest(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("'{s}' is not an IPv4 address (e.g. {DEFAULT_GUEST})"))
}

impl NetSpec {
    /// The defaults for the VMM process `pid`: TAP `dvmm<pid>`, host 172.30.213.1/24,
    /// guest 172.30.213.2.
    pub fn default_for(pid: u32) -> NetSpec {
        NetSpec {
            tap: default_tap_name(pid),
            host_addr: Ipv4Addr::new(172, 30, 213, 1),
            prefix_len: 24,
            guest_addr: Ipv4Addr::new(172, 30, 213, 2),
        }
    }

    /// The subnet's netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        tap::netmask(self.prefix_len)
    }

    /// Checks the specification: a valid TAP name, a prefix length of 8 to 30, two
    /// different unicast addresses in the same subnet, neither its network nor its
    /// broadcast address. The error is one line.
    pub fn validate(&self) -> Result<(), String> {
        tap::check_name(&self.tap).map_err(|e| e.to_string())?;
        let p = self.prefix_len;
        if !(8..=30).contains(&p) {
            return Err(format!("prefix length /{p} is out of range: use 8 to 30"));
        }
        let mask = u32::from(self.netmask());
        let (host, guest) = (self.host_addr, self.guest_addr);
        let network = Ipv4Addr::from(u32::from(host) & mask);
        let subnet = format!("{network}/{p}");
        for (who, a) in [("host", host), ("guest", guest)] {
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
                return Err(format!("the {who} address {a} is not a unicast address"));
            }
        }
        if host == guest {
            return Err(format!(
                "the host and the guest have the same address {host}"
            ));
        }
        if u32::from(guest) & mask != u32::from(network) {
            return Err(format!(
                "the guest address {guest} is not in the host's subnet {subnet}"
            ));
        }
        for (who, a) in [("host", host), ("guest", guest)] {
            let host_part = u32::from(a) & !mask;
            if host_part == 0 {
                return Err(format!(
                    "the {who} address {a} is the network address of {subnet}"
                ));
            }
            if host_part == !mask {
                return Err(format!(
                    "the {who} address {a} is the broadcast address of {subnet}"
                ));
            }
        }
        Ok(())
    }

    /// The guest kernel's option that configures its interface (IP_PNP):
    /// `ip=<guest>::<host>:<netmask>::eth0:off` (the host is the gateway).
    pub fn kernel_ip_option(&self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off",
            self.guest_addr,
            self.host_addr,
            self.netmask()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{Buf, Rig, OUTSIDE};
    use crate::devices::virtio::tap::tests::{no_ipv6, require_root, test_name, TapGuard};
    use std::collections::HashMap;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_mmio::{
        VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_QUEUE_NUM_MAX,
        VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_STATUS,
    };
    use vm_memory::{Bytes, GuestAddress};

    /// Where the rig's receive buffers go (one page each).
    const RX_BUFS: u64 = 0x40000;
    /// Where the rig's transmit chains go.
    const TX_BUFS: u64 = 0x80000;
    /// The test frames' EtherType: IEEE 802 local experimental (no host stack takes it).
    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
    /// A locally administered unicast address for the other end of the test frames.
    const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
    /// `sll_pkttype` of a frame this host sent (linux/if_packet.h).
    const PACKET_OUTGOING: u8 = 4;

    /// A test frame of `len` bytes from `src` to `dst`, marked with `tag`.
    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE);
        f.push(tag);
        f.extend((0..len.saturating_sub(f.len())).map(|i| (i as u8).wrapping_mul(7) ^ tag));
        f.truncate(len);
        f
    }

    /// The tag of a test frame (None for another frame).
    fn tag_of(f: &[u8]) -> Option<u8> {
        (f.len() > 14 && f[12..14] == ETHERTYPE).then(|| f[14])
    }

    /// An AF_PACKET socket on one interface: frames injected into it (they go to the
    /// TAP's reader, the device) and frames captured from it (what the device wrote).
    struct PacketSocket(OwnedFd);

    impl PacketSocket {
        fn bind(ifindex: u32) -> PacketSocket {
            // SAFETY: socket has no memory arguments; the result is checked. Protocol 0:
            // the socket receives nothing until it is bound to the one interface below.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: `sockaddr_ll` is plain data, for which all-zero bytes are valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind reads the given length of `sll`, which is alive across the call.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
            // Bounded reads: 100 ms each.
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: setsockopt reads the given length of `tv`, alive across the call.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
            PacketSocket(fd)
        }

        /// Sends `frame` on the interface: the TAP's reader (the device) gets it.
        fn send(&self, frame: &[u8]) {
            // SAFETY: send reads `frame.len()` bytes of `frame`, alive across the call.
            let n =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                n,
                frame.len() as isize,
                "send on the TAP: {}",
                io::Error::last_os_error()
            );
        }

        /// The first test frame that arrives on the interface from the TAP's side within
        /// 5 s (frames this host sends, and other frames, are skipped).
        fn capture(&self) -> Option<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; 1 << 16];
            while Instant::now() < deadline {
                // SAFETY: `sockaddr_ll` is plain data, for which all-zero bytes are valid.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: recvfrom writes at most `buf.len()` bytes into `buf` and at most
                // `len` bytes into `from`, both alive across the call.
                let n = unsafe {
                    libc::recvfrom(
                        self.0.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                // A timeout (or a signal): look at the clock again.
                let Ok(n) = usize::try_from(n) else {
                    continue;
                };
                let f = &buf[..n];
                if from.sll_pkttype != PACKET_OUTGOING && tag_of(f).is_some() {
                    return Some(f.to_vec());
                }
            }
            None
        }
    }

    /// The network device on a fresh TAP (up, no address, no IPv6: the host sends nothing
    /// on it by itself), a packet socket on that TAP, and the driver's side.
    struct NetRig {
        rig: Rig<Net>,
        sock: PacketSocket,
        /// The guest address of the buffer of each receive chain (by head).
        rx_bufs: HashMap<u16, u64>,
        /// Last: the TAP is gone (or removed) before the test ends.
        _guard: TapGuard,
    }

    impl std::ops::Deref for NetRig {
        type Target = Rig<Net>;
        fn deref(&self) -> &Rig<Net> {
            &self.rig
        }
    }

    impl std::ops::DerefMut for NetRig {
        fn deref_mut(&mut self) -> &mut Rig<Net> {
            &mut self.rig
        }
    }

    impl NetRig {
        fn new() -> NetRig {
            require_root();
            let name = test_name();
            let guard = TapGuard(name.clone());
            let tap = Tap::create(&name).unwrap();
            no_ipv6(&name);
            tap.set_up().unwrap();
            let sock = PacketSocket::bind(tap.if_index().unwrap());
            NetRig {
                rig: Rig::with(Net::new(tap, GUEST_MAC)),
                sock,
                rx_bufs: HashMap::new(),
                _guard: guard,
            }
        }

        /// A rig whose driver set up both queues.
        fn ready() -> NetRig {
            let mut rig = NetRig::new();
            rig.init();
            rig
        }

        /// Adds a receive chain of one writable buffer of `len` bytes (in page `slot`,
        /// filled with 0xee) and notifies the receive queue.
        fn add_rx(&mut self, slot: u64, len: u32) {
            let addr = RX_BUFS + 0x1000 * slot;
            self.mem
                .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                .unwrap();
            let head = self.add_chain_on(RX, &[(addr, len, true)]);
            self.rx_bufs.insert(head, addr);
            self.notify_on(RX as u32);
        }

        /// The next test frame the device delivers (other frames are skipped): its
        /// virtio-net header and its bytes.
        fn receive(&mut self) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
            for _ in 0..16 {
                let (id, len) = self.wait_used_on(RX);
                let addr = self.rx_bufs[&(id as u16)];
                let got = self.read_guest(addr, len as usize);
                if got.len() > VNET_HDR_LEN && tag_of(&got[VNET_HDR_LEN..]).is_some() {
                    let mut hdr = [0u8; VNET_HDR_LEN];
                    hdr.copy_from_slice(&got[..VNET_HDR_LEN]);
                    return (hdr, got[VNET_HDR_LEN..].to_vec());
                }
            }
            panic!("no test frame among the frames received");
        }

        /// Makes `bufs` one transmit chain, notifies, and waits for it to come back:
        /// its used length.
        fn transmit(&mut self, bufs: &[Buf]) -> u32 {
            let head = self.add_chain_on(TX, bufs);
            self.notify_on(TX as u32);
            let (id, len) = self.wait_used_on(TX);
            assert_eq!(id, u32::from(head));
            len
        }

        /// Writes a transmit header (`flags`, `gso_type`) and `frame` right after it at
        /// `at`; returns the bytes' length.
        fn put_tx(&self, at: u64, flags: u8, gso_type: u8, frame: &[u8]) -> u32 {
            let mut bytes = vec![0u8; VNET_HDR_LEN];
            bytes[0] = flags;
            bytes[1] = gso_type;
            bytes.extend_from_slice(frame);
            self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
            bytes.len() as u32
        }
    }

    /// The header the guest gets: no flags, no segmentation, one buffer.
    const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    #[test]
    fn device_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<MmioNet>();
    }

    #[test]
    fn registers_features_and_mac() {
        let rig = NetRig::new();
        assert_eq!(rig.r32(VIRTIO_MMIO_DEVICE_ID.into()), 1);
        // VERSION_1, MAC and STATUS; no offloads, no mergeable buffers, no control queue.
        assert_eq!(
            rig.device_features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
        );
        let mut config = [0u8; 8];
        rig.dev.mmio_read(0x100, &mut config);
        assert_eq!(&config[..6], &GUEST_MAC);
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
        assert_ne!(GUEST_MAC[0] & 0x02, 0, "locally administered");
        assert_eq!(GUEST_MAC[0] & 0x01, 0, "unicast");
        // Two queues of 256 entries.
        for (q, max) in [(0, 256), (1, 256), (2, 0)] {
            rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), q);
            assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_NUM_MAX.into()), max, "queue {q}");
        }
        assert_eq!(rig.dev.stats(), NetStats::default());
    }

    #[test]
    fn received_frame_arrives_after_the_header_with_an_interrupt() {
        let mut rig = NetRig::ready();
        rig.add_rx(0, 2048);
        rig.add_rx(1, 2048);
        let pulses = rig.irq.pulses.load(Ordering::SeqCst);
        let sent = frame(GUEST_MAC, PEER_MAC, 1, 142);
        rig.sock.send(&sent);
        let (hdr, got) = rig.receive();
        assert_eq!(hdr, RX_HEADER);
        assert_eq!(got, sent);
        rig.wait_interrupt(pulses);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()) & 1, 1);
        let stats = rig.dev.stats();
        assert_eq!(stats.rx_packets, 1);
        assert_eq!(stats.rx_bytes, 142);
        assert_eq!((stats.dropped, stats.errors), (0, 0));
        // A second frame, of the largest size a 1500-byte MTU gives, into the next chain.
        let big = frame(GUEST_MAC, PEER_MAC, 2, 1514);
        rig.sock.send(&big);
        let (hdr, got) = rig.receive();
        assert_eq!((hdr, got), (RX_HEADER, big));
        assert_eq!(rig.dev.stats().rx_bytes, 142 + 1514);
    }

    #[test]
    fn transmitted_frame_reaches_the_tap() {
        let mut rig = NetRig::ready();
        let sent = frame(PEER_MAC, GUEST_MAC, 3, 300);
        // The header and the frame's first 30 bytes in one buffer, the rest in two more.
        let len = rig.put_tx(TX_BUFS, 0, 0, &sent[..30]);
        rig.mem
            .write_slice(&sent[30..100], GuestAddress(TX_BUFS + 0x1000))
            .unwrap();
        rig.mem
            .write_slice(&sent[100..], GuestAddress(TX_BUFS + 0x2000))
            .unwrap();
        let pulses = rig.irq.pulses.load(Ordering::SeqCst);
        let used = rig.transmit(&[
            (TX_BUFS, len, false),
            (TX_BUFS + 0x1000, 70, false),
            (TX_BUFS + 0x2000, 200, false),
        ]);
        assert_eq!(used, 0);
        assert_eq!(rig.sock.capture().expect("no frame on the TAP"), sent);
        rig.wait_interrupt(pulses);
        let stats = rig.dev.stats();
        assert_eq!((stats.tx_packets, stats.tx_bytes), (1, 300));
        assert_eq!((stats.dropped, stats.errors), (0, 0));
    }

    #[test]
    fn receiving_waits_for_buffers() {
        let mut rig = NetRig::ready();
        // No receive chain: the frame waits in the host's queue.
        let sent = frame(GUEST_MAC, PEER_MAC, 4, 90);
        rig.sock.send(&sent);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rig.used_index_on(RX), 0);
        assert_eq!(rig.dev.stats(), NetStats::default());
        // A chain (and its notification): the frame is delivered.
        rig.add_rx(0, 2048);
        let (hdr, got) = rig.receive();
        assert_eq!((hdr, got), (RX_HEADER, sent));
        let stats = rig.dev.stats();
        assert_eq!((stats.rx_packets, stats.dropped), (1, 0));
    }

    #[test]
    fn frame_longer_than_the_chain_is_dropped() {
        let mut rig = NetRig::ready();
        // Room for the header and 40 bytes.
        rig.add_rx(0, VNET_HDR_LEN as u32 + 40);
        rig.sock.send(&frame(GUEST_MAC, PEER_MAC, 5, 100));
        let (id, len) = rig.wait_used_on(RX);
        assert_eq!((id, len), (0, 0));
        assert_eq!(rig.read_guest(RX_BUFS, 52), vec![0xee; 52]);
        let stats = rig.dev.stats();
        assert_eq!((stats.rx_packets, stats.dropped, stats.errors), (0, 1, 1));
        // The next frame goes into the next chain.
        rig.add_rx(1, 2048);
        let sent = frame(GUEST_MAC, PEER_MAC, 6, 100);
        rig.sock.send(&sent);
        let (hdr, got) = rig.receive();
        assert_eq!((hdr, got), (RX_HEADER, sent));
        assert_eq!(rig.dev.stats().rx_packets, 1);
    }

    #[test]
    fn malformed_chains_are_counted_and_returned() {
        let mut rig = NetRig::ready();
        // A frame that would be captured if any of these were sent.
        let bad = frame(PEER_MAC, GUEST_MAC, 7, 60);
        let len = rig.put_tx(TX_BUFS, 0, 0, &bad);
        let csum = TX_BUFS + 0x1000;
        rig.put_tx(csum, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, &bad);
        let gso = TX_BUFS + 0x2000;
        rig.put_tx(gso, 0, 1, &bad);
        let huge = (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
        let transmit_cases: [(&str, Vec<Buf>); 7] = [
            ("shorter than the header", vec![(TX_BUFS, 8, false)]),
            ("header only", vec![(TX_BUFS, VNET_HDR_LEN as u32, false)]),
            ("device-writable", vec![(TX_BUFS, len, true)]),
            (
                "outside guest memory",
                vec![(TX_BUFS, VNET_HDR_LEN as u32, false), (OUTSIDE, 60, false)],
            ),
            ("checksum offload", vec![(csum, len, false)]),
            ("segmentation offload", vec![(gso, len, false)]),
            ("longer than a frame", vec![(0x100000, huge, false)]),
        ];
        for (what, bufs) in &transmit_cases {
            assert_eq!(rig.transmit(bufs), 0, "{what}");
        }
        let receive_cases: [(&str, Buf); 3] = [
            ("read-only", (RX_BUFS, 2048, false)),
            ("shorter than the header", (RX_BUFS, 8, true)),
            ("outside guest memory", (OUTSIDE, 2048, true)),
        ];
        for (what, buf) in receive_cases {
            let head = rig.add_chain_on(RX, &[buf]);
            rig.notify_on(RX as u32);
            assert_eq!(rig.wait_used_on(RX), (u32::from(head), 0), "{what}");
        }
        let stats = rig.dev.stats();
        assert_eq!(stats.errors, 10);
        assert_eq!(
            (stats.tx_packets, stats.rx_packets, stats.dropped),
            (0, 0, 0)
        );
        // The device goes on: the first frame on the TAP is the good one.
        let good = frame(PEER_MAC, GUEST_MAC, 8, 60);
        let len = rig.put_tx(TX_BUFS, 0, 0, &good);
        assert_eq!(rig.transmit(&[(TX_BUFS, len, false)]), 0);
        assert_eq!(rig.sock.capture().expect("no frame on the TAP"), good);
        rig.add_rx(2, 2048);
        let sent = frame(GUEST_MAC, PEER_MAC, 9, 64);
        rig.sock.send(&sent);
        assert_eq!(rig.receive(), (RX_HEADER, sent));
        let stats = rig.dev.stats();
        assert_eq!(
            (stats.tx_packets, stats.rx_packets, stats.errors),
            (1, 1, 10)
        );
    }

    #[test]
    fn reset_stops_receiving_until_the_driver_is_back() {
        let mut rig = NetRig::ready();
        rig.add_rx(0, 2048);
        rig.w32(VIRTIO_MMIO_STATUS.into(), 0);
        assert_eq!(rig.status(), 0);
        // The chain made available before the reset is not used any more.
        let sent = frame(GUEST_MAC, PEER_MAC, 10, 80);
        rig.sock.send(&sent);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rig.used_index_on(RX), 0);
        assert_eq!(rig.dev.stats().rx_packets, 0);
        // Initialised again, with a buffer: the waiting frame comes in.
        rig.init();
        assert_eq!(
            rig.status(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK
        );
        rig.add_rx(0, 2048);
        assert_eq!(rig.receive(), (RX_HEADER, sent));
    }

    #[test]
    fn net_specs_are_checked() {
        let ok = NetSpec::default_for(4_194_304);
        assert_eq!(ok.tap, "dvmm4194304");
        ok.validate().unwrap();
        assert_eq!(
            (ok.host_addr, ok.prefix_len),
            parse_host(DEFAULT_HOST).unwrap()
        );
        assert_eq!(ok.guest_addr, parse_guest(DEFAULT_GUEST).unwrap());
        assert_eq!(
            ok.kernel_ip_option(),
            "ip=172.30.213.2::172.30.213.1:255.255.255.0::eth0:off"
        );
        let with = |f: &dyn Fn(&mut NetSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate()
        };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        type Change<'a> = &'a dyn Fn(&mut NetSpec);
        let bad: [(Change, &str); 11] = [
            (&|s| s.tap = String::new(), "invalid TAP name"),
            (
                &|s| s.tap = "a-very-long-tap-name".into(),
                "invalid TAP name",
            ),
            (&|s| s.tap = "a b".into(), "invalid TAP name"),
            (&|s| s.prefix_len = 7, "prefix length /7 is out of range"),
            (&|s| s.prefix_len = 31, "prefix length /31 is out of range"),
            (
                &|s| s.guest_addr = s.host_addr,
                "the same address 172.30.213.1",
            ),
            (
                &|s| s.guest_addr = ip("172.30.214.2"),
                "not in the host's subnet 172.30.213.0/24",
            ),
            (
                &|s| s.guest_addr = ip("172.30.213.255"),
                "broadcast address of 172.30.213.0/24",
            ),
            (
                &|s| s.host_addr = ip("172.30.213.0"),
                "network address of 172.30.213.0/24",
            ),
            (&|s| s.guest_addr = ip("224.0.0.1"), "not a unicast address"),
            (&|s| s.host_addr = ip("127.0.0.1"), "not a unicast address"),
        ];
        for (change, want) in bad {
            let e = with(change).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // Other subnets and prefixes.
        with(&|s| {
            s.host_addr = ip("10.1.0.1");
            s.guest_addr = ip("10.200.3.4");
            s.prefix_len = 8;
        })
        .unwrap();
        with(&|s| {
            s.host_addr = ip("192.168.7.5");
            s.guest_addr = ip("192.168.7.6");
            s.prefix_len = 30;
        })
        .unwrap();
        // Parsing.
        assert_eq!(parse_host("10.0.0.1/16").unwrap(), (ip("10.0.0.1"), 16));
        for s in [
            "10.0.0.1",
            "10.0.0.1/",
            "10.0.0/24",
            "10.0.0.1/x",
            "10.0.0.1/300",
            "",
        ] {
            let e = parse_host(s).unwrap_err();
            assert!(
                e.contains("is not an IPv4 address with a prefix length"),
                "{e}"
            );
        }
        for s in ["10.0.0.1/24", "host", "", "1.2.3.4.5"] {
            let e = parse_guest(s).unwrap_err();
            assert!(e.contains("is not an IPv4 address"), "{e}");
        }
    }
}
