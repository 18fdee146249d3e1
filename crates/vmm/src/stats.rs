//! Per-vCPU counters: exits by kind, interrupts injected, and where the vCPU spends its
//! time (its [`VcpuState`]). Lock-free, readable while the VM runs (`dvmm stats`).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// What a vCPU thread is doing. Only the vCPU's own thread changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Not started yet (an application processor waiting for its start-up IPI).
    Waiting = 0,
    /// In `KVM_RUN`: running guest code (or blocked in the host on a guest page the
    /// DSM is fetching: a node's snapshot shows that as `page`, from the DSM's waiting
    /// threads).
    Guest = 1,
    /// Halted (HLT), waiting for an interrupt.
    Halted = 2,
    /// Serving a device access (port or MMIO; on nodes other than 0 this includes the
    /// round trip to node 0).
    Device = 3,
    /// In the VMM for any other exit (interrupt injection, MSRs, emulation).
    Vmm = 4,
    /// The vCPU's thread has ended.
    Stopped = 5,
}

impl VcpuState {
    /// All states, in display order.
    pub const ALL: [VcpuState; 6] = [
        VcpuState::Waiting,
        VcpuState::Guest,
        VcpuState::Halted,
        VcpuState::Device,
        VcpuState::Vmm,
        VcpuState::Stopped,
    ];
    /// Short name (metric label, `dvmm stats` column).
    pub fn name(self) -> &'static str {
        match self {
            VcpuState::Waiting => "waiting",
            VcpuState::Guest => "guest",
            VcpuState::Halted => "halted",
            VcpuState::Device => "device",
            VcpuState::Vmm => "vmm",
            VcpuState::Stopped => "stopped",
        }
    }
    fn from_u8(v: u8) -> VcpuState {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(VcpuState::Vmm)
    }
}

/// Nanoseconds on a process-wide monotonic clock.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

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
    /// The current [`VcpuState`].
    state: AtomicU8,
    /// When the current state began ([`now_ns`]; 0: never set).
    state_since: AtomicU64,
    /// Time spent in each state before the current one, in ns.
    state_ns: [AtomicU64; VcpuState::ALL.len()],
    /// The vCPU thread's id (0 until it runs): the DSM reports waiting threads by it.
    tid: AtomicU32,
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
    /// Enters `state` (called by the vCPU's own thread only).
    pub fn set_state(&self, state: VcpuState) {
        let now = now_ns();
        let old = VcpuState::from_u8(self.state.swap(state as u8, Ordering::Relaxed));
        let since = self.state_since.swap(now, Ordering::Relaxed);
        if since != 0 {
            self.state_ns[old as usize].fetch_add(now.saturating_sub(since), Ordering::Relaxed);
        }
    }
    /// Records the calling thread as the vCPU's thread.
    pub fn set_thread(&self) {
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.tid
            .store(u32::try_from(tid).unwrap_or(0), Ordering::Relaxed);
    }
    /// The current state.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Relaxed))
    }
    /// Time spent in each state so far (in [`VcpuState::ALL`] order), in ns, the current
    /// state's running interval included.
    pub fn state_times_ns(&self) -> [u64; VcpuState::ALL.len()] {
        let mut t: [u64; VcpuState::ALL.len()] =
            std::array::from_fn(|i| self.state_ns[i].load(Ordering::Relaxed));
        let since = self.state_since.load(Ordering::Relaxed);
        if since != 0 {
            t[self.state() as usize] += now_ns().saturating_sub(since);
        }
        t
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

/// One vCPU's counters at one moment (`dvmm stats`, metrics).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct VcpuSnapshot {
    /// The vCPU's index (its APIC id).
    pub vcpu: usize,
    /// Its current state ([`VcpuState::name`]).
    pub state: String,
    /// Time spent in each state so far, in µs, by state name.
    pub state_us: Vec<(String, u64)>,
    /// Exits by kind ([`ExitKind::name`]).
    pub exits: Vec<(String, u64)>,
    /// Interrupts injected.
    pub injected: u64,
    /// IPIs sent.
    pub ipis_sent: u64,
    /// The vCPU thread's id on its host (0: not started).
    #[cfg_attr(feature = "serde", serde(default))]
    pub tid: u32,
}

/// A device's counters at one moment, by name (e.g. the disk's `requests`).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DeviceCounters {
    /// The device (`disk`, `net`).
    pub device: String,
    /// Its counters, by name.
    pub counters: Vec<(String, u64)>,
}

impl VcpuStats {
    /// The counters of vCPU `vcpu` now.
    pub fn snapshot(&self, vcpu: usize) -> VcpuSnapshot {
        let times = self.state_times_ns();
        VcpuSnapshot {
            vcpu,
            state: self.state().name().to_string(),
            state_us: VcpuState::ALL
                .iter()
                .map(|s| (s.name().to_string(), times[*s as usize] / 1000))
                .collect(),
            exits: ExitKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), self.exits(*k)))
                .collect(),
            injected: self.injected.load(Ordering::Relaxed),
            ipis_sent: self.ipis_sent.load(Ordering::Relaxed),
            tid: self.tid.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_times_add_up() {
        let s = VcpuStats::default();
        assert_eq!(s.state(), VcpuState::Waiting);
        assert_eq!(s.state_times_ns(), [0; 6]);
        s.set_state(VcpuState::Guest);
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.set_state(VcpuState::Halted);
        std::thread::sleep(std::time::Duration::from_millis(10));
        let t = s.state_times_ns();
        assert_eq!(s.state(), VcpuState::Halted);
        assert!(t[VcpuState::Guest as usize] >= 20_000_000, "{t:?}");
        assert!(t[VcpuState::Halted as usize] >= 10_000_000, "{t:?}");
        assert_eq!(t[VcpuState::Waiting as usize], 0);
        // The running interval is counted, not stored: reading twice grows.
        assert!(s.state_times_ns()[VcpuState::Halted as usize] >= t[VcpuState::Halted as usize]);
        for v in VcpuState::ALL {
            assert_eq!(VcpuState::from_u8(v as u8), v);
        }
    }
}
