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
//! | 0xe0000    | ACPI: RSDP, then the tables (`acpi`)   |
//! | 0x100000   | kernel (ELF at its physical addresses) |
//! | top of RAM | initrd                                 |
//!
//! The kernel is an ELF vmlinux, loaded at its physical addresses and entered at its
//! 64-bit entry, or a bzImage. A bzImage is either unpacked here (`bzimage`: its
//! compressed payload is the same ELF vmlinux, booted the same way, with the bzImage's
//! setup header in the zero page) or loaded whole at 0x100000 and entered at its 64-bit
//! entry, where the kernel's own decompressor runs. [`bzimage::Unpacker::choose`]
//! decides which.

pub mod acpi;
pub mod bzimage;
pub mod mptable;
pub mod params;
pub mod regs;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use bzimage::{BzImageError, Unpacker};

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
    /// The kernel file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
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
        /// Why it is not a bzImage either.
        bz: String,
    },
    /// The VMM was to unpack a bzImage and cannot.
    #[error("cannot unpack the bzImage {path}: {source}{}", never_hint(source))]
    Unpack {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: BzImageError,
    },
    /// What a bzImage unpacked to does not load as an ELF vmlinux.
    #[error("the kernel unpacked from the bzImage {path} does not load: {source}")]
    UnpackedElf {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: linux_loader::loader::Error,
    },
    /// The command line is longer than the kernel takes (its setup header says).
    #[error("the kernel command line has {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Length without the NUL.
        len: usize,
        /// The setup header's `cmdline_size`.
        max: u32,
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
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
}

fn never_hint(e: &BzImageError) -> &'static str {
    if e.guest_may_unpack() {
        " (with --unpack-bzimage never the kernel's own decompressor unpacks it)"
    } else {
        ""
    }
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
    /// Who unpacks a bzImage ([`Unpacker::choose`]).
    pub unpacker: Unpacker,
    /// The ACPI tables to write (None: an ACPI-less machine, described by the MP table
    /// only). The MP table is written either way, for kernels booted with `acpi=off`.
    pub acpi: Option<acpi::AcpiSpec<'a>>,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
struct LoadedKernel {
    /// 64-bit entry point.
    entry: u64,
    /// A bzImage's setup header (for the zero page); None for an ELF vmlinux.
    setup_header: Option<setup_header>,
}

/// Loads the kernel, initrd and command line and writes the zero page, e820 map, MP
/// table, ACPI tables, GDT and page tables. Returns where the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<BootInfo, BootError> {
    let LoadedKernel {
        entry,
        setup_header,
    } = load_kernel(mem, spec.kernel, spec.unpacker)?;

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
    // From boot protocol 2.06 a bzImage says how long a command line it takes.
    if let Some(h) = setup_header.filter(|h| h.version >= 0x0206 && h.cmdline_size > 0) {
        if cmdline_len > h.cmdline_size as usize {
            return Err(BootError::CmdlineTooLong {
                len: cmdline_len,
                max: h.cmdline_size,
            });
        }
    }

    let initrd = match spec.initrd {
        None => None,
        Some(path) => Some(load_initrd(mem, path)?),
    };

    let ram = mem_ranges(mem);
    let rsdp = match &spec.acpi {
        Some(a) => Some(acpi::write(mem, a)?),
        None => None,
    };
    let zp = params::ZeroPage {
        setup_header,
        cmdline_addr: CMDLINE_START,
        cmdline_len,
        initrd,
        ram: &ram,
        rsdp,
    };
    params::write_zero_page(mem, GuestAddress(ZERO_PAGE_START), &zp)?;
    mptable::write(mem, spec.vcpus)?;
    regs::write_boot_tables(mem).map_err(BootError::Memory)?;
    Ok(BootInfo {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

/// Loads the kernel: an ELF vmlinux, else a bzImage, unpacked by whom `unpacker` says.
fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    unpacker: Unpacker,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    if let Unpacker::Vmm { strict } = unpacker {
        let image = std::fs::read(path).map_err(|source| BootError::ReadKernel {
            path: path.to_path_buf(),
            source,
        })?;
        match load_unpacked(mem, path, &image) {
            Ok(k) => return Ok(k),
            Err(UnpackFailure::Unpack(BzImageError::NotBzImage)) => {
                return Err(BootError::NotAKernel {
                    path: path.to_path_buf(),
                    elf: elf_err,
                    bz: BzImageError::NotBzImage.to_string(),
                })
            }
            Err(UnpackFailure::Unpack(e)) if !strict && e.guest_may_unpack() => {
                tracing::warn!(
                    kernel = %path.display(),
                    "the VMM cannot unpack this bzImage ({e}): the kernel's own \
                     decompressor will (slow under a software KVM)"
                );
            }
            Err(UnpackFailure::Unpack(source)) => {
                return Err(BootError::Unpack {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(UnpackFailure::Elf(source)) => {
                return Err(BootError::UnpackedElf {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0 + 0x200,
            setup_header: r.setup_header,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.to_path_buf(),
            elf: elf_err,
            bz: bz_err.to_string(),
        }),
    }
}

/// Why [`load_unpacked`] failed.
#[derive(Debug)]
enum UnpackFailure {
    /// Unpacking.
    Unpack(BzImageError),
    /// Loading the ELF that came out.
    Elf(linux_loader::loader::Error),
}

/// Unpacks a bzImage's kernel and loads it as an ELF vmlinux (at its physical
/// addresses, entered at its 64-bit entry), keeping the bzImage's setup header.
fn load_unpacked(
    mem: &GuestMemoryMmap,
    path: &Path,
    image: &[u8],
) -> Result<LoadedKernel, UnpackFailure> {
    let started = std::time::Instant::now();
    let bz = bzimage::BzImage::parse(image).map_err(UnpackFailure::Unpack)?;
    let compression = bz.compression().map_err(UnpackFailure::Unpack)?;
    let elf = bz
        .unpack(bzimage::UNPACK_LIMIT)
        .map_err(UnpackFailure::Unpack)?;
    let r = Elf::load(
        mem,
        None,
        &mut std::io::Cursor::new(&elf),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(UnpackFailure::Elf)?;
    tracing::info!(
        kernel = %path.display(),
        %compression,
        packed = bz.payload.len(),
        unpacked = elf.len(),
        entry = format_args!("{:#x}", r.kernel_load.0),
        ms = started.elapsed().as_millis() as u64,
        "bzImage unpacked by the VMM"
    );
    Ok(LoadedKernel {
        entry: r.kernel_load.0,
        setup_header: Some(bz.header),
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

    use bzimage::tests::{bzimage, compress, tiny_elf};
    use bzimage::Compression;
    use linux_loader::loader::bootparam::boot_params;

    /// A file in the temporary directory, removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str, data: &[u8]) -> Self {
            let p = std::env::temp_dir().join(format!("dvmm-boot-{}-{name}", std::process::id()));
            std::fs::write(&p, data).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn guest_ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn spec<'a>(kernel: &'a Path, cmdline: &'a str, unpacker: Unpacker) -> BootSpec<'a> {
        BootSpec {
            kernel,
            initrd: None,
            cmdline,
            vcpus: 1,
            unpacker,
            acpi: None,
        }
    }

    const STRICT: Unpacker = Unpacker::Vmm { strict: true };
    const LENIENT: Unpacker = Unpacker::Vmm { strict: false };

    #[test]
    fn an_unpacked_bzimage_boots_like_its_vmlinux() {
        let elf = tiny_elf(0x4000);
        let vmlinux = TempFile::new("vmlinux", &elf);
        let bz = TempFile::new(
            "bz-xz",
            &bzimage(&compress(Compression::Xz, &elf), 4, 0x800),
        );

        let mem = guest_ram();
        let direct = load(&mem, &spec(&vmlinux.0, "console=ttyS0", STRICT)).unwrap();
        let direct_bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(
            { direct_bp.hdr.version },
            0,
            "an ELF vmlinux has no setup header"
        );

        for unpacker in [STRICT, LENIENT] {
            let mem = guest_ram();
            let info = load(&mem, &spec(&bz.0, "console=ttyS0", unpacker)).unwrap();
            assert_eq!(info.entry, direct.entry);
            assert_eq!(info.entry, 0x100_0000);
            // Both PT_LOAD segments at their physical addresses.
            let mut seg = [0u8; 0x80];
            mem.read_slice(&mut seg, GuestAddress(0x100_0000)).unwrap();
            assert_eq!(&seg[..], &elf[0x1000..0x1080]);
            mem.read_slice(&mut seg, GuestAddress(0x120_0000)).unwrap();
            assert_eq!(&seg[..], &elf[0x1080..0x1100]);
            // Nothing at the bzImage's own load address.
            let mut low = [0u8; 16];
            mem.read_slice(&mut low, GuestAddress(HIMEM_START)).unwrap();
            assert_eq!(low, [0; 16]);
            // The bzImage's setup header informs the zero page.
            let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
            assert_eq!({ bp.hdr.version }, 0x020f);
            assert_eq!({ bp.hdr.header }, 0x5372_6448);
            assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
            assert_eq!({ bp.hdr.init_size }, 0x100_0000);
        }
    }

    #[test]
    fn the_guest_decompressor_path_is_kept() {
        let elf = tiny_elf(0x4000);
        let bz = TempFile::new(
            "bz-guest",
            &bzimage(&compress(Compression::Gzip, &elf), 4, 0),
        );
        let mem = guest_ram();
        let info = load(&mem, &spec(&bz.0, "console=ttyS0", Unpacker::Guest)).unwrap();
        // linux-loader puts the protected-mode part at 0x100000, entered 0x200 in.
        assert_eq!(info.entry, HIMEM_START + 0x200);
        let mut seg = [0u8; 0x80];
        mem.read_slice(&mut seg, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(seg, [0; 0x80], "nothing unpacked");
        let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.version }, 0x020f);
    }

    #[test]
    fn what_the_vmm_cannot_unpack_goes_to_the_guest_unless_strict() {
        let lzo = TempFile::new(
            "bz-lzo",
            &bzimage(b"\x89LZO\x00\x0d\x0a\x1a\x0a\x10\x30 rest", 4, 0),
        );
        let info = load(&guest_ram(), &spec(&lzo.0, "", LENIENT)).unwrap();
        assert_eq!(info.entry, HIMEM_START + 0x200);
        let e = load(&guest_ram(), &spec(&lzo.0, "", STRICT)).unwrap_err();
        assert!(matches!(e, BootError::Unpack { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("lzo") && msg.contains("--unpack-bzimage never"),
            "{msg}"
        );

        // A broken image is an error either way: the guest could not unpack it either.
        let mut payload = compress(Compression::Zstd, &tiny_elf(0x4000));
        let n = payload.len();
        payload[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        let broken = TempFile::new("bz-broken", &bzimage(&payload, 4, 0));
        for unpacker in [STRICT, LENIENT] {
            let e = load(&guest_ram(), &spec(&broken.0, "", unpacker)).unwrap_err();
            assert!(
                matches!(
                    e,
                    BootError::Unpack {
                        source: BzImageError::SizeMismatch { .. },
                        ..
                    }
                ),
                "{e}"
            );
            assert!(!e.to_string().contains("--unpack-bzimage"), "{e}");
        }

        // Unpacked, but not an x86-64 ELF.
        let mut not_x86 = tiny_elf(0x4000);
        not_x86[18] = 183; // EM_AARCH64
        let arm = TempFile::new(
            "bz-arm",
            &bzimage(&compress(Compression::Lz4, &not_x86), 4, 0),
        );
        let e = load(&guest_ram(), &spec(&arm.0, "", LENIENT)).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::Unpack {
                    source: BzImageError::NotX86_64 { machine: 183, .. },
                    ..
                }
            ),
            "{e}"
        );
        // An x86-64 ELF the loader refuses (entry below 1 MiB).
        let mut low = tiny_elf(0x4000);
        low[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        let low = TempFile::new("bz-low", &bzimage(&compress(Compression::Lzma, &low), 4, 0));
        let e = load(&guest_ram(), &spec(&low.0, "", LENIENT)).unwrap_err();
        assert!(matches!(e, BootError::UnpackedElf { .. }), "{e}");
    }

    #[test]
    fn neither_elf_nor_bzimage() {
        let junk = TempFile::new("junk", &[0x42u8; 4096]);
        for unpacker in [STRICT, LENIENT, Unpacker::Guest] {
            let e = load(&guest_ram(), &spec(&junk.0, "", unpacker)).unwrap_err();
            assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        }
    }

    #[test]
    fn the_setup_header_bounds_the_command_line() {
        let mut img = bzimage(&compress(Compression::Bzip2, &tiny_elf(0x4000)), 4, 0);
        img[0x238..0x23c].copy_from_slice(&16u32.to_le_bytes());
        let bz = TempFile::new("bz-cmdline", &img);
        assert!(load(&guest_ram(), &spec(&bz.0, "console=ttyS0", STRICT)).is_ok());
        let e = load(&guest_ram(), &spec(&bz.0, "console=ttyS0 quiet=1", STRICT)).unwrap_err();
        assert!(
            matches!(e, BootError::CmdlineTooLong { len: 21, max: 16 }),
            "{e}"
        );
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
