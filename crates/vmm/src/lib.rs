//! The dvmm virtual machine monitor core.
//!
//! One [`vm::Vm`] is the part of the guest machine that runs in this process: its vCPUs
//! under KVM, its view of guest memory, and (on the I/O node) the devices. The crate is
//! laid out like the machine:
//!
//! * [`memory`]: guest RAM layout and the host mapping behind it;
//! * [`boot`]: kernel loading (ELF vmlinux or bzImage, via linux-loader), boot params,
//!   e820 map, command line, MP table, and the 64-bit entry state of the boot vCPU;
//! * [`vcpu`]: the vCPU thread, its explicit run state, and exit dispatch;
//! * [`irq`]: the interrupt routing decision ("which vCPU, here or elsewhere") behind one
//!   interface, on top of the user-space LAPIC/IOAPIC models of the `irqchip` crate;
//! * [`bus`]: where a node's port and MMIO accesses go: the devices and IOAPIC on the
//!   I/O node, forwarded to it elsewhere; [`layout`]: the address map (APIC pages, ports);
//! * [`devices`]: the 16550 serial console (vm-superio) and the few legacy ports a PC has;
//! * [`term`]: the user's terminal: raw mode, the console input pump (escape Ctrl-A x),
//!   whole-line messages on stderr;
//! * [`compat`]: what this host's KVM needs that a hardware-virtualized host does not
//!   (with [`compat::usermode`], the system-call repair, and [`paging`], the guest
//!   page-table walk it reads the guest with).
#![deny(missing_docs)]

pub mod boot;
pub mod bus;
pub mod compat;
pub mod devices;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod paging;
pub mod stats;
pub mod symbols;
pub mod term;
mod timer;
pub mod vcpu;
pub mod vm;

/// The guard of a lock, even if a thread panicked while holding it: the state behind
/// vmm's locks (device registers, outcomes, generation counters) stays consistent at
/// every step, and dropping the guest's interrupts or accesses would be worse.
pub(crate) fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub use vm::{
    run, ClusterLink, GuestEnd, IoAccess, Placement, RunReport, Vm, VmConfig, VmError, VmHandle,
};
