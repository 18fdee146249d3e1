//! One VM in this process: creation, the vCPU threads, and how a run ends. Device
//! accesses go through the node's I/O bus ([`crate::bus`]); the LAPIC timers are fired
//! by [`crate::timer`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use irqchip::{Interrupt, InterruptMessage, IoApic};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::acpi::{AcpiSpec, MmioDevice, NumaNode};
use crate::boot::bzimage::{UnpackBzImage, Unpacker};
use crate::boot::{self, mptable, BootSpec};
use crate::bus::{IoBus, LocalBus};
use crate::compat::shadow::ShadowSync;
use crate::compat::usermode::{UserMode, MSR_STAR};
use crate::compat::HostKind;
use crate::devices::virtio::net::{MmioNet, Net, GUEST_MAC};
use crate::devices::virtio::{Block, DiskError, DiskImage, MmioBlock, Tap, TapError};
use crate::devices::{ConsoleOut, ConsoleWatch, IrqLine, PortEvent};
use crate::irq::{IoApicLink, Router, VcpuTarget};
use crate::layout::{
    POWER_BUTTON_GSI, VIRTIO_BLK_BASE, VIRTIO_BLK_GSI, VIRTIO_MMIO_SIZE, VIRTIO_NET_BASE,
    VIRTIO_NET_GSI,
};
use crate::memory::{self, MemoryError};
use crate::timer::LapicTimer;
use crate::vcpu::{self, Start, VcpuEnd, VcpuEnv, VcpuError, VcpuHandle};

/// Options the VMM always puts on the guest command line.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 no_timer_check tsc=reliable";

/// How to run a VM.
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Appended to the VMM's default command line.
    pub cmdline_extra: String,
    /// Where the console goes.
    pub console: ConsoleOut,
    /// The host kind (normally [`HostKind::detect`]).
    pub host: HostKind,
    /// Who unpacks a bzImage kernel (with `host`: [`Unpacker::choose`]).
    pub unpack_bzimage: UnpackBzImage,
    /// Stop the guest with an error if it has not ended after this long.
    pub timeout: Option<Duration>,
    /// Where this process sits in a multi-node cluster (None: a single-node VM).
    pub placement: Option<Placement>,
    /// Guest RAM prepared by the caller (e.g. mapped over the DSM region); None: the VM
    /// maps private anonymous memory itself.
    pub guest_memory: Option<GuestMemoryMmap>,
    /// Give the guest ACPI tables (power-off through ACPI); else only the MP table.
    pub acpi: bool,
    /// The guest's NUMA nodes (SRAT/SLIT, with `acpi`); empty or one node: none.
    pub numa: Vec<NumaNode>,
    /// A virtio block device on the I/O node (needs `acpi`: the guest finds it in the
    /// DSDT).
    pub disk: Option<DiskSpec>,
    /// A virtio network device on the I/O node, on a TAP interface the VMM creates (needs
    /// `acpi`, like the disk).
    pub net: Option<NetSpec>,
}

pub use crate::devices::virtio::NetSpec;

/// The image file of the virtio disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Path of the image (a raw disk image, e.g. an ext4 file system).
    pub path: PathBuf,
    /// The guest may not write to it (the device says so, and refuses writes).
    pub read_only: bool,
}

/// How long the VMM waits, after the guest kernel printed its power-off line on a
/// machine with ACPI, for the ACPI power-off before it ends the run anyway (a kernel
/// without ACPI, or booted with `acpi=off`, halts instead).
pub const POWER_OFF_FALLBACK: Duration = Duration::from_secs(2);

/// What a node needs to reach the rest of the cluster. Implemented by the node layer
/// over the transport; the VM calls it from vCPU threads.
pub trait ClusterLink: Send + Sync {
    /// Delivers an interrupt to vCPU `vcpu`, which runs on node `node`.
    fn deliver(&self, node: u16, vcpu: usize, irq: &Interrupt);
    /// A local vCPU changed its logical destination registers: tell every other node.
    fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32);
    /// A level-triggered EOI on a node without the IOAPIC: forward it to the I/O node.
    fn eoi(&self, vector: u8);
    /// A port or MMIO access on a node without the devices: forward it to the I/O node
    /// and wait for the answer (reads fill `data`).
    fn io(&self, vcpu: usize, access: IoAccess, data: &mut [u8]) -> PortEvent;
    /// The run ended here (guest end or error): tell the other nodes.
    fn ended(&self, outcome: &Result<GuestEnd, String>);
}

/// A forwarded device access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum IoAccess {
    /// Port read.
    PioRead(u16),
    /// Port write.
    PioWrite(u16),
    /// MMIO read.
    MmioRead(u64),
    /// MMIO write.
    MmioWrite(u64),
}

/// This process's place in the cluster.
pub struct Placement {
    /// This node's id; node 0 is the boot and I/O node.
    pub node: u16,
    /// The node of every vCPU (index = vCPU = APIC id).
    pub vcpu_nodes: Vec<u16>,
    /// How to reach the other nodes.
    pub link: Arc<dyn ClusterLink>,
    /// Guest TSC = host TSC - base (so every node's guest TSC agrees); None: leave it.
    pub tsc_base: Option<u64>,
    /// The guest's TSC frequency as the boot node measured it (for the command line).
    pub tsc_khz: Option<u32>,
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum GuestEnd {
    /// Powered off without ACPI: the kernel's power-off line on the console (ACPI-less
    /// Linux then halts every CPU with interrupts disabled), or every vCPU halted for
    /// good (single node).
    PowerOff,
    /// Asked for a reboot (i8042 reset), which ends the run.
    Reboot,
    /// Powered off through ACPI (S5 in the sleep control register). (Last: the
    /// variants' indices are their codes between nodes.)
    AcpiPowerOff,
}

/// Errors of a VM run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The number of vCPUs is out of range.
    #[error("{0} vCPUs is not possible: use 1 to {max}", max = mptable::MAX_CPUS)]
    BadVcpus(usize),
    /// The kernel file is missing.
    #[error("kernel {} not found (build one with `make guest`, or pass --kernel)", .0.display())]
    KernelNotFound(PathBuf),
    /// This host's KVM allows fewer vCPUs than this node must run.
    #[error("{vcpus} vCPUs is not possible: this host's KVM allows at most {max}")]
    HostVcpus {
        /// vCPUs this node runs.
        vcpus: usize,
        /// KVM's limit.
        max: usize,
    },
    /// A node without the IOAPIC has no link to reach it.
    #[error("no IOAPIC reachable")]
    NoIoApic,
    /// A node without the devices has no link to reach them.
    #[error("no I/O node reachable")]
    NoIoNode,
    /// The boot node runs no vCPU (and was given no TSC frequency).
    #[error("the boot node has no vCPU")]
    NoBootVcpu,
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot use KVM (/dev/kvm): {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl that sets up the VM failed.
    #[error("cannot use KVM (/dev/kvm): {what}: {source}")]
    Kvm {
        /// Which operation (the ioctl's name).
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU cannot be created.
    #[error("cannot use KVM (/dev/kvm): KVM_CREATE_VCPU {vcpu}: {source}")]
    CreateVcpu {
        /// vCPU index.
        vcpu: usize,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR list that sets a vCPU's TSC cannot be built.
    #[error("cannot use KVM (/dev/kvm): TSC MSR: {0}")]
    TscMsr(#[source] vmm_sys_util::fam::Error),
    /// The signal handler that kicks vCPUs out of KVM_RUN cannot be installed.
    #[error("cannot use KVM (/dev/kvm): signal handler: {0}")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// Dropping the shadow page tables of a software backend failed.
    #[error(
        "cannot use KVM (/dev/kvm): dropping shadow page tables (memory slot {slot}): {source}"
    )]
    ShadowSync {
        /// The memory slot used to drop them.
        slot: u32,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The guest kernel panicked.
    #[error("the guest kernel panicked (see the console output above)")]
    GuestPanic,
    /// Another node ended the run with an error, or vanished.
    #[error("{0}")]
    Cluster(String),
    /// The guest did not end in time.
    #[error("the guest did not end within {0:?} (vCPU counters: {1})")]
    Timeout(Duration, String),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The user stopped the VM from the console (Ctrl-A x).
    #[error("stopped from the console (Ctrl-A x)")]
    ConsoleQuit,
    /// The disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A stop was requested and the guest did not power off in time.
    #[error("the guest did not power off within {0} s of the power button: stopped")]
    StopTimeout(u64),
    /// A stop was requested of a guest without ACPI (no power button to press).
    #[error("stopped on request without the guest's power-off (it has no ACPI power button)")]
    StoppedWithoutAcpi,
    /// A disk was asked for on a machine without ACPI (the guest finds it in the DSDT).
    #[error("a disk needs ACPI (the guest finds the virtio device in the ACPI tables): drop --no-acpi / acpi = false")]
    DiskWithoutAcpi,
    /// A network device was asked for on a machine without ACPI.
    #[error("a network device needs ACPI (the guest finds the virtio device in the ACPI tables): drop --no-acpi / acpi = false")]
    NetWithoutAcpi,
    /// The network's addresses or TAP name are not acceptable.
    #[error("invalid network: {0}")]
    NetSpec(String),
    /// The TAP interface cannot be created or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The result of a run, with the counters.
#[derive(Debug)]
pub struct RunReport {
    /// How the guest ended.
    pub end: GuestEnd,
    /// One line per vCPU with its exit counters.
    pub vcpu_stats: Vec<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    outcome: Mutex<Option<Result<GuestEnd, VmError>>>,
    outcome_cv: Condvar,
    dead_halted: AtomicUsize,
    handles: Vec<Arc<VcpuHandle>>,
    router: Arc<Router>,
    bus: IoBus,
    link: Option<Arc<dyn ClusterLink>>,
    local: Vec<bool>,
    timer: LapicTimer,
    console: ConsoleWatch,
    dump: AtomicBool,
    user_mode: Option<UserMode>,
    shadow: Option<Arc<ShadowSync>>,
    /// Guest RAM, for the instructions the VMM emulates.
    mem: GuestMemoryMmap,
    /// When the console fallback ends the run if no ACPI power-off came
    /// ([`POWER_OFF_FALLBACK`] after the kernel's power-off line).
    power_off_fallback: Mutex<Option<Instant>>,
    /// The guest has ACPI tables (and so a power button).
    acpi: bool,
    /// The kernel's symbols, to name hot pages (when its System.map is at hand).
    symbols: Option<crate::symbols::KernelSymbols>,
    /// A power-off was asked for from outside ([`VmHandle::request_power_off`]).
    power_off_asked: AtomicBool,
}

/// Records the outcome of a run unless one is already there: the first definitive
/// outcome wins. `make` runs only when the slot is empty. Returns whether it was set.
fn settle<T>(slot: &mut Option<T>, make: impl FnOnce() -> T) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(make());
    true
}

impl Shared {
    fn finish(&self, r: Result<GuestEnd, VmError>) {
        self.finish_inner(r, true)
    }

    /// What a port write's event means for the run, on the I/O node: an ACPI power-off
    /// ends it (the vCPU then stops as for any power-off); the power-off line of a
    /// guest that has ACPI arms the console fallback and the vCPU goes on.
    fn port_event(&self, ev: PortEvent) -> PortEvent {
        match ev {
            PortEvent::AcpiPowerOff => {
                self.finish(Ok(GuestEnd::AcpiPowerOff));
                PortEvent::PowerOff
            }
            PortEvent::PowerOffAnnounced => {
                let mut f = crate::lock(&self.power_off_fallback);
                if f.is_none() {
                    *f = Some(Instant::now() + POWER_OFF_FALLBACK);
                    drop(f);
                    self.outcome_cv.notify_all();
                }
                PortEvent::None
            }
            other => other,
        }
    }

    fn finish_inner(&self, r: Result<GuestEnd, VmError>, tell_others: bool) {
        {
            let mut o = crate::lock(&self.outcome);
            let first = settle(&mut o, || r);
            if first && tell_others {
                if let (Some(link), Some(r)) = (&self.link, o.as_ref()) {
                    let msg = match r {
                        Ok(e) => Ok(*e),
                        Err(e) => Err(e.to_string()),
                    };
                    link.ended(&msg);
                }
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.outcome_cv.notify_all();
        self.timer.wake();
        for h in &self.handles {
            h.wake();
        }
    }
}

impl VcpuEnv for Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]) {
        tracing::trace!(vcpu, port, "pio_read");
        self.bus.pio_read(vcpu, port, data)
    }
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> PortEvent {
        let ev = self.bus.pio_write(vcpu, port, data);
        if self.bus.is_local() {
            self.port_event(ev)
        } else {
            ev
        }
    }
    fn mmio_read(&self, vcpu: usize, addr: u64, data: &mut [u8]) {
        self.bus.mmio_read(vcpu, addr, data)
    }
    fn mmio_write(&self, vcpu: usize, addr: u64, data: &[u8]) {
        self.bus.mmio_write(vcpu, addr, data)
    }
    fn send_ipi(&self, _vcpu: usize, msg: &InterruptMessage) {
        self.router.send(msg)
    }
    fn eoi(&self, vector: u8) {
        self.router.eoi(vector)
    }
    fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32) {
        self.router.set_logical(vcpu, ldr, dfr);
        if let Some(link) = &self.link {
            link.set_logical(vcpu, ldr, dfr);
        }
    }
    fn timer_changed(&self) {
        self.timer.changed();
    }
    fn dump_requested(&self) -> bool {
        self.dump.load(Ordering::SeqCst)
    }
    fn user_mode(&self) -> Option<&UserMode> {
        self.user_mode.as_ref()
    }
    fn guest_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.mem)
    }
    fn dead_halt(&self, _vcpu: usize, halted: bool) {
        if halted {
            let n = self.dead_halted.fetch_add(1, Ordering::SeqCst) + 1;
            // Only a single-node VM sees every vCPU; a cluster ends on the console's
            // power-off line, a reset, or an error.
            if n == self.handles.len() && self.link.is_none() {
                self.finish(Ok(GuestEnd::PowerOff));
            }
        } else {
            self.dead_halted.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Validates the parts of a configuration that do not need KVM.
pub fn validate(vcpus: usize, memory: u64) -> Result<(), VmError> {
    if vcpus == 0 || vcpus > mptable::MAX_CPUS {
        return Err(VmError::BadVcpus(vcpus));
    }
    memory::ram_ranges(memory)?;
    Ok(())
}

fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, host: HostKind) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(|source| VmError::Kvm {
        what: "KVM_CREATE_VM",
        source,
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives every use
        // of it by the VM: run() drops it only after every vCPU thread has been joined,
        // and leaks it (never unmaps it) when a thread could not be joined.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    // The TSC-deadline MSR belongs to the user-space LAPIC: have KVM exit on it.
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|source| VmError::Kvm {
        what: "KVM_CAP_X86_USER_SPACE_MSR",
        source,
    })?;
    let bitmap = [0u8; 1];
    // STAR, LSTAR, CSTAR, FMASK: writes of all but CSTAR (bit 2 set: allowed) exit to
    // the VMM, which keeps them for the system-call repair and hands them to KVM.
    let syscall_bitmap = [0b0100u8];
    let mut ranges = vec![kvm_ioctls::MsrFilterRange {
        flags: kvm_ioctls::MsrFilterRangeFlags::READ | kvm_ioctls::MsrFilterRangeFlags::WRITE,
        base: vcpu::MSR_TSC_DEADLINE,
        msr_count: 1,
        bitmap: &bitmap,
    }];
    if host.traps_syscall_msrs() {
        ranges.push(kvm_ioctls::MsrFilterRange {
            flags: kvm_ioctls::MsrFilterRangeFlags::WRITE,
            base: MSR_STAR,
            msr_count: 4,
            bitmap: &syscall_bitmap,
        });
    }
    vm.set_msr_filter(kvm_ioctls::MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(|source| VmError::Kvm {
            what: "KVM_X86_SET_MSR_FILTER",
            source,
        })?;
    // Needed by Intel VMX without unrestricted guest; harmless elsewhere.
    let _ = vm.set_tss_address(0xfffb_d000);
    Ok(vm)
}

/// KVM_FEATURE_CLOCKSOURCE, NOP_IO_DELAY, CLOCKSOURCE2, CLOCKSOURCE_STABLE_BIT (24).
const KVM_PV_FEATURES_KEPT: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

fn set_cpuid(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd, index: usize) -> Result<(), VmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24);
                e.ecx |= 1 << 24; // TSC-deadline timer (MSR trapped to the user-space LAPIC)
                e.ecx &= !(1 << 21); // no x2APIC
            }
            0xb | 0x1f => e.edx = index as u32,
            // KVM paravirtual features: keep the clock, drop what needs an in-kernel
            // LAPIC (PV IPIs, PV EOI, PV spinlock kicks, async PF interrupts...).
            0x4000_0001 => e.eax &= KVM_PV_FEATURES_KEPT,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(|source| VmError::Kvm {
        what: "KVM_SET_CPUID2",
        source,
    })
}

/// The full kernel command line for a host kind and the user's extra options.
pub fn cmdline(host: HostKind, extra: &str) -> String {
    [DEFAULT_CMDLINE, host.extra_cmdline(), extra]
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The virtio-mmio devices the DSDT lists: the disk, then the network device.
fn virtio_devices(disk: bool, net: bool) -> Vec<MmioDevice> {
    let mut devices = Vec::new();
    if disk {
        devices.push(MmioDevice {
            base: VIRTIO_BLK_BASE,
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_BLK_GSI as u32,
        });
    }
    if net {
        devices.push(MmioDevice {
            base: VIRTIO_NET_BASE,
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_NET_GSI as u32,
        });
    }
    devices
}

/// The network device of `spec`: its TAP created and given the host's address, the
/// device interrupting through `router` on [`VIRTIO_NET_GSI`].
fn create_net(
    spec: &NetSpec,
    acpi: bool,
    mem: &GuestMemoryMmap,
    router: &Arc<Router>,
) -> Result<MmioNet, VmError> {
    if !acpi {
        return Err(VmError::NetWithoutAcpi);
    }
    spec.validate().map_err(VmError::NetSpec)?;
    let tap = Tap::create(&spec.tap)?;
    tap.configure_host(spec.host_addr, spec.prefix_len)?;
    tracing::info!(
        tap = %spec.tap,
        host = %format!("{}/{}", spec.host_addr, spec.prefix_len),
        guest = %spec.guest_addr,
        "network device"
    );
    MmioNet::new(
        Net::new(tap, GUEST_MAC),
        mem.clone(),
        router.clone(),
        VIRTIO_NET_GSI,
    )
    .map_err(VmError::Thread)
}

/// A remote vCPU as seen by the router of this node.
struct RemoteVcpu {
    node: u16,
    vcpu: usize,
    link: Arc<dyn ClusterLink>,
}

impl VcpuTarget for RemoteVcpu {
    fn deliver(&self, irq: &Interrupt) {
        self.link.deliver(self.node, self.vcpu, irq);
    }
}

/// The IOAPIC as seen by a node that does not hold it: EOIs are forwarded.
struct RemoteIoApic(Arc<dyn ClusterLink>);

impl IoApicLink for RemoteIoApic {
    fn set_irq(&self, _pin: usize, _level: bool) -> Option<InterruptMessage> {
        None
    }
    fn eoi(&self, vector: u8) -> Vec<InterruptMessage> {
        self.0.eoi(vector);
        Vec::new()
    }
}

/// The handle other nodes' messages use to reach this VM (from transport threads).
#[derive(Clone)]
pub struct VmHandle(Arc<Shared>);

impl VmHandle {
    /// An interrupt for local vCPU `vcpu` arrived from another node.
    pub fn deliver(&self, vcpu: usize, irq: &Interrupt) {
        if let Some(s) = &self.0.shadow {
            s.wait_flushed(Duration::from_millis(20));
        }
        if let Some(h) = self.0.handles.get(vcpu).filter(|_| self.0.local[vcpu]) {
            h.deliver(irq);
        }
    }
    /// A remote vCPU changed its logical destination registers.
    pub fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32) {
        self.0.router.set_logical(vcpu, ldr, dfr);
    }
    /// A level-triggered EOI from another node (I/O node only).
    pub fn eoi(&self, vector: u8) {
        self.0.router.eoi(vector);
    }
    /// A device access forwarded from another node (I/O node only).
    pub fn io(&self, vcpu: usize, access: IoAccess, data: &mut [u8]) -> PortEvent {
        let ev = self.0.port_event(self.0.bus.access(vcpu, access, data));
        match ev {
            PortEvent::Reset => self.0.finish(Ok(GuestEnd::Reboot)),
            PortEvent::PowerOff => self.0.finish(Ok(GuestEnd::PowerOff)),
            PortEvent::None | PortEvent::AcpiPowerOff | PortEvent::PowerOffAnnounced => {}
        }
        ev
    }
    /// Another node ended the run: stop here with the same outcome.
    pub fn remote_end(&self, outcome: Result<GuestEnd, String>) {
        self.0
            .finish_inner(outcome.map_err(VmError::Cluster), false);
    }
    /// Stops the VM with an error (e.g. a node vanished).
    pub fn fail(&self, why: String) {
        self.0.finish(Err(VmError::Cluster(why)));
    }
    /// Bytes typed on the console, for the guest's serial port (I/O node only).
    /// Returns how many the receive FIFO took.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.0.bus.console_input(bytes)
    }
    /// This node gave up a guest page that another node is about to write (called by
    /// the DSM under its lock: it only takes note).
    pub fn page_lost(&self) {
        if let Some(s) = &self.0.shadow {
            s.stale();
        }
    }
    /// Shadow page-table flushes done on this node (software-KVM clusters).
    pub fn shadow_flushes(&self) -> u64 {
        self.0
            .shadow
            .as_ref()
            .map_or(0, |s| s.flushes.load(Ordering::Relaxed))
    }
    /// The counters of this node's vCPUs now.
    pub fn vcpu_snapshots(&self) -> Vec<crate::stats::VcpuSnapshot> {
        self.0
            .handles
            .iter()
            .filter(|h| self.0.local[h.index])
            .map(|h| h.stats.snapshot(h.index))
            .collect()
    }
    /// The counters of the devices on this node (the I/O node's disk and network device).
    pub fn device_counters(&self) -> Vec<crate::stats::DeviceCounters> {
        let mut v = Vec::new();
        if let Some(d) = self.0.bus.disk() {
            let s = d.stats();
            v.push(crate::stats::DeviceCounters {
                device: "disk".into(),
                counters: vec![
                    ("requests".into(), s.requests),
                    ("read_bytes".into(), s.bytes_read),
                    ("written_bytes".into(), s.bytes_written),
                    ("errors".into(), s.errors),
                ],
            });
        }
        if let Some(n) = self.0.bus.net() {
            let s = n.stats();
            v.push(crate::stats::DeviceCounters {
                device: "net".into(),
                counters: vec![
                    ("rx_packets".into(), s.rx_packets),
                    ("tx_packets".into(), s.tx_packets),
                    ("rx_bytes".into(), s.rx_bytes),
                    ("tx_bytes".into(), s.tx_bytes),
                    ("dropped".into(), s.dropped),
                    ("errors".into(), s.errors),
                ],
            });
        }
        v
    }
    /// What the guest kernel keeps at guest-physical `gpa`, when the VMM can tell (see
    /// [`crate::symbols`]).
    pub fn name_address(&self, gpa: u64) -> Option<String> {
        self.0.symbols.as_ref()?.name(&self.0.mem, gpa)
    }
    /// Asks the guest to power off (SIGTERM, `dvmm stop`; I/O node only): presses the
    /// ACPI power button once and gives the guest `timeout` to power off, after which
    /// the run ends with an error; a guest without ACPI is stopped at once (an error
    /// too). Returns what was done, for the one who asked.
    pub fn request_power_off(&self, timeout: Duration) -> Result<String, String> {
        if self.0.power_off_asked.swap(true, Ordering::SeqCst) {
            return Ok("the power button was pressed already; waiting for the guest".into());
        }
        match self.power_button() {
            Ok(()) => {
                crate::term::eprint_line(&format!(
                    "dvmm: stop requested: pressed the guest's power button (it has {} s to \
                     power off)",
                    timeout.as_secs()
                ));
                let h = self.clone();
                std::thread::Builder::new()
                    .name("stop-timeout".into())
                    .spawn(move || {
                        let deadline = Instant::now() + timeout;
                        while Instant::now() < deadline && !h.0.stopping() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        h.0.finish(Err(VmError::StopTimeout(timeout.as_secs())));
                    })
                    .map_err(|e| format!("cannot start the stop timer: {e}"))?;
                Ok("pressed the guest's power button".into())
            }
            Err(e) if self.0.acpi => Err(e),
            Err(e) => {
                self.0.finish(Err(VmError::StoppedWithoutAcpi));
                Ok(format!("stopped at once ({e})"))
            }
        }
    }
    /// Presses the guest's ACPI power button (an edge on [`POWER_BUTTON_GSI`], which the
    /// DSDT's Generic Event Device turns into a power-button notification). Only on the
    /// I/O node of a guest with ACPI tables; otherwise an error saying why.
    pub fn power_button(&self) -> Result<(), String> {
        if !self.0.acpi {
            return Err("the guest has no ACPI tables (--no-acpi): it has no power button".into());
        }
        match &self.0.bus {
            IoBus::Local(_) => {
                self.0.router.pulse(POWER_BUTTON_GSI);
                Ok(())
            }
            IoBus::Remote(_) => Err("the power button is on node 0".into()),
        }
    }
    /// One line of counters per local vCPU.
    pub fn vcpu_stats(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .0
            .handles
            .iter()
            .filter(|h| self.0.local[h.index])
            .map(|h| format!("vcpu{} {}", h.index, h.stats.summary()))
            .collect();
        // The devices' lines come from the same counters as `dvmm stats`.
        lines.extend(self.device_counters().iter().map(|d| {
            let kv: Vec<String> = d.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}", d.device, kv.join(" "))
        }));
        lines
    }
}

impl crate::term::ConsoleSink for VmHandle {
    fn offer(&self, bytes: &[u8]) -> usize {
        self.console_input(bytes)
    }
    fn stopped(&self) -> bool {
        self.0.stopping()
    }
    fn quit(&self) {
        self.0.finish(Err(VmError::ConsoleQuit));
    }
}

/// A created VM, ready to run.
pub struct Vm {
    shared: Arc<Shared>,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vcpus: Vec<(usize, kvm_ioctls::VcpuFd)>,
    boot: Option<boot::BootInfo>,
    timeout: Option<Duration>,
}

fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Vm {
    /// Creates the VM: memory, KVM VM, local vCPUs, and on the boot node the kernel and
    /// boot data.
    pub fn create(cfg: VmConfig) -> Result<Vm, VmError> {
        validate(cfg.vcpus, cfg.memory)?;
        let node = cfg.placement.as_ref().map_or(0, |p| p.node);
        if node == 0 && !cfg.kernel.is_file() {
            return Err(VmError::KernelNotFound(cfg.kernel));
        }
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let max = kvm.get_max_vcpus();
        let local: Vec<bool> = match &cfg.placement {
            None => vec![true; cfg.vcpus],
            Some(p) => p.vcpu_nodes.iter().map(|n| *n == p.node).collect(),
        };
        let nlocal = local.iter().filter(|l| **l).count();
        if nlocal > max {
            return Err(VmError::HostVcpus { vcpus: nlocal, max });
        }
        let mem = match cfg.guest_memory {
            Some(m) => m,
            None => memory::create_guest_memory(cfg.memory)?,
        };
        let vm = create_vm(&kvm, &mem, cfg.host)?;
        vcpu::install_kick_handler().map_err(VmError::KickHandler)?;
        let link = cfg.placement.as_ref().map(|p| p.link.clone());
        // The I/O node (node 0) holds the IOAPIC and the devices; the others reach them
        // through the link.
        let ioapic =
            (node == 0).then(|| Arc::new(Mutex::new(IoApic::new(mptable::ioapic_id(cfg.vcpus)))));
        let ioapic_link: Arc<dyn IoApicLink> = match (&ioapic, &link) {
            (Some(io), _) => io.clone(),
            (None, Some(l)) => Arc::new(RemoteIoApic(l.clone())),
            (None, None) => return Err(VmError::NoIoApic),
        };
        let router = Arc::new(Router::new(cfg.vcpus, ioapic_link));
        let handles: Vec<Arc<VcpuHandle>> = (0..cfg.vcpus)
            .map(|i| Arc::new(VcpuHandle::new(i)))
            .collect();
        for h in &handles {
            match (&cfg.placement, local[h.index]) {
                (Some(p), false) => router.set_target(
                    h.index,
                    Arc::new(RemoteVcpu {
                        node: p.vcpu_nodes[h.index],
                        vcpu: h.index,
                        link: p.link.clone(),
                    }),
                ),
                _ => router.set_target(h.index, h.clone()),
            }
        }
        let console = cfg.console.watch();
        let bus = match (ioapic, &link) {
            (Some(io), _) => {
                let bus = LocalBus::new(cfg.console, io, router.clone(), cfg.acpi);
                let bus = match &cfg.net {
                    None => bus,
                    Some(n) => bus.with_net(create_net(n, cfg.acpi, &mem, &router)?),
                };
                match &cfg.disk {
                    None => IoBus::Local(bus),
                    Some(d) => {
                        if !cfg.acpi {
                            return Err(VmError::DiskWithoutAcpi);
                        }
                        let image = DiskImage::open(&d.path, d.read_only)?;
                        let dev = MmioBlock::new(
                            Block::new(image),
                            mem.clone(),
                            router.clone(),
                            VIRTIO_BLK_GSI,
                        )
                        .map_err(VmError::Thread)?;
                        IoBus::Local(bus.with_disk(dev))
                    }
                }
            }
            (None, Some(l)) => IoBus::Remote(l.clone()),
            (None, None) => return Err(VmError::NoIoNode),
        };
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            outcome_cv: Condvar::new(),
            dead_halted: AtomicUsize::new(0),
            handles: handles.clone(),
            router,
            bus,
            link,
            local: local.clone(),
            timer: LapicTimer::default(),
            console,
            dump: AtomicBool::new(false),
            user_mode: cfg
                .host
                .traps_syscall_msrs()
                .then(|| UserMode::new(mem.clone(), cfg.vcpus)),
            shadow: (cfg.host.traps_syscall_msrs() && cfg.placement.is_some())
                .then(|| Arc::new(ShadowSync::default())),
            mem: mem.clone(),
            power_off_fallback: Mutex::new(None),
            acpi: cfg.acpi,
            symbols: crate::symbols::KernelSymbols::for_kernel(&cfg.kernel, cfg.vcpus),
            power_off_asked: AtomicBool::new(false),
        });

        let tsc_base = cfg.placement.as_ref().and_then(|p| p.tsc_base);
        let mut vcpus = Vec::new();
        for i in (0..cfg.vcpus).filter(|i| local[*i]) {
            let fd = vm
                .create_vcpu(i as u64)
                .map_err(|source| VmError::CreateVcpu { vcpu: i, source })?;
            set_cpuid(&kvm, &fd, i).or_else(|e| match cfg.host {
                // A software backend ignores the table anyway (see compat).
                HostKind::Software => Ok(()),
                HostKind::Hardware => Err(e),
            })?;
            if let Some(base) = tsc_base {
                let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                    index: 0x10, // IA32_TIME_STAMP_COUNTER
                    data: host_tsc().wrapping_sub(base),
                    ..Default::default()
                }])
                .map_err(VmError::TscMsr)?;
                fd.set_msrs(&msrs).map_err(|source| VmError::Kvm {
                    what: "KVM_SET_MSRS (TSC)",
                    source,
                })?;
            }
            vcpus.push((i, fd));
        }

        let boot = if node == 0 {
            let tsc_khz = match cfg.placement.as_ref().and_then(|p| p.tsc_khz) {
                Some(k) => k,
                None => vcpus
                    .first()
                    .ok_or(VmError::NoBootVcpu)?
                    .1
                    .get_tsc_khz()
                    .map_err(|source| VmError::Kvm {
                        what: "KVM_GET_TSC_KHZ",
                        source,
                    })?,
            };
            let host_opts = cfg.host.tsc_cmdline(tsc_khz);
            // The guest configures its interface at boot (IP_PNP).
            let host_opts = match &cfg.net {
                Some(n) => format!("{host_opts} {}", n.kernel_ip_option()),
                None => host_opts,
            };
            let full_cmdline = cmdline(cfg.host, &format!("{host_opts} {}", cfg.cmdline_extra));
            tracing::info!(cmdline = %full_cmdline, "booting");
            Some(boot::load(
                &mem,
                &BootSpec {
                    kernel: &cfg.kernel,
                    initrd: cfg.initrd.as_deref(),
                    cmdline: &full_cmdline,
                    vcpus: cfg.vcpus,
                    unpacker: Unpacker::choose(cfg.unpack_bzimage, cfg.host),
                    acpi: cfg.acpi.then_some(AcpiSpec {
                        vcpus: cfg.vcpus,
                        numa: &cfg.numa,
                        devices: &virtio_devices(cfg.disk.is_some(), cfg.net.is_some()),
                    }),
                },
            )?)
        } else {
            None
        };
        Ok(Vm {
            shared,
            vm: Arc::new(vm),
            mem,
            vcpus,
            boot,
            timeout: cfg.timeout,
        })
    }

    /// The handle for messages from other nodes.
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.shared.clone())
    }

    /// Runs the local vCPUs until the guest ends (or fails).
    pub fn run(self) -> Result<RunReport, VmError> {
        let Vm {
            shared,
            vm,
            mem,
            vcpus,
            boot,
            timeout,
        } = self;
        let handles = shared.handles.clone();
        let mut threads = Vec::new();
        {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("lapic-timer".into())
                    .spawn(move || s.timer.run(&s.handles, &s.local, s.as_ref()))
                    .map_err(VmError::Thread)?,
            );
        }
        if let Some(sync) = shared.shadow.clone() {
            let s = shared.clone();
            let vmfd = vm.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("shadow-sync".into())
                    .spawn(move || {
                        if let Err(source) = sync.run(&vmfd, &|| s.stopping()) {
                            s.finish(Err(VmError::ShadowSync {
                                slot: crate::compat::shadow::DUMMY_SLOT,
                                source,
                            }));
                        }
                    })
                    .map_err(VmError::Thread)?,
            );
        }
        for (i, fd) in vcpus {
            let s = shared.clone();
            let h = handles[i].clone();
            let start = match (i, boot) {
                (0, Some(b)) => Start::Boot(b),
                _ => Start::Ap,
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let r = vcpu::run(fd, &h, s.as_ref(), start);
                    match r {
                        Ok(VcpuEnd::Stopped) => {}
                        Ok(VcpuEnd::Reset) => s.finish(Ok(GuestEnd::Reboot)),
                        Ok(VcpuEnd::PowerOff) => s.finish(Ok(GuestEnd::PowerOff)),
                        Err(e) => s.finish(Err(e.into())),
                    }
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.finish(Err(VmError::Thread(e)));
                    break;
                }
            }
        }

        // Whether this loop settled the outcome (a timeout): the other nodes have not
        // heard of it yet. Every other outcome was reported when it was settled.
        let mut timed_out = false;
        let outcome = {
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut o = crate::lock(&shared.outcome);
            while o.is_none() {
                let fallback = *crate::lock(&shared.power_off_fallback);
                if fallback.is_some_and(|f| Instant::now() >= f) {
                    tracing::warn!(
                        "the guest printed its power-off line but did not power off \
                         through ACPI within {:?}: ending the run (a kernel without ACPI \
                         support, or booted with acpi=off)",
                        POWER_OFF_FALLBACK
                    );
                    drop(o);
                    shared.finish(Ok(GuestEnd::PowerOff));
                    o = crate::lock(&shared.outcome);
                    continue;
                }
                if let Some(f) = fallback.filter(|f| deadline.is_none_or(|d| *f < d)) {
                    o = shared
                        .outcome_cv
                        .wait_timeout(o, f.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    continue;
                }
                match deadline {
                    None => o = shared.outcome_cv.wait(o).unwrap_or_else(|p| p.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            // Have every running vCPU log where it is.
                            shared.dump.store(true, Ordering::SeqCst);
                            drop(o);
                            for h in &handles {
                                h.wake();
                            }
                            std::thread::sleep(Duration::from_millis(300));
                            o = crate::lock(&shared.outcome);
                            // A power-off, panic or failure that arrived while the
                            // vCPUs dumped their state is the real outcome: keep it.
                            timed_out = settle(&mut o, || {
                                let counters = VmHandle(shared.clone()).vcpu_stats().join("; ");
                                Err(VmError::Timeout(timeout.unwrap_or_default(), counters))
                            });
                            break;
                        }
                        o = shared
                            .outcome_cv
                            .wait_timeout(o, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
            o.take()
        };
        // Make sure everything stops; other nodes hear of a timeout here.
        if let (true, Some(Err(e)), Some(link)) = (timed_out, &outcome, &shared.link) {
            link.ended(&Err(e.to_string()));
        }
        shared.finish_inner(Ok(GuestEnd::PowerOff), false);
        // A vCPU blocked on a page that can no longer arrive (its node is gone) never
        // returns from KVM_RUN: give the threads a few seconds, then leave them.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut left = 0;
        for t in threads {
            if !join_by(t, deadline) {
                left += 1;
            }
        }
        if left == 0 {
            drop(vm);
            drop(mem);
        } else {
            // A thread left running may still be inside KVM_RUN on this memory: never
            // unmap it under it. Leak the mapping (and the VM) for the rest of the
            // process; the process normally exits right after the run.
            tracing::warn!(
                threads = left,
                "threads did not stop; leaving them and leaking the guest memory mapping"
            );
            std::mem::forget(mem);
            std::mem::forget(vm);
        }
        let elapsed = shared.start.elapsed();
        let vcpu_stats = VmHandle(shared.clone()).vcpu_stats();
        let end = match outcome {
            Some(r) => r?,
            None => GuestEnd::PowerOff,
        };
        if shared.console.panicked() {
            return Err(VmError::GuestPanic);
        }
        Ok(RunReport {
            end,
            vcpu_stats,
            elapsed,
        })
    }
}

/// Joins `t` if it finishes by `deadline`; returns false (leaving it running) if not.
pub fn join_by<T>(t: std::thread::JoinHandle<T>, deadline: Instant) -> bool {
    while !t.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let done = t.is_finished();
    if done {
        let _ = t.join();
    }
    done
}

/// Creates the VM, boots the kernel and runs until the guest ends.
pub fn run(cfg: VmConfig) -> Result<RunReport, VmError> {
    Vm::create(cfg)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_one_line_and_keep_their_sources() {
        use std::error::Error as _;
        let e = VmError::Kvm {
            what: "KVM_CREATE_VM",
            source: kvm_ioctls::Error::new(libc::ENOMEM),
        };
        let os = kvm_ioctls::Error::new(libc::ENOMEM).to_string();
        assert_eq!(
            e.to_string(),
            format!("cannot use KVM (/dev/kvm): KVM_CREATE_VM: {os}")
        );
        assert_eq!(e.source().map(|s| s.to_string()), Some(os));
        let e = VmError::CreateVcpu {
            vcpu: 3,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        assert!(e.to_string().contains("KVM_CREATE_VCPU 3: "), "{e}");
        assert!(e.source().is_some());
        assert_eq!(
            validate(0, 512 << 20).unwrap_err().to_string(),
            format!("0 vCPUs is not possible: use 1 to {}", mptable::MAX_CPUS)
        );
        assert!(validate(1, 1 << 20)
            .unwrap_err()
            .to_string()
            .starts_with("memory size"));
        let e = VmError::KernelNotFound(PathBuf::from("/nonexistent/vmlinux"));
        assert_eq!(
            e.to_string(),
            "kernel /nonexistent/vmlinux not found (build one with `make guest`, or pass --kernel)"
        );
        for e in [e, VmError::HostVcpus { vcpus: 9, max: 8 }] {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn first_outcome_wins() {
        let mut o: Option<Result<GuestEnd, VmError>> = None;
        assert!(settle(&mut o, || Ok(GuestEnd::PowerOff)));
        let mut called = false;
        assert!(!settle(&mut o, || {
            called = true;
            Err(VmError::Timeout(Duration::from_secs(1), String::new()))
        }));
        assert!(!called, "the later outcome is not even built");
        assert!(matches!(o, Some(Ok(GuestEnd::PowerOff))));
    }

    #[test]
    fn timeout_fills_an_empty_slot() {
        let mut o: Option<Result<GuestEnd, VmError>> = None;
        assert!(settle(&mut o, || Err(VmError::GuestPanic)));
        assert!(matches!(o, Some(Err(VmError::GuestPanic))));
    }

    #[test]
    fn virtio_windows_and_network_checks() {
        let (blk, net) = (virtio_devices(true, false), virtio_devices(false, true));
        assert_eq!(virtio_devices(true, true), [blk[0], net[0]]);
        assert!(virtio_devices(false, false).is_empty());
        // Each window in its own page, each device on its own interrupt.
        assert_eq!((blk[0].base, blk[0].gsi), (0xd000_0000, 16));
        assert_eq!((net[0].base, net[0].gsi), (0xd000_1000, 17));
        assert_eq!(net[0].size, VIRTIO_MMIO_SIZE);
        // Refused before any TAP is made: no ACPI, bad addresses, an existing interface.
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let router = Arc::new(Router::new(1, Arc::new(Mutex::new(IoApic::new(1)))));
        let spec = NetSpec::default_for(std::process::id());
        let err = |spec: &NetSpec, acpi: bool| {
            create_net(spec, acpi, &mem, &router)
                .err()
                .expect("refused")
                .to_string()
        };
        assert!(err(&spec, false).starts_with("a network device needs ACPI"));
        let same = NetSpec {
            guest_addr: spec.host_addr,
            ..spec.clone()
        };
        assert_eq!(
            err(&same, true),
            "invalid network: the host and the guest have the same address 172.30.213.1"
        );
        let lo = NetSpec {
            tap: "lo".into(),
            ..spec.clone()
        };
        assert_eq!(
            err(&lo, true),
            "network interface lo already exists: choose another TAP name"
        );
    }
}
