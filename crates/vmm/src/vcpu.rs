//! vCPU threads.
//!
//! Each vCPU runs on its own thread with an explicit run state
//! ([`RunState`]): the boot vCPU starts `Running` at the kernel's 64-bit entry, the
//! others wait for INIT and then SIPI, as on real hardware. Exits are handled by the
//! free function [`dispatch`], which unit tests call with synthetic exits.
//!
//! Interrupts: there is no in-kernel irqchip. Before each `KVM_RUN` the thread asks its
//! user-space LAPIC for the highest deliverable vector and injects it with
//! `KVM_INTERRUPT` when the guest can take it, or requests an interrupt-window exit.
//! Another thread that makes an interrupt pending calls [`VcpuHandle::wake`], which
//! notifies a halted vCPU and kicks a running one out of `KVM_RUN` (it sets
//! `immediate_exit` in the shared `kvm_run` page and sends [`kick_signal`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use irqchip::{Interrupt, Lapic, LapicWriteEffect};
use kvm_bindings::kvm_interrupt;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::boot::{regs, BootInfo};
use crate::compat::emulate::{self, Action, Outcome};
use crate::compat::usermode::{Breakpoint, UserMode, MSR_LSTAR};
use crate::compat::xstate;
use crate::compat::INTERNAL_ERROR_EMULATION;
use crate::devices::PortEvent;
use crate::irq::VcpuTarget;
use crate::stats::{ExitKind, VcpuState, VcpuStats};

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_interrupt;
    use vmm_sys_util::ioctl_iow_nr;
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
    pub(crate) use self::KVM_INTERRUPT as kvm_interrupt_nr;
}
use ioctls::kvm_interrupt_nr as KVM_INTERRUPT;

pub use crate::layout::{IOAPIC_BASE, LAPIC_BASE};

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; idempotent.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
}

/// Errors that end a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: usize,
        /// Which operation.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// The guest triple-faulted.
    #[error("vCPU {vcpu}: guest triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}")]
    TripleFault {
        /// vCPU index.
        vcpu: usize,
        /// Instruction pointer.
        rip: u64,
    },
    /// KVM could not run or emulate the guest.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror}, data {data:x?}, rip {rip:#x}")]
    Internal {
        /// vCPU index.
        vcpu: usize,
        /// KVM suberror.
        suberror: u32,
        /// Data words.
        data: Vec<u64>,
        /// Instruction pointer.
        rip: u64,
    },
    /// The backend failed on an instruction the VMM does not handle (see
    /// [`crate::compat::emulate`]); `what` names the decoded instruction.
    #[error("vCPU {vcpu}: {what}")]
    Emulation {
        /// vCPU index.
        vcpu: usize,
        /// The instruction and why it was not handled.
        what: String,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unhandled exit {exit} at rip {rip:#x}")]
    Unhandled {
        /// vCPU index.
        vcpu: usize,
        /// Description.
        exit: String,
        /// Instruction pointer.
        rip: u64,
    },
}

/// Run state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// An AP before its first INIT.
    WaitForInit,
    /// After INIT, waiting for a start-up IPI.
    WaitForSipi,
    /// Executing guest code.
    Running,
}

/// What the exit handler asks the vCPU loop to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Enter the guest again.
    Continue,
    /// The guest executed HLT: wait for an interrupt.
    Halt,
    /// The guest asked for a reset.
    Reset,
    /// The guest asked to be powered off (system event).
    PowerOff,
    /// Triple fault.
    TripleFault,
    /// KVM internal error: the caller reads the details from `kvm_run`.
    InternalError,
    /// KVM_RUN was interrupted by a kick.
    Interrupted,
    /// Anything else.
    Unhandled(String),
}

/// The devices and interrupt controller a vCPU's exits reach.
pub trait ExitHandler {
    /// A port read.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// A port write.
    fn pio_write(&mut self, port: u16, data: &[u8]) -> PortEvent;
    /// An MMIO read.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    /// An MMIO write.
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// A read of an MSR that the VMM filters; None injects #GP.
    fn rdmsr(&mut self, index: u32) -> Option<u64>;
    /// A write of an MSR that the VMM filters; false injects #GP.
    fn wrmsr(&mut self, index: u32, value: u64) -> bool;
}

/// Handles one exit. Pure with respect to KVM: it only talks to `h`, so tests can drive
/// it with synthetic exits.
pub fn dispatch<H: ExitHandler>(exit: VcpuExit<'_>, h: &mut H, stats: &VcpuStats) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.exit(ExitKind::IoIn);
            stats.set_state(VcpuState::Device);
            h.pio_read(port, data);
            stats.set_state(VcpuState::Vmm);
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            stats.exit(ExitKind::IoOut);
            stats.set_state(VcpuState::Device);
            let ev = h.pio_write(port, data);
            stats.set_state(VcpuState::Vmm);
            match ev {
                PortEvent::None | PortEvent::PowerOffAnnounced => Next::Continue,
                PortEvent::Reset => Next::Reset,
                PortEvent::PowerOff | PortEvent::AcpiPowerOff => Next::PowerOff,
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.exit(ExitKind::MmioRead);
            stats.set_state(VcpuState::Device);
            h.mmio_read(addr, data);
            stats.set_state(VcpuState::Vmm);
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.exit(ExitKind::MmioWrite);
            stats.set_state(VcpuState::Device);
            h.mmio_write(addr, data);
            stats.set_state(VcpuState::Vmm);
            Next::Continue
        }
        VcpuExit::Hlt => {
            stats.exit(ExitKind::Hlt);
            Next::Halt
        }
        VcpuExit::IrqWindowOpen => {
            stats.exit(ExitKind::IrqWindow);
            Next::Continue
        }
        VcpuExit::Intr => {
            stats.exit(ExitKind::Intr);
            Next::Interrupted
        }
        VcpuExit::X86Rdmsr(exit) => {
            stats.exit(ExitKind::Msr);
            match h.rdmsr(exit.index) {
                Some(v) => *exit.data = v,
                None => *exit.error = 1,
            }
            Next::Continue
        }
        VcpuExit::X86Wrmsr(exit) => {
            stats.exit(ExitKind::Msr);
            if !h.wrmsr(exit.index, exit.data) {
                *exit.error = 1;
            }
            Next::Continue
        }
        VcpuExit::Shutdown => Next::TripleFault,
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::SystemEvent(kind, _) => {
            stats.exit(ExitKind::Other);
            match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Reset,
                other => Next::Unhandled(format!("system event {other}")),
            }
        }
        other => {
            stats.exit(ExitKind::Other);
            Next::Unhandled(format!("{other:?}"))
        }
    }
}

struct Kicker {
    thread: libc::pthread_t,
    kvm_run: *mut kvm_bindings::kvm_run,
}

// SAFETY: the pointer is only dereferenced while the Kicker is registered, i.e. while
// the owning vCPU thread keeps its VcpuFd (and so the kvm_run mapping) alive; the
// thread unregisters before dropping the VcpuFd.
unsafe impl Send for Kicker {}

/// The part of a vCPU other threads see: its LAPIC and how to wake it.
pub struct VcpuHandle {
    /// vCPU index (= APIC id).
    pub index: usize,
    lapic: Mutex<Lapic>,
    cond: Condvar,
    kicker: Mutex<Option<Kicker>>,
    in_guest: AtomicBool,
    /// Counters.
    pub stats: VcpuStats,
    /// Number of kicks sent.
    pub kicks: AtomicU64,
    tsc_deadline: AtomicU64,
}

impl VcpuHandle {
    /// A handle for vCPU `index`.
    pub fn new(index: usize) -> Self {
        VcpuHandle {
            index,
            lapic: Mutex::new(Lapic::new(index as u32, index == 0)),
            cond: Condvar::new(),
            kicker: Mutex::new(None),
            in_guest: AtomicBool::new(false),
            stats: VcpuStats::default(),
            kicks: AtomicU64::new(0),
            tsc_deadline: AtomicU64::new(0),
        }
    }

    /// Locks the LAPIC.
    pub fn lapic(&self) -> MutexGuard<'_, Lapic> {
        crate::lock(&self.lapic)
    }

    /// Makes the vCPU look at its LAPIC again: wakes it if it waits, kicks it out of
    /// `KVM_RUN` if it runs guest code.
    pub fn wake(&self) {
        self.cond.notify_all();
        if self.in_guest.load(Ordering::SeqCst) {
            let k = crate::lock(&self.kicker);
            if let Some(k) = k.as_ref() {
                // SAFETY: see `Kicker`: the mapping is alive while registered. A
                // volatile byte store into the shared kvm_run page is what
                // immediate_exit is designed for.
                unsafe { std::ptr::addr_of_mut!((*k.kvm_run).immediate_exit).write_volatile(1) };
                // SAFETY: the thread id belongs to a live thread (it unregisters before
                // exiting) and the signal has a handler installed.
                unsafe { libc::pthread_kill(k.thread, kick_signal()) };
                self.kicks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn register(&self, vcpu: &mut VcpuFd) {
        let run: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        *crate::lock(&self.kicker) = Some(Kicker {
            thread,
            kvm_run: run,
        });
    }

    fn unregister(&self) {
        *crate::lock(&self.kicker) = None;
    }
}

impl VcpuTarget for VcpuHandle {
    fn deliver(&self, irq: &Interrupt) {
        self.lapic().accept(irq);
        self.wake();
    }
}

/// What the vCPU loop needs from the VM around it.
pub trait VcpuEnv: Send + Sync {
    /// Nanoseconds since the VM started (the LAPIC clock).
    fn now_ns(&self) -> u64;
    /// Whether the VM is stopping.
    fn stopping(&self) -> bool;
    /// Port read.
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]);
    /// Port write.
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> PortEvent;
    /// MMIO read outside the LAPIC page.
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]);
    /// MMIO write outside the LAPIC page.
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]);
    /// Route an IPI.
    fn send_ipi(&self, vcpu: usize, msg: &irqchip::InterruptMessage);
    /// A level-triggered EOI (for the IOAPIC).
    fn eoi(&self, vector: u8);
    /// LDR/DFR changed.
    fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32);
    /// The LAPIC timer of `vcpu` was (re)programmed.
    fn timer_changed(&self);
    /// The vCPU is halted with interrupts disabled (true) or no longer (false).
    fn dead_halt(&self, vcpu: usize, halted: bool);
    /// Whether vCPUs should log their registers at the next interruption (diagnosis of
    /// a guest that does not end).
    fn dump_requested(&self) -> bool {
        false
    }
    /// The system-call repair, on hosts that need it (see [`crate::compat::usermode`]).
    fn user_mode(&self) -> Option<&UserMode> {
        None
    }
    /// Guest RAM, for the instructions the VMM emulates (see
    /// [`crate::compat::emulate`]).
    fn guest_memory(&self) -> Option<&vm_memory::GuestMemoryMmap> {
        None
    }
}

struct Ctx<'a> {
    handle: &'a VcpuHandle,
    env: &'a dyn VcpuEnv,
    tsc: &'a TscClock,
    /// Trapped MSR writes that must reach KVM before the next entry.
    msr_writes: Vec<(u32, u64)>,
}

/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// Maps this vCPU's guest TSC to the VM's nanosecond clock.
#[derive(Debug, Clone, Copy)]
pub struct TscClock {
    /// Guest TSC frequency in kHz.
    pub khz: u64,
    /// Guest TSC at `at_ns`.
    pub guest_tsc: u64,
    /// The VM clock (ns) when `guest_tsc` was read.
    pub at_ns: u64,
}

impl TscClock {
    /// The VM-clock time at which the guest TSC reaches `tsc`.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let khz = self.khz.max(1) as i128;
        let delta = tsc as i128 - self.guest_tsc as i128;
        let ns = self.at_ns as i128 + delta * 1_000_000 / khz;
        ns.clamp(0, u64::MAX as i128) as u64
    }
}

impl ExitHandler for Ctx<'_> {
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        match index {
            MSR_TSC_DEADLINE => Some(if self.handle.lapic().tsc_deadline_ns().is_some() {
                self.handle.tsc_deadline.load(Ordering::Relaxed)
            } else {
                0
            }),
            _ => None,
        }
    }
    fn wrmsr(&mut self, index: u32, value: u64) -> bool {
        match index {
            MSR_TSC_DEADLINE => {
                self.handle.tsc_deadline.store(value, Ordering::Relaxed);
                let ns = (value != 0).then(|| self.tsc.ns_at(value));
                self.handle.lapic().set_tsc_deadline_ns(ns);
                self.env.timer_changed();
                true
            }
            i if UserMode::traps(i) => match self.env.user_mode() {
                Some(um) => {
                    um.msr_written(self.handle.index, i, value);
                    self.msr_writes.push((i, value));
                    true
                }
                None => false,
            },
            _ => false,
        }
    }
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.env.pio_read(self.handle.index, port, data)
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) -> PortEvent {
        self.env.pio_write(self.handle.index, port, data)
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if crate::layout::LAPIC_RANGE.contains(&addr) {
            let off = (addr - LAPIC_BASE) as u32;
            let v = self.handle.lapic().read(off & !3, self.env.now_ns());
            let bytes = v.to_le_bytes();
            let shift = (off & 3) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(shift + i).copied().unwrap_or(0);
            }
        } else {
            self.env.mmio_read(self.handle.index, addr, data)
        }
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if crate::layout::LAPIC_RANGE.contains(&addr) {
            let off = (addr - LAPIC_BASE) as u32;
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            let value = u32::from_le_bytes(b);
            let effect = self
                .handle
                .lapic()
                .write(off & !3, value, self.env.now_ns());
            match effect {
                LapicWriteEffect::None => {}
                LapicWriteEffect::Ipi(msg) => {
                    self.handle.stats.ipis_sent.fetch_add(1, Ordering::Relaxed);
                    self.env.send_ipi(self.handle.index, &msg)
                }
                LapicWriteEffect::Eoi {
                    vector,
                    level_triggered,
                } => {
                    if level_triggered {
                        self.env.eoi(vector)
                    }
                }
                LapicWriteEffect::LogicalIdChanged { ldr, dfr } => {
                    self.env.set_logical(self.handle.index, ldr, dfr)
                }
            }
            if matches!(off & !3, 0x320 | 0x380 | 0x3e0) {
                self.env.timer_changed();
            }
        } else {
            self.env.mmio_write(self.handle.index, addr, data)
        }
    }
}

/// How a vCPU thread starts.
pub enum Start {
    /// The boot processor, at the kernel entry.
    Boot(BootInfo),
    /// An application processor: waits for INIT/SIPI.
    Ap,
}

/// Why a vCPU thread ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The VM is stopping.
    Stopped,
    /// The guest asked for a reset.
    Reset,
    /// The guest asked for power off.
    PowerOff,
}

fn kvm_err(vcpu: usize, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { vcpu, what, source }
}

/// The body of a vCPU thread.
pub fn run(
    mut vcpu: VcpuFd,
    handle: &VcpuHandle,
    env: &dyn VcpuEnv,
    start: Start,
) -> Result<VcpuEnd, VcpuError> {
    handle.register(&mut vcpu);
    handle.stats.set_thread();
    let r = run_inner(&mut vcpu, handle, env, start);
    handle.unregister();
    handle.stats.set_state(VcpuState::Stopped);
    r
}

fn run_inner(
    vcpu: &mut VcpuFd,
    handle: &VcpuHandle,
    env: &dyn VcpuEnv,
    start: Start,
) -> Result<VcpuEnd, VcpuError> {
    let idx = handle.index;
    let reset_sregs = vcpu.get_sregs().map_err(kvm_err(idx, "KVM_GET_SREGS"))?;
    let tsc = tsc_clock(vcpu, env).map_err(kvm_err(idx, "reading the guest TSC"))?;
    let mut state = match start {
        Start::Boot(boot) => {
            let s = regs::boot_sregs(reset_sregs);
            vcpu.set_sregs(&s).map_err(kvm_err(idx, "KVM_SET_SREGS"))?;
            vcpu.set_regs(&regs::boot_regs(boot.entry, boot.zero_page))
                .map_err(kvm_err(idx, "KVM_SET_REGS"))?;
            vcpu.set_fpu(&regs::boot_fpu())
                .map_err(kvm_err(idx, "KVM_SET_FPU"))?;
            RunState::Running
        }
        Start::Ap => RunState::WaitForInit,
    };
    // Where this vCPU is, logged once when the VM asks (on a timeout).
    let mut dumped = false;
    loop {
        if env.stopping() {
            return Ok(VcpuEnd::Stopped);
        }
        match state {
            RunState::WaitForInit | RunState::WaitForSipi => {
                handle.stats.set_state(VcpuState::Waiting);
                let mut l = handle.lapic();
                loop {
                    if env.stopping() {
                        return Ok(VcpuEnd::Stopped);
                    }
                    if l.take_init() {
                        state = RunState::WaitForSipi;
                    }
                    if state == RunState::WaitForSipi {
                        if let Some(v) = l.take_sipi() {
                            drop(l);
                            vcpu.set_sregs(&regs::sipi_sregs(reset_sregs, v))
                                .map_err(kvm_err(idx, "KVM_SET_SREGS"))?;
                            vcpu.set_regs(&regs::sipi_regs())
                                .map_err(kvm_err(idx, "KVM_SET_REGS"))?;
                            vcpu.set_fpu(&regs::boot_fpu())
                                .map_err(kvm_err(idx, "KVM_SET_FPU"))?;
                            tracing::debug!(vcpu = idx, vector = v, "started by SIPI");
                            state = RunState::Running;
                            break;
                        }
                    }
                    l = handle.cond.wait(l).unwrap_or_else(|p| p.into_inner());
                }
            }
            RunState::Running => {
                if let Some(next) = enter_guest(vcpu, handle, env, &tsc)? {
                    match next {
                        Next::Continue => {}
                        Next::Interrupted => {
                            if env.dump_requested() && !std::mem::replace(&mut dumped, true) {
                                if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
                                    tracing::warn!(
                                        vcpu = idx,
                                        "rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rcx {:#x} cr0 {:#x} cs {:#x}",
                                        r.rip, r.rsp, r.rflags, r.rax, r.rcx, s.cr0, s.cs.selector
                                    );
                                }
                            }
                        }
                        Next::Halt => halt(vcpu, handle, env),
                        Next::Reset => return Ok(VcpuEnd::Reset),
                        Next::PowerOff => return Ok(VcpuEnd::PowerOff),
                        Next::TripleFault => {
                            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                            return Err(VcpuError::TripleFault { vcpu: idx, rip });
                        }
                        Next::InternalError => internal_error(vcpu, handle, env)?,
                        Next::Unhandled(exit) => {
                            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                            return Err(VcpuError::Unhandled {
                                vcpu: idx,
                                exit,
                                rip,
                            });
                        }
                    }
                } else {
                    state = RunState::WaitForSipi;
                }
            }
        }
    }
}

/// Injects what is pending and runs the guest once. Returns None when an INIT arrived
/// (the vCPU goes back to waiting for SIPI).
fn enter_guest(
    vcpu: &mut VcpuFd,
    handle: &VcpuHandle,
    env: &dyn VcpuEnv,
    tsc: &TscClock,
) -> Result<Option<Next>, VcpuError> {
    let idx = handle.index;
    handle.in_guest.store(true, Ordering::SeqCst);
    {
        let mut l = handle.lapic();
        if l.take_init() {
            handle.in_guest.store(false, Ordering::SeqCst);
            return Ok(None);
        }
        // A second SIPI after start-up is ignored, as on hardware.
        let _ = l.take_sipi();
        if l.take_nmi() {
            vcpu.nmi().map_err(kvm_err(idx, "KVM_NMI"))?;
        }
        let run = vcpu.get_kvm_run();
        match l.pending_vector() {
            Some(v) if run.if_flag != 0 && run.ready_for_interrupt_injection != 0 => {
                let irq = kvm_interrupt { irq: u32::from(v) };
                // SAFETY: KVM_INTERRUPT takes a pointer to a kvm_interrupt that lives
                // for the call; the fd is a vCPU fd.
                let ret = unsafe { ioctl_with_ref(&*vcpu, KVM_INTERRUPT(), &irq) };
                if ret < 0 {
                    return Err(VcpuError::Kvm {
                        vcpu: idx,
                        what: "KVM_INTERRUPT",
                        source: kvm_ioctls::Error::last(),
                    });
                }
                l.ack(v);
                handle.stats.injected.fetch_add(1, Ordering::Relaxed);
                vcpu.get_kvm_run().request_interrupt_window = 0;
            }
            Some(_) => run.request_interrupt_window = 1,
            None => run.request_interrupt_window = 0,
        }
    }
    let mut ctx = Ctx {
        handle,
        env,
        tsc,
        msr_writes: Vec::new(),
    };
    handle.stats.set_state(VcpuState::Guest);
    let ran = vcpu.run();
    handle.stats.set_state(VcpuState::Vmm);
    let next = match ran {
        Ok(exit) => dispatch(exit, &mut ctx, &handle.stats),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            handle.stats.exit(ExitKind::Intr);
            Next::Interrupted
        }
        Err(e) => {
            handle.in_guest.store(false, Ordering::SeqCst);
            return Err(VcpuError::Kvm {
                vcpu: idx,
                what: "KVM_RUN",
                source: e,
            });
        }
    };
    handle.in_guest.store(false, Ordering::SeqCst);
    vcpu.set_kvm_immediate_exit(0);
    if !ctx.msr_writes.is_empty() {
        apply_msr_writes(vcpu, idx, &ctx.msr_writes, env)?;
    }
    Ok(Some(next))
}

/// Gives KVM the MSR values the guest wrote while the filter trapped them; after an
/// LSTAR write (the guest's `syscall_init`, its IDT in place) places the user-mode
/// repair's breakpoint.
fn apply_msr_writes(
    vcpu: &mut VcpuFd,
    idx: usize,
    writes: &[(u32, u64)],
    env: &dyn VcpuEnv,
) -> Result<(), VcpuError> {
    let entries: Vec<kvm_bindings::kvm_msr_entry> = writes
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let err = kvm_err(idx, "KVM_SET_MSRS (syscall MSRs)");
    let invalid = || err(kvm_ioctls::Error::new(libc::EINVAL));
    let msrs = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| invalid())?;
    let n = vcpu.set_msrs(&msrs).map_err(&err)?;
    if n != entries.len() {
        return Err(invalid());
    }
    if let Some(um) = env.user_mode() {
        if writes.iter().any(|(i, _)| *i == MSR_LSTAR) && um.hook().is_none() {
            let s = vcpu.get_sregs().map_err(kvm_err(idx, "KVM_GET_SREGS"))?;
            let pt = crate::paging::PageTables::from_regs(s.cr3, s.cr4);
            if let Err(e) = um.install(pt, s.idt.base, s.idt.limit) {
                um.warn_once(&e);
            }
        }
    }
    Ok(())
}

/// Reads the guest TSC frequency and current value to map TSC deadlines to VM time.
fn tsc_clock(vcpu: &VcpuFd, env: &dyn VcpuEnv) -> Result<TscClock, kvm_ioctls::Error> {
    let khz = u64::from(vcpu.get_tsc_khz()?);
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x10, // IA32_TIME_STAMP_COUNTER
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    let at_ns = env.now_ns();
    vcpu.get_msrs(&mut msrs)?;
    let guest_tsc = msrs.as_slice()[0].data;
    Ok(TscClock {
        khz,
        guest_tsc,
        at_ns,
    })
}

/// HLT: wait until something can wake the vCPU.
fn halt(vcpu: &mut VcpuFd, handle: &VcpuHandle, env: &dyn VcpuEnv) {
    handle.stats.set_state(VcpuState::Halted);
    halt_inner(vcpu, handle, env);
    handle.stats.set_state(VcpuState::Vmm);
}

fn halt_inner(vcpu: &mut VcpuFd, handle: &VcpuHandle, env: &dyn VcpuEnv) {
    let if_flag = vcpu.get_kvm_run().if_flag != 0;
    let mut dead = false;
    let mut l = handle.lapic();
    loop {
        // With interrupts disabled only NMI, INIT or SIPI end a HLT.
        let wake = l.has_pending_event() && (if_flag || l.pending_vector().is_none());
        if env.stopping() || wake {
            break;
        }
        if !if_flag && !dead {
            dead = true;
            drop(l);
            env.dead_halt(handle.index, true);
            l = handle.lapic();
            continue;
        }
        l = handle.cond.wait(l).unwrap_or_else(|p| p.into_inner());
    }
    drop(l);
    if dead {
        env.dead_halt(handle.index, false);
    }
}

/// A `KVM_EXIT_INTERNAL_ERROR`: an emulation failure is looked up in the compat
/// table ([`crate::compat::emulate`]) and handled as it says; anything else ends the
/// vCPU.
fn internal_error(
    vcpu: &mut VcpuFd,
    handle: &VcpuHandle,
    env: &dyn VcpuEnv,
) -> Result<(), VcpuError> {
    let idx = handle.index;
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
    // the kernel filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data = internal.data[..n].to_vec();
    let mut regs = vcpu.get_regs().map_err(kvm_err(idx, "KVM_GET_REGS"))?;
    if internal.suberror != INTERNAL_ERROR_EMULATION {
        return Err(VcpuError::Internal {
            vcpu: idx,
            suberror: internal.suberror,
            data,
            rip: regs.rip,
        });
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(idx, "KVM_GET_SREGS"))?;
    let failed = emulate::Failed::from_exit(&data, regs.rip, &sregs)
        .map_err(|what| VcpuError::Emulation { vcpu: idx, what })?;
    if failed.is_breakpoint() {
        if let Some(um) = env.user_mode() {
            match um.on_breakpoint(idx, &mut regs, &mut sregs) {
                Breakpoint::NotOurs => {}
                Breakpoint::Syscall => {
                    handle.stats.exit(ExitKind::Syscall);
                    vcpu.set_sregs(&sregs)
                        .map_err(kvm_err(idx, "KVM_SET_SREGS"))?;
                    return vcpu.set_regs(&regs).map_err(kvm_err(idx, "KVM_SET_REGS"));
                }
                Breakpoint::PassThrough | Breakpoint::Refused => {
                    handle.stats.exit(ExitKind::PageFault);
                    return vcpu.set_regs(&regs).map_err(kvm_err(idx, "KVM_SET_REGS"));
                }
            }
        }
    }
    // MXCSR only for the instructions that use it (a KVM_GET_FPU each).
    let mut fpu = if failed.needs_mxcsr() {
        Some(vcpu.get_fpu().map_err(kvm_err(idx, "KVM_GET_FPU"))?)
    } else {
        None
    };
    // XCR0 and the extended state only for the XSAVE family.
    let mut xs = if failed.needs_xstate() {
        get_xstate(vcpu, idx)?
    } else {
        None
    };
    let outcome = failed.resolve(&mut emulate::Cpu {
        regs: &mut regs,
        sregs: &sregs,
        mem: env.guest_memory(),
        mxcsr: fpu.as_mut().map(|f| &mut f.mxcsr),
        xstate: xs.as_mut(),
    });
    if let (Outcome::Done, Some(f)) = (&outcome, &fpu) {
        vcpu.set_fpu(f).map_err(kvm_err(idx, "KVM_SET_FPU"))?;
    }
    if let (Outcome::Done, Some(x)) = (&outcome, &xs) {
        set_xstate(vcpu, idx, x)?;
    }
    let inject = match outcome {
        Outcome::Done => None,
        Outcome::Inject(e) => Some(e),
        Outcome::Unhandled(what) => return Err(VcpuError::Emulation { vcpu: idx, what }),
    };
    handle.stats.exit(match failed.entry().map(|e| e.action) {
        Some(Action::Emulate(_)) => ExitKind::Emulated,
        _ => ExitKind::Int3,
    });
    vcpu.set_regs(&regs).map_err(kvm_err(idx, "KVM_SET_REGS"))?;
    if let Some(e) = inject {
        if let Some(cr2) = e.cr2 {
            sregs.cr2 = cr2;
            vcpu.set_sregs(&sregs)
                .map_err(kvm_err(idx, "KVM_SET_SREGS"))?;
        }
        let mut ev = vcpu
            .get_vcpu_events()
            .map_err(kvm_err(idx, "KVM_GET_VCPU_EVENTS"))?;
        ev.exception.injected = 1;
        ev.exception.nr = e.vector;
        ev.exception.has_error_code = u8::from(e.error_code.is_some());
        ev.exception.error_code = e.error_code.unwrap_or(0);
        vcpu.set_vcpu_events(&ev)
            .map_err(kvm_err(idx, "KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}

/// XCR0 and the extended state of the vCPU (KVM_GET_XCRS, KVM_GET_XSAVE) for the
/// XSAVE family's emulation; None where the host has no XSAVE layout the VMM handles
/// (the instruction is then refused with a message).
fn get_xstate(vcpu: &VcpuFd, idx: usize) -> Result<Option<xstate::XState>, VcpuError> {
    let Some(layout) = xstate::Layout::host() else {
        return Ok(None);
    };
    let xcrs = vcpu.get_xcrs().map_err(kvm_err(idx, "KVM_GET_XCRS"))?;
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    let xcr0 = xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value);
    // The XCR0 bits KVM accepts for the vCPU (leaf 0xD of its CPUID, the same for
    // every vCPU of the process); without that leaf, what the CPU supports (KVM then
    // refuses a value it does not take, and the VM stops with that error).
    static ALLOWED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let allowed = *ALLOWED.get_or_init(|| {
        vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .ok()
            .and_then(|c| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == 0xd && e.index == 0)
                    .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
            })
            .unwrap_or(layout.supported)
    });
    let xsave = vcpu.get_xsave().map_err(kvm_err(idx, "KVM_GET_XSAVE"))?;
    let mut area = Box::new([0u8; xstate::AREA]);
    for (chunk, word) in area.chunks_exact_mut(4).zip(xsave.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Ok(Some(xstate::XState {
        xcr0,
        area,
        layout,
        allowed,
        area_changed: false,
        xcr0_changed: false,
    }))
}

/// Writes back what an emulated XSAVE-family instruction changed: XCR0 first (the
/// extended state is checked against it), then the state.
fn set_xstate(vcpu: &VcpuFd, idx: usize, x: &xstate::XState) -> Result<(), VcpuError> {
    if x.xcr0_changed {
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = x.xcr0;
        vcpu.set_xcrs(&xcrs).map_err(kvm_err(idx, "KVM_SET_XCRS"))?;
    }
    if x.area_changed {
        let mut xsave = kvm_bindings::kvm_xsave::default();
        for (word, chunk) in xsave.region.iter_mut().zip(x.area.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // SAFETY: KVM_SET_XSAVE reads the vCPU's uABI size of extended state, which is
        // the 4096-byte region of `kvm_xsave` here: xstate::Layout::host() accepted the
        // host layout only because every component it supports fits in that region (no
        // dynamically enabled AMX state, whose uABI size would be larger).
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err(idx, "KVM_SET_XSAVE"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        out: Vec<(u16, Vec<u8>)>,
        mmio: Vec<(u64, Vec<u8>)>,
    }
    impl ExitHandler for Fake {
        fn pio_read(&mut self, port: u16, data: &mut [u8]) {
            data.fill(port as u8);
        }
        fn pio_write(&mut self, port: u16, data: &[u8]) -> PortEvent {
            self.out.push((port, data.to_vec()));
            if port == 0x64 && data == [0xfe] {
                PortEvent::Reset
            } else {
                PortEvent::None
            }
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0xab);
        }
        fn mmio_write(&mut self, addr: u64, data: &[u8]) {
            self.mmio.push((addr, data.to_vec()));
        }
        fn rdmsr(&mut self, index: u32) -> Option<u64> {
            (index == MSR_TSC_DEADLINE).then_some(7)
        }
        fn wrmsr(&mut self, index: u32, _value: u64) -> bool {
            index == MSR_TSC_DEADLINE
        }
    }

    #[test]
    fn tsc_deadline_maps_to_vm_time() {
        let c = TscClock {
            khz: 2_000_000, // 2 GHz
            guest_tsc: 1_000_000,
            at_ns: 500,
        };
        assert_eq!(c.ns_at(1_000_000), 500);
        assert_eq!(c.ns_at(3_000_000), 500 + 1_000_000);
        assert_eq!(c.ns_at(0), 0, "deadlines in the past are due now");
    }

    #[test]
    fn dispatches_port_and_mmio_exits() {
        let mut f = Fake::default();
        let s = VcpuStats::default();
        let mut buf = [0u8; 1];
        assert_eq!(
            dispatch(VcpuExit::IoIn(0x3f8, &mut buf), &mut f, &s),
            Next::Continue
        );
        assert_eq!(buf, [0xf8]);
        assert_eq!(
            dispatch(VcpuExit::IoOut(0x3f8, b"x"), &mut f, &s),
            Next::Continue
        );
        assert_eq!(f.out, vec![(0x3f8, b"x".to_vec())]);
        assert_eq!(
            dispatch(VcpuExit::IoOut(0x64, &[0xfe]), &mut f, &s),
            Next::Reset
        );
        let mut m = [0u8; 4];
        assert_eq!(
            dispatch(VcpuExit::MmioRead(0xfec0_0000, &mut m), &mut f, &s),
            Next::Continue
        );
        assert_eq!(m, [0xab; 4]);
        assert_eq!(
            dispatch(VcpuExit::MmioWrite(0xfec0_0010, &[1, 0, 0, 0]), &mut f, &s),
            Next::Continue
        );
        assert_eq!(f.mmio.len(), 1);
        assert_eq!(s.exits(ExitKind::IoIn), 1);
        assert_eq!(s.exits(ExitKind::IoOut), 2);
        assert_eq!(s.exits(ExitKind::MmioRead), 1);
    }

    #[test]
    fn dispatches_control_exits() {
        let mut f = Fake::default();
        let s = VcpuStats::default();
        assert_eq!(dispatch(VcpuExit::Hlt, &mut f, &s), Next::Halt);
        assert_eq!(
            dispatch(VcpuExit::IrqWindowOpen, &mut f, &s),
            Next::Continue
        );
        assert_eq!(dispatch(VcpuExit::Shutdown, &mut f, &s), Next::TripleFault);
        assert_eq!(
            dispatch(VcpuExit::InternalError, &mut f, &s),
            Next::InternalError
        );
        assert_eq!(dispatch(VcpuExit::Intr, &mut f, &s), Next::Interrupted);
        assert_eq!(
            dispatch(
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &mut f,
                &s
            ),
            Next::PowerOff
        );
        assert!(matches!(
            dispatch(VcpuExit::Unknown, &mut f, &s),
            Next::Unhandled(_)
        ));
        assert!(matches!(
            dispatch(VcpuExit::FailEntry(7, 0), &mut f, &s),
            Next::Unhandled(_)
        ));
    }
}
