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
