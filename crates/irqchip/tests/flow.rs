//! End-to-end flows through the I/O APIC, the topology and the LAPICs.

use irqchip::{
    lapic_regs as regs, ApicTopology, DeliveryMode, InterruptMessage, IoApic, Lapic,
    LapicWriteEffect,
};

struct Machine {
    cpus: Vec<Lapic>,
    topo: ApicTopology,
    ioapic: IoApic,
}

impl Machine {
    fn new(n: u32) -> Self {
        let mut cpus: Vec<Lapic> = (0..n).map(|i| Lapic::new(i, i == 0)).collect();
        for c in &mut cpus {
            c.write(regs::SVR, 0x1ff, 0);
        }
        Self {
            cpus,
            topo: ApicTopology::new((0..n).collect()),
            ioapic: IoApic::new(0),
        }
    }

    fn deliver(&mut self, msg: &InterruptMessage) {
        if msg.interrupt.is_init_deassert() {
            return;
        }
        for vcpu in self.topo.resolve(msg) {
            self.cpus[vcpu].accept(&msg.interrupt);
        }
    }

    fn lapic_write(&mut self, vcpu: usize, offset: u32, value: u32) {
        match self.cpus[vcpu].write(offset, value, 0) {
            LapicWriteEffect::Ipi(msg) => self.deliver(&msg),
            LapicWriteEffect::Eoi {
                vector,
                level_triggered: true,
            } => {
                for msg in self.ioapic.eoi(vector) {
                    self.deliver(&msg);
                }
            }
            LapicWriteEffect::LogicalIdChanged { ldr, dfr } => {
                self.topo.set_logical(vcpu, ldr, dfr)
            }
            _ => {}
        }
    }

    fn ioapic_rte(&mut self, pin: u32, value: u64) {
        self.ioapic.write(0x00, 0x10 + 2 * pin + 1);
        self.ioapic.write(0x10, (value >> 32) as u32);
        self.ioapic.write(0x00, 0x10 + 2 * pin);
        for msg in self.ioapic.write(0x10, value as u32) {
            self.deliver(&msg);
        }
    }

    fn irq(&mut self, pin: usize, level: bool) {
        if let Some(msg) = self.ioapic.set_irq(pin, level) {
            self.deliver(&msg);
        }
    }

    /// Inject what is pending on `vcpu` (as the VMM would) and return it.
    fn inject(&mut self, vcpu: usize) -> Option<u8> {
        let v = self.cpus[vcpu].pending_vector()?;
        self.cpus[vcpu].ack(v);
        Some(v)
    }
}

#[test]
fn level_triggered_device_interrupt_round_trip() {
    let mut m = Machine::new(2);
    // Pin 11, vector 0x41, level, physical destination 1.
    m.ioapic_rte(11, (1 << 56) | (1 << 15) | 0x41);
    m.irq(11, true);
    assert_eq!(m.inject(0), None);
    assert_eq!(m.inject(1), Some(0x41));
    // The handler has not silenced the device yet: EOI re-delivers.
    m.lapic_write(1, regs::EOI, 0);
    assert_eq!(m.inject(1), Some(0x41));
    // Now the device drops its line before EOI: nothing more.
    m.irq(11, false);
    m.lapic_write(1, regs::EOI, 0);
    assert_eq!(m.inject(1), None);
}

#[test]
fn logical_flat_device_interrupt_after_ldr_setup() {
    let mut m = Machine::new(4);
    for cpu in 0..4 {
        m.lapic_write(cpu, regs::DFR, 0xffff_ffff);
        m.lapic_write(cpu, regs::LDR, 1 << (24 + cpu));
    }
    // Fixed, logical destination = CPU 2's bit, edge.
    m.ioapic_rte(4, (0x04 << 56) | (1 << 11) | 0x34);
    m.irq(4, true);
    assert_eq!(m.inject(2), Some(0x34));
    for cpu in [0, 1, 3] {
        assert_eq!(m.inject(cpu), None);
    }
}

#[test]
fn linux_style_ap_bringup() {
    let mut m = Machine::new(2);
    // INIT assert, INIT de-assert, then two SIPIs to APIC id 1.
    m.lapic_write(0, regs::ICR_HIGH, 1 << 24);
    m.lapic_write(0, regs::ICR_LOW, 0xc500);
    m.lapic_write(0, regs::ICR_LOW, 0x8500);
    assert!(m.cpus[1].take_init());
    m.lapic_write(0, regs::ICR_LOW, 0x0609);
    assert_eq!(m.cpus[1].take_sipi(), Some(0x09));
    m.lapic_write(0, regs::ICR_LOW, 0x0609);
    assert_eq!(m.cpus[1].take_sipi(), None, "already running");
    assert!(!m.cpus[0].take_init(), "the BSP was not a target");
    // The AP enables its APIC after INIT reset it.
    assert!(!m.cpus[1].software_enabled());
    m.lapic_write(1, regs::SVR, 0x1ff);
    // Broadcast-excluding-self reschedule IPI from CPU 1.
    m.lapic_write(1, regs::ICR_LOW, (3 << 18) | 0xfd);
    assert_eq!(m.inject(0), Some(0xfd));
    assert_eq!(m.inject(1), None);
}

#[test]
fn nmi_ipi_to_all() {
    let mut m = Machine::new(3);
    m.lapic_write(
        0,
        regs::ICR_LOW,
        (2 << 18) | (DeliveryMode::Nmi.bits() << 8),
    );
    for cpu in &mut m.cpus {
        assert!(cpu.take_nmi());
    }
}

#[test]
fn timer_interrupt_is_delivered_and_eoi_is_edge() {
    let mut m = Machine::new(1);
    let cpu = &mut m.cpus[0];
    cpu.write(regs::TIMER_DIVIDE, 0b0011, 0);
    cpu.write(regs::LVT_TIMER, 0xec, 0);
    cpu.write(regs::TIMER_INITIAL_COUNT, 62_500, 0); // 1 ms at /16
    assert_eq!(cpu.timer_deadline_ns(), Some(1_000_000));
    cpu.poll_timer(1_000_000);
    assert_eq!(m.inject(0), Some(0xec));
    assert_eq!(
        m.cpus[0].write(regs::EOI, 0, 1_000_100),
        LapicWriteEffect::Eoi {
            vector: 0xec,
            level_triggered: false
        }
    );
}
