//! The guest-physical and port address map of the machine, in one place: the APIC
//! pages and the legacy devices the I/O node emulates.

/// Base of the LAPIC MMIO page (every vCPU's own LAPIC; handled on the vCPU's node).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Base of the IOAPIC MMIO page (on the I/O node).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of each APIC's MMIO page.
pub const APIC_PAGE_SIZE: u64 = 0x1000;

/// The LAPIC MMIO range.
pub const LAPIC_RANGE: std::ops::Range<u64> = LAPIC_BASE..LAPIC_BASE + APIC_PAGE_SIZE;
/// The IOAPIC MMIO range.
pub const IOAPIC_RANGE: std::ops::Range<u64> = IOAPIC_BASE..IOAPIC_BASE + APIC_PAGE_SIZE;

/// COM1 (the 16550 serial console): base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ports.
pub const COM1_RANGE: std::ops::Range<u16> = COM1_BASE..COM1_BASE + 8;
/// COM1's ISA IRQ (IOAPIC pin 4).
pub const COM1_IRQ: usize = 4;

/// The virtio block device's register window (virtio-mmio, in the 32-bit hole).
pub const VIRTIO_BLK_BASE: u64 = 0xd000_0000;
/// Size of a virtio-mmio window as the guest is told (registers and config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// The virtio block device's window.
pub const VIRTIO_BLK_RANGE: std::ops::Range<u64> =
    VIRTIO_BLK_BASE..VIRTIO_BLK_BASE + VIRTIO_MMIO_SIZE;
/// The virtio block device's interrupt (IOAPIC pin, above the ISA range; edge, active high).
pub const VIRTIO_BLK_GSI: usize = 16;

/// The virtio network device's register window (its own page, after the block device's).
pub const VIRTIO_NET_BASE: u64 = 0xd000_1000;
/// The virtio network device's window.
pub const VIRTIO_NET_RANGE: std::ops::Range<u64> =
    VIRTIO_NET_BASE..VIRTIO_NET_BASE + VIRTIO_MMIO_SIZE;
/// The virtio network device's interrupt (IOAPIC pin; edge, active high). GSI 18 is the
/// ACPI power button's.
pub const VIRTIO_NET_GSI: usize = 17;

/// The ACPI power button's interrupt: the IOAPIC pin of the DSDT's Generic Event Device
/// (edge, active high), pulsed by `dvmm stop` / SIGTERM.
pub const POWER_BUTTON_GSI: usize = 18;
