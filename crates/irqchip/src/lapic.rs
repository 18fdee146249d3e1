//! Local APIC model (xAPIC mode only).
//!
//! One [`Lapic`] per vCPU. The VMM forwards 32-bit MMIO accesses to the
//! LAPIC page with [`Lapic::read`] / [`Lapic::write`], delivers interrupt
//! messages with [`Lapic::accept`], and before each entry into the guest asks
//! [`Lapic::pending_vector`] (then [`Lapic::ack`]s what it injected),
//! [`Lapic::take_nmi`], [`Lapic::take_init`], [`Lapic::take_sipi`] and
//! [`Lapic::take_extint`].
//!
//! # Timer
//!
//! The timer counts at [`LAPIC_BUS_HZ`] = 1 GHz: one tick is one nanosecond
//! before the divide configuration is applied, so with divide-by-16 an initial
//! count of 1000 expires 16 µs after it is written. The caller sleeps until
//! [`Lapic::timer_deadline_ns`] (re-read after every [`Lapic::write`] and
//! [`Lapic::set_tsc_deadline_ns`]) and then calls [`Lapic::poll_timer`].

use crate::{
    destination_matches, DeliveryMode, Destination, Interrupt, InterruptMessage, Shorthand,
    TriggerMode,
};

/// Frequency at which the LAPIC timer counts before division: 1 GHz, i.e. one
/// tick per nanosecond of `now_ns`. Advertise it to the guest (e.g. CPUID leaf
/// 0x15/0x16 or the KVM paravirtual clock) or let the guest calibrate it.
pub const LAPIC_BUS_HZ: u64 = 1_000_000_000;

/// Default guest-physical address of the LAPIC MMIO page.
pub const LAPIC_DEFAULT_BASE: u64 = 0xFEE0_0000;

/// Size of the LAPIC MMIO page.
pub const LAPIC_MMIO_SIZE: u64 = 0x1000;

/// Value of the version register: version 0x14 (integrated xAPIC), max LVT
/// entry 5 (six entries: timer, thermal, performance, LINT0, LINT1, error),
/// bit 24 (EOI-broadcast suppression supported) clear.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// IA32_APIC_BASE bit 8: this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode enable (not supported by this model).
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: APIC global (hardware) enable.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE bits that may be written: base address (bits 51:12), BSP
/// and global enable.
const APIC_BASE_WRITABLE: u64 = 0x000F_FFFF_FFFF_F000 | APIC_BASE_BSP | APIC_BASE_ENABLE;

/// Offsets of the LAPIC registers within its MMIO page.
pub mod regs {
    /// Local APIC ID (bits 31:24). Writes are ignored.
    pub const ID: u32 = 0x020;
    /// Version (read-only).
    pub const VERSION: u32 = 0x030;
    /// Task priority register.
    pub const TPR: u32 = 0x080;
    /// Arbitration priority register (read-only).
    pub const APR: u32 = 0x090;
    /// Processor priority register (read-only).
    pub const PPR: u32 = 0x0A0;
    /// End of interrupt (write-only).
    pub const EOI: u32 = 0x0B0;
    /// Remote read register (reads 0).
    pub const RRD: u32 = 0x0C0;
    /// Logical destination register (bits 31:24).
    pub const LDR: u32 = 0x0D0;
    /// Destination format register (model in bits 31:28).
    pub const DFR: u32 = 0x0E0;
    /// Spurious interrupt vector register (bit 8: software enable).
    pub const SVR: u32 = 0x0F0;
    /// In-service register, 8 registers of 32 bits, 0x10 apart.
    pub const ISR0: u32 = 0x100;
    /// Trigger mode register, 8 registers of 32 bits, 0x10 apart.
    pub const TMR0: u32 = 0x180;
    /// Interrupt request register, 8 registers of 32 bits, 0x10 apart.
    pub const IRR0: u32 = 0x200;
    /// Error status register.
    pub const ESR: u32 = 0x280;
    /// Interrupt command register, low half (writing it sends the IPI).
    pub const ICR_LOW: u32 = 0x300;
    /// Interrupt command register, high half (destination in bits 31:24).
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance monitoring counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL_COUNT: u32 = 0x380;
    /// Timer current count (read-only).
    pub const TIMER_CURRENT_COUNT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

/// ESR bit 5: the LAPIC tried to send an illegal vector (0..=15).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: the LAPIC received an illegal vector (0..=15).
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

const LVT_MASKED: u32 = 1 << 16;
const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITABLE: u32 = 0x3ff; // vector, enable, focus checking; no EOI suppression
const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF; // vector, mode, dest mode, level, trigger, shorthand

/// Number of LVT entries.
const NUM_LVT: usize = 6;
const LVT_TIMER_IDX: usize = 0;
const LVT_LINT0_IDX: usize = 3;
const LVT_ERROR_IDX: usize = 5;
/// Writable bits of each LVT entry, in register order.
const LVT_WRITABLE: [u32; NUM_LVT] = [
    0x0007_00FF, // timer: vector, mask, mode (18:17)
    0x0001_07FF, // thermal: vector, delivery mode, mask
    0x0001_07FF, // perf: vector, delivery mode, mask
    0x0001_A7FF, // LINT0: vector, delivery mode, polarity, trigger, mask
    0x0001_A7FF, // LINT1
    0x0001_00FF, // error: vector, mask
];

/// Mode of the LAPIC timer (LVT timer bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// 0b00: count down once from the initial count.
    OneShot,
    /// 0b01: count down and reload the initial count.
    Periodic,
    /// 0b10: fire when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
}

/// Errors of the LAPIC model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LapicError {
    /// A write to IA32_APIC_BASE set reserved bits (including x2APIC enable,
    /// which this model does not support). The VMM should inject #GP.
    #[error("reserved bits set in IA32_APIC_BASE write {0:#x}")]
    ApicBaseReserved(u64),
}

/// What a register write asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicWriteEffect {
    /// Nothing to do.
    None,
    /// An ICR write: route the message (the sender itself may be a target).
    Ipi(InterruptMessage),
    /// An EOI write retired `vector`. When `level_triggered`, broadcast the
    /// EOI to the I/O APIC ([`crate::IoApic::eoi`]).
    Eoi {
        /// The vector whose in-service bit was cleared.
        vector: u8,
        /// Its TMR bit was set (it was delivered level-triggered).
        level_triggered: bool,
    },
    /// LDR or DFR changed: update the routers
    /// ([`crate::ApicTopology::set_logical`]) with the new values.
    LogicalIdChanged {
        /// New LDR.
        ldr: u32,
        /// New DFR.
        dfr: u32,
    },
}

/// A 256-bit vector register (IRR, ISR, TMR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bits256([u32; 8]);

impl Bits256 {
    fn get(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn set(&mut self, v: u8, on: bool) {
        let word = &mut self.0[usize::from(v >> 5)];
        if on {
            *word |= 1 << (v & 31);
        } else {
            *word &= !(1 << (v & 31));
        }
    }
    fn highest(&self) -> Option<u8> {
        self.0.iter().enumerate().rev().find_map(|(i, &w)| {
            // i < 8 and the bit index < 32, so the result fits in a u8.
            (w != 0).then(|| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
        })
    }
}

/// Divisor encoded by a timer divide configuration value (bits 0, 1, 3).
fn divisor(dcr: u32) -> u64 {
    let code = ((dcr & 0x8) >> 1) | (dcr & 0x3);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

/// A local APIC in xAPIC mode.
///
/// State kept besides the registers: pending NMI / SMI / INIT / SIPI /
/// ExtINT events that do not go through the IRR, and whether the LAPIC is in
/// the wait-for-SIPI state.
#[derive(Debug, Clone)]
pub struct Lapic {
    apic_id: u32,
    apic_base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; NUM_LVT],
    lint_level: [bool; 2],
    // Timer.
    initial_count: u32,
    divide_config: u32,
    /// Next expiry of an armed one-shot / periodic countdown.
    expiry_ns: Option<u64>,
    /// Armed TSC deadline, in ns.
    tsc_deadline_ns: Option<u64>,
    // Events that bypass the IRR.
    nmi_pending: bool,
    smi_pending: bool,
    init_pending: bool,
    sipi_vector: Option<u8>,
    wait_for_sipi: bool,
    extint_pending: bool,
}

impl Lapic {
    /// A LAPIC in its power-on reset state: hardware-enabled (IA32_APIC_BASE
    /// = 0xFEE0_0900 for the BSP, 0xFEE0_0800 otherwise), software-disabled
    /// (SVR = 0xFF), every LVT entry masked, DFR = 0xFFFF_FFFF.
    ///
    /// `is_bsp` only sets the BSP bit of IA32_APIC_BASE; no LAPIC starts in
    /// the wait-for-SIPI state (it enters it on INIT).
    pub fn new(apic_id: u32, is_bsp: bool) -> Self {
        let mut lapic = Self {
            apic_id,
            apic_base: LAPIC_DEFAULT_BASE
                | APIC_BASE_ENABLE
                | if is_bsp { APIC_BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: Bits256::default(),
            tmr: Bits256::default(),
            irr: Bits256::default(),
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; NUM_LVT],
            lint_level: [false; 2],
            initial_count: 0,
            divide_config: 0,
            expiry_ns: None,
            tsc_deadline_ns: None,
            nmi_pending: false,
            smi_pending: false,
            init_pending: false,
            sipi_vector: None,
            wait_for_sipi: false,
            extint_pending: false,
        };
        lapic.reset_registers();
        lapic
    }

    /// Resets every register but the APIC id and IA32_APIC_BASE (what both
    /// INIT and a hardware disable do).
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = Bits256::default();
        self.tmr = Bits256::default();
        self.irr = Bits256::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; NUM_LVT];
        self.initial_count = 0;
        self.divide_config = 0;
        self.expiry_ns = None;
        self.tsc_deadline_ns = None;
    }

    /// This LAPIC's APIC id.
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// Value of IA32_APIC_BASE (MSR 0x1B).
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Guest-physical address of the MMIO page (from IA32_APIC_BASE).
    pub fn mmio_base(&self) -> u64 {
        self.apic_base & 0x000F_FFFF_FFFF_F000
    }

    /// A guest write to IA32_APIC_BASE. Clearing the global enable bit
    /// hardware-disables the LAPIC: its registers are reset and it accepts
    /// nothing until re-enabled. x2APIC enable and other reserved bits are
    /// refused (inject #GP); the state is then unchanged.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), LapicError> {
        if value & !APIC_BASE_WRITABLE != 0 {
            return Err(LapicError::ApicBaseReserved(value));
        }
        if self.hw_enabled() && value & APIC_BASE_ENABLE == 0 {
            self.reset_registers();
            self.clear_events();
        }
        self.apic_base = value;
        Ok(())
    }

    fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// SVR bit 8: the APIC is software-enabled.
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    fn clear_events(&mut self) {
        self.nmi_pending = false;
        self.smi_pending = false;
        self.extint_pending = false;
    }

    // ----- MMIO -----

    /// A 32-bit read at `offset` within the MMIO page. Offsets that are not
    /// the start of a register (16-byte aligned) and unimplemented registers
    /// read 0. The current count is computed from `now_ns`.
    pub fn read(&mut self, offset: u32, now_ns: u64) -> u32 {
        let offset = offset & 0xfff;
        if offset & 0xf != 0 {
            return 0;
        }
        match offset {
            regs::ID => self.apic_id << 24,
            regs::VERSION => LAPIC_VERSION,
            regs::TPR => self.tpr,
            regs::APR => self.apr(),
            regs::PPR => self.ppr(),
            regs::LDR => self.ldr,
            regs::DFR => self.dfr,
            regs::SVR => self.svr,
            0x100..=0x170 => self.isr.0[((offset - regs::ISR0) >> 4) as usize],
            0x180..=0x1F0 => self.tmr.0[((offset - regs::TMR0) >> 4) as usize],
            0x200..=0x270 => self.irr.0[((offset - regs::IRR0) >> 4) as usize],
            regs::ESR => self.esr,
            regs::ICR_LOW => self.icr_low, // delivery status (bit 12) always idle
            regs::ICR_HIGH => self.icr_high,
            regs::LVT_TIMER..=regs::LVT_ERROR => {
                self.lvt[((offset - regs::LVT_TIMER) >> 4) as usize]
            }
            regs::TIMER_INITIAL_COUNT => self.initial_count,
            regs::TIMER_CURRENT_COUNT => self.current_count(now_ns),
            regs::TIMER_DIVIDE => self.divide_config,
            _ => 0, // EOI, RRD, reserved, absent CMCI LVT
        }
    }

    /// A 32-bit write at `offset` within the MMIO page. Read-only, reserved
    /// and misaligned offsets are ignored, as are writes to the ID register.
    ///
    /// After any write, re-read [`Lapic::timer_deadline_ns`]. Writes to the
    /// timer registers and SVR first run [`Lapic::poll_timer`] at `now_ns`
    /// under the old settings, so they may raise a timer interrupt that was
    /// already due.
    pub fn write(&mut self, offset: u32, value: u32, now_ns: u64) -> LapicWriteEffect {
        let offset = offset & 0xfff;
        if offset & 0xf != 0 || !self.hw_enabled() {
            return LapicWriteEffect::None;
        }
        match offset {
            regs::TPR => self.tpr = value & 0xff,
            regs::EOI => return self.eoi(),
            regs::LDR => {
                self.ldr = value & 0xff00_0000;
                return self.logical_changed();
            }
            regs::DFR => {
                self.dfr = value | 0x0fff_ffff;
                return self.logical_changed();
            }
            regs::SVR => {
                self.poll_timer(now_ns);
                self.svr = value & SVR_WRITABLE;
                if !self.software_enabled() {
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            regs::ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            regs::ICR_LOW => {
                self.icr_low = value & ICR_LOW_WRITABLE;
                return match self.icr_message() {
                    Some(msg) => LapicWriteEffect::Ipi(msg),
                    None => LapicWriteEffect::None,
                };
            }
            regs::ICR_HIGH => self.icr_high = value & 0xff00_0000,
            regs::LVT_TIMER..=regs::LVT_ERROR => {
                let idx = ((offset - regs::LVT_TIMER) >> 4) as usize;
                self.write_lvt(idx, value, now_ns);
            }
            regs::TIMER_INITIAL_COUNT => self.write_initial_count(value, now_ns),
            regs::TIMER_DIVIDE => self.write_divide_config(value, now_ns),
            _ => {}
        }
        LapicWriteEffect::None
    }

    fn logical_changed(&self) -> LapicWriteEffect {
        LapicWriteEffect::LogicalIdChanged {
            ldr: self.ldr,
            dfr: self.dfr,
        }
    }

    fn write_lvt(&mut self, idx: usize, value: u32, now_ns: u64) {
        let mut value = value & LVT_WRITABLE[idx];
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        if idx == LVT_TIMER_IDX {
            self.poll_timer(now_ns);
            let was_tsc = self.timer_mode() == TimerMode::TscDeadline;
            self.lvt[idx] = value;
            if was_tsc != (self.timer_mode() == TimerMode::TscDeadline) {
                // Switching to or from TSC-deadline mode disarms the timer.
                self.initial_count = 0;
                self.expiry_ns = None;
                self.tsc_deadline_ns = None;
            }
        } else {
            self.lvt[idx] = value;
        }
    }

    // ----- Identity -----

    /// Does this LAPIC match `dest` (physical id or broadcast, logical flat or
    /// cluster per LDR and DFR)? A hardware-disabled LAPIC matches nothing.
    pub fn matches(&self, dest: &Destination) -> bool {
        self.hw_enabled() && destination_matches(self.apic_id, self.ldr, self.dfr, dest)
    }

    /// `(LDR, DFR)`, for routers that resolve logical destinations.
    pub fn logical_id(&self) -> (u32, u32) {
        (self.ldr, self.dfr)
    }

    // ----- Delivery -----

    /// An interrupt arriving at this LAPIC.
    ///
    /// * Fixed / lowest priority: sets the IRR bit and sets (level) or clears
    ///   (edge) the TMR bit. Dropped while the APIC is software-disabled.
    ///   Vectors 0..=15 are illegal: dropped, ESR bit 6 set.
    /// * NMI, SMI, ExtINT: recorded, see [`Lapic::take_nmi`],
    ///   [`Lapic::take_smi`], [`Lapic::take_extint`].
    /// * INIT: recorded (see [`Lapic::take_init`]) and the LAPIC enters the
    ///   wait-for-SIPI state; an INIT level de-assert is ignored.
    /// * StartUp: recorded only in the wait-for-SIPI state, and only the first
    ///   one (a second SIPI before [`Lapic::take_sipi`] is dropped, like the
    ///   redundant second SIPI of the MP start-up sequence); otherwise ignored.
    ///
    /// A hardware-disabled LAPIC accepts nothing.
    pub fn accept(&mut self, irq: &Interrupt) {
        if !self.hw_enabled() {
            return;
        }
        match irq.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if self.software_enabled() {
                    self.set_irr(irq.vector, irq.trigger == TriggerMode::Level);
                }
            }
            DeliveryMode::Smi => self.smi_pending = true,
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::Init => {
                if !irq.is_init_deassert() {
                    self.init_pending = true;
                    self.wait_for_sipi = true;
                    self.sipi_vector = None;
                }
            }
            DeliveryMode::StartUp => {
                if self.wait_for_sipi && self.sipi_vector.is_none() {
                    self.sipi_vector = Some(irq.vector);
                }
            }
            DeliveryMode::ExtInt => self.extint_pending = true,
        }
    }

    fn set_irr(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.set_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level);
    }

    fn set_error(&mut self, bit: u32) {
        let fresh = self.esr_pending & bit == 0;
        self.esr_pending |= bit;
        let lvt = self.lvt[LVT_ERROR_IDX];
        // A fresh error raises the LVT error interrupt; an illegal error vector
        // sets the (then already set) bit again, which ends the recursion.
        if fresh && lvt & LVT_MASKED == 0 && self.software_enabled() {
            self.set_irr(lvt as u8, false);
        }
    }

    /// The local interrupt pins. `pin` 0 is LINT0 (usually ExtINT from the
    /// 8259 PIC), 1 is LINT1 (usually NMI); `level` is the logical (asserted)
    /// level. Delivery follows the LVT entry unless it is masked: fixed, NMI,
    /// SMI and INIT deliver on a rising edge; ExtINT follows the level (the
    /// pending ExtINT is withdrawn when the line drops, so the VMM should
    /// mirror the PIC's INTR output here). Other pins are ignored.
    pub fn set_lint(&mut self, pin: usize, level: bool) {
        let Some(old) = self
            .lint_level
            .get_mut(pin)
            .map(|l| std::mem::replace(l, level))
        else {
            return;
        };
        let lvt = self.lvt[LVT_LINT0_IDX + pin];
        let mode = DeliveryMode::from_bits(lvt >> 8);
        if mode == Some(DeliveryMode::ExtInt) && !level {
            self.extint_pending = false;
        }
        if lvt & LVT_MASKED != 0 || !level {
            return;
        }
        let trigger = if lvt & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        match mode {
            Some(DeliveryMode::ExtInt) => self.extint_pending = true,
            Some(mode) if !old => self.accept(&Interrupt {
                vector: lvt as u8,
                mode,
                trigger,
                level: true,
            }),
            _ => {}
        }
    }

    // ----- Priorities -----

    fn isrv(&self) -> u32 {
        self.isr.highest().map_or(0, u32::from)
    }

    /// Processor priority: TPR if its class is at least the highest in-service
    /// class, else the in-service class.
    fn ppr(&self) -> u32 {
        let isrv = self.isrv();
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Arbitration priority (P6 rules).
    fn apr(&self) -> u32 {
        let isrv = self.isrv();
        let irrv = self.irr.highest().map_or(0, u32::from);
        if self.tpr >> 4 >= irrv >> 4 && self.tpr >> 4 > isrv >> 4 {
            self.tpr
        } else {
            (self.tpr & 0xf0).max(isrv & 0xf0).max(irrv & 0xf0)
        }
    }

    /// Set the TPR (all 8 bits, as an MMIO write would).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = u32::from(tpr);
    }

    /// The TPR.
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// CR8 as the guest sees it: `TPR >> 4`.
    pub fn cr8(&self) -> u8 {
        (self.tpr >> 4) as u8
    }

    /// Sync from the guest's CR8 (`kvm_run.cr8` after an exit). Sets
    /// `TPR = cr8 << 4` only when the priority class differs, so the low
    /// nibble written through MMIO survives an unchanged CR8.
    pub fn set_cr8(&mut self, cr8: u8) {
        let cr8 = u32::from(cr8 & 0xf);
        if cr8 != self.tpr >> 4 {
            self.tpr = cr8 << 4;
        }
    }

    /// The highest IRR vector whose priority class is above the processor
    /// priority (TPR and ISR), i.e. what to inject next when the guest has
    /// interrupts enabled. Already-pending IRR bits stay deliverable after a
    /// software disable (the SDM holds them "for handling by the CPU"); a
    /// hardware-disabled LAPIC has none.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let irrv = self.irr.highest()?;
        (u32::from(irrv) >> 4 > self.ppr() >> 4).then_some(irrv)
    }

    /// The VMM injected `vector`: move it from IRR to ISR.
    pub fn ack(&mut self, vector: u8) {
        self.irr.set(vector, false);
        self.isr.set(vector, true);
    }

    fn eoi(&mut self) -> LapicWriteEffect {
        match self.isr.highest() {
            Some(vector) => {
                self.isr.set(vector, false);
                LapicWriteEffect::Eoi {
                    vector,
                    level_triggered: self.tmr.get(vector),
                }
            }
            None => LapicWriteEffect::None,
        }
    }

    /// Anything that should wake a halted vCPU: a deliverable vector, or a
    /// pending NMI, SMI, INIT, SIPI or ExtINT.
    pub fn has_pending_event(&self) -> bool {
        self.pending_vector().is_some()
            || self.nmi_pending
            || self.smi_pending
            || self.init_pending
            || self.sipi_vector.is_some()
            || self.extint_pending
    }

    /// Take a pending NMI (NMIs that arrive while one is pending coalesce).
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Take a pending SMI.
    pub fn take_smi(&mut self) -> bool {
        std::mem::take(&mut self.smi_pending)
    }

    /// Take a pending ExtINT. When true, the VMM acknowledges the 8259 PIC
    /// and injects the vector it returns (it does not go through IRR/ISR).
    pub fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.extint_pending)
    }

    /// Take a pending INIT. When true, the LAPIC has already performed its
    /// INIT reset (every register but the APIC id and IA32_APIC_BASE; pending
    /// NMI/SMI/ExtINT dropped) and is in the wait-for-SIPI state; the VMM
    /// resets the vCPU's registers and parks it until [`Lapic::take_sipi`]
    /// returns a vector. A SIPI that already arrived is kept.
    pub fn take_init(&mut self) -> bool {
        if !std::mem::take(&mut self.init_pending) {
            return false;
        }
        self.reset_registers();
        self.clear_events();
        true
    }

    /// Take a pending start-up IPI: the vector is the start page (the AP
    /// starts in real mode at CS = vector << 8, IP = 0, i.e. physical
    /// `vector << 12`). Taking it leaves the wait-for-SIPI state, so later
    /// SIPIs are ignored until the next INIT. Take INIT first.
    pub fn take_sipi(&mut self) -> Option<u8> {
        let v = self.sipi_vector.take()?;
        self.wait_for_sipi = false;
        Some(v)
    }

    /// In the wait-for-SIPI state (entered on INIT, left by taking a SIPI).
    pub fn is_waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    // ----- IPIs -----

    fn icr_message(&mut self) -> Option<InterruptMessage> {
        let low = self.icr_low;
        let vector = low as u8;
        let mode = match DeliveryMode::from_bits(low >> 8)? {
            DeliveryMode::ExtInt => return None, // reserved in the ICR
            m => m,
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.set_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        let dest_field = self.icr_high >> 24;
        let dest = if low & (1 << 11) != 0 {
            Destination::Logical(dest_field as u8)
        } else {
            Destination::Physical(dest_field)
        };
        Some(InterruptMessage {
            source_apic_id: Some(self.apic_id),
            dest,
            shorthand: Shorthand::from_bits(low >> 18),
            interrupt: Interrupt {
                vector,
                mode,
                trigger: if low & (1 << 15) != 0 {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                },
                level: low & (1 << 14) != 0,
            },
        })
    }

    // ----- Timer -----

    /// Current timer mode (reserved mode 0b11 behaves as one-shot).
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER_IDX] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    fn divisor(&self) -> u64 {
        divisor(self.divide_config)
    }

    fn period_ns(&self) -> u64 {
        u64::from(self.initial_count) * self.divisor()
    }

    /// First expiry strictly after `now_ns` of the countdown that expires
    /// at `expiry`, for a periodic timer.
    fn next_periodic(&self, expiry: u64, now_ns: u64) -> u64 {
        let period = self.period_ns().max(1);
        expiry + ((now_ns - expiry) / period + 1) * period
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let Some(mut expiry) = self.expiry_ns else {
            return 0;
        };
        if now_ns >= expiry {
            if self.timer_mode() != TimerMode::Periodic {
                return 0;
            }
            expiry = self.next_periodic(expiry, now_ns);
        }
        let div = self.divisor();
        let count = (expiry - now_ns).div_ceil(div);
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    fn write_initial_count(&mut self, value: u32, now_ns: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return; // ignored in TSC-deadline mode
        }
        self.poll_timer(now_ns);
        self.initial_count = value;
        self.expiry_ns = (value != 0).then(|| now_ns + self.period_ns());
    }

    fn write_divide_config(&mut self, value: u32, now_ns: u64) {
        self.poll_timer(now_ns);
        let remaining = match self.expiry_ns {
            Some(_) if self.timer_mode() != TimerMode::TscDeadline => {
                Some(u64::from(self.current_count(now_ns)))
            }
            _ => None,
        };
        self.divide_config = value & 0xb;
        // The countdown goes on from the current count at the new rate.
        if let Some(remaining) = remaining {
            self.expiry_ns = Some(now_ns + remaining * self.divisor());
        }
    }

    /// When the next timer interrupt is due, in ns: the one-shot or periodic
    /// expiry, or the armed TSC deadline. `None` when the timer is stopped or
    /// its LVT entry is masked (a masked timer still counts, silently; the
    /// LAPIC catches up when the entry is written). May be in the past.
    pub fn timer_deadline_ns(&self) -> Option<u64> {
        if self.lvt[LVT_TIMER_IDX] & LVT_MASKED != 0 {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => self.tsc_deadline_ns,
            _ => self.expiry_ns,
        }
    }

    /// If the timer is due at `now_ns`: raise the LVT timer vector (unless
    /// masked) and re-arm a periodic timer at its next period boundary after
    /// `now_ns` (missed periods coalesce into one interrupt). A one-shot or
    /// TSC-deadline timer disarms.
    pub fn poll_timer(&mut self, now_ns: u64) {
        let fired = match self.timer_mode() {
            TimerMode::TscDeadline => match self.tsc_deadline_ns {
                Some(d) if d <= now_ns => {
                    self.tsc_deadline_ns = None;
                    true
                }
                _ => false,
            },
            mode => match self.expiry_ns {
                Some(e) if e <= now_ns => {
                    self.expiry_ns = (mode == TimerMode::Periodic && self.initial_count != 0)
                        .then(|| self.next_periodic(e, now_ns));
                    true
                }
                _ => false,
            },
        };
        let lvt = self.lvt[LVT_TIMER_IDX];
        if fired && lvt & LVT_MASKED == 0 && self.software_enabled() {
            self.set_irr(lvt as u8, false);
        }
    }

    /// Arm (or with `None` / `Some(0)` disarm) the TSC-deadline timer. The
    /// VMM converts the guest's IA32_TSC_DEADLINE write from guest TSC to the
    /// `now_ns` clock. Ignored unless the LVT timer is in TSC-deadline mode
    /// (as the SDM says of IA32_TSC_DEADLINE writes). A deadline already past
    /// fires on the next [`Lapic::poll_timer`].
    pub fn set_tsc_deadline_ns(&mut self, deadline_ns: Option<u64>) {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline_ns = deadline_ns.filter(|&d| d != 0);
        }
    }

    /// The armed TSC deadline in ns; `None` once it fired or was disarmed
    /// (a guest read of IA32_TSC_DEADLINE then returns 0).
    pub fn tsc_deadline_ns(&self) -> Option<u64> {
        self.tsc_deadline_ns
    }
}

#[cfg(test)]
mod tests;
