use super::*;

/// A software-enabled LAPIC (SVR = 0x1FF).
fn enabled(id: u32) -> Lapic {
    let mut l = Lapic::new(id, id == 0);
    assert_eq!(l.write(regs::SVR, 0x1ff, 0), LapicWriteEffect::None);
    l
}

fn edge(vector: u8) -> Interrupt {
    Interrupt::fixed(vector)
}

fn level(vector: u8) -> Interrupt {
    Interrupt {
        trigger: TriggerMode::Level,
        ..Interrupt::fixed(vector)
    }
}

fn ipi(l: &mut Lapic, high: u32, low: u32) -> Option<InterruptMessage> {
    l.write(regs::ICR_HIGH, high, 0);
    match l.write(regs::ICR_LOW, low, 0) {
        LapicWriteEffect::Ipi(m) => Some(m),
        LapicWriteEffect::None => None,
        other => panic!("unexpected {other:?}"),
    }
}

fn bit_in(l: &mut Lapic, base: u32, v: u8) -> bool {
    l.read(base + u32::from(v >> 5) * 0x10, 0) & (1 << (v & 31)) != 0
}

// ----- reset state and plain registers -----

#[test]
fn reset_state() {
    let mut l = Lapic::new(3, false);
    assert_eq!(l.apic_id(), 3);
    assert_eq!(l.read(regs::ID, 0), 3 << 24);
    assert_eq!(l.read(regs::VERSION, 0), 0x0005_0014);
    assert_eq!(
        l.read(regs::VERSION, 0) & (1 << 24),
        0,
        "no EOI broadcast suppression"
    );
    assert_eq!(
        (l.read(regs::VERSION, 0) >> 16) & 0xff,
        5,
        "six LVT entries"
    );
    assert_eq!(l.read(regs::SVR, 0), 0xff);
    assert_eq!(l.read(regs::DFR, 0), 0xffff_ffff);
    assert_eq!(l.read(regs::LDR, 0), 0);
    assert_eq!(l.read(regs::TPR, 0), 0);
    for off in (regs::LVT_TIMER..=regs::LVT_ERROR).step_by(0x10) {
        assert_eq!(l.read(off, 0), 1 << 16, "LVT {off:#x} masked");
    }
    assert!(!l.software_enabled());
    assert!(!l.is_waiting_for_sipi());
    assert_eq!(l.timer_deadline_ns(), None);
    assert_eq!(l.pending_vector(), None);
    assert!(!l.has_pending_event());
}

#[test]
fn apic_base_msr() {
    let bsp = Lapic::new(0, true);
    assert_eq!(bsp.apic_base(), 0xFEE0_0900);
    assert_eq!(bsp.mmio_base(), LAPIC_DEFAULT_BASE);
    let mut ap = Lapic::new(1, false);
    assert_eq!(ap.apic_base(), 0xFEE0_0800);
    assert_eq!(
        ap.set_apic_base(0xFEE0_0800 | APIC_BASE_X2APIC),
        Err(LapicError::ApicBaseReserved(0xFEE0_0C00))
    );
    assert!(ap.set_apic_base(0xFEE0_0801).is_err());
    assert_eq!(ap.apic_base(), 0xFEE0_0800);
    assert!(ap.set_apic_base(0xFED0_0800).is_ok());
    assert_eq!(ap.mmio_base(), 0xFED0_0000);
}

#[test]
fn hardware_disable_resets_and_ignores() {
    let mut l = enabled(1);
    l.accept(&edge(0x40));
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    assert!(l.set_apic_base(0xFEE0_0000).is_ok());
    assert_eq!(l.pending_vector(), None);
    assert!(!l.take_nmi());
    assert!(!l.matches(&Destination::Physical(1)));
    l.accept(&edge(0x41));
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    assert!(!l.has_pending_event());
    assert_eq!(l.write(regs::SVR, 0x1ff, 0), LapicWriteEffect::None);
    assert!(l.set_apic_base(0xFEE0_0800).is_ok());
    assert_eq!(l.read(regs::SVR, 0), 0xff, "registers were reset");
    assert!(l.matches(&Destination::Physical(1)));
}

#[test]
fn id_register_is_read_only() {
    let mut l = enabled(2);
    l.write(regs::ID, 7 << 24, 0);
    assert_eq!(l.read(regs::ID, 0), 2 << 24);
    assert_eq!(l.apic_id(), 2);
}

#[test]
fn misaligned_and_unknown_offsets() {
    let mut l = enabled(0);
    assert_eq!(l.read(regs::VERSION + 4, 0), 0);
    assert_eq!(l.read(regs::EOI, 0), 0);
    assert_eq!(l.read(0x2F0, 0), 0, "no CMCI LVT");
    assert_eq!(l.read(0x3F0, 0), 0);
    assert_eq!(l.write(regs::TPR + 4, 0xff, 0), LapicWriteEffect::None);
    assert_eq!(l.read(regs::TPR, 0), 0);
    // Offsets are taken within the page.
    assert_eq!(l.read(0x1000 | regs::VERSION, 0), LAPIC_VERSION);
}

#[test]
fn ldr_dfr_writes_report_logical_id() {
    let mut l = enabled(0);
    assert_eq!(
        l.write(regs::LDR, 0x0312_3456, 0),
        LapicWriteEffect::LogicalIdChanged {
            ldr: 0x0300_0000,
            dfr: 0xffff_ffff
        }
    );
    assert_eq!(
        l.write(regs::DFR, 0x0000_0000, 0),
        LapicWriteEffect::LogicalIdChanged {
            ldr: 0x0300_0000,
            dfr: 0x0fff_ffff
        }
    );
    assert_eq!(l.read(regs::LDR, 0), 0x0300_0000);
    assert_eq!(l.read(regs::DFR, 0), 0x0fff_ffff);
    assert_eq!(l.logical_id(), (0x0300_0000, 0x0fff_ffff));
}

#[test]
fn matches_physical_and_logical() {
    let mut l = enabled(5);
    assert!(l.matches(&Destination::Physical(5)));
    assert!(l.matches(&Destination::Physical(0xff)));
    assert!(!l.matches(&Destination::Physical(4)));
    assert!(!l.matches(&Destination::Logical(0xff)), "LDR 0");
    l.write(regs::LDR, 0x20 << 24, 0);
    assert!(l.matches(&Destination::Logical(0x20)));
    assert!(l.matches(&Destination::Logical(0x21)));
    assert!(!l.matches(&Destination::Logical(0x01)));
    // Cluster model: cluster 2, member 0.
    l.write(regs::LDR, 0x21 << 24, 0);
    l.write(regs::DFR, 0x0fff_ffff, 0);
    assert!(l.matches(&Destination::Logical(0x21)));
    assert!(!l.matches(&Destination::Logical(0x11)));
    assert!(l.matches(&Destination::Logical(0xff)));
}

#[test]
fn svr_software_disable_masks_lvts_and_drops_fixed() {
    let mut l = enabled(0);
    l.write(regs::LVT_LINT0, 0x700, 0);
    l.write(regs::LVT_TIMER, 0x20, 0);
    assert_eq!(l.read(regs::LVT_TIMER, 0), 0x20);
    l.accept(&edge(0x40));
    // Software disable.
    l.write(regs::SVR, 0x0ff, 0);
    assert!(!l.software_enabled());
    assert_eq!(l.read(regs::LVT_TIMER, 0), 0x1_0020);
    assert_eq!(l.read(regs::LVT_LINT0, 0), 0x1_0700);
    // Unmasking is refused while disabled.
    l.write(regs::LVT_TIMER, 0x20, 0);
    assert_eq!(l.read(regs::LVT_TIMER, 0), 0x1_0020);
    // Fixed and lowest-priority interrupts are not accepted...
    l.accept(&edge(0x50));
    l.accept(&Interrupt {
        mode: DeliveryMode::LowestPriority,
        ..edge(0x51)
    });
    assert!(!bit_in(&mut l, regs::IRR0, 0x50));
    assert!(!bit_in(&mut l, regs::IRR0, 0x51));
    // ...but what was already pending stays deliverable.
    assert_eq!(l.pending_vector(), Some(0x40));
    // NMI, INIT, SIPI still work.
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    assert!(l.take_nmi());
    l.accept(&Interrupt {
        mode: DeliveryMode::Init,
        ..edge(0)
    });
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x9a)
    });
    assert!(l.take_init());
    assert_eq!(l.take_sipi(), Some(0x9a));
}

#[test]
fn svr_writable_bits() {
    let mut l = enabled(0);
    l.write(regs::SVR, 0xffff_ffff, 0);
    assert_eq!(
        l.read(regs::SVR, 0),
        0x3ff,
        "no EOI-broadcast suppression bit"
    );
}

#[test]
fn lvt_writable_bits() {
    let mut l = enabled(0);
    for (off, mask) in [
        (regs::LVT_TIMER, 0x0007_00ffu32),
        (regs::LVT_THERMAL, 0x0001_07ff),
        (regs::LVT_PERF, 0x0001_07ff),
        (regs::LVT_LINT0, 0x0001_a7ff),
        (regs::LVT_LINT1, 0x0001_a7ff),
        (regs::LVT_ERROR, 0x0001_00ff),
    ] {
        l.write(off, 0xffff_ffff, 0);
        assert_eq!(l.read(off, 0), mask, "LVT {off:#x}");
    }
}

#[test]
fn esr_write_then_read() {
    let mut l = enabled(0);
    assert_eq!(l.read(regs::ESR, 0), 0);
    l.accept(&edge(3)); // illegal vector received
    assert_eq!(l.read(regs::ESR, 0), 0, "latched only on write");
    l.write(regs::ESR, 0, 0);
    assert_eq!(l.read(regs::ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
    l.write(regs::ESR, 0, 0);
    assert_eq!(l.read(regs::ESR, 0), 0);
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn error_lvt_raises_interrupt() {
    let mut l = enabled(0);
    l.write(regs::LVT_ERROR, 0xfe, 0);
    l.accept(&edge(1));
    assert_eq!(l.pending_vector(), Some(0xfe));
    // An illegal error vector does not loop.
    let mut l = enabled(0);
    l.write(regs::LVT_ERROR, 0x02, 0);
    l.accept(&edge(1));
    assert_eq!(l.pending_vector(), None);
}

// ----- acceptance, IRR/ISR/TMR, priorities, EOI -----

#[test]
fn fixed_edge_sets_irr_clears_tmr() {
    let mut l = enabled(0);
    l.accept(&level(0x45));
    assert!(bit_in(&mut l, regs::TMR0, 0x45));
    l.accept(&edge(0x45));
    assert!(bit_in(&mut l, regs::IRR0, 0x45));
    assert!(!bit_in(&mut l, regs::TMR0, 0x45));
}

#[test]
fn lowest_priority_accepted_like_fixed() {
    let mut l = enabled(0);
    l.accept(&Interrupt {
        mode: DeliveryMode::LowestPriority,
        ..edge(0x66)
    });
    assert_eq!(l.pending_vector(), Some(0x66));
}

#[test]
fn fixed_with_level_bit_clear_is_still_accepted() {
    // Linux sends fixed IPIs without the assert bit.
    let mut l = enabled(0);
    l.accept(&Interrupt {
        level: false,
        ..edge(0xfd)
    });
    assert_eq!(l.pending_vector(), Some(0xfd));
}

#[test]
fn ack_moves_irr_to_isr_and_eoi_clears_highest() {
    let mut l = enabled(0);
    l.accept(&edge(0x31));
    l.accept(&edge(0x81));
    assert_eq!(l.pending_vector(), Some(0x81));
    l.ack(0x81);
    assert!(bit_in(&mut l, regs::ISR0, 0x81));
    assert!(!bit_in(&mut l, regs::IRR0, 0x81));
    // 0x31 is blocked by the in-service 0x81.
    assert_eq!(l.pending_vector(), None);
    assert_eq!(l.read(regs::PPR, 0), 0x80);
    assert_eq!(
        l.write(regs::EOI, 0, 0),
        LapicWriteEffect::Eoi {
            vector: 0x81,
            level_triggered: false
        }
    );
    assert_eq!(l.pending_vector(), Some(0x31));
    // EOI with nothing in service does nothing.
    assert_eq!(l.write(regs::EOI, 0, 0), LapicWriteEffect::None);
}

#[test]
fn eoi_reports_level_triggered() {
    let mut l = enabled(0);
    l.accept(&level(0x52));
    l.ack(0x52);
    assert_eq!(
        l.write(regs::EOI, 0, 0),
        LapicWriteEffect::Eoi {
            vector: 0x52,
            level_triggered: true
        }
    );
}

#[test]
fn nested_interrupts_preempt_by_class() {
    let mut l = enabled(0);
    l.accept(&edge(0x41));
    l.ack(0x41);
    // Same class does not preempt.
    l.accept(&edge(0x4f));
    assert_eq!(l.pending_vector(), None);
    // Higher class does.
    l.accept(&edge(0x50));
    assert_eq!(l.pending_vector(), Some(0x50));
    l.ack(0x50);
    assert_eq!(
        l.write(regs::EOI, 0, 0),
        LapicWriteEffect::Eoi {
            vector: 0x50,
            level_triggered: false
        }
    );
    assert_eq!(
        l.write(regs::EOI, 0, 0),
        LapicWriteEffect::Eoi {
            vector: 0x41,
            level_triggered: false
        }
    );
    assert_eq!(l.pending_vector(), Some(0x4f));
}

#[test]
fn tpr_blocks_by_class() {
    let mut l = enabled(0);
    l.accept(&edge(0x55));
    l.write(regs::TPR, 0x50, 0);
    assert_eq!(l.pending_vector(), None, "same class as TPR is blocked");
    assert_eq!(l.read(regs::PPR, 0), 0x50);
    l.write(regs::TPR, 0x4f, 0);
    assert_eq!(l.pending_vector(), Some(0x55));
    assert_eq!(l.read(regs::PPR, 0), 0x4f);
    l.write(regs::TPR, 0x1ff, 0);
    assert_eq!(l.read(regs::TPR, 0), 0xff);
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn ppr_from_isr_and_tpr() {
    let mut l = enabled(0);
    l.accept(&edge(0x62));
    l.ack(0x62);
    l.set_tpr(0x35);
    assert_eq!(l.read(regs::PPR, 0), 0x60);
    l.set_tpr(0x75);
    assert_eq!(l.read(regs::PPR, 0), 0x75);
    l.set_tpr(0x65);
    assert_eq!(
        l.read(regs::PPR, 0),
        0x65,
        "TPR class equal to ISRV class: PPR = TPR"
    );
}

#[test]
fn apr_rules() {
    let mut l = enabled(0);
    l.set_tpr(0x23);
    assert_eq!(l.read(regs::APR, 0), 0x23);
    l.accept(&edge(0x45));
    assert_eq!(l.read(regs::APR, 0), 0x40);
    l.ack(0x45);
    assert_eq!(l.read(regs::APR, 0), 0x40);
    l.set_tpr(0x93);
    assert_eq!(l.read(regs::APR, 0), 0x93);
}

#[test]
fn cr8_sync() {
    let mut l = enabled(0);
    l.write(regs::TPR, 0x37, 0);
    assert_eq!(l.cr8(), 3);
    l.set_cr8(3);
    assert_eq!(l.tpr(), 0x37, "unchanged class keeps the low nibble");
    l.set_cr8(5);
    assert_eq!(l.tpr(), 0x50);
    l.set_cr8(0);
    assert_eq!(l.tpr(), 0);
    l.set_tpr(0xe0);
    assert_eq!(l.cr8(), 0xe);
}

#[test]
fn illegal_vectors_are_dropped() {
    let mut l = enabled(0);
    for v in 0..16 {
        l.accept(&edge(v));
    }
    assert_eq!(l.pending_vector(), None);
    l.accept(&edge(16));
    assert_eq!(l.pending_vector(), Some(16));
}

// ----- NMI, SMI, INIT, SIPI, ExtINT -----

#[test]
fn nmi_and_smi_are_recorded() {
    let mut l = enabled(0);
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    assert!(l.has_pending_event());
    assert!(l.take_nmi());
    assert!(!l.take_nmi(), "NMIs coalesce");
    l.accept(&Interrupt {
        mode: DeliveryMode::Smi,
        ..edge(0)
    });
    assert!(l.take_smi());
    assert!(!l.take_smi());
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn extint_is_recorded() {
    let mut l = enabled(0);
    l.accept(&Interrupt {
        mode: DeliveryMode::ExtInt,
        ..edge(0)
    });
    assert!(l.has_pending_event());
    assert!(l.take_extint());
    assert!(!l.take_extint());
}

#[test]
fn init_deassert_is_ignored() {
    let mut l = enabled(1);
    l.accept(&Interrupt {
        vector: 0,
        mode: DeliveryMode::Init,
        trigger: TriggerMode::Level,
        level: false,
    });
    assert!(!l.take_init());
    assert!(!l.is_waiting_for_sipi());
}

#[test]
fn sipi_without_init_is_ignored() {
    let mut l = enabled(1);
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x9f)
    });
    assert_eq!(l.take_sipi(), None);
}

#[test]
fn init_sipi_sipi_sequence() {
    let mut l = enabled(1);
    l.accept(&edge(0x40));
    l.write(regs::TPR, 0x20, 0);
    // INIT assert (level), INIT de-assert, SIPI, SIPI.
    l.accept(&Interrupt {
        vector: 0,
        mode: DeliveryMode::Init,
        trigger: TriggerMode::Level,
        level: true,
    });
    l.accept(&Interrupt {
        vector: 0,
        mode: DeliveryMode::Init,
        trigger: TriggerMode::Level,
        level: false,
    });
    assert!(l.is_waiting_for_sipi());
    assert!(l.has_pending_event());
    assert!(l.take_init());
    assert!(!l.take_init());
    // INIT reset the registers but not the id.
    assert_eq!(l.read(regs::SVR, 0), 0xff);
    assert_eq!(l.read(regs::TPR, 0), 0);
    assert_eq!(l.read(regs::ID, 0), 1 << 24);
    assert_eq!(l.pending_vector(), None);
    assert_eq!(l.apic_base(), 0xFEE0_0800);
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x9a)
    });
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x9b)
    });
    assert_eq!(l.take_sipi(), Some(0x9a));
    assert!(!l.is_waiting_for_sipi());
    // The second SIPI arrived before the first was taken: dropped.
    assert_eq!(l.take_sipi(), None);
    // A SIPI to a running CPU is ignored.
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x9c)
    });
    assert_eq!(l.take_sipi(), None);
}

#[test]
fn sipi_before_take_init_is_kept() {
    let mut l = enabled(1);
    l.accept(&Interrupt {
        mode: DeliveryMode::Init,
        ..edge(0)
    });
    l.accept(&Interrupt {
        mode: DeliveryMode::StartUp,
        ..edge(0x10)
    });
    assert!(l.take_init());
    assert_eq!(l.take_sipi(), Some(0x10));
}

#[test]
fn init_drops_pending_nmi() {
    let mut l = enabled(1);
    l.accept(&Interrupt {
        mode: DeliveryMode::Nmi,
        ..edge(0)
    });
    l.accept(&Interrupt {
        mode: DeliveryMode::Init,
        ..edge(0)
    });
    assert!(l.take_init());
    assert!(!l.take_nmi());
}

#[test]
fn lint_pins() {
    let mut l = enabled(0);
    // Masked: nothing.
    l.set_lint(1, true);
    assert!(!l.has_pending_event());
    l.set_lint(1, false);
    // LINT1 = NMI, LINT0 = ExtINT.
    l.write(regs::LVT_LINT1, 0x400, 0);
    l.write(regs::LVT_LINT0, 0x700, 0);
    l.set_lint(1, true);
    assert!(l.take_nmi());
    l.set_lint(1, true);
    assert!(!l.take_nmi(), "edge only");
    l.set_lint(0, true);
    l.set_lint(0, false);
    assert!(!l.take_extint(), "ExtINT follows the line");
    l.set_lint(0, true);
    assert!(l.take_extint());
    // Fixed delivery through LINT0.
    l.write(regs::LVT_LINT0, 0x33, 0);
    l.set_lint(0, false);
    l.set_lint(0, true);
    assert_eq!(l.pending_vector(), Some(0x33));
    // Level-triggered LVT sets TMR.
    l.write(regs::LVT_LINT0, 0x8034, 0);
    l.set_lint(0, false);
    l.set_lint(0, true);
    assert!(bit_in(&mut l, regs::TMR0, 0x34));
    l.set_lint(7, true); // ignored
}

// ----- ICR -----

#[test]
fn icr_fixed_physical() {
    let mut l = enabled(2);
    let m = ipi(&mut l, 0x0300_0000, 0x0000_40fd).expect("ipi");
    assert_eq!(m.source_apic_id, Some(2));
    assert_eq!(m.dest, Destination::Physical(3));
    assert_eq!(m.shorthand, Shorthand::None);
    assert_eq!(m.interrupt.vector, 0xfd);
    assert_eq!(m.interrupt.mode, DeliveryMode::Fixed);
    assert_eq!(m.interrupt.trigger, TriggerMode::Edge);
    assert!(m.interrupt.level);
    // Delivery status reads idle; registers read back.
    assert_eq!(l.read(regs::ICR_LOW, 0), 0x40fd);
    assert_eq!(l.read(regs::ICR_LOW, 0) & (1 << 12), 0);
    assert_eq!(l.read(regs::ICR_HIGH, 0), 0x0300_0000);
    l.write(regs::ICR_HIGH, 0xffff_ffff, 0);
    assert_eq!(l.read(regs::ICR_HIGH, 0), 0xff00_0000);
    l.write(regs::ICR_LOW, !0x700, 0); // every bit but the delivery mode: fixed, vector 0xff
    assert_eq!(l.read(regs::ICR_LOW, 0), 0x000c_c8ff);
}

#[test]
fn icr_logical_destination() {
    let mut l = enabled(0);
    let m = ipi(&mut l, 0x0c00_0000, 0x0000_0830).expect("ipi");
    assert_eq!(m.dest, Destination::Logical(0x0c));
}

#[test]
fn icr_delivery_modes() {
    let mut l = enabled(0);
    let cases = [
        (0b000, Some(DeliveryMode::Fixed)),
        (0b001, Some(DeliveryMode::LowestPriority)),
        (0b010, Some(DeliveryMode::Smi)),
        (0b011, None),
        (0b100, Some(DeliveryMode::Nmi)),
        (0b101, Some(DeliveryMode::Init)),
        (0b110, Some(DeliveryMode::StartUp)),
        (0b111, None),
    ];
    for (bits, expected) in cases {
        let got = ipi(&mut l, 1 << 24, (bits << 8) | 0x4000 | 0x20).map(|m| m.interrupt.mode);
        assert_eq!(got, expected, "mode {bits:#b}");
    }
}

#[test]
fn icr_shorthands() {
    let mut l = enabled(4);
    for (bits, sh) in [
        (0, Shorthand::None),
        (1, Shorthand::SelfOnly),
        (2, Shorthand::AllIncludingSelf),
        (3, Shorthand::AllExcludingSelf),
    ] {
        let m = ipi(&mut l, 0, (bits << 18) | 0x40).expect("ipi");
        assert_eq!(m.shorthand, sh);
        assert_eq!(m.source_apic_id, Some(4));
    }
}

#[test]
fn icr_init_assert_and_deassert() {
    let mut l = enabled(0);
    // Linux: INIT, level trigger, assert; then de-assert.
    let a = ipi(&mut l, 1 << 24, 0x0000_c500).expect("ipi");
    assert_eq!(a.interrupt.mode, DeliveryMode::Init);
    assert_eq!(a.interrupt.trigger, TriggerMode::Level);
    assert!(a.interrupt.level);
    assert!(!a.interrupt.is_init_deassert());
    let d = ipi(&mut l, 1 << 24, 0x0000_8500).expect("ipi");
    assert!(d.interrupt.is_init_deassert());
    let mut target = enabled(1);
    target.accept(&a.interrupt);
    target.accept(&d.interrupt);
    assert!(target.take_init());
    let s = ipi(&mut l, 1 << 24, 0x0000_069a).expect("ipi");
    assert_eq!(s.interrupt.mode, DeliveryMode::StartUp);
    target.accept(&s.interrupt);
    assert_eq!(target.take_sipi(), Some(0x9a));
}

#[test]
fn icr_illegal_vector_sets_send_error() {
    let mut l = enabled(0);
    assert_eq!(ipi(&mut l, 1 << 24, 0x0000_4005), None);
    l.write(regs::ESR, 0, 0);
    assert_eq!(l.read(regs::ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    // NMI's vector field is ignored.
    assert!(ipi(&mut l, 1 << 24, 0x0000_4400).is_some());
}

#[test]
fn self_ipi_round_trip() {
    let mut l = enabled(0);
    let m = ipi(&mut l, 0, (1 << 18) | 0xec).expect("ipi");
    let topo = crate::ApicTopology::new(vec![0, 1]);
    for cpu in topo.resolve(&m) {
        assert_eq!(cpu, 0);
        l.accept(&m.interrupt);
    }
    assert_eq!(l.pending_vector(), Some(0xec));
}

// ----- timer -----

#[test]
fn divide_config_encodings() {
    let expected = [
        (0b0000, 2),
        (0b0001, 4),
        (0b0010, 8),
        (0b0011, 16),
        (0b1000, 32),
        (0b1001, 64),
        (0b1010, 128),
        (0b1011, 1),
    ];
    for (dcr, div) in expected {
        assert_eq!(divisor(dcr), div, "dcr {dcr:#06b}");
        let mut l = enabled(0);
        l.write(regs::TIMER_DIVIDE, dcr, 0);
        assert_eq!(l.read(regs::TIMER_DIVIDE, 0), dcr);
        l.write(regs::LVT_TIMER, 0x30, 0);
        l.write(regs::TIMER_INITIAL_COUNT, 100, 1000);
        assert_eq!(l.timer_deadline_ns(), Some(1000 + 100 * div));
    }
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0xffff_ffff, 0);
    assert_eq!(l.read(regs::TIMER_DIVIDE, 0), 0xb);
}

#[test]
fn one_shot_timer() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b0011, 0); // /16
    l.write(regs::LVT_TIMER, 0xef, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 1000, 5_000);
    assert_eq!(l.read(regs::TIMER_INITIAL_COUNT, 0), 1000);
    assert_eq!(l.timer_deadline_ns(), Some(5_000 + 16_000));
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 5_000), 1000);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 5_000 + 1600), 900);
    assert_eq!(
        l.read(regs::TIMER_CURRENT_COUNT, 5_000 + 1601),
        900,
        "rounds up"
    );
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 5_000 + 1616), 899);
    l.poll_timer(20_999);
    assert_eq!(l.pending_vector(), None, "not yet due");
    l.poll_timer(21_000);
    assert_eq!(l.pending_vector(), Some(0xef));
    assert_eq!(l.timer_deadline_ns(), None);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 30_000), 0);
    // A one-shot timer does not fire again.
    l.ack(0xef);
    l.write(regs::EOI, 0, 30_000);
    l.poll_timer(100_000);
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn one_shot_current_count_reaches_zero_without_poll() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0); // /1
    l.write(regs::LVT_TIMER, 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 50, 0);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 49), 1);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 50), 0);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 500), 0);
}

#[test]
fn periodic_timer() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0); // /1
    l.write(regs::LVT_TIMER, (1 << 17) | 0xec, 0);
    assert_eq!(l.timer_mode(), TimerMode::Periodic);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    assert_eq!(l.timer_deadline_ns(), Some(100));
    l.poll_timer(100);
    assert_eq!(l.pending_vector(), Some(0xec));
    assert_eq!(l.timer_deadline_ns(), Some(200));
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 100), 100);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 150), 50);
    // Current count wraps even without polling.
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 275), 25);
    l.ack(0xec);
    l.write(regs::EOI, 0, 150);
    // Late poll: missed periods coalesce, next deadline is the next boundary.
    l.poll_timer(555);
    assert_eq!(l.pending_vector(), Some(0xec));
    assert_eq!(l.timer_deadline_ns(), Some(600));
}

#[test]
fn initial_count_zero_stops_timer() {
    let mut l = enabled(0);
    l.write(regs::LVT_TIMER, (1 << 17) | 0xec, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    assert!(l.timer_deadline_ns().is_some());
    l.write(regs::TIMER_INITIAL_COUNT, 0, 10);
    assert_eq!(l.timer_deadline_ns(), None);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 20), 0);
    l.poll_timer(1_000_000);
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn rewriting_initial_count_restarts() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0);
    l.write(regs::LVT_TIMER, 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 60);
    assert_eq!(l.timer_deadline_ns(), Some(160));
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn divide_change_mid_count_rescales() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0); // /1
    l.write(regs::LVT_TIMER, 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    l.write(regs::TIMER_DIVIDE, 0b0000, 40); // /2, 60 counts left
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 40), 60);
    assert_eq!(l.timer_deadline_ns(), Some(160));
}

#[test]
fn masked_timer_counts_silently() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0);
    l.write(regs::LVT_TIMER, (1 << 16) | 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    assert_eq!(l.timer_deadline_ns(), None, "masked: no wake-up needed");
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 30), 70);
    // Unmasking after the expiry does not deliver the missed one-shot.
    l.write(regs::LVT_TIMER, 0x30, 150);
    assert_eq!(l.pending_vector(), None);
    assert_eq!(l.timer_deadline_ns(), None);
    // Unmasking before expiry: it fires on time.
    l.write(regs::TIMER_INITIAL_COUNT, 100, 200);
    l.write(regs::LVT_TIMER, (1 << 16) | 0x30, 210);
    l.write(regs::LVT_TIMER, 0x30, 250);
    assert_eq!(l.timer_deadline_ns(), Some(300));
    l.poll_timer(300);
    assert_eq!(l.pending_vector(), Some(0x30));
}

#[test]
fn due_timer_fires_before_a_write_changes_it() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0);
    l.write(regs::LVT_TIMER, 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    // The VMM did not poll at 100; the guest masks the timer at 120.
    l.write(regs::LVT_TIMER, (1 << 16) | 0x30, 120);
    assert_eq!(l.pending_vector(), Some(0x30));
}

#[test]
fn tsc_deadline_timer() {
    let mut l = enabled(0);
    // Ignored outside TSC-deadline mode.
    l.set_tsc_deadline_ns(Some(500));
    assert_eq!(l.tsc_deadline_ns(), None);
    l.write(regs::LVT_TIMER, (2 << 17) | 0xec, 0);
    assert_eq!(l.timer_mode(), TimerMode::TscDeadline);
    l.set_tsc_deadline_ns(Some(500));
    assert_eq!(l.timer_deadline_ns(), Some(500));
    // Initial count is ignored, current count reads 0.
    l.write(regs::TIMER_INITIAL_COUNT, 1000, 0);
    assert_eq!(l.read(regs::TIMER_INITIAL_COUNT, 0), 0);
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 10), 0);
    l.poll_timer(499);
    assert_eq!(l.pending_vector(), None);
    l.poll_timer(501);
    assert_eq!(l.pending_vector(), Some(0xec));
    assert_eq!(l.tsc_deadline_ns(), None, "fired: disarmed");
    assert_eq!(l.timer_deadline_ns(), None);
    // Re-arm and disarm with 0 or None.
    l.set_tsc_deadline_ns(Some(900));
    l.set_tsc_deadline_ns(Some(0));
    assert_eq!(l.timer_deadline_ns(), None);
    l.set_tsc_deadline_ns(Some(900));
    l.set_tsc_deadline_ns(None);
    assert_eq!(l.timer_deadline_ns(), None);
}

#[test]
fn timer_mode_switch_disarms() {
    let mut l = enabled(0);
    l.write(regs::LVT_TIMER, (2 << 17) | 0xec, 0);
    l.set_tsc_deadline_ns(Some(1000));
    l.write(regs::LVT_TIMER, 0xec, 10); // back to one-shot
    assert_eq!(l.timer_deadline_ns(), None);
    assert_eq!(l.tsc_deadline_ns(), None);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 20);
    assert!(l.timer_deadline_ns().is_some());
    l.write(regs::LVT_TIMER, (2 << 17) | 0xec, 30); // to TSC deadline
    assert_eq!(l.timer_deadline_ns(), None);
    assert_eq!(l.read(regs::TIMER_INITIAL_COUNT, 30), 0);
    l.poll_timer(10_000);
    assert_eq!(l.pending_vector(), None);
}

#[test]
fn one_shot_to_periodic_keeps_counting() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1011, 0);
    l.write(regs::LVT_TIMER, 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, 100, 0);
    l.write(regs::LVT_TIMER, (1 << 17) | 0x30, 50);
    assert_eq!(l.timer_deadline_ns(), Some(100));
    l.poll_timer(100);
    assert_eq!(l.timer_deadline_ns(), Some(200), "now periodic");
}

#[test]
fn timer_with_large_count_does_not_overflow() {
    let mut l = enabled(0);
    l.write(regs::TIMER_DIVIDE, 0b1010, 0); // /128
    l.write(regs::LVT_TIMER, (1 << 17) | 0x30, 0);
    l.write(regs::TIMER_INITIAL_COUNT, u32::MAX, 0);
    assert_eq!(l.timer_deadline_ns(), Some(u64::from(u32::MAX) * 128));
    assert_eq!(l.read(regs::TIMER_CURRENT_COUNT, 0), u32::MAX);
    l.poll_timer(u64::from(u32::MAX) * 128 * 3 + 5);
    assert_eq!(l.pending_vector(), Some(0x30));
}
