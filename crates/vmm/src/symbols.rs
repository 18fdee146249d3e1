//! Names for guest-physical addresses: which kernel variable, or which CPU's per-CPU
//! area, a hot DSM page holds (`dvmm stats`).
//!
//! The names come from the kernel's `System.map`, found next to the kernel image
//! (`System.map` in the same directory, or `System.map-<version>` beside
//! `vmlinuz-<version>` / `vmlinux-<version>`; `make guest` puts one in guest/out/).
//! Two kinds of address are named:
//!
//! * the kernel image: a symbol's guest-physical address is its virtual address minus
//!   the kernel mapping's base ([`KERNEL_MAP`]; the VMM loads the kernel where it was
//!   linked, without KASLR);
//! * per-CPU areas: CPU `n`'s area starts at `__per_cpu_offset[n]` (read from guest
//!   memory once the kernel has set the offsets), in the direct map ([`DIRECT_MAP`]);
//!   an address in it is named by the per-CPU variable at that offset.
//!
//! Anything else (slab, page cache, page tables) has no name here.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Base of the kernel image's virtual mapping (`__START_KERNEL_map`).
pub const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Base of the direct map of physical memory (`page_offset_base` without KASLR).
pub const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;

/// Symbols of one kernel.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// Kernel-image symbols: (virtual address, name), sorted.
    image: Vec<(u64, String)>,
    /// Per-CPU variables: (offset in a per-CPU area, name), sorted.
    percpu: Vec<(u64, String)>,
    /// Size of the static per-CPU section (`__per_cpu_end`).
    percpu_size: u64,
    /// Virtual address of `__per_cpu_offset`.
    offsets_at: Option<u64>,
    /// The per-CPU areas' guest-physical starts, once read and plausible.
    areas: Mutex<Option<Vec<u64>>>,
    /// CPUs whose areas are read.
    cpus: usize,
}

/// The `System.map` that belongs to `kernel`, if there is one.
pub fn system_map_for(kernel: &Path) -> Option<PathBuf> {
    let dir = kernel.parent()?;
    let plain = dir.join("System.map");
    let file = kernel.file_name()?.to_string_lossy().into_owned();
    let versioned = ["vmlinuz-", "vmlinux-"]
        .iter()
        .find_map(|p| file.strip_prefix(p))
        .map(|v| dir.join(format!("System.map-{v}")));
    versioned
        .into_iter()
        .chain(std::iter::once(plain))
        .find(|p| p.is_file())
}

impl KernelSymbols {
    /// Parses a `System.map` (`<hex address> <type> <name>` per line) for a guest with
    /// `cpus` CPUs. Lines that do not parse are skipped; a map without kernel symbols
    /// gives None.
    pub fn parse(text: &str, cpus: usize) -> Option<KernelSymbols> {
        let mut s = KernelSymbols {
            cpus,
            ..Default::default()
        };
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            // Absolute symbols are constants, not places.
            if kind.eq_ignore_ascii_case("a") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            match name {
                "__per_cpu_end" => s.percpu_size = addr,
                "__per_cpu_offset" => s.offsets_at = Some(addr),
                _ => {}
            }
            if addr >= KERNEL_MAP {
                s.image.push((addr, name.to_string()));
            } else if addr < (1 << 32) && !name.starts_with("__per_cpu_") {
                s.percpu.push((addr, name.to_string()));
            }
        }
        s.image.sort();
        s.percpu.sort();
        if s.percpu_size == 0 {
            s.percpu.clear();
        }
        (!s.image.is_empty()).then_some(s)
    }

    /// Loads the `System.map` next to `kernel` (see [`system_map_for`]).
    pub fn for_kernel(kernel: &Path, cpus: usize) -> Option<KernelSymbols> {
        let path = system_map_for(kernel)?;
        let text = std::fs::read_to_string(&path).ok()?;
        let s = Self::parse(&text, cpus);
        if s.is_none() {
            tracing::warn!(map = %path.display(), "no kernel symbols in this System.map");
        }
        s
    }

    /// Names the guest page at `gpa`: what covers its start, and how many more symbols
    /// start inside it. Reads the per-CPU offsets from `mem` until they are set.
    pub fn name(&self, mem: &GuestMemoryMmap, gpa: u64) -> Option<String> {
        let page = gpa & !0xfff;
        if let Some(n) = self.in_image(page) {
            return Some(n);
        }
        let areas = self.areas(mem)?;
        let (cpu, start) = areas
            .iter()
            .enumerate()
            .find(|(_, &a)| page + 0x1000 > a && page < a + self.percpu_size)?;
        let off = page.saturating_sub(*start);
        let names = covering(&self.percpu, off, off + 0x1000);
        Some(format!("cpu{cpu} per-CPU +{off:#x}: {names}"))
    }

    fn in_image(&self, page: u64) -> Option<String> {
        let virt = page.checked_add(KERNEL_MAP)?;
        let first = self.image.first()?.0;
        let last = self.image.last()?.0;
        if virt + 0x1000 <= first || virt > last {
            return None;
        }
        Some(format!(
            "kernel: {}",
            covering(&self.image, virt, virt + 0x1000)
        ))
    }

    /// The per-CPU areas' guest-physical starts, read once the kernel has set them
    /// (every offset non-zero and in the direct map).
    fn areas(&self, mem: &GuestMemoryMmap) -> Option<Vec<u64>> {
        if self.percpu.is_empty() {
            return None;
        }
        let mut cached = self.areas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cached.as_ref() {
            return Some(a.clone());
        }
        let at = self.offsets_at?.checked_sub(KERNEL_MAP)?;
        let mut raw = vec![0u8; 8 * self.cpus];
        mem.read_slice(&mut raw, GuestAddress(at)).ok()?;
        let areas: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .map(|o| o.wrapping_sub(DIRECT_MAP))
            .collect();
        let plausible = areas
            .iter()
            .all(|&a| a != 0 && mem.address_in_range(GuestAddress(a)));
        if !plausible {
            return None;
        }
        *cached = Some(areas.clone());
        Some(areas)
    }
}

/// The symbol covering `from` and up to two more that start before `to`, with a count
/// of the rest: `a+0x10, b, c (+5 more)`.
fn covering(syms: &[(u64, String)], from: u64, to: u64) -> String {
    let i = syms.partition_point(|(a, _)| *a <= from);
    let mut parts = Vec::new();
    if i > 0 {
        let (a, n) = &syms[i - 1];
        parts.push(if from == *a {
            n.clone()
        } else {
            format!("{n}+{:#x}", from - a)
        });
    }
    let inside: Vec<&String> = syms[i..]
        .iter()
        .take_while(|(a, _)| *a < to)
        .map(|(_, n)| n)
        .collect();
    parts.extend(inside.iter().take(2).map(|n| n.to_string()));
    let mut s = parts.join(", ");
    if inside.len() > 2 {
        s.push_str(&format!(" (+{} more)", inside.len() - 2));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
0000000000001000 D fixed_percpu_data
000000000001f000 D runqueues
000000000001f800 D cpu_tlbstate_shared
0000000000020000 D __per_cpu_end
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff82000000 D jiffies_64
ffffffff82000040 D jiffies_lock
ffffffff82000100 D a
ffffffff82000200 D b
ffffffff82000300 D c
ffffffff82001000 D __per_cpu_offset
ffffffff82002000 B _end
garbage line
";

    #[test]
    fn names_kernel_and_per_cpu_pages() {
        let s = KernelSymbols::parse(MAP, 2).unwrap();
        assert_eq!(s.percpu_size, 0x20000);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        // The kernel image: jiffies_64's page (phys 0x2000000), 5 symbols start in it.
        assert_eq!(
            s.name(&mem, 0x200_0000).unwrap(),
            "kernel: jiffies_64, jiffies_lock, a (+2 more)"
        );
        assert_eq!(s.name(&mem, 0x100_0000).unwrap(), "kernel: startup_64");
        // Before the kernel sets the per-CPU offsets, per-CPU pages have no name.
        assert_eq!(s.name(&mem, 0x300_0000 + 0x1f000), None);
        // The kernel sets them: cpu0 at phys 0x3000000, cpu1 at 0x3200000.
        let offs: Vec<u8> = [0x300_0000u64, 0x320_0000]
            .iter()
            .flat_map(|p| (p + DIRECT_MAP).to_le_bytes())
            .collect();
        mem.write_slice(&offs, GuestAddress(0x200_1000)).unwrap();
        assert_eq!(
            s.name(&mem, 0x320_0000 + 0x1f000).unwrap(),
            "cpu1 per-CPU +0x1f000: runqueues, cpu_tlbstate_shared"
        );
        assert_eq!(
            s.name(&mem, 0x300_0000 + 0x2000).unwrap(),
            "cpu0 per-CPU +0x2000: fixed_percpu_data+0x1000"
        );
        // Outside both: no name.
        assert_eq!(s.name(&mem, 0x10_0000), None);
        assert_eq!(s.name(&mem, 0x320_0000 + 0x20000), None);
        assert!(KernelSymbols::parse("nothing here\n", 1).is_none());
    }

    #[test]
    fn finds_the_map_next_to_the_kernel() {
        let dir = std::env::temp_dir().join(format!("dvmm-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(system_map_for(&dir.join("vmlinux")), None);
        std::fs::write(dir.join("System.map"), MAP).unwrap();
        assert_eq!(
            system_map_for(&dir.join("vmlinux")),
            Some(dir.join("System.map"))
        );
        std::fs::write(dir.join("System.map-6.1.0-9-amd64"), MAP).unwrap();
        assert_eq!(
            system_map_for(&dir.join("vmlinuz-6.1.0-9-amd64")),
            Some(dir.join("System.map-6.1.0-9-amd64"))
        );
        assert!(KernelSymbols::for_kernel(&dir.join("vmlinux"), 2).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
