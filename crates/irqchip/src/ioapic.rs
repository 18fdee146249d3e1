//! I/O APIC model (82093AA style, 24 pins).
//!
//! The guest programs it through two MMIO registers: IOREGSEL (offset 0x00)
//! selects an indirect register, IOWIN (offset 0x10) reads or writes it.
//! Indirect registers: 0x00 ID (bits 27:24), 0x01 version, 0x02 arbitration
//! id, 0x10 + 2 * pin (+1) the low (high) half of a pin's redirection entry.
//! A write to offset 0x40 is accepted as a directed EOI (vector in bits 7:0),
//! although the version (0x11) does not advertise it, so Linux uses the
//! LAPIC EOI broadcast instead.

use crate::{DeliveryMode, Destination, Interrupt, InterruptMessage, Shorthand, TriggerMode};

/// Number of interrupt input pins.
pub const IOAPIC_PINS: usize = 24;

/// Default guest-physical address of the I/O APIC MMIO window.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xFEC0_0000;

/// Size of the I/O APIC MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;

/// Value of the version register: version 0x11, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDTBL: u32 = 0x10;

const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Writable bits of a redirection entry: vector, delivery mode, destination
/// mode, polarity, trigger mode, mask (low half) and destination (bits 63:56).
const RTE_WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

/// An I/O APIC.
///
/// Pin levels passed to [`IoApic::set_irq`] are *logical*: `true` means the
/// device asserts its interrupt. The polarity bit of the redirection entry is
/// stored for the guest but not applied (the devices are virtual and assert
/// logically), as in KVM's model.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u8,
    ioregsel: u8,
    redirection: [u64; IOAPIC_PINS],
    line: [bool; IOAPIC_PINS],
}

impl IoApic {
    /// An I/O APIC in its reset state, every pin masked.
    pub fn new(id: u8) -> Self {
        Self {
            id: id & 0xf,
            ioregsel: 0,
            redirection: [RTE_MASKED; IOAPIC_PINS],
            line: [false; IOAPIC_PINS],
        }
    }

    /// The I/O APIC id (4 bits).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The 64-bit redirection entry of `pin`, if it exists.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// A 32-bit MMIO read at `offset` in the window. Unknown offsets read 0.
    pub fn read(&mut self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_indirect(u32::from(self.ioregsel)),
            _ => 0,
        }
    }

    fn read_indirect(&self, reg: u32) -> u32 {
        match reg {
            REG_ID | REG_ARB => u32::from(self.id) << 24,
            REG_VERSION => IOAPIC_VERSION,
            _ => match Self::redirection_index(reg) {
                Some((pin, true)) => (self.redirection[pin] >> 32) as u32,
                Some((pin, false)) => self.redirection[pin] as u32,
                None => 0,
            },
        }
    }

    /// `(pin, high half)` of an indirect register in the redirection table.
    fn redirection_index(reg: u32) -> Option<(usize, bool)> {
        let idx = reg.checked_sub(REG_REDTBL)? as usize;
        (idx < 2 * IOAPIC_PINS).then_some((idx / 2, idx % 2 == 1))
    }

    /// A 32-bit MMIO write at `offset` in the window. Returns the messages to
    /// deliver: writing a redirection entry can deliver its pin (a level line
    /// still asserted, now unmasked, with remote IRR clear), and a write to
    /// the EOI register at 0x40 acts like [`IoApic::eoi`].
    ///
    /// Changing a pin to edge triggered clears its remote IRR.
    pub fn write(&mut self, offset: u64, value: u32) -> Vec<InterruptMessage> {
        match offset {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN => return self.write_indirect(u32::from(self.ioregsel), value),
            IOEOI => return self.eoi(value as u8),
            _ => {}
        }
        Vec::new()
    }

    fn write_indirect(&mut self, reg: u32, value: u32) -> Vec<InterruptMessage> {
        if reg == REG_ID {
            self.id = ((value >> 24) & 0xf) as u8;
            return Vec::new();
        }
        let Some((pin, high)) = Self::redirection_index(reg) else {
            return Vec::new();
        };
        let old = self.redirection[pin];
        let new = if high {
            (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (old & !0xFFFF_FFFF) | u64::from(value)
        };
        let mut entry = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
        if entry & RTE_LEVEL == 0 {
            entry &= !RTE_REMOTE_IRR;
        }
        self.redirection[pin] = entry;
        self.service_level(pin).into_iter().collect()
    }

    /// Delivers a level-triggered pin whose line is asserted, if it is
    /// unmasked and its remote IRR is clear (and then sets remote IRR).
    fn service_level(&mut self, pin: usize) -> Option<InterruptMessage> {
        let entry = self.redirection[pin];
        if entry & RTE_LEVEL != 0 && self.line[pin] && entry & (RTE_MASKED | RTE_REMOTE_IRR) == 0 {
            let msg = self.message(pin)?;
            self.redirection[pin] |= RTE_REMOTE_IRR;
            return Some(msg);
        }
        None
    }

    /// The message pin `pin` sends, or `None` for a reserved delivery mode
    /// (0b011 and StartUp, which an I/O APIC cannot send).
    fn message(&self, pin: usize) -> Option<InterruptMessage> {
        let entry = self.redirection[pin];
        let mode = DeliveryMode::from_bits((entry >> 8) as u32)?;
        if mode == DeliveryMode::StartUp {
            return None;
        }
        let dest_field = (entry >> 56) as u32;
        let dest = if entry & (1 << 11) != 0 {
            Destination::Logical(dest_field as u8)
        } else {
            Destination::Physical(dest_field)
        };
        Some(InterruptMessage {
            source_apic_id: None,
            dest,
            shorthand: Shorthand::None,
            interrupt: Interrupt {
                vector: entry as u8,
                mode,
                trigger: if entry & RTE_LEVEL != 0 {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                },
                level: true,
            },
        })
    }

    /// A device drives `pin` to `level` (logical: `true` = asserted).
    ///
    /// * Edge-triggered pin: delivers on a rising edge if unmasked (an edge
    ///   while masked is lost).
    /// * Level-triggered pin: delivers while asserted, unmasked and remote IRR
    ///   clear, and sets remote IRR; [`IoApic::eoi`] re-delivers a line that
    ///   is still asserted.
    ///
    /// Pins beyond [`IOAPIC_PINS`] are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) -> Option<InterruptMessage> {
        let old = std::mem::replace(self.line.get_mut(pin)?, level);
        let entry = self.redirection[pin];
        if entry & RTE_LEVEL != 0 {
            self.service_level(pin)
        } else if level && !old && entry & RTE_MASKED == 0 {
            self.message(pin)
        } else {
            None
        }
    }

    /// An EOI for `vector` (broadcast from a LAPIC, for a level-triggered
    /// interrupt): clears remote IRR of every pin with that vector, and
    /// re-delivers those whose level line is still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<InterruptMessage> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if self.redirection[pin] as u8 == vector && self.redirection[pin] & RTE_REMOTE_IRR != 0
            {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                out.extend(self.service_level(pin));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_rte(io: &mut IoApic, pin: usize, value: u64) -> Vec<InterruptMessage> {
        io.write(IOREGSEL, REG_REDTBL + 2 * pin as u32 + 1);
        let mut out = io.write(IOWIN, (value >> 32) as u32);
        io.write(IOREGSEL, REG_REDTBL + 2 * pin as u32);
        out.extend(io.write(IOWIN, value as u32));
        out
    }

    fn read_reg(io: &mut IoApic, reg: u32) -> u32 {
        io.write(IOREGSEL, reg);
        io.read(IOWIN)
    }

    #[test]
    fn id_version_arbitration() {
        let mut io = IoApic::new(2);
        assert_eq!(read_reg(&mut io, REG_ID), 2 << 24);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
        assert_eq!(read_reg(&mut io, REG_ARB), 2 << 24);
        io.write(IOREGSEL, REG_ID);
        io.write(IOWIN, 5 << 24);
        assert_eq!(read_reg(&mut io, REG_ID), 5 << 24);
        assert_eq!(io.id(), 5);
        assert_eq!(io.read(IOREGSEL), REG_ID);
        assert_eq!(read_reg(&mut io, 0x7f), 0);
        assert_eq!(io.read(0x20), 0);
    }

    #[test]
    fn reset_state_masked() {
        let mut io = IoApic::new(0);
        for pin in 0..IOAPIC_PINS {
            assert_eq!(io.redirection_entry(pin), Some(RTE_MASKED));
            assert_eq!(read_reg(&mut io, REG_REDTBL + 2 * pin as u32), 1 << 16);
        }
        assert_eq!(io.redirection_entry(IOAPIC_PINS), None);
        assert_eq!(io.set_irq(4, true), None);
        assert_eq!(io.set_irq(99, true), None);
    }

    #[test]
    fn redirection_entry_readback_masks_readonly_bits() {
        let mut io = IoApic::new(0);
        // Try to set delivery status (12) and remote IRR (14) and reserved bits.
        write_rte(&mut io, 3, 0x0300_0000_FFFF_FFFF);
        let e = io.redirection_entry(3).unwrap_or(0);
        assert_eq!(e, 0x0300_0000_0001_AFFF);
        assert_eq!(read_reg(&mut io, REG_REDTBL + 7), 0x0300_0000);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_only() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 4, (1u64 << 56) | 0x34); // fixed, physical 1, edge
        let msg = io.set_irq(4, true).expect("delivered");
        assert_eq!(msg.dest, Destination::Physical(1));
        assert_eq!(msg.source_apic_id, None);
        assert_eq!(msg.shorthand, Shorthand::None);
        assert_eq!(msg.interrupt, Interrupt::fixed(0x34));
        assert_eq!(io.set_irq(4, true), None, "no edge");
        assert_eq!(io.set_irq(4, false), None);
        assert!(io.set_irq(4, true).is_some());
        // EOI does nothing for edge pins.
        assert!(io.eoi(0x34).is_empty());
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 1, RTE_MASKED | 0x31);
        assert_eq!(io.set_irq(1, true), None);
        assert!(write_rte(&mut io, 1, 0x31).is_empty(), "edge not latched");
        assert_eq!(io.set_irq(1, false), None);
        assert!(io.set_irq(1, true).is_some());
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut io = IoApic::new(0);
        // Level, logical dest 0x03, lowest priority.
        write_rte(
            &mut io,
            10,
            (0x03u64 << 56) | RTE_LEVEL | (1 << 11) | (1 << 8) | 0x51,
        );
        let msg = io.set_irq(10, true).expect("delivered");
        assert_eq!(msg.dest, Destination::Logical(3));
        assert_eq!(msg.interrupt.mode, DeliveryMode::LowestPriority);
        assert_eq!(msg.interrupt.trigger, TriggerMode::Level);
        assert!(msg.interrupt.level);
        let e = io.redirection_entry(10).unwrap_or(0);
        assert_ne!(e & RTE_REMOTE_IRR, 0);
        // Still asserted, remote IRR set: no re-delivery.
        assert_eq!(io.set_irq(10, true), None);
        // EOI with the line still asserted re-delivers.
        let again = io.eoi(0x51);
        assert_eq!(again, vec![msg]);
        // Device drops the line, then EOI: remote IRR clears, nothing sent.
        assert_eq!(io.set_irq(10, false), None);
        assert!(io.eoi(0x51).is_empty());
        assert_eq!(io.redirection_entry(10).unwrap_or(0) & RTE_REMOTE_IRR, 0);
        // EOI for another vector does nothing.
        assert!(io.set_irq(10, true).is_some());
        assert!(io.eoi(0x52).is_empty());
        assert_ne!(io.redirection_entry(10).unwrap_or(0) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_asserted_level_line_delivers() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 5, RTE_MASKED | RTE_LEVEL | 0x40);
        assert_eq!(io.set_irq(5, true), None);
        let out = write_rte(&mut io, 5, RTE_LEVEL | 0x40);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].interrupt.vector, 0x40);
        // Rewriting the entry while remote IRR is set does not re-deliver,
        // and remote IRR survives the write.
        assert!(write_rte(&mut io, 5, RTE_LEVEL | 0x40).is_empty());
        assert_ne!(io.redirection_entry(5).unwrap_or(0) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 6, RTE_LEVEL | 0x41);
        assert!(io.set_irq(6, true).is_some());
        write_rte(&mut io, 6, 0x41);
        assert_eq!(io.redirection_entry(6).unwrap_or(0) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn directed_eoi_register() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 7, RTE_LEVEL | 0x42);
        assert!(io.set_irq(7, true).is_some());
        let out = io.write(IOEOI, 0x42);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn eoi_shared_vector_redelivers_each_asserted_pin() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 8, RTE_LEVEL | 0x60);
        write_rte(&mut io, 9, RTE_LEVEL | 0x60);
        assert!(io.set_irq(8, true).is_some());
        assert!(io.set_irq(9, true).is_some());
        io.set_irq(9, false);
        let out = io.eoi(0x60);
        assert_eq!(out.len(), 1);
        assert_eq!(io.redirection_entry(9).unwrap_or(0) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn delivery_modes() {
        let mut io = IoApic::new(0);
        let cases = [
            (0b000, Some(DeliveryMode::Fixed)),
            (0b001, Some(DeliveryMode::LowestPriority)),
            (0b010, Some(DeliveryMode::Smi)),
            (0b011, None),
            (0b100, Some(DeliveryMode::Nmi)),
            (0b101, Some(DeliveryMode::Init)),
            (0b110, None),
            (0b111, Some(DeliveryMode::ExtInt)),
        ];
        for (bits, expected) in cases {
            write_rte(&mut io, 0, (bits << 8) | 0x20);
            io.set_irq(0, false);
            let got = io.set_irq(0, true).map(|m| m.interrupt.mode);
            assert_eq!(got, expected, "mode {bits:#b}");
        }
    }

    #[test]
    fn physical_broadcast_destination() {
        let mut io = IoApic::new(0);
        write_rte(&mut io, 2, (0xffu64 << 56) | 0x30);
        let msg = io.set_irq(2, true).expect("delivered");
        assert_eq!(msg.dest, Destination::Physical(0xff));
    }
}
