//! The zero page (`struct boot_params`) and the e820 memory map.

use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::mptable::MPTABLE_START;
use super::BootError;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What goes into the zero page.
#[derive(Debug)]
pub struct ZeroPage<'a> {
    /// The bzImage's own setup header, or None for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Command line address.
    pub cmdline_addr: u64,
    /// Command line length without the NUL.
    pub cmdline_len: usize,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// RAM ranges (start, length).
    pub ram: &'a [(u64, u64)],
    /// Where the ACPI RSDP is (boot protocol 2.14 `acpi_rsdp_addr`), if there is one.
    pub rsdp: Option<u64>,
}

/// The e820 map for the given RAM ranges: low RAM stops at the MP table, the BIOS area
/// (0x9fc00..0x100000) is reserved.
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for &(start, len) in ram {
        if start == 0 {
            map.push((0, MPTABLE_START, E820_RAM));
            map.push((MPTABLE_START, 0x10_0000 - MPTABLE_START, E820_RESERVED));
            if len > 0x10_0000 {
                map.push((0x10_0000, len - 0x10_0000, E820_RAM));
            }
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// Builds the `boot_params` structure.
pub fn build(zp: &ZeroPage<'_>) -> Result<boot_params, BootError> {
    let mut p = boot_params::default();
    if let Some(hdr) = zp.setup_header {
        p.hdr = hdr;
    }
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    p.hdr.cmd_line_ptr = zp.cmdline_addr as u32;
    p.hdr.cmdline_size = zp.cmdline_len as u32;
    if let Some((addr, size)) = zp.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = zp.rsdp {
        p.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(zp.ram);
    if map.len() > p.e820_table.len() {
        return Err(BootError::TooManyE820(map.len()));
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    p.e820_entries = map.len() as u8;
    Ok(p)
}

/// Writes the zero page at `addr`.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    zp: &ZeroPage<'_>,
) -> Result<(), BootError> {
    let p = build(zp)?;
    let bp = BootParams::new::<boot_params>(&p, addr);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_bios_area() {
        let map = e820_map(&[(0, 512 << 20)]);
        assert_eq!(map[0], (0, MPTABLE_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM));
        let big = e820_map(&[(0, 0xC000_0000), (0x1_0000_0000, 1 << 30)]);
        assert_eq!(big.last().unwrap(), &(0x1_0000_0000, 1 << 30, E820_RAM));
    }

    #[test]
    fn params_carry_cmdline_initrd_and_magic() {
        let ram = [(0u64, 256u64 << 20)];
        let zp = ZeroPage {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 17,
            initrd: Some((0x0f00_0000, 12345)),
            ram: &ram,
            rsdp: Some(0xe_0000),
        };
        let p = build(&zp).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 17);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 12345);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
    }
}
