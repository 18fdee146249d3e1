//! User-space interrupt controller models for dvmm.
//!
//! dvmm runs without an in-kernel irqchip: every vCPU's local APIC and the
//! machine's I/O APIC are modelled here, in user space, so that an
//! inter-processor interrupt aimed at a vCPU on another host can leave the host.
//!
//! The models are *pure*: no KVM, no threads, no clocks. Time is passed in as
//! `now_ns`, a monotonic nanosecond clock chosen by the caller, and every
//! interrupt that leaves a controller is returned as a value
//! ([`InterruptMessage`]) that the caller routes with an [`ApicTopology`].
//!
//! * [`Lapic`]: an xAPIC (MMIO page at [`LAPIC_DEFAULT_BASE`]), version 0x14,
//!   six LVT entries, timer in one-shot, periodic and TSC-deadline modes
//!   counting at [`LAPIC_BUS_HZ`].
//! * [`IoApic`]: an 82093AA-style I/O APIC with [`IOAPIC_PINS`] pins (MMIO at
//!   [`IOAPIC_DEFAULT_BASE`]).
//! * [`ApicTopology`]: resolves a message to the vCPU indexes it reaches.
//!
//! # Wiring notes for the VMM
//!
//! * **Injection.** Before entering a vCPU: an INIT ([`Lapic::take_init`])
//!   comes first, then SIPI, NMI, ExtINT, then a vector: when the guest can
//!   take an interrupt (`kvm_run.ready_for_interrupt_injection`), inject
//!   [`Lapic::pending_vector`] with `KVM_INTERRUPT` and call [`Lapic::ack`]
//!   with it; otherwise set `request_interrupt_window`. Use
//!   [`Lapic::has_pending_event`] to wake a vCPU halted in `HLT`.
//! * **CR8 / TPR.** Without an in-kernel irqchip KVM keeps CR8 in
//!   `kvm_run.cr8`. After every exit call [`Lapic::set_cr8`] with it (it only
//!   changes the TPR when the priority class differs, so an MMIO-written low
//!   nibble survives); before every entry store [`Lapic::cr8`] into
//!   `kvm_run.cr8`. A guest lowering CR8 exits with `KVM_EXIT_SET_TPR`, which
//!   is the moment to re-check [`Lapic::pending_vector`].
//! * **Timer.** Sleep until [`Lapic::timer_deadline_ns`] (re-read it after
//!   every LAPIC write and TSC-deadline change), then [`Lapic::poll_timer`].
//!   For TSC-deadline mode, advertise CPUID.1:ECX\[24\], trap the
//!   IA32_TSC_DEADLINE MSR (0x6E0), convert the written guest-TSC value to the
//!   `now_ns` clock and call [`Lapic::set_tsc_deadline_ns`] (`0` disarms); a
//!   read returns the last value written, or 0 once
//!   [`Lapic::tsc_deadline_ns`] is `None`. The LAPIC timer counts at
//!   [`LAPIC_BUS_HZ`] (1 tick = 1 ns before division); a guest that is told
//!   so (e.g. a 1 GHz crystal in CPUID leaf 0x15) needs no calibration.
//! * **IPIs.** A [`LapicWriteEffect::Ipi`] is resolved with
//!   [`ApicTopology::resolve`] and each target's [`Lapic::accept`] is called,
//!   possibly on another node. INIT de-asserts
//!   ([`Interrupt::is_init_deassert`]) may be dropped by the sender.
//! * **EOI.** A [`LapicWriteEffect::Eoi`] with `level_triggered` must reach the
//!   I/O APIC ([`IoApic::eoi`]), which may re-deliver a still-asserted line.
//! * **Logical ids.** Forward [`LapicWriteEffect::LogicalIdChanged`] to every
//!   node's [`ApicTopology::set_logical`].
//!
//! # Example: an IPI from vCPU 0 to vCPU 1
//!
//! ```
//! use irqchip::{lapic_regs, ApicTopology, Lapic, LapicWriteEffect};
//!
//! let mut cpus = vec![Lapic::new(0, true), Lapic::new(1, false)];
//! let topology = ApicTopology::new(vec![0, 1]);
//! for cpu in &mut cpus {
//!     // Software-enable the APIC, spurious vector 0xff.
//!     cpu.write(lapic_regs::SVR, 0x1ff, 0);
//! }
//! // Fixed IPI, vector 0x40, physical destination 1.
//! cpus[0].write(lapic_regs::ICR_HIGH, 1 << 24, 0);
//! let LapicWriteEffect::Ipi(msg) = cpus[0].write(lapic_regs::ICR_LOW, 0x40, 0) else {
//!     panic!("expected an IPI");
//! };
//! for vcpu in topology.resolve(&msg) {
//!     cpus[vcpu].accept(&msg.interrupt);
//! }
//! assert_eq!(cpus[1].pending_vector(), Some(0x40));
//! cpus[1].ack(0x40);
//! // The guest's handler writes EOI.
//! let eoi = cpus[1].write(lapic_regs::EOI, 0, 0);
//! assert_eq!(eoi, LapicWriteEffect::Eoi { vector: 0x40, level_triggered: false });
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod ioapic;
mod lapic;
mod topology;

pub use ioapic::{IoApic, IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, IOAPIC_PINS, IOAPIC_VERSION};
pub use lapic::{
    regs as lapic_regs, Lapic, LapicError, LapicWriteEffect, TimerMode, APIC_BASE_BSP,
    APIC_BASE_ENABLE, APIC_BASE_X2APIC, ESR_RECEIVE_ILLEGAL_VECTOR, ESR_SEND_ILLEGAL_VECTOR,
    LAPIC_BUS_HZ, LAPIC_DEFAULT_BASE, LAPIC_MMIO_SIZE, LAPIC_VERSION,
};
pub use topology::ApicTopology;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// How an interrupt is delivered (ICR bits 10:8, redirection entry bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum DeliveryMode {
    /// Deliver `vector` to every destination.
    Fixed,
    /// Deliver `vector` to one of the destinations (see [`ApicTopology::resolve`]).
    LowestPriority,
    /// System management interrupt (vector ignored).
    Smi,
    /// Non-maskable interrupt (vector ignored).
    Nmi,
    /// INIT (vector ignored). With level trigger and `level == false` it is an
    /// "INIT level de-assert", which receivers ignore.
    Init,
    /// Start-up IPI: `vector` is the 4 KiB page the AP starts executing at.
    StartUp,
    /// External interrupt: the vector comes from an 8259 PIC.
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit delivery mode field. Reserved encodings (0b011, and
    /// 0b110/0b111 where not allowed by the caller) are the caller's business:
    /// this returns `None` only for 0b011.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 0x7 {
            0b000 => Some(Self::Fixed),
            0b001 => Some(Self::LowestPriority),
            0b010 => Some(Self::Smi),
            0b100 => Some(Self::Nmi),
            0b101 => Some(Self::Init),
            0b110 => Some(Self::StartUp),
            0b111 => Some(Self::ExtInt),
            _ => None,
        }
    }

    /// The 3-bit encoding of this delivery mode.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0b000,
            Self::LowestPriority => 0b001,
            Self::Smi => 0b010,
            Self::Nmi => 0b100,
            Self::Init => 0b101,
            Self::StartUp => 0b110,
            Self::ExtInt => 0b111,
        }
    }
}

/// Trigger mode of an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum TriggerMode {
    /// Edge triggered.
    Edge,
    /// Level triggered: the receiving LAPIC sets its TMR bit and its EOI is
    /// reported as level-triggered so that the I/O APIC can clear remote IRR.
    Level,
}

/// Where an interrupt goes (as encoded in ICR or an IOAPIC redirection entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum Destination {
    /// Physical destination mode: an APIC id; `0xff` is the broadcast id.
    Physical(u32),
    /// Logical destination mode: the message destination address (MDA),
    /// matched against each LAPIC's LDR in the flat or cluster model (DFR).
    Logical(u8),
}

/// Physical APIC id that addresses every LAPIC (xAPIC).
pub const BROADCAST_APIC_ID: u32 = 0xff;

/// ICR destination shorthand (bits 19:18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum Shorthand {
    /// No shorthand: use the destination field.
    None,
    /// Only the sending LAPIC.
    SelfOnly,
    /// Every LAPIC, the sender included.
    AllIncludingSelf,
    /// Every LAPIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decodes the 2-bit shorthand field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 0x3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }
}

/// The payload of an interrupt message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Interrupt {
    /// Vector (for `StartUp`: the start page; ignored for NMI, SMI, INIT, ExtINT).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Trigger mode.
    pub trigger: TriggerMode,
    /// Level (ICR bit 14): `true` = assert. Only meaningful for INIT, where
    /// level trigger with `level == false` is an INIT de-assert. Messages from
    /// the I/O APIC always assert.
    pub level: bool,
}

impl Interrupt {
    /// A fixed, edge-triggered, asserting interrupt.
    pub fn fixed(vector: u8) -> Self {
        Self {
            vector,
            mode: DeliveryMode::Fixed,
            trigger: TriggerMode::Edge,
            level: true,
        }
    }

    /// True for an "INIT level de-assert" message, which every receiver
    /// ignores (a router may drop it without sending it anywhere).
    pub fn is_init_deassert(&self) -> bool {
        self.mode == DeliveryMode::Init && self.trigger == TriggerMode::Level && !self.level
    }
}

/// An interrupt message leaving a LAPIC (ICR write) or the IOAPIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct InterruptMessage {
    /// APIC id of the sending LAPIC; `None` for the I/O APIC.
    pub source_apic_id: Option<u32>,
    /// Destination (ignored when `shorthand` is not [`Shorthand::None`]).
    pub dest: Destination,
    /// Destination shorthand.
    pub shorthand: Shorthand,
    /// What is delivered.
    pub interrupt: Interrupt,
}

/// Does a LAPIC with this identity match `dest`?
///
/// * Physical: the APIC id, or the broadcast id `0xff`.
/// * Logical, flat model (DFR bits 31:28 = 0xF): `LDR[31:24] & MDA != 0`.
/// * Logical, cluster model (DFR bits 31:28 = 0x0): the cluster (high nibble)
///   must be equal, or the MDA cluster is 0xF (broadcast to all clusters), and
///   `LDR[27:24] & MDA[3:0] != 0`.
///
/// Any other DFR model value is treated as flat.
pub fn destination_matches(apic_id: u32, ldr: u32, dfr: u32, dest: &Destination) -> bool {
    match *dest {
        Destination::Physical(id) => id == BROADCAST_APIC_ID || id == apic_id,
        Destination::Logical(mda) => {
            let logical = (ldr >> 24) as u8;
            if dfr >> 28 == 0 {
                let cluster_ok = (mda >> 4) == 0xf || (mda >> 4) == (logical >> 4);
                cluster_ok && (mda & logical & 0xf) != 0
            } else {
                (mda & logical) != 0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_roundtrip() {
        for bits in 0..8 {
            match DeliveryMode::from_bits(bits) {
                Some(m) => assert_eq!(m.bits(), bits),
                None => assert_eq!(bits, 0b011),
            }
        }
    }

    #[test]
    fn shorthand_decode() {
        assert_eq!(Shorthand::from_bits(0), Shorthand::None);
        assert_eq!(Shorthand::from_bits(1), Shorthand::SelfOnly);
        assert_eq!(Shorthand::from_bits(2), Shorthand::AllIncludingSelf);
        assert_eq!(Shorthand::from_bits(3), Shorthand::AllExcludingSelf);
    }

    #[test]
    fn physical_match() {
        assert!(destination_matches(3, 0, !0, &Destination::Physical(3)));
        assert!(!destination_matches(3, 0, !0, &Destination::Physical(2)));
        assert!(destination_matches(3, 0, !0, &Destination::Physical(0xff)));
    }

    #[test]
    fn logical_flat_match() {
        let ldr = 0b0000_0100 << 24;
        assert!(destination_matches(
            9,
            ldr,
            !0,
            &Destination::Logical(0b0000_0100)
        ));
        assert!(destination_matches(
            9,
            ldr,
            !0,
            &Destination::Logical(0b0000_0111)
        ));
        assert!(!destination_matches(
            9,
            ldr,
            !0,
            &Destination::Logical(0b0000_1011)
        ));
        assert!(destination_matches(9, ldr, !0, &Destination::Logical(0xff)));
        // LDR 0 never matches a logical destination.
        assert!(!destination_matches(9, 0, !0, &Destination::Logical(0xff)));
    }

    #[test]
    fn logical_cluster_match() {
        let dfr = 0x0fff_ffff;
        let ldr = 0x21 << 24; // cluster 2, member bit 0
        assert!(destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0x21)
        ));
        assert!(destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0x23)
        ));
        assert!(!destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0x11)
        ));
        assert!(!destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0x22)
        ));
        assert!(destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0xff)
        ));
        assert!(destination_matches(
            0,
            ldr,
            dfr,
            &Destination::Logical(0xf1)
        ));
    }

    #[test]
    fn init_deassert_detection() {
        let mut i = Interrupt {
            vector: 0,
            mode: DeliveryMode::Init,
            trigger: TriggerMode::Level,
            level: false,
        };
        assert!(i.is_init_deassert());
        i.level = true;
        assert!(!i.is_init_deassert());
        i.level = false;
        i.trigger = TriggerMode::Edge;
        assert!(!i.is_init_deassert());
        assert!(!Interrupt::fixed(0x30).is_init_deassert());
    }
}
