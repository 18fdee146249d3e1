//! Interrupt routing: the one place that decides which vCPU an interrupt message
//! reaches and how it gets there.
//!
//! A [`Router`] resolves a message (from a LAPIC's ICR or from the IOAPIC) to vCPU
//! indexes with the `irqchip` crate's [`ApicTopology`], then hands the interrupt to each
//! target's [`VcpuTarget`]. A target is a local vCPU today; a vCPU on another node is
//! just another `VcpuTarget` implementation, so remote delivery adds a target type and
//! changes nothing here.

use std::sync::{Arc, Mutex, RwLock};

use irqchip::{ApicTopology, Interrupt, InterruptMessage, IoApic};

use crate::devices::IrqLine;

/// Something that can receive an interrupt for one vCPU.
pub trait VcpuTarget: Send + Sync {
    /// Delivers `irq` to the vCPU's LAPIC and wakes the vCPU.
    fn deliver(&self, irq: &Interrupt);
}

/// Where the IOAPIC lives from this process's point of view.
pub trait IoApicLink: Send + Sync {
    /// Drives input `pin` to `level`; returns the message the IOAPIC emits, if any.
    fn set_irq(&self, pin: usize, level: bool) -> Option<InterruptMessage>;
    /// An EOI for a level-triggered vector; returns messages for lines still asserted.
    fn eoi(&self, vector: u8) -> Vec<InterruptMessage>;
}

impl IoApicLink for Mutex<IoApic> {
    fn set_irq(&self, pin: usize, level: bool) -> Option<InterruptMessage> {
        // A panic while the lock was held leaves the IOAPIC state consistent enough
        // (every operation is a few register updates): keep delivering interrupts.
        crate::lock(self).set_irq(pin, level)
    }
    fn eoi(&self, vector: u8) -> Vec<InterruptMessage> {
        crate::lock(self).eoi(vector)
    }
}

/// The interrupt router of one VM.
pub struct Router {
    topology: RwLock<ApicTopology>,
    targets: RwLock<Vec<Option<Arc<dyn VcpuTarget>>>>,
    ioapic: Arc<dyn IoApicLink>,
}

impl Router {
    /// A router for `vcpus` vCPUs (apic id = index) and the given IOAPIC.
    pub fn new(vcpus: usize, ioapic: Arc<dyn IoApicLink>) -> Self {
        Router {
            topology: RwLock::new(ApicTopology::new((0..vcpus as u32).collect())),
            targets: RwLock::new(vec![None; vcpus]),
            ioapic,
        }
    }

    /// Connects vCPU `index` to its delivery path.
    pub fn set_target(&self, index: usize, target: Arc<dyn VcpuTarget>) {
        let mut t = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = t.get_mut(index) {
            *slot = Some(target);
        }
    }

    /// Delivers a message to every vCPU it resolves to.
    pub fn send(&self, msg: &InterruptMessage) {
        // A poisoned lock (a panic elsewhere while it was held) must not drop
        // interrupts: the tables are plain data, recover the guard.
        let dests = self
            .topology
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .resolve(msg);
        let targets = self.targets.read().unwrap_or_else(|p| p.into_inner());
        for d in dests {
            if let Some(Some(t)) = targets.get(d) {
                t.deliver(&msg.interrupt);
            }
        }
    }

    /// A guest changed the logical destination registers of vCPU `vcpu`.
    pub fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32) {
        self.topology
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_logical(vcpu, ldr, dfr);
    }

    /// A LAPIC retired a level-triggered vector: forward the EOI to the IOAPIC.
    pub fn eoi(&self, vector: u8) {
        for m in self.ioapic.eoi(vector) {
            self.send(&m);
        }
    }

    /// Drives an IOAPIC input line.
    pub fn set_irq(&self, pin: usize, level: bool) {
        if let Some(m) = self.ioapic.set_irq(pin, level) {
            self.send(&m);
        }
    }
}

impl IrqLine for Router {
    fn pulse(&self, pin: usize) {
        self.set_irq(pin, true);
        self.set_irq(pin, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::{DeliveryMode, Destination, Shorthand, TriggerMode};
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Seen(StdMutex<Vec<u8>>);
    impl VcpuTarget for Seen {
        fn deliver(&self, irq: &Interrupt) {
            self.0.lock().unwrap().push(irq.vector);
        }
    }

    fn msg(dest: Destination, shorthand: Shorthand, vector: u8) -> InterruptMessage {
        InterruptMessage {
            source_apic_id: Some(0),
            dest,
            shorthand,
            interrupt: Interrupt {
                vector,
                mode: DeliveryMode::Fixed,
                trigger: TriggerMode::Edge,
                level: true,
            },
        }
    }

    fn router(n: usize) -> (Router, Vec<Arc<Seen>>) {
        let r = Router::new(n, Arc::new(Mutex::new(IoApic::new(n as u8))));
        let seen: Vec<Arc<Seen>> = (0..n).map(|_| Arc::new(Seen::default())).collect();
        for (i, s) in seen.iter().enumerate() {
            r.set_target(i, s.clone());
        }
        (r, seen)
    }

    #[test]
    fn physical_and_broadcast() {
        let (r, seen) = router(3);
        r.send(&msg(Destination::Physical(2), Shorthand::None, 0x40));
        assert_eq!(*seen[2].0.lock().unwrap(), vec![0x40]);
        assert!(seen[0].0.lock().unwrap().is_empty());
        r.send(&msg(
            Destination::Physical(0),
            Shorthand::AllExcludingSelf,
            0x41,
        ));
        assert!(seen[0].0.lock().unwrap().is_empty());
        assert_eq!(seen[1].0.lock().unwrap().last(), Some(&0x41));
        assert_eq!(seen[2].0.lock().unwrap().last(), Some(&0x41));
    }

    #[test]
    fn poisoned_locks_still_deliver() {
        let (r, seen) = router(2);
        let r = Arc::new(r);
        let r2 = r.clone();
        let _ = std::thread::spawn(move || {
            let _t = r2.topology.write().unwrap();
            let _g = r2.targets.write().unwrap();
            panic!("poison the router's locks");
        })
        .join();
        assert!(r.topology.is_poisoned() && r.targets.is_poisoned());
        r.set_logical(1, 1 << 25, 0xffff_ffff);
        r.send(&msg(Destination::Physical(1), Shorthand::None, 0x42));
        assert_eq!(*seen[1].0.lock().unwrap(), vec![0x42]);
    }

    #[test]
    fn logical_flat() {
        let (r, seen) = router(3);
        for i in 0..3 {
            r.set_logical(i, 1 << (24 + i), 0xffff_ffff);
        }
        r.send(&msg(Destination::Logical(0b101), Shorthand::None, 0x50));
        assert_eq!(*seen[0].0.lock().unwrap(), vec![0x50]);
        assert!(seen[1].0.lock().unwrap().is_empty());
        assert_eq!(*seen[2].0.lock().unwrap(), vec![0x50]);
    }
}
