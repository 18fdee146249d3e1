//! Entry state of the boot vCPU (64-bit long mode, as the Linux 64-bit boot protocol
//! asks) and of application processors started by INIT/SIPI (real mode at the SIPI page).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// IDT address.
pub const IDT_ADDR: u64 = 0x520;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables: PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory (four follow, identity-mapping 4 GiB with 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;

/// Code segment selector (the Linux boot protocol's __BOOT_CS).
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector (__BOOT_DS).
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes a GDT entry into a KVM segment.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// Writes the GDT, an empty IDT and identity-mapping page tables for the first 4 GiB.
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))?;
    for pd in 0..4u64 {
        mem.write_obj(
            (PD_ADDR + pd * 0x1000) | 0x03,
            GuestAddress(PDPT_ADDR + pd * 8),
        )?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(PD_ADDR + pd * 0x1000 + i * 8))?;
        }
    }
    Ok(())
}

/// Special registers of the boot vCPU: long mode, paging on, boot GDT loaded.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(GDT[2], BOOT_CS / 8);
    let data = segment_from_gdt(GDT[3], BOOT_DS / 8);
    let tss = segment_from_gdt(GDT[4], BOOT_TSS / 8);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers of the boot vCPU.
pub fn boot_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: zero_page,
        ..Default::default()
    }
}

/// FPU state at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Special registers of an AP after INIT + SIPI with `vector`: real mode, CS at
/// `vector << 12`, everything else as after reset.
pub fn sipi_sregs(mut sregs: kvm_sregs, vector: u8) -> kvm_sregs {
    sregs.cs.selector = (vector as u16) << 8;
    sregs.cs.base = (vector as u64) << 12;
    sregs.cs.limit = 0xffff;
    sregs
}

/// General registers of an AP after SIPI.
pub fn sipi_regs() -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: 0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT[2], 2);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(cs.l, 1, "64-bit code");
        assert_eq!(cs.present, 1);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[3], 3);
        assert_eq!(ds.selector, 0x18);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 3);
    }

    #[test]
    fn page_tables_identity_map() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 8)).unwrap();
        assert_eq!(pde, (8 << 21) | 0x83);
        let pde_3g: u64 = mem.read_obj(GuestAddress(PD_ADDR + 3 * 0x1000)).unwrap();
        assert_eq!(pde_3g, (3 << 30) | 0x83);
    }

    #[test]
    fn long_mode_state() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr3, PML4_ADDR);
        let r = boot_regs(0x100_0000, 0x7000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, 0x7000);
        let ap = sipi_sregs(kvm_sregs::default(), 0x9a);
        assert_eq!(ap.cs.base, 0x9a000);
        assert_eq!(ap.cs.selector, 0x9a00);
    }
}
