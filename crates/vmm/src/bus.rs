//! The I/O bus of one node: where a vCPU's port and MMIO accesses (outside its own
//! LAPIC page) go.
//!
//! On the I/O node (node 0, or a single-node VM) the bus is [`IoBus::Local`]: the
//! legacy devices of [`crate::devices`] and the IOAPIC, decoded by address range (see
//! [`crate::layout`]). On every other node it is [`IoBus::Remote`]: each access is
//! forwarded to the I/O node through the cluster link, which answers with the same
//! [`IoBus::access`] of its local bus.

use crate::lock;
use std::sync::{Arc, Mutex};

use irqchip::IoApic;

use crate::devices::virtio::{MmioBlock, MmioNet};
use crate::devices::{ConsoleOut, Devices, PortEvent};
use crate::irq::Router;
use crate::layout::{
    IOAPIC_BASE, IOAPIC_RANGE, VIRTIO_BLK_BASE, VIRTIO_BLK_RANGE, VIRTIO_NET_BASE, VIRTIO_NET_RANGE,
};
use crate::vm::{ClusterLink, IoAccess};

/// The devices and IOAPIC of the I/O node.
pub struct LocalBus {
    devices: Mutex<Devices>,
    ioapic: Arc<Mutex<IoApic>>,
    router: Arc<Router>,
    /// The virtio block device, if the guest has a disk.
    disk: Option<MmioBlock>,
    /// The virtio network device, if the guest has one.
    net: Option<MmioNet>,
}

/// Where this node's device accesses go.
pub enum IoBus {
    /// The devices are here (I/O node).
    Local(LocalBus),
    /// The devices are on the I/O node: forward every access there.
    Remote(Arc<dyn ClusterLink>),
}

impl LocalBus {
    /// The I/O node's bus: `ioapic` decodes the IOAPIC page, `router` delivers what it
    /// and the devices raise; `acpi`: the guest has ACPI tables.
    pub fn new(
        console: ConsoleOut,
        ioapic: Arc<Mutex<IoApic>>,
        router: Arc<Router>,
        acpi: bool,
    ) -> Self {
        LocalBus {
            devices: Mutex::new(Devices::new(console, router.clone(), acpi)),
            ioapic,
            router,
            disk: None,
            net: None,
        }
    }

    /// Puts the virtio block device at [`VIRTIO_BLK_BASE`].
    pub fn with_disk(mut self, disk: MmioBlock) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The virtio block device.
    pub fn disk(&self) -> Option<&MmioBlock> {
        self.disk.as_ref()
    }

    /// Puts the virtio network device at [`VIRTIO_NET_BASE`].
    pub fn with_net(mut self, net: MmioNet) -> Self {
        self.net = Some(net);
        self
    }

    /// The virtio network device.
    pub fn net(&self) -> Option<&MmioNet> {
        self.net.as_ref()
    }

    fn pio_read(&self, port: u16, data: &mut [u8]) {
        lock(&self.devices).pio_read(port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> PortEvent {
        lock(&self.devices).pio_write(port, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if IOAPIC_RANGE.contains(&addr) {
            let b = lock(&self.ioapic).read(addr - IOAPIC_BASE).to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(i).copied().unwrap_or(0);
            }
        } else if let Some(disk) = self
            .disk
            .as_ref()
            .filter(|_| VIRTIO_BLK_RANGE.contains(&addr))
        {
            disk.mmio_read(addr - VIRTIO_BLK_BASE, data);
        } else if let Some(net) = self
            .net
            .as_ref()
            .filter(|_| VIRTIO_NET_RANGE.contains(&addr))
        {
            net.mmio_read(addr - VIRTIO_NET_BASE, data);
        } else {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if IOAPIC_RANGE.contains(&addr) {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            let msgs = lock(&self.ioapic).write(addr - IOAPIC_BASE, u32::from_le_bytes(b));
            for m in msgs {
                self.router.send(&m);
            }
        } else if let Some(disk) = self
            .disk
            .as_ref()
            .filter(|_| VIRTIO_BLK_RANGE.contains(&addr))
        {
            disk.mmio_write(addr - VIRTIO_BLK_BASE, data);
        } else if let Some(net) = self
            .net
            .as_ref()
            .filter(|_| VIRTIO_NET_RANGE.contains(&addr))
        {
            net.mmio_write(addr - VIRTIO_NET_BASE, data);
        }
    }
}

impl IoBus {
    /// Port read by vCPU `vcpu`.
    pub fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        match self {
            IoBus::Local(b) => b.pio_read(port, data),
            IoBus::Remote(link) => {
                link.io(vcpu, IoAccess::PioRead(port), data);
            }
        }
    }

    /// Port write by vCPU `vcpu`.
    pub fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> PortEvent {
        match self {
            IoBus::Local(b) => b.pio_write(port, data),
            IoBus::Remote(link) => {
                let mut buf = data.to_vec();
                link.io(vcpu, IoAccess::PioWrite(port), &mut buf)
            }
        }
    }

    /// MMIO read (outside the LAPIC page) by vCPU `vcpu`.
    pub fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) {
        match self {
            IoBus::Local(b) => b.mmio_read(addr, data),
            IoBus::Remote(link) => {
                link.io(vcpu, IoAccess::MmioRead(addr), data);
            }
        }
    }

    /// MMIO write (outside the LAPIC page) by vCPU `vcpu`.
    pub fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) {
        match self {
            IoBus::Local(b) => b.mmio_write(addr, data),
            IoBus::Remote(link) => {
                let mut buf = data.to_vec();
                link.io(vcpu, IoAccess::MmioWrite(addr), &mut buf);
            }
        }
    }

    /// One access in its forwarded form (what another node's [`IoBus::Remote`] sends).
    pub fn access(&self, vcpu: usize, access: IoAccess, data: &mut [u8]) -> PortEvent {
        match access {
            IoAccess::PioRead(p) => {
                self.pio_read(vcpu, p, data);
                PortEvent::None
            }
            IoAccess::PioWrite(p) => self.pio_write(vcpu, p, data),
            IoAccess::MmioRead(a) => {
                self.mmio_read(vcpu, a, data);
                PortEvent::None
            }
            IoAccess::MmioWrite(a) => {
                self.mmio_write(vcpu, a, data);
                PortEvent::None
            }
        }
    }

    /// Bytes typed on the console for the serial port; returns how many it took (0
    /// off the I/O node).
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        match self {
            IoBus::Local(b) => lock(&b.devices).console_input(bytes),
            IoBus::Remote(_) => 0,
        }
    }

    /// Whether the devices are on this node.
    pub fn is_local(&self) -> bool {
        matches!(self, IoBus::Local(_))
    }

    /// The virtio block device, on the I/O node.
    pub fn disk(&self) -> Option<&MmioBlock> {
        match self {
            IoBus::Local(b) => b.disk(),
            IoBus::Remote(_) => None,
        }
    }

    /// The virtio network device, on the I/O node.
    pub fn net(&self) -> Option<&MmioNet> {
        match self {
            IoBus::Local(b) => b.net(),
            IoBus::Remote(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::Interrupt;

    fn local() -> IoBus {
        let ioapic = Arc::new(Mutex::new(IoApic::new(2)));
        let router = Arc::new(Router::new(2, ioapic.clone()));
        let (console, _watch) = ConsoleOut::capture();
        IoBus::Local(LocalBus::new(console, ioapic, router, false))
    }

    #[test]
    fn local_bus_decodes_the_ioapic_page() {
        let bus = local();
        let mut reference = IoApic::new(2);
        // IOREGSEL = 1 (version), then read IOWIN.
        bus.mmio_write(0, IOAPIC_BASE, &[1, 0, 0, 0]);
        reference.write(0, 1);
        let mut got = [0u8; 4];
        bus.mmio_read(0, IOAPIC_BASE + 0x10, &mut got);
        assert_eq!(u32::from_le_bytes(got), reference.read(0x10));
        // Outside the IOAPIC page: nothing there.
        let mut none = [0u8; 4];
        bus.mmio_read(0, 0xd000_0000, &mut none);
        assert_eq!(none, [0xff; 4]);
        assert!(bus.is_local());
    }

    #[test]
    fn local_bus_ports_and_forwarded_form_agree() {
        let bus = local();
        let mut a = [0u8; 1];
        bus.pio_read(0, 0x64, &mut a);
        let mut b = [0u8; 1];
        assert_eq!(
            bus.access(1, IoAccess::PioRead(0x64), &mut b),
            PortEvent::None
        );
        assert_eq!(a, b);
        assert_eq!(bus.pio_write(0, 0x64, &[0xfe]), PortEvent::Reset);
        assert_eq!(
            bus.access(0, IoAccess::PioWrite(0xcf9), &mut [0x06]),
            PortEvent::Reset
        );
    }

    #[test]
    fn local_bus_routes_the_virtio_windows() {
        use crate::devices::virtio::net::{Net, GUEST_MAC};
        use crate::devices::virtio::tap::tests::{require_root, test_name, TapGuard};
        use crate::devices::virtio::Tap;
        use crate::layout::VIRTIO_NET_GSI;
        require_root();
        let name = test_name();
        // Dropped last: the TAP is gone when the test ends.
        let _guard = TapGuard(name.clone());
        let ioapic = Arc::new(Mutex::new(IoApic::new(2)));
        let router = Arc::new(Router::new(2, ioapic.clone()));
        let (console, _watch) = ConsoleOut::capture();
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
                .unwrap();
        let net = MmioNet::new(
            Net::new(Tap::create(&name).unwrap(), GUEST_MAC),
            mem,
            router.clone(),
            VIRTIO_NET_GSI,
        )
        .unwrap();
        let bus = IoBus::Local(LocalBus::new(console, ioapic, router, true).with_net(net));
        assert!(bus.net().is_some() && bus.disk().is_none());
        let r32 = |addr: u64| {
            let mut b = [0u8; 4];
            bus.mmio_read(0, addr, &mut b);
            u32::from_le_bytes(b)
        };
        // Magic "virt", version 2, device 1 (network); the MAC from 0x100.
        assert_eq!(r32(VIRTIO_NET_BASE), 0x7472_6976);
        assert_eq!(r32(VIRTIO_NET_BASE + 4), 2);
        assert_eq!(r32(VIRTIO_NET_BASE + 8), 1);
        let mut mac = [0u8; 6];
        bus.access(0, IoAccess::MmioRead(VIRTIO_NET_BASE + 0x100), &mut mac);
        assert_eq!(mac, GUEST_MAC);
        // Writes reach it too (Status, forwarded form).
        bus.access(
            0,
            IoAccess::MmioWrite(VIRTIO_NET_BASE + 0x70),
            &mut [1, 0, 0, 0],
        );
        assert_eq!(r32(VIRTIO_NET_BASE + 0x70), 1);
        // No disk, and nothing past the network device's window.
        assert_eq!(r32(VIRTIO_BLK_BASE), 0xffff_ffff);
        assert_eq!(r32(VIRTIO_NET_BASE + 0x200), 0xffff_ffff);
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, IoAccess, Vec<u8>)>>);
    impl ClusterLink for Recorder {
        fn deliver(&self, _node: u16, _vcpu: usize, _irq: &Interrupt) {}
        fn set_logical(&self, _vcpu: usize, _ldr: u32, _dfr: u32) {}
        fn eoi(&self, _vector: u8) {}
        fn io(&self, vcpu: usize, access: IoAccess, data: &mut [u8]) -> PortEvent {
            self.0.lock().unwrap().push((vcpu, access, data.to_vec()));
            data.fill(0x5a);
            PortEvent::None
        }
        fn ended(&self, _outcome: &Result<crate::vm::GuestEnd, String>) {}
    }

    #[test]
    fn remote_bus_forwards_every_access() {
        let rec = Arc::new(Recorder::default());
        let bus = IoBus::Remote(rec.clone());
        let mut d = [0u8; 1];
        bus.pio_read(3, 0x3f8, &mut d);
        assert_eq!(d, [0x5a]);
        bus.pio_write(3, 0x3f8, b"x");
        bus.mmio_write(1, IOAPIC_BASE, &[1, 0, 0, 0]);
        let mut m = [0u8; 4];
        bus.mmio_read(1, IOAPIC_BASE + 0x10, &mut m);
        assert_eq!(bus.console_input(b"abc"), 0);
        assert!(!bus.is_local());
        let seen = rec.0.lock().unwrap();
        assert_eq!(
            seen.iter().map(|(v, a, _)| (*v, *a)).collect::<Vec<_>>(),
            vec![
                (3, IoAccess::PioRead(0x3f8)),
                (3, IoAccess::PioWrite(0x3f8)),
                (1, IoAccess::MmioWrite(IOAPIC_BASE)),
                (1, IoAccess::MmioRead(IOAPIC_BASE + 0x10)),
            ]
        );
        assert_eq!(seen[1].2, b"x".to_vec());
    }
}
