//! The ACPI tables that describe the machine to the guest (rust-vmm `acpi_tables`):
//! RSDP, XSDT, FADT, DSDT, MADT and, when the guest has more than one NUMA node, SRAT
//! and SLIT.
//!
//! * **FADT**: a hardware-reduced ACPI platform (no SCI, no PM timer, no legacy
//!   enable handshake), as cloud VMMs do. Power-off is the sleep control register
//!   ([`SLEEP_CONTROL_PORT`]): the guest writes `SLP_EN | SLP_TYP` there with the
//!   `SLP_TYP` of the DSDT's `\_S5_` object, and the VMM ends the run ([`Devices`]).
//!   Reset is the PC's port 0xcf9 (value 6), which the VMM already handles.
//! * **DSDT**: `\_S5_`, COM1, each virtio-mmio device, and the power button: a
//!   Generic Event Device (`ACPI0013`) on [`POWER_BUTTON_GSI`] whose `_EVT` method
//!   notifies the power button device (`PNP0C0C`) — the hardware-reduced way to have
//!   one. `dvmm stop` and SIGTERM pulse that interrupt; the guest's button driver
//!   reports KEY_POWER and its user space powers off.
//! * **MADT**: every vCPU's local APIC (APIC id = vCPU index), the IOAPIC (id after
//!   the vCPUs, GSI base 0), ISA IRQ 0 routed to GSI 2 as on PCs, and LINT1 as NMI.
//! * **SRAT/SLIT**: one proximity domain per dvmm node ([`NumaNode`]): its vCPUs' APIC
//!   ids and the guest-physical ranges of its memory share (the DSM is home of that
//!   share on that node, so node-local allocations are at home where they are used).
//!   Distances: [`LOCAL_DISTANCE`] within a node, [`REMOTE_DISTANCE`] between nodes.
//!
//! The tables live in the BIOS area at [`ACPI_START`] (reserved in the e820 map), the
//! RSDP first, where the kernel's scan of 0xe0000..0x100000 finds it; its address is
//! also in the zero page (`acpi_rsdp_addr`).
//!
//! [`Devices`]: crate::devices::Devices

use std::ops::Range;

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Notify, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{COM1_BASE, COM1_IRQ, IOAPIC_BASE, LAPIC_BASE, POWER_BUTTON_GSI};

/// Where the RSDP and the tables after it go (the BIOS read-only area, reserved RAM).
pub const ACPI_START: u64 = 0xe_0000;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0x10_0000;
/// The sleep control register (hardware-reduced ACPI): `SLP_TYP << 2 | SLP_EN` enters
/// a sleep state; the only one declared is S5, power-off.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register (`WAK_STS`, bit 7): written by the guest before sleeping.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `SLP_TYP` of S5 (soft off) in the DSDT's `\_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// What the guest writes to [`SLEEP_CONTROL_PORT`] to power off.
pub const S5_WRITE: u8 = (S5_SLEEP_TYPE << 2) | SLEEP_ENABLE;
/// The reset register (the PC's reset control port) and the value that resets.
pub const RESET_PORT: u16 = 0xcf9;
/// Value written to [`RESET_PORT`] to reset (full reset, CPU reset).
pub const RESET_VALUE: u8 = 0x06;

/// SLIT distance of a node to itself (the ACPI-defined base).
pub const LOCAL_DISTANCE: u8 = 10;
/// SLIT distance between two dvmm nodes. A page on another node costs a network round
/// trip (tens of microseconds and more), so the distance is above Linux's
/// `RECLAIM_DISTANCE` (30): the scheduler then does not balance on fork, exec or
/// wake-up across nodes (tasks start near their parent's memory) and moves tasks
/// between nodes only by its periodic and idle balancing.
pub const REMOTE_DISTANCE: u8 = 40;

const OEM_ID: [u8; 6] = *b"DVMM  ";
const OEM_REVISION: u32 = 1;
/// FADT `hypervisor_vendor_identity`.
const HYPERVISOR_VENDOR: u64 = u64::from_le_bytes(*b"DVMM-SSI");
/// IA-PC boot architecture flags: no VGA (bit 2), no MSI (bit 3), no ASPM control (bit 4).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);

/// One NUMA node of the guest: a dvmm node's vCPUs and memory share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Its vCPUs (indexes = APIC ids).
    pub vcpus: Range<usize>,
    /// Its guest-physical memory ranges (start, length).
    pub memory: Vec<(u64, u64)>,
}

/// A virtio-mmio device window, described in the DSDT as an `LNRO0005` device (the
/// identifier Linux's virtio-mmio driver binds to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of the register window (below 4 GiB).
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt: an IOAPIC input (GSI), edge-triggered, active high.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiSpec<'a> {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The NUMA nodes; SRAT and SLIT are written only with two or more.
    pub numa: &'a [NumaNode],
    /// The virtio-mmio devices.
    pub devices: &'a [MmioDevice],
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A topology that cannot be described.
    #[error("invalid ACPI topology: {0}")]
    Topology(String),
    /// The tables do not fit in the BIOS area.
    #[error("the ACPI tables need {0} bytes, more than the {max} bytes of the BIOS area", max = ACPI_END - ACPI_START)]
    TooLarge(u64),
    /// Writing guest memory failed.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

acpi_tables::aml_as_bytes!(InterruptSourceOverride);

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

acpi_tables::aml_as_bytes!(LocalApicNmi);

/// SRAT Processor Local APIC Affinity (type 0).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct ProcessorApicAffinity {
    r#type: u8,
    length: u8,
    proximity_lo: u8,
    apic_id: u8,
    flags: u32,
    sapic_eid: u8,
    proximity_hi: [u8; 3],
    clock_domain: u32,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The tables, laid out for [`ACPI_START`].
#[derive(Debug)]
pub struct Tables {
    /// The bytes from [`ACPI_START`] on.
    pub blob: Vec<u8>,
    /// Guest-physical address of the RSDP.
    pub rsdp: u64,
}

/// Appends `table` to `blob` (8-byte aligned) and returns its guest-physical address.
fn place(blob: &mut Vec<u8>, table: &[u8]) -> u64 {
    blob.resize(blob.len().next_multiple_of(8), 0);
    let addr = ACPI_START + blob.len() as u64;
    blob.extend_from_slice(table);
    addr
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut aml = Vec::new();
    // \_S5_: the sleep type values of soft-off (SLP_TYPa, SLP_TYPb).
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut aml);
    let mut bodies = Vec::new();
    // COM1. A hardware-reduced platform has no legacy PIC, so Linux maps no ISA
    // interrupt by itself: the console's IRQ 4 comes from this device (PNP0501).
    {
        let ports = IO::new(COM1_BASE, COM1_BASE, 1, 8);
        let irq = Interrupt::new(true, true, false, false, COM1_IRQ as u32);
        let crs = ResourceTemplate::new(vec![&ports, &irq]);
        let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
        let uid = Name::new("_UID".into(), &0u8);
        let crs = Name::new("_CRS".into(), &crs);
        Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bodies);
    }
    // The power button, behind a Generic Event Device: the GED's interrupt runs its
    // `_EVT` method, which sends the button's "pressed" notification (0x80).
    {
        let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
        let uid = Name::new("_UID".into(), &0u8);
        Device::new("PWRB".into(), vec![&hid, &uid]).to_aml_bytes(&mut bodies);
        let irq = Interrupt::new(true, true, false, false, POWER_BUTTON_GSI as u32);
        let crs = ResourceTemplate::new(vec![&irq]);
        let hid = Name::new("_HID".into(), &"ACPI0013");
        let uid = Name::new("_UID".into(), &0u8);
        let crs = Name::new("_CRS".into(), &crs);
        let button = Path::new("\\_SB_.PWRB");
        let pressed = 0x80u8;
        let notify = Notify::new(&button, &pressed);
        let evt = Method::new("_EVT".into(), 1, true, vec![&notify]);
        Device::new("GED0".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(&mut bodies);
    }
    for (i, d) in devices.iter().enumerate() {
        let uid = i as u8;
        let window = Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &uid);
        let crs = Name::new("_CRS".into(), &crs);
        let name = format!("VR{i:02X}");
        Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bodies);
    }
    Scope::new("\\_SB_".into(), vec![&RawAml(bodies)]).to_aml_bytes(&mut aml);
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"DVMMDSDT", OEM_REVISION);
    t.append_slice(&aml);
    t.as_slice().to_vec()
}

/// AML already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, *b"DVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed power or sleep button (a control-method one may come with the DSDT).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io(SLEEP_STATUS_PORT);
    b.reset_reg = io(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.hypervisor_vendor_identity = HYPERVISOR_VENDOR.into();
    bytes_of(&b.finalize())
}

fn madt(vcpus: usize) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"DVMMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE as u32),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(
        super::mptable::ioapic_id(vcpus),
        IOAPIC_BASE as u32,
        0,
    ));
    // ISA IRQ 0 (the PIT) is wired to GSI 2 on PCs; flags 0: bus-conforming polarity
    // and trigger (ISA: active high, edge).
    m.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2,
        flags: 0,
    });
    // LINT1 of every processor (uid 0xff) is the NMI line.
    m.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    bytes_of(&m)
}

fn srat(numa: &[NumaNode]) -> Vec<u8> {
    let mut t = Sdt::new(*b"SRAT", 48, 3, OEM_ID, *b"DVMMSRAT", OEM_REVISION);
    // Reserved, 1 for backward compatibility; then 8 reserved bytes.
    t.write_u32(36, 1);
    for (domain, node) in numa.iter().enumerate() {
        let pd = (domain as u32).to_le_bytes();
        for apic in node.vcpus.clone() {
            let a = ProcessorApicAffinity {
                r#type: 0,
                length: 16,
                proximity_lo: pd[0],
                apic_id: apic as u8,
                flags: 1, // enabled
                sapic_eid: 0,
                proximity_hi: [pd[1], pd[2], pd[3]],
                clock_domain: 0,
            };
            t.append_slice(a.as_bytes());
        }
        for &(start, len) in &node.memory {
            t.append_slice(&bytes_of(
                &MemoryAffinity::new(domain as u32, start, len).enabled(),
            ));
        }
    }
    t.as_slice().to_vec()
}

fn slit(nodes: usize) -> Vec<u8> {
    let mut t = SLIT::new(OEM_ID, *b"DVMMSLIT", OEM_REVISION, nodes as u32);
    for a in 0..nodes {
        for b in 0..nodes {
            let d = if a == b {
                LOCAL_DISTANCE
            } else {
                REMOTE_DISTANCE
            };
            t.set_distance(a, b, d);
        }
    }
    bytes_of(&t)
}

/// Checks that `numa` describes every vCPU once and disjoint memory.
fn check_topology(spec: &AcpiSpec<'_>) -> Result<(), AcpiError> {
    let bad = |m: String| Err(AcpiError::Topology(m));
    if spec.vcpus == 0 || spec.vcpus > 255 {
        return bad(format!("{} vCPUs (xAPIC ids go up to 254)", spec.vcpus));
    }
    if spec.numa.len() < 2 {
        return Ok(());
    }
    let mut next_vcpu = 0;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (i, n) in spec.numa.iter().enumerate() {
        if n.vcpus.start != next_vcpu || n.vcpus.end < n.vcpus.start {
            return bad(format!(
                "node {i}'s vCPUs {:?} do not follow vCPU {next_vcpu}",
                n.vcpus
            ));
        }
        next_vcpu = n.vcpus.end;
        if n.memory.is_empty() {
            return bad(format!("node {i} has no memory"));
        }
        ranges.extend(n.memory.iter().copied());
    }
    if next_vcpu != spec.vcpus {
        return bad(format!(
            "the nodes have {next_vcpu} vCPUs, the machine {}",
            spec.vcpus
        ));
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return bad("the nodes' memory ranges overlap".into());
    }
    Ok(())
}

/// Builds the tables.
pub fn build(spec: &AcpiSpec<'_>) -> Result<Tables, AcpiError> {
    check_topology(spec)?;
    if let Some(d) = spec
        .devices
        .iter()
        .find(|d| d.base.checked_add(d.size).is_none_or(|end| end > 1 << 32))
    {
        return Err(AcpiError::Topology(format!(
            "device window {:#x}+{:#x} is not below 4 GiB",
            d.base, d.size
        )));
    }
    // The RSDP first (36 bytes), at a 16-byte boundary for the kernel's scan.
    let mut blob = vec![0u8; Rsdp::len().next_multiple_of(16)];
    let dsdt_addr = place(&mut blob, &dsdt(spec.devices));
    let mut xsdt = XSDT::new(OEM_ID, *b"DVMMXSDT", OEM_REVISION);
    xsdt.add_entry(place(&mut blob, &fadt(dsdt_addr)));
    xsdt.add_entry(place(&mut blob, &madt(spec.vcpus)));
    if spec.numa.len() >= 2 {
        xsdt.add_entry(place(&mut blob, &srat(spec.numa)));
        xsdt.add_entry(place(&mut blob, &slit(spec.numa.len())));
    }
    let xsdt_addr = place(&mut blob, &bytes_of(&xsdt));
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    blob[..Rsdp::len()].copy_from_slice(rsdp.as_bytes());
    if blob.len() as u64 > ACPI_END - ACPI_START {
        return Err(AcpiError::TooLarge(blob.len() as u64));
    }
    Ok(Tables {
        blob,
        rsdp: ACPI_START,
    })
}

/// Builds the tables and writes them into guest memory. Returns the RSDP's address.
pub fn write<M: GuestMemory>(mem: &M, spec: &AcpiSpec<'_>) -> Result<u64, AcpiError> {
    let t = build(spec)?;
    mem.write_slice(&t.blob, GuestAddress(ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(t.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// The table at guest-physical `addr` in the blob.
    fn table(t: &Tables, addr: u64) -> &[u8] {
        let o = (addr - ACPI_START) as usize;
        let len = u32_at(&t.blob, o + 4) as usize;
        &t.blob[o..o + len]
    }

    /// Follows RSDP -> XSDT and returns every table by signature.
    fn tables(t: &Tables) -> Vec<(String, Vec<u8>)> {
        let rsdp = &t.blob[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt = table(t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0, "XSDT checksum");
        let mut out = Vec::new();
        for i in 0..(xsdt.len() - 36) / 8 {
            let tb = table(t, u64_at(xsdt, 36 + 8 * i));
            assert_eq!(sum(tb), 0, "checksum of {:?}", &tb[..4]);
            out.push((String::from_utf8_lossy(&tb[..4]).into_owned(), tb.to_vec()));
        }
        out
    }

    fn two_nodes() -> Vec<NumaNode> {
        vec![
            NumaNode {
                vcpus: 0..2,
                memory: vec![(0, 256 << 20)],
            },
            NumaNode {
                vcpus: 2..4,
                memory: vec![(256 << 20, 256 << 20)],
            },
        ]
    }

    #[test]
    fn one_node_has_no_srat() {
        let t = build(&AcpiSpec {
            vcpus: 3,
            numa: &[],
            devices: &[],
        })
        .unwrap();
        let names: Vec<_> = tables(&t).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["FACP", "APIC"]);
    }

    #[test]
    fn fadt_points_to_dsdt_and_the_sleep_registers() {
        let t = build(&AcpiSpec {
            vcpus: 1,
            numa: &[],
            devices: &[],
        })
        .unwrap();
        let all = tables(&t);
        let fadt = &all.iter().find(|(n, _)| n == "FACP").unwrap().1;
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        assert_ne!(flags & (1 << 10), 0, "reset register supported");
        // Reset register: system I/O port 0xcf9, value 6.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), RESET_PORT as u64);
        assert_eq!(fadt[128], RESET_VALUE);
        // Sleep control / status registers at 244 and 256.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(fadt, 260), SLEEP_STATUS_PORT as u64);
        // X_DSDT at 140.
        let dsdt = table(&t, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        let aml = &dsdt[36..];
        // NameOp "_S5_" PackageOp len 2 elements BytePrefix 5 BytePrefix 5.
        assert_eq!(
            &aml[..12],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02, 0x0a, 5, 0x0a, 5]
        );
        assert_eq!(S5_WRITE, 0x34);
        // COM1 in \_SB_ on every machine: its ports and IRQ 4 (edge).
        let com1 = &aml[12..];
        assert_eq!(com1[0], 0x10, "ScopeOp");
        let find = |needle: &[u8]| com1.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"COM1"));
        assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "EISA id PNP0501");
        assert!(
            find(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]),
            "I/O 0x3f8, 8 ports"
        );
        assert!(find(&[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]), "IRQ 4");
        // The power button and its Generic Event Device on GSI 18.
        assert!(find(b"PWRB"));
        assert!(find(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]), "EISA id PNP0C0C");
        assert!(find(b"ACPI0013\0"));
        assert!(find(b"_EVT"));
        assert!(find(&[0x89, 6, 0, 0x03, 1, 18, 0, 0, 0]), "GSI 18");
        // Notify(\_SB_.PWRB, 0x80): NotifyOp, the path, a byte constant.
        assert!(find(&[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80
        ]));
        // With a device: a Scope(\_SB_) holding Device(VR00) with LNRO0005, its window
        // and its interrupt.
        let disk = MmioDevice {
            base: 0xd000_0000,
            size: 0x200,
            gsi: 16,
        };
        let t = build(&AcpiSpec {
            vcpus: 1,
            numa: &[],
            devices: &[disk],
        })
        .unwrap();
        let all = tables(&t);
        let fadt = &all.iter().find(|(n, _)| n == "FACP").unwrap().1;
        let dsdt = table(&t, u64_at(fadt, 140));
        assert_eq!(sum(dsdt), 0);
        let aml = &dsdt[36 + 12..];
        assert_eq!(aml[0], 0x10, "ScopeOp");
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"\\_SB_"));
        assert!(find(b"VR00"));
        assert!(find(b"LNRO0005\0"));
        // Memory32Fixed: read-write, base, length.
        assert!(find(&[0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 2, 0, 0]));
        // Extended interrupt: consumer + edge, one interrupt, GSI 16.
        assert!(find(&[0x89, 6, 0, 0x03, 1, 16, 0, 0, 0]));
        let high = MmioDevice {
            base: 0xffff_ff00,
            ..disk
        };
        assert!(build(&AcpiSpec {
            vcpus: 1,
            numa: &[],
            devices: &[high]
        })
        .is_err());
    }

    #[test]
    fn madt_lists_every_vcpu_the_ioapic_and_the_overrides() {
        let t = build(&AcpiSpec {
            vcpus: 4,
            numa: &[],
            devices: &[],
        })
        .unwrap();
        let all = tables(&t);
        let madt = &all.iter().find(|(n, _)| n == "APIC").unwrap().1;
        assert_eq!(u32_at(madt, 36), LAPIC_BASE as u32);
        let mut o = 44;
        let mut seen = Vec::new();
        while o < madt.len() {
            seen.push((madt[o], madt[o + 2], madt[o + 3]));
            o += madt[o + 1] as usize;
        }
        assert_eq!(o, madt.len());
        assert_eq!(
            seen,
            [
                (0, 0, 0),
                (0, 1, 1),
                (0, 2, 2),
                (0, 3, 3),
                (1, 4, 0),
                (2, 0, 0),
                (4, 0xff, 0)
            ]
        );
    }

    #[test]
    fn srat_and_slit_follow_the_nodes() {
        let numa = two_nodes();
        let t = build(&AcpiSpec {
            vcpus: 4,
            numa: &numa,
            devices: &[],
        })
        .unwrap();
        let all = tables(&t);
        let names: Vec<_> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["FACP", "APIC", "SRAT", "SLIT"]);
        let srat = &all[2].1;
        assert_eq!(u32_at(srat, 36), 1);
        let (mut cpus, mut mems) = (Vec::new(), Vec::new());
        let mut o = 48;
        while o < srat.len() {
            match srat[o] {
                0 => cpus.push((srat[o + 3], srat[o + 2], u32_at(srat, o + 4))),
                1 => mems.push((
                    u32_at(srat, o + 2),
                    u64_at(srat, o + 8),
                    u64_at(srat, o + 16),
                )),
                t => panic!("unexpected SRAT structure {t}"),
            }
            o += srat[o + 1] as usize;
        }
        assert_eq!(cpus, [(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]);
        assert_eq!(mems, [(0, 0, 256 << 20), (1, 256 << 20, 256 << 20)]);
        let slit = &all[3].1;
        assert_eq!(u64_at(slit, 36), 2);
        assert_eq!(&slit[44..48], &[10, REMOTE_DISTANCE, REMOTE_DISTANCE, 10]);
    }

    #[test]
    fn impossible_topologies_are_refused() {
        let mut numa = two_nodes();
        numa[1].vcpus = 3..4;
        assert!(build(&AcpiSpec {
            vcpus: 4,
            numa: &numa,
            devices: &[],
        })
        .is_err());
        let mut numa = two_nodes();
        numa[1].memory = vec![(128 << 20, 256 << 20)];
        let e = build(&AcpiSpec {
            vcpus: 4,
            numa: &numa,
            devices: &[],
        })
        .unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        let numa = two_nodes();
        assert!(build(&AcpiSpec {
            vcpus: 5,
            numa: &numa,
            devices: &[],
        })
        .is_err());
        assert!(build(&AcpiSpec {
            vcpus: 0,
            numa: &[],
            devices: &[],
        })
        .is_err());
    }

    #[test]
    fn many_vcpus_and_nodes_fit() {
        let numa: Vec<NumaNode> = (0..8)
            .map(|i| NumaNode {
                vcpus: i * 4..i * 4 + 4,
                memory: vec![(i as u64 * (64 << 20), 64 << 20)],
            })
            .collect();
        let t = build(&AcpiSpec {
            vcpus: 32,
            numa: &numa,
            devices: &[],
        })
        .unwrap();
        assert_eq!(tables(&t).len(), 4);
        assert!(t.blob.len() < 8192);
    }
}
