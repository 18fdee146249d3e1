//! Loading the guest kernel and describing the machine to it.
//!
//! Memory map used at boot (guest physical):
//!
//! | address    | what                                   |
//! |------------|----------------------------------------|
//! | 0x500      | GDT                                    |
//! | 0x520      | IDT (empty)                            |
//! | 0x7000     | zero page (`boot_params`)              |
//! | 0x8ff0     | initial stack pointer                  |
//! | 0x9000     | PML4, then PDPT (0xa000), PDs (0xb000) |
//! | 0x20000    | kernel command line                    |
//! | 0x9fc00    | MP table                               |
//! | 0x100000   | kernel (ELF at its physical addresses) |
//! | top of RAM | initrd                                 |

pub mod bzimage;
pub mod mptable;
pub mod params;
pub mod regs;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Where the kernel's high part is loaded (bzImage) / the lowest ELF address accepted.
pub const HIMEM_START: u64 = 0x10_0000;
/// The zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum command-line size (including the NUL).
pub const CMDLINE_MAX: usize = 4096;

/// Errors while loading the kernel or writing boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel file is neither an x86-64 ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel this VMM can boot (an x86-64 ELF vmlinux or a bzImage): {elf}; {bz}")]
    NotAKernel {
        /// Path.
        path: PathBuf,
        /// Why ELF loading failed.
        elf: linux_loader::loader::Error,
        /// Why bzImage loading failed.
        bz: linux_loader::loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The initrd is gzip but does not unpack.
    #[error("initrd {path} is gzip-compressed but cannot be unpacked: {source}")]
    InitrdGzip {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd of {0} bytes does not fit in guest memory")]
    InitrdTooLarge(u64),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line cannot be placed in guest memory.
    #[error("invalid kernel command line: {0}")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// Writing to guest memory failed.
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Writing the zero page failed.
    #[error("cannot write boot data into guest memory: {0}")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// The e820 map does not fit in the zero page.
    #[error("cannot write boot data into guest memory: too many e820 entries ({0})")]
    TooManyE820(usize),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// What the boot vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// Guest-physical address of the zero page.
    pub zero_page: u64,
}

/// Everything needed to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initrd path.
    pub initrd: Option<&'a Path>,
    /// The full kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub vcpus: usize,
}

/// Loads the kernel, initrd and command line and writes the zero page, e820 map, MP
/// table, GDT and page tables. Returns where the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<BootInfo, BootError> {
    let mut file = File::open(spec.kernel).map_err(|source| BootError::OpenKernel {
        path: spec.kernel.to_path_buf(),
        source,
    })?;
    let (entry, setup_header) =
        match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => (r.kernel_load.0, None),
            Err(elf_err) => {
                match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
                    // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
                    Ok(r) => (r.kernel_load.0 + 0x200, r.setup_header),
                    Err(bz_err) => {
                        return Err(BootError::NotAKernel {
                            path: spec.kernel.to_path_buf(),
                            elf: elf_err,
                            bz: bz_err,
                        })
                    }
                }
            }
        };

    let mut cmdline =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();

    let initrd = match spec.initrd {
        None => None,
        Some(path) => Some(load_initrd(mem, path)?),
    };

    let ram = mem_ranges(mem);
    let zp = params::ZeroPage {
        setup_header,
        cmdline_addr: CMDLINE_START,
        cmdline_len,
        initrd,
        ram: &ram,
    };
    params::write_zero_page(mem, GuestAddress(ZERO_PAGE_START), &zp)?;
    mptable::write(mem, spec.vcpus)?;
    regs::write_boot_tables(mem).map_err(BootError::Memory)?;
    Ok(BootInfo {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

/// A gzip-compressed initramfs is handed to the guest unpacked (a cpio archive, which
/// every kernel accepts as well): unpacking in the VMM takes milliseconds, in a guest
/// kernel run by a software backend's instruction emulator it takes most of a minute.
/// Anything else is passed through unchanged. `limit` bounds the unpacked size.
pub fn unpack_initrd(data: Vec<u8>, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if !data.starts_with(&[0x1f, 0x8b]) {
        return Ok(data);
    }
    let mut out = Vec::with_capacity(data.len() * 3);
    let n = flate2::read::MultiGzDecoder::new(&data[..])
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)?;
    if n as u64 > limit {
        return Err(std::io::Error::other(format!(
            "it unpacks to more than {limit} bytes"
        )));
    }
    Ok(out)
}

fn mem_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Places the initrd at the top of low RAM (below 896 MiB so any kernel can reach it),
/// page aligned. Returns (address, size).
fn load_initrd(mem: &GuestMemoryMmap, path: &Path) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::Initrd {
        path: path.to_path_buf(),
        source,
    })?;
    let low_end = mem_ranges(mem)
        .first()
        .map(|(s, l)| s + l)
        .unwrap_or(0)
        .min(0x3800_0000);
    let data = unpack_initrd(data, low_end / 2).map_err(|source| BootError::InitrdGzip {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= 16 << 20)
        .ok_or(BootError::InitrdTooLarge(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(BootError::Memory)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_initrds_are_unpacked_others_passed_through() {
        let cpio = b"070701fake cpio archive".repeat(100);
        assert_eq!(unpack_initrd(gz(&cpio), 1 << 20).unwrap(), cpio);
        // Two concatenated members (as `cat a.gz b.gz` makes).
        let mut two = gz(b"first ");
        two.extend(gz(b"second"));
        assert_eq!(unpack_initrd(two, 1 << 20).unwrap(), b"first second");
        assert_eq!(unpack_initrd(cpio.clone(), 10).unwrap(), cpio);
        // Too large once unpacked, and broken.
        assert!(unpack_initrd(gz(&cpio), 100).is_err());
        let mut broken = gz(&cpio);
        broken.truncate(20);
        assert!(unpack_initrd(broken, 1 << 20).is_err());
    }
}
