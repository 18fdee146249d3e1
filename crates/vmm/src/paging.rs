//! Reading guest memory by guest-virtual address: an x86-64 page-table walk (4 or 5
//! levels, 2 MiB and 1 GiB pages) over guest-physical memory.
//!
//! The VMM needs this where it must look at what the guest kernel sees through its own
//! page tables (the system-call repair of [`crate::compat::usermode`] reads the IDT and
//! an exception frame on the kernel stack). Reads go through the host mapping of guest
//! RAM; on a node of a cluster that mapping is the DSM region, so a page that lives on
//! another node is fetched like any other access.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// CR4.LA57: five-level paging.
pub const CR4_LA57: u64 = 1 << 12;

/// Why a guest-virtual access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PagingError {
    /// No present mapping for the address.
    #[error("guest-virtual address {0:#x} is not mapped")]
    NotMapped(u64),
    /// The page tables or the target point outside guest RAM.
    #[error("guest-physical address {0:#x} is outside guest RAM")]
    OutsideRam(u64),
}

/// Where a guest-virtual address leads, and what the page tables allow there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// Every level allows writes (R/W set).
    pub writable: bool,
    /// Every level allows user-mode access (U/S set).
    pub user: bool,
}

/// The page tables of a vCPU at one moment: its CR3 and whether CR4.LA57 is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTables {
    /// CR3 (the root table's physical address in bits 12..52).
    pub cr3: u64,
    /// Five-level paging.
    pub la57: bool,
}

impl PageTables {
    /// From a vCPU's control registers.
    pub fn from_regs(cr3: u64, cr4: u64) -> Self {
        PageTables {
            cr3,
            la57: cr4 & CR4_LA57 != 0,
        }
    }

    /// The guest-physical address of `gva`.
    pub fn translate(&self, mem: &GuestMemoryMmap, gva: u64) -> Result<u64, PagingError> {
        self.walk(mem, gva).map(|t| t.gpa)
    }

    /// The translation of `gva` with the access rights the walk found (the R/W and U/S
    /// bits of every level combined, as the CPU combines them).
    pub fn walk(&self, mem: &GuestMemoryMmap, gva: u64) -> Result<Translation, PagingError> {
        let levels: u32 = if self.la57 { 5 } else { 4 };
        let mut table = self.cr3 & ADDR_MASK;
        let mut rights = WRITABLE | USER;
        let done = |gpa, rights: u64| Translation {
            gpa,
            writable: rights & WRITABLE != 0,
            user: rights & USER != 0,
        };
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let index = (gva >> shift) & 0x1ff;
            let at = table + index * 8;
            let entry: u64 = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| PagingError::OutsideRam(at))?;
            if entry & PRESENT == 0 {
                return Err(PagingError::NotMapped(gva));
            }
            rights &= entry;
            // A large page at level 2 (2 MiB) or 3 (1 GiB).
            if (level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0 {
                let size = 1u64 << shift;
                let base = entry & ADDR_MASK & !(size - 1);
                return Ok(done(base | (gva & (size - 1)), rights));
            }
            table = entry & ADDR_MASK;
        }
        Ok(done(table | (gva & 0xfff), rights))
    }

    /// Reads `buf.len()` bytes at `gva` (the range may cross pages).
    pub fn read(&self, mem: &GuestMemoryMmap, gva: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        let mut done = 0usize;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let pa = self.translate(mem, va)?;
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + n], GuestAddress(pa))
                .map_err(|_| PagingError::OutsideRam(pa))?;
            done += n;
        }
        Ok(())
    }

    /// Reads a little-endian u64 at `gva`.
    pub fn read_u64(&self, mem: &GuestMemoryMmap, gva: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read(mem, gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds 4-level tables at 0x1000.. mapping `va` to `pa` with a 4 KiB page, one
    /// 2 MiB page at `va2m` -> 0x40_0000 and returns the tables.
    pub(crate) fn map(mem: &GuestMemoryMmap, maps: &[(u64, u64)]) -> PageTables {
        let with_flags: Vec<(u64, u64, u64)> = maps.iter().map(|&(va, pa)| (va, pa, 3)).collect();
        map_with(mem, &with_flags)
    }

    /// Like [`map`], with the leaf entry's flag bits given per mapping (`(va, pa,
    /// flags)`); the upper levels allow everything (present, writable, user).
    pub(crate) fn map_with(mem: &GuestMemoryMmap, maps: &[(u64, u64, u64)]) -> PageTables {
        // A bump allocator of table pages from 0x1000.
        let mut next = 0x2000u64;
        let root = 0x1000u64;
        for &(va, pa, flags) in maps {
            let mut table = root;
            for level in (2..=4u32).rev() {
                let shift = 12 + 9 * (level - 1);
                let at = table + ((va >> shift) & 0x1ff) * 8;
                let e: u64 = mem.read_obj(GuestAddress(at)).unwrap();
                table = if e & PRESENT != 0 {
                    e & ADDR_MASK
                } else {
                    let t = next;
                    next += 0x1000;
                    mem.write_obj(t | 7, GuestAddress(at)).unwrap();
                    t
                };
            }
            let at = table + ((va >> 12) & 0x1ff) * 8;
            mem.write_obj(pa | flags, GuestAddress(at)).unwrap();
        }
        PageTables {
            cr3: root,
            la57: false,
        }
    }

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn walks_4k_and_large_pages() {
        let mem = memory();
        let pt = map(
            &mem,
            &[
                (0xffff_ffff_8100_0000, 0x50_0000),
                (0xffff_ffff_8100_1000, 0x70_3000),
            ],
        );
        assert_eq!(
            pt.translate(&mem, 0xffff_ffff_8100_0123).unwrap(),
            0x50_0123
        );
        assert_eq!(
            pt.translate(&mem, 0xffff_ffff_8100_1ff8).unwrap(),
            0x70_3ff8
        );
        assert_eq!(
            pt.translate(&mem, 0xffff_ffff_8100_2000),
            Err(PagingError::NotMapped(0xffff_ffff_8100_2000))
        );
        // A read across the two pages.
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x50_0ffe))
            .unwrap();
        mem.write_slice(&[5, 6], GuestAddress(0x70_3000)).unwrap();
        let mut b = [0u8; 4];
        pt.read(&mem, 0xffff_ffff_8100_0ffe, &mut b).unwrap();
        assert_eq!(b, [1, 2, 5, 6]);
        // A 2 MiB page: make the PD entry of a new address large.
        let va = 0xffff_8880_0020_0000u64;
        let pt2 = map(&mem, &[(va, 0x60_0000)]);
        // Find the PD entry and turn it into a 2 MiB mapping of 0x80_0000.
        let pml4 = (pt2.cr3 & ADDR_MASK) + ((va >> 39) & 0x1ff) * 8;
        let pdpt: u64 = mem.read_obj::<u64>(GuestAddress(pml4)).unwrap() & ADDR_MASK;
        let pd: u64 = mem
            .read_obj::<u64>(GuestAddress(pdpt + ((va >> 30) & 0x1ff) * 8))
            .unwrap()
            & ADDR_MASK;
        mem.write_obj(
            0x80_0000u64 | 3 | PAGE_SIZE_BIT,
            GuestAddress(pd + ((va >> 21) & 0x1ff) * 8),
        )
        .unwrap();
        assert_eq!(pt2.translate(&mem, va + 0x1_2345).unwrap(), 0x81_2345);
        // Tables pointing outside RAM.
        let bad = PageTables {
            cr3: 0x4000_0000,
            la57: false,
        };
        assert!(matches!(
            bad.translate(&mem, 0),
            Err(PagingError::OutsideRam(_))
        ));
    }

    #[test]
    fn walk_reports_access_rights() {
        let mem = memory();
        let pt = map_with(
            &mem,
            &[
                (0x40_0000, 0x50_0000, PRESENT),
                (0x40_1000, 0x50_1000, PRESENT | WRITABLE),
                (0x40_2000, 0x50_2000, PRESENT | WRITABLE | USER),
            ],
        );
        let t = |va| pt.walk(&mem, va).unwrap();
        assert_eq!(
            t(0x40_0010),
            Translation {
                gpa: 0x50_0010,
                writable: false,
                user: false
            }
        );
        assert!(t(0x40_1000).writable && !t(0x40_1000).user);
        assert!(t(0x40_2fff).writable && t(0x40_2fff).user);
        // An upper level without R/W takes the right away from the whole range.
        let pml4 = pt.cr3 & ADDR_MASK;
        let e: u64 = mem.read_obj(GuestAddress(pml4)).unwrap();
        mem.write_obj(e & !WRITABLE, GuestAddress(pml4)).unwrap();
        assert!(!t(0x40_2000).writable && t(0x40_2000).user);
    }
}
