//! Per-vCPU counters: exits by kind and interrupts injected. Lock-free, readable while
//! the VM runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Kinds of vCPU exit that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT.
    Hlt,
    /// Interrupt window opened.
    IrqWindow,
    /// KVM_RUN interrupted by a kick.
    Intr,
    /// Emulation failure fixed by the compat module without emulating (int3, fwait).
    Int3,
    /// An instruction the backend failed on, emulated by the VMM
    /// (`compat::emulate`: cmpxchg16b...), the faults it raised included.
    Emulated,
    /// MSR access handled in user space (TSC deadline, `syscall` MSRs).
    Msr,
    /// A guest system call repaired by the VMM (software-KVM hosts).
    Syscall,
    /// A guest page fault passed through the user-mode hook (software-KVM hosts).
    PageFault,
    /// Anything else.
    Other,
}

impl ExitKind {
    /// All kinds, in display order.
    pub const ALL: [ExitKind; 13] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::IrqWindow,
        ExitKind::Intr,
        ExitKind::Int3,
        ExitKind::Emulated,
        ExitKind::Msr,
        ExitKind::Syscall,
        ExitKind::PageFault,
        ExitKind::Other,
    ];
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::IrqWindow => "irq_window",
            ExitKind::Intr => "intr",
            ExitKind::Int3 => "emul_fix",
            ExitKind::Emulated => "emulated",
            ExitKind::Msr => "msr",
            ExitKind::Syscall => "syscall",
            ExitKind::PageFault => "page_fault",
            ExitKind::Other => "other",
        }
    }
}

/// Counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuStats {
    exits: [AtomicU64; ExitKind::ALL.len()],
    /// Interrupts injected with KVM_INTERRUPT.
    pub injected: AtomicU64,
    /// IPIs sent by this vCPU.
    pub ipis_sent: AtomicU64,
}

impl VcpuStats {
    /// Counts one exit.
    pub fn exit(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
    /// Reads one counter.
    pub fn exits(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize].load(Ordering::Relaxed)
    }
    /// One line: `exits io_in=.. io_out=.. ... injected=..`.
    pub fn summary(&self) -> String {
        let mut s = String::from("exits");
        for k in ExitKind::ALL {
            s.push_str(&format!(" {}={}", k.name(), self.exits(k)));
        }
        s.push_str(&format!(
            " injected={} ipis_sent={}",
            self.injected.load(Ordering::Relaxed),
            self.ipis_sent.load(Ordering::Relaxed)
        ));
        s
    }
}
