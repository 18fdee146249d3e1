//! The Intel MultiProcessor Specification 1.4 table that tells the guest which CPUs,
//! which IOAPIC and which interrupt wiring the machine has (no ACPI in this machine).
//!
//! Layout written at [`MPTABLE_START`]: floating pointer structure, then the
//! configuration table header and its entries: one processor entry per vCPU, an ISA
//! bus, the IOAPIC, ISA IRQ 0..15 to IOAPIC pins (IRQ 0 to pin 2, as on PCs), and the
//! LINT0 (ExtINT) / LINT1 (NMI) local interrupt entries.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Where the table goes: the last KiB of base memory, which Linux scans.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = crate::layout::IOAPIC_BASE as u32;
/// Physical address of every LAPIC (xAPIC mode).
pub const LAPIC_ADDR: u32 = crate::layout::LAPIC_BASE as u32;
/// The largest vCPU count an MP table of this layout can describe (it must fit in 1 KiB).
pub const MAX_CPUS: usize = 32;
/// APIC id of the IOAPIC (after the vCPUs' ids).
pub fn ioapic_id(cpus: usize) -> u8 {
    cpus as u8
}

const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201; // FPU + APIC

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(usize),
    /// Writing guest memory failed.
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer + configuration table bytes for `cpus` vCPUs, to be
/// placed at `base`.
pub fn build(cpus: usize, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    // Processor entries (type 0, 20 bytes).
    for i in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = 0;
        e[1] = i as u8; // local APIC id
        e[2] = APIC_VERSION;
        e[3] = 0x01 | if i == 0 { 0x02 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&CPU_STEPPING.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus entry (type 1, 8 bytes): bus 0 = ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // IOAPIC entry (type 2, 8 bytes).
    let mut e = [0u8; 8];
    e[0] = 2;
    e[1] = ioapic_id(cpus);
    e[2] = 0x11;
    e[3] = 1; // enabled
    e[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // I/O interrupt entries (type 3, 8 bytes): ISA IRQ n -> IOAPIC pin n (IRQ 0 -> pin 2).
    for irq in 0u8..16 {
        if irq == 2 {
            continue; // the cascade line does not exist on an IOAPIC-only machine
        }
        let pin = if irq == 0 { 2 } else { irq };
        // type, interrupt type (0 = INT), flags (conforming), source bus, source irq,
        // destination IOAPIC id, destination pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id(cpus), pin]);
        count += 1;
    }
    // Local interrupt entries (type 4): LINT0 ExtINT, LINT1 NMI, to all LAPICs (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut header = [0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    let table_len = (44 + entries.len()) as u16;
    header[4..6].copy_from_slice(&table_len.to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"DVMM    ");
    header[16..28].copy_from_slice(b"DVMM-SSI    ");
    // OEM table pointer 0, OEM table size 0.
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    let mut table: Vec<u8> = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    if out.len() > 1024 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs into guest memory at [`MPTABLE_START`].
pub fn write<M: GuestMemory>(mem: &M, cpus: usize) -> Result<(), MpTableError> {
    let bytes = build(cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1, 2, 4, 16, MAX_CPUS] {
            let t = build(cpus, MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(&t[16..20], b"PCMP");
            assert_eq!(sum(&t[16..16 + len]), 0, "table checksum");
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]) as usize;
            assert_eq!(count, cpus + 1 + 1 + 15 + 2);
            // First processor is the BSP, the others are not.
            assert_eq!(t[16 + 44 + 3], 3);
            if cpus > 1 {
                assert_eq!(t[16 + 44 + 20 + 3], 1);
                assert_eq!(t[16 + 44 + 20 + 1], 1, "apic id of cpu 1");
            }
        }
    }

    #[test]
    fn rejects_impossible_counts() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(MAX_CPUS + 1, MPTABLE_START).is_err());
    }
}
