//! Resolving interrupt messages to vCPUs.

use crate::{destination_matches, DeliveryMode, InterruptMessage, Shorthand};

#[derive(Debug, Clone, Copy)]
struct CpuIdentity {
    apic_id: u32,
    ldr: u32,
    dfr: u32,
}

/// Every vCPU's LAPIC identity (APIC id, LDR, DFR), to resolve a message to
/// the vCPU indexes it reaches without asking the (possibly remote) LAPICs.
///
/// Keep it in sync: call [`ApicTopology::set_logical`] whenever a LAPIC write
/// returns [`crate::LapicWriteEffect::LogicalIdChanged`] (on every node).
#[derive(Debug, Clone)]
pub struct ApicTopology {
    cpus: Vec<CpuIdentity>,
}

impl ApicTopology {
    /// vCPU `i` has APIC id `apic_ids[i]`, LDR 0 and DFR 0xFFFF_FFFF (the
    /// reset values).
    pub fn new(apic_ids: Vec<u32>) -> Self {
        Self {
            cpus: apic_ids
                .into_iter()
                .map(|apic_id| CpuIdentity {
                    apic_id,
                    ldr: 0,
                    dfr: 0xFFFF_FFFF,
                })
                .collect(),
        }
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.cpus.len()
    }

    /// No vCPUs at all.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_empty()
    }

    /// The vCPU index with this APIC id.
    pub fn vcpu_of_apic_id(&self, apic_id: u32) -> Option<usize> {
        self.cpus.iter().position(|c| c.apic_id == apic_id)
    }

    /// Records vCPU `vcpu`'s new LDR and DFR (out-of-range indexes are ignored).
    pub fn set_logical(&mut self, vcpu: usize, ldr: u32, dfr: u32) {
        if let Some(cpu) = self.cpus.get_mut(vcpu) {
            cpu.ldr = ldr;
            cpu.dfr = dfr;
        }
    }

    /// The vCPU indexes `msg` reaches, in increasing order.
    ///
    /// * Shorthand self: the vCPU whose APIC id is `msg.source_apic_id`
    ///   (none if the source is unknown or the I/O APIC).
    /// * All including self: every vCPU. All excluding self: every vCPU but
    ///   the source.
    /// * No shorthand: the vCPUs whose identity matches `msg.dest`
    ///   (see [`crate::destination_matches`]).
    ///
    /// Lowest priority (unless self): the model has no view of the remote
    /// LAPICs' priorities, so it picks ONE of the matching vCPUs by vector
    /// hashing, like KVM: the `(vector % n)`-th of the `n` matches in index
    /// order. Deterministic, and it spreads different vectors over the CPUs.
    pub fn resolve(&self, msg: &InterruptMessage) -> Vec<usize> {
        let source = msg.source_apic_id.and_then(|id| self.vcpu_of_apic_id(id));
        let all = 0..self.cpus.len();
        let targets: Vec<usize> = match msg.shorthand {
            Shorthand::None => all
                .filter(|&i| {
                    let c = &self.cpus[i];
                    destination_matches(c.apic_id, c.ldr, c.dfr, &msg.dest)
                })
                .collect(),
            Shorthand::SelfOnly => return source.into_iter().collect(),
            Shorthand::AllIncludingSelf => all.collect(),
            Shorthand::AllExcludingSelf => all.filter(|&i| Some(i) != source).collect(),
        };
        if msg.interrupt.mode == DeliveryMode::LowestPriority && targets.len() > 1 {
            let pick = usize::from(msg.interrupt.vector) % targets.len();
            return vec![targets[pick]];
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Destination, Interrupt, TriggerMode};

    fn msg(source: Option<u32>, dest: Destination, shorthand: Shorthand) -> InterruptMessage {
        InterruptMessage {
            source_apic_id: source,
            dest,
            shorthand,
            interrupt: Interrupt::fixed(0x40),
        }
    }

    fn lowest(mut m: InterruptMessage, vector: u8) -> InterruptMessage {
        m.interrupt.mode = DeliveryMode::LowestPriority;
        m.interrupt.vector = vector;
        m
    }

    #[test]
    fn physical_destinations() {
        let t = ApicTopology::new(vec![0, 1, 2, 3]);
        assert_eq!(t.len(), 4);
        assert!(!t.is_empty());
        assert_eq!(
            t.resolve(&msg(None, Destination::Physical(2), Shorthand::None)),
            vec![2]
        );
        assert!(t
            .resolve(&msg(None, Destination::Physical(7), Shorthand::None))
            .is_empty());
        assert_eq!(
            t.resolve(&msg(None, Destination::Physical(0xff), Shorthand::None)),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn non_identity_apic_ids() {
        let t = ApicTopology::new(vec![4, 8, 12]);
        assert_eq!(t.vcpu_of_apic_id(8), Some(1));
        assert_eq!(t.vcpu_of_apic_id(1), None);
        assert_eq!(
            t.resolve(&msg(None, Destination::Physical(12), Shorthand::None)),
            vec![2]
        );
        assert_eq!(
            t.resolve(&msg(Some(8), Destination::Physical(0), Shorthand::SelfOnly)),
            vec![1]
        );
    }

    #[test]
    fn logical_flat_and_cluster() {
        let mut t = ApicTopology::new(vec![0, 1, 2, 3]);
        // Nothing matches logical destinations before LDRs are set.
        assert!(t
            .resolve(&msg(None, Destination::Logical(0xff), Shorthand::None))
            .is_empty());
        for i in 0..4 {
            t.set_logical(i, 1 << (24 + i), 0xffff_ffff);
        }
        t.set_logical(9, 0, 0); // ignored
        assert_eq!(
            t.resolve(&msg(None, Destination::Logical(0b1010), Shorthand::None)),
            vec![1, 3]
        );
        assert_eq!(
            t.resolve(&msg(None, Destination::Logical(0xff), Shorthand::None)),
            vec![0, 1, 2, 3]
        );
        // Cluster model: vCPU 0,1 in cluster 0, vCPU 2,3 in cluster 1.
        for i in 0..4u32 {
            let ldr = (((i / 2) << 4) | (1 << (i % 2))) << 24;
            t.set_logical(i as usize, ldr, 0x0fff_ffff);
        }
        assert_eq!(
            t.resolve(&msg(None, Destination::Logical(0x13), Shorthand::None)),
            vec![2, 3]
        );
        assert_eq!(
            t.resolve(&msg(None, Destination::Logical(0x02), Shorthand::None)),
            vec![1]
        );
        assert_eq!(
            t.resolve(&msg(None, Destination::Logical(0xf1), Shorthand::None)),
            vec![0, 2]
        );
    }

    #[test]
    fn shorthands() {
        let t = ApicTopology::new(vec![0, 1, 2]);
        let d = Destination::Physical(0);
        assert_eq!(t.resolve(&msg(Some(1), d, Shorthand::SelfOnly)), vec![1]);
        assert!(t.resolve(&msg(None, d, Shorthand::SelfOnly)).is_empty());
        assert!(t.resolve(&msg(Some(9), d, Shorthand::SelfOnly)).is_empty());
        assert_eq!(
            t.resolve(&msg(Some(1), d, Shorthand::AllIncludingSelf)),
            vec![0, 1, 2]
        );
        assert_eq!(
            t.resolve(&msg(Some(1), d, Shorthand::AllExcludingSelf)),
            vec![0, 2]
        );
        assert_eq!(
            t.resolve(&msg(None, d, Shorthand::AllExcludingSelf)),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn lowest_priority_picks_one_by_vector() {
        let mut t = ApicTopology::new(vec![0, 1, 2, 3]);
        for i in 0..4 {
            t.set_logical(i, 1 << (24 + i), 0xffff_ffff);
        }
        let m = msg(None, Destination::Logical(0b1110), Shorthand::None);
        // Matches are [1, 2, 3]; vector % 3 picks.
        assert_eq!(t.resolve(&lowest(m, 0x30)), vec![1]); // 48 % 3 = 0
        assert_eq!(t.resolve(&lowest(m, 0x31)), vec![2]);
        assert_eq!(t.resolve(&lowest(m, 0x32)), vec![3]);
        // Deterministic.
        assert_eq!(t.resolve(&lowest(m, 0x31)), t.resolve(&lowest(m, 0x31)));
        // A single match is that match; none is none.
        let single = msg(None, Destination::Physical(2), Shorthand::None);
        assert_eq!(t.resolve(&lowest(single, 0x33)), vec![2]);
        let none = msg(None, Destination::Logical(0), Shorthand::None);
        assert!(t.resolve(&lowest(none, 0x33)).is_empty());
        // With a shorthand (other than self) it still picks one.
        let all = msg(
            Some(0),
            Destination::Physical(0),
            Shorthand::AllExcludingSelf,
        );
        assert_eq!(t.resolve(&lowest(all, 0x31)).len(), 1);
        let me = msg(Some(0), Destination::Physical(0), Shorthand::SelfOnly);
        assert_eq!(t.resolve(&lowest(me, 0x31)), vec![0]);
    }

    #[test]
    fn other_modes_go_to_every_match() {
        let t = ApicTopology::new(vec![0, 1]);
        let mut m = msg(Some(0), Destination::Physical(0xff), Shorthand::None);
        for mode in [
            DeliveryMode::Nmi,
            DeliveryMode::Init,
            DeliveryMode::StartUp,
            DeliveryMode::Smi,
        ] {
            m.interrupt.mode = mode;
            m.interrupt.trigger = TriggerMode::Edge;
            assert_eq!(t.resolve(&m), vec![0, 1]);
        }
    }
}
