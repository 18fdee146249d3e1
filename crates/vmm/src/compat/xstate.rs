//! XSAVE, XRSTOR, XGETBV and XSETBV, emulated against the vCPU's real extended state.
//!
//! A software KVM backend's instruction emulator cannot run XSAVE or XRSTOR. Guest
//! user code runs natively on the host CPU and uses whatever vector registers the host
//! has (AVX, AVX-512), so the guest kernel must save and restore the whole extended
//! state on every context switch, exactly as on hardware, or one process sees (and
//! corrupts) another's ymm/zmm registers. The VMM therefore does the kernel's XSAVE and
//! XRSTOR itself on their emulation-failure exits:
//!
//! * the vCPU's extended state comes from `KVM_GET_XSAVE` (the standard, non-compacted
//!   layout: legacy region, header, then each component at the offset CPUID leaf 0xD
//!   gives) and goes back with `KVM_SET_XSAVE`; XCR0 from `KVM_GET_XCRS` /
//!   `KVM_SET_XCRS`;
//! * the guest's XSAVE area is reached through its page tables like every memory operand
//!   of [`super::emulate`], with the faults the CPU raises (#GP(0) for an area that is
//!   not 64-byte aligned or a bad header or MXCSR value, #PF for an unmapped or
//!   read-only page, #UD without CR4.OSXSAVE) and nothing written or loaded before the
//!   instruction is known not to fault;
//! * the requested-feature bitmap is RFBM = XCR0 AND EDX:EAX, and the rules are the
//!   standard form's of the Intel SDM (vol. 1, 13.7-13.8): XSAVE writes each requested
//!   component and sets XSTATE_BV\[i\] = XINUSE\[i\] for the requested ones (the other
//!   header bytes unchanged); XRSTOR initialises a requested component whose
//!   XSTATE_BV bit is clear and loads it otherwise, loads MXCSR when RFBM\[1\] or
//!   RFBM\[2\] is set, and refuses (#GP) a header with XCOMP_BV or reserved bytes set
//!   or XSTATE_BV bits outside XCR0.
//!
//! The compacted and supervisor forms (XSAVEC, XSAVES, XRSTORS) and XSAVEOPT are hidden
//! from the guest (`clearcpuid=`), so its kernel uses the standard form only.

use iced_x86::{Instruction, Mnemonic};

use super::emulate::{Access, Cpu, Exception, Stop};

/// The size of `KVM_GET_XSAVE`'s region: the VMM handles layouts that fit in it.
pub const AREA: usize = 4096;
/// The legacy region and the header: the first component (2, AVX) starts here.
const EXTENDED: usize = 576;

/// Byte ranges of the legacy region (the FXSAVE image).
mod legacy {
    use std::ops::Range;
    /// FCW, FSW, abridged FTW, FOP, FIP, FDP: x87 state (component 0).
    pub const X87_CONTROL: Range<usize> = 0..24;
    /// MXCSR and MXCSR_MASK: written and loaded with component 1 or 2.
    pub const MXCSR: Range<usize> = 24..32;
    /// ST0-ST7 / MM0-MM7: x87 state (component 0).
    pub const X87_REGS: Range<usize> = 32..160;
    /// XMM0-XMM15: SSE state (component 1).
    pub const XMM: Range<usize> = 160..416;
    /// The header's XSTATE_BV.
    pub const XSTATE_BV: Range<usize> = 512..520;
    /// The header after XSTATE_BV: XCOMP_BV and reserved bytes (bytes 23:8 must be 0
    /// for the standard form of XRSTOR).
    pub const HEADER_CHECKED: Range<usize> = 520..536;
}

/// The x87 control word after FINIT / the x87 init state.
const FCW_INIT: u16 = 0x037f;
/// CR4.OSXSAVE.
const CR4_OSXSAVE: u64 = 1 << 18;

/// Where each state component lives in the standard XSAVE layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The XCR0 bits the CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
    pub supported: u64,
    /// (offset, size) of each component 2..63; (0, 0) where the CPU has none.
    pub components: [(u32, u32); 64],
}

impl Layout {
    /// The host CPU's layout (the guest sees the host's CPUID on a software backend,
    /// and `KVM_GET_XSAVE` uses the host's offsets); None without XSAVE or when a
    /// supported component lies beyond [`AREA`] (AMX tiles: not handled).
    pub fn host() -> Option<&'static Layout> {
        static HOST: std::sync::OnceLock<Option<Layout>> = std::sync::OnceLock::new();
        HOST.get_or_init(|| {
            if !std::arch::is_x86_feature_detected!("xsave") {
                return None;
            }
            // CPUID is available on every x86-64 CPU; leaf 0xD exists because the CPU
            // has XSAVE (checked above).
            let leaf = |sub: u32| std::arch::x86_64::__cpuid_count(0xd, sub);
            let l0 = leaf(0);
            let supported = u64::from(l0.eax) | (u64::from(l0.edx) << 32);
            let mut components = [(0, 0); 64];
            for (i, c) in components.iter_mut().enumerate().skip(2) {
                // Supervisor components (IA32_XSS) are not in XCR0's bitmap.
                if supported & (1 << i) != 0 {
                    let l = leaf(i as u32);
                    *c = (l.ebx, l.eax);
                }
            }
            Layout::new(supported, components)
        })
        .as_ref()
    }

    /// A layout from its parts; None if a supported component lies beyond [`AREA`] or
    /// inside the legacy region and header.
    pub fn new(supported: u64, components: [(u32, u32); 64]) -> Option<Layout> {
        let l = Layout {
            supported,
            components,
        };
        let fits = (2..64).filter(|i| supported & (1 << i) != 0).all(|i| {
            let (off, size) = l.components[i];
            off as usize >= EXTENDED && (off as usize + size as usize) <= AREA
        });
        fits.then_some(l)
    }

    /// The byte range of component `i` (2..63) in the area.
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let (off, size) = self.components[i];
        off as usize..off as usize + size as usize
    }

    /// The extended components (2..63) set in `bits`.
    fn extended(bits: u64) -> impl Iterator<Item = usize> {
        (2..64).filter(move |i| bits & (1 << i) != 0)
    }

    /// Whether `xcr0` is a value XSETBV accepts: x87 set, AVX only with SSE, the three
    /// AVX-512 components together and only with AVX, nothing the CPU lacks.
    pub fn valid_xcr0(&self, xcr0: u64) -> bool {
        const X87: u64 = 1;
        const SSE: u64 = 2;
        const AVX: u64 = 4;
        const AVX512: u64 = 0xe0;
        const MPX: u64 = 0x18;
        xcr0 & X87 != 0
            && xcr0 & !self.supported == 0
            && (xcr0 & AVX == 0 || xcr0 & SSE != 0)
            && (xcr0 & AVX512 == 0 || (xcr0 & AVX512 == AVX512 && xcr0 & AVX != 0))
            && (xcr0 & MPX == 0 || xcr0 & MPX == MPX)
    }
}

/// The vCPU's extended state for the instructions of this module (the caller fetches it
/// with `KVM_GET_XSAVE` and `KVM_GET_XCRS` and writes back what changed).
pub struct XState {
    /// XCR0.
    pub xcr0: u64,
    /// The extended state in the standard layout (`KVM_GET_XSAVE`'s region, bytes).
    pub area: Box<[u8; AREA]>,
    /// Where the components are.
    pub layout: &'static Layout,
    /// The XCR0 bits KVM lets this vCPU set (its CPUID leaf 0xD; KVM_SET_XCRS refuses
    /// others): XSETBV takes only these, of those the CPU supports.
    pub allowed: u64,
    /// Set when [`Self::area`] changed (XRSTOR): write it back with `KVM_SET_XSAVE`.
    pub area_changed: bool,
    /// Set when [`Self::xcr0`] changed (XSETBV): write it back with `KVM_SET_XCRS`.
    pub xcr0_changed: bool,
}

impl XState {
    fn xinuse(&self) -> u64 {
        u64::from_le_bytes(self.area[legacy::XSTATE_BV].try_into().unwrap_or([0; 8]))
    }

    /// The MXCSR bits the CPU lets software set (MXCSR_MASK, 0 meaning the default
    /// 0xffbf).
    fn mxcsr_mask(&self) -> u32 {
        let m = u32::from_le_bytes(self.area[28..32].try_into().unwrap_or([0; 4]));
        if m == 0 {
            0xffbf
        } else {
            m
        }
    }
}

/// Whether [`run`] handles this instruction (the caller then supplies [`Cpu::xstate`]).
pub fn handles(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Xsave
            | Mnemonic::Xsave64
            | Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Xgetbv
            | Mnemonic::Xsetbv
    )
}

fn ud() -> Stop {
    Stop::Fault(Exception::ud())
}

fn gp() -> Stop {
    Stop::Fault(Exception::gp(0))
}

/// `xsave`/`xsave64`/`xrstor`/`xrstor64 m`, `xgetbv`, `xsetbv`.
pub fn run(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    if cpu.sregs.cr4 & CR4_OSXSAVE == 0 || insn.has_lock_prefix() {
        return Err(ud());
    }
    state(cpu)?;
    match insn.mnemonic() {
        Mnemonic::Xgetbv => xgetbv(cpu),
        Mnemonic::Xsetbv => xsetbv(cpu),
        Mnemonic::Xsave | Mnemonic::Xsave64 => xsave(insn, cpu),
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => xrstor(insn, cpu),
        m => Err(Stop::Refuse(format!("{m:?} is not an XSAVE instruction"))),
    }
}

/// The extended state the caller supplied (refused when there is none).
fn state<'c>(cpu: &'c Cpu<'_>) -> Result<&'c XState, Stop> {
    cpu.xstate.as_deref().ok_or_else(no_state)
}

fn no_state() -> Stop {
    Stop::Refuse("the extended state is not available to the emulator".into())
}

/// EDX:EAX.
fn edx_eax(cpu: &Cpu<'_>) -> u64 {
    (cpu.regs.rdx << 32) | (cpu.regs.rax & 0xffff_ffff)
}

/// XGETBV: ECX 0 reads XCR0, ECX 1 XCR0 AND XINUSE; anything else #GP(0).
fn xgetbv(cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    let x = state(cpu)?;
    let v = match cpu.regs.rcx & 0xffff_ffff {
        0 => x.xcr0,
        1 => x.xcr0 & x.xinuse(),
        _ => return Err(gp()),
    };
    cpu.regs.rax = v & 0xffff_ffff;
    cpu.regs.rdx = v >> 32;
    Ok(())
}

/// XSETBV: CPL 0 and ECX 0 only, and a value [`Layout::valid_xcr0`] accepts within
/// [`XState::allowed`].
fn xsetbv(cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    let v = edx_eax(cpu);
    if cpu.cpl() != 0 || cpu.regs.rcx & 0xffff_ffff != 0 {
        return Err(gp());
    }
    let x = cpu.xstate.as_deref_mut().ok_or_else(no_state)?;
    if !x.layout.valid_xcr0(v) || v & !x.allowed != 0 {
        return Err(gp());
    }
    x.xcr0_changed |= x.xcr0 != v;
    x.xcr0 = v;
    Ok(())
}

/// The XSAVE area's address: #GP(0) unless 64-byte aligned.
fn area_address(insn: &Instruction, cpu: &Cpu<'_>) -> Result<u64, Stop> {
    if insn.op0_kind() != iced_x86::OpKind::Memory {
        return Err(Stop::Refuse("expected a memory operand".into()));
    }
    let ea = cpu.effective_address(insn)?;
    if ea % 64 != 0 {
        return Err(gp());
    }
    Ok(ea)
}

/// The byte ranges of the area that the requested components `rfbm` occupy.
fn requested_ranges(layout: &Layout, rfbm: u64) -> Vec<std::ops::Range<usize>> {
    let mut r = Vec::new();
    if rfbm & 1 != 0 {
        r.push(legacy::X87_CONTROL);
        r.push(legacy::X87_REGS);
    }
    if rfbm & 6 != 0 {
        r.push(legacy::MXCSR);
    }
    if rfbm & 2 != 0 {
        r.push(legacy::XMM);
    }
    r.extend(Layout::extended(rfbm).map(|i| layout.range(i)));
    r
}

/// The 32-bit x87 pointer format of the forms without REX.W in 64-bit mode: FIP and
/// FDP are 32-bit offsets followed by a selector, which the VMM does not know (0).
fn narrow_x87_pointers(bytes: &mut [u8]) {
    bytes[12..16].fill(0);
    bytes[20..24].fill(0);
}

/// XSAVE: the requested components of the vCPU's state into the area, and their
/// XSTATE_BV bits.
fn xsave(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    let ea = area_address(insn, cpu)?;
    let x = state(cpu)?;
    let rfbm = x.xcr0 & edx_eax(cpu);
    let mut image = x.area.clone();
    if insn.mnemonic() == Mnemonic::Xsave {
        narrow_x87_pointers(&mut image[..]);
    }
    let mut ranges = requested_ranges(x.layout, rfbm);
    ranges.push(legacy::XSTATE_BV);
    // Every page first, so that a fault leaves memory as it was.
    for r in &ranges {
        cpu.check(ea + r.start as u64, r.len(), Access::Write)?;
    }
    // XSTATE_BV: the requested bits from XINUSE, the others as they are in memory.
    let mut bv = [0u8; 8];
    cpu.read(ea + legacy::XSTATE_BV.start as u64, &mut bv)?;
    let bv = (u64::from_le_bytes(bv) & !rfbm) | (x.xinuse() & rfbm);
    image[legacy::XSTATE_BV].copy_from_slice(&bv.to_le_bytes());
    for r in ranges {
        cpu.write(ea + r.start as u64, &image[r])?;
    }
    Ok(())
}

/// XRSTOR (standard form): the requested components from the area, or their initial
/// values where XSTATE_BV says so.
fn xrstor(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    let ea = area_address(insn, cpu)?;
    let x = state(cpu)?;
    let rfbm = x.xcr0 & edx_eax(cpu);
    let mut mem = vec![0u8; AREA];
    cpu.read(ea, &mut mem[..EXTENDED])?;
    let bv = u64::from_le_bytes(mem[legacy::XSTATE_BV].try_into().unwrap_or([0; 8]));
    if mem[legacy::HEADER_CHECKED].iter().any(|&b| b != 0) || bv & !x.xcr0 != 0 {
        return Err(gp());
    }
    for i in Layout::extended(rfbm & bv) {
        let r = x.layout.range(i);
        cpu.read(ea + r.start as u64, &mut mem[r])?;
    }
    if insn.mnemonic() == Mnemonic::Xrstor {
        narrow_x87_pointers(&mut mem);
    }
    let mxcsr = u32::from_le_bytes(mem[24..28].try_into().unwrap_or([0; 4]));
    if rfbm & 6 != 0 && mxcsr & !x.mxcsr_mask() != 0 {
        return Err(gp());
    }
    // Nothing can fault from here on.
    let x = cpu.xstate.as_deref_mut().ok_or_else(no_state)?;
    let mut next = x.area.clone();
    let load = |next: &mut Box<[u8; AREA]>, r: std::ops::Range<usize>, from_memory: bool| {
        if from_memory {
            next[r.clone()].copy_from_slice(&mem[r]);
        } else {
            next[r].fill(0);
        }
    };
    if rfbm & 1 != 0 {
        let m = bv & 1 != 0;
        load(&mut next, legacy::X87_CONTROL, m);
        load(&mut next, legacy::X87_REGS, m);
        if !m {
            next[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        }
    }
    if rfbm & 2 != 0 {
        load(&mut next, legacy::XMM, bv & 2 != 0);
    }
    if rfbm & 6 != 0 {
        next[24..28].copy_from_slice(&mxcsr.to_le_bytes());
    }
    for i in Layout::extended(rfbm) {
        load(&mut next, x.layout.range(i), bv & (1 << i) != 0);
    }
    let mut inuse = (x.xinuse() & !rfbm) | (bv & rfbm);
    if rfbm & 6 != 0 {
        // MXCSR was loaded; KVM_SET_XSAVE takes it only with SSE or AVX marked in use
        // (SSE then counts as in use with its registers as they are, which XINUSE
        // allows).
        if inuse & 6 == 0 {
            inuse |= 2;
        }
    }
    next[legacy::XSTATE_BV].copy_from_slice(&inuse.to_le_bytes());
    x.area_changed |= next[..] != x.area[..];
    x.area = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_regs, kvm_sregs};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::compat::emulate::{Failed, Outcome};
    use crate::paging::tests::{map_with, memory};
    use crate::paging::PageTables;

    /// Two writable pages (at separate physical pages), a read-only one, kernel text.
    const AREA_VA: u64 = 0xffff_8880_0010_0000;
    const RO: u64 = 0xffff_8880_0010_2000;
    const UNMAPPED: u64 = 0xffff_8880_0030_0000;
    const TEXT: u64 = 0xffff_ffff_8100_0000;

    const XSAVE64_RDI: &[u8] = &[0x48, 0x0f, 0xae, 0x27];
    const XRSTOR64_RDI: &[u8] = &[0x48, 0x0f, 0xae, 0x2f];
    const XSAVE_RDI: &[u8] = &[0x0f, 0xae, 0x27];
    const XGETBV: &[u8] = &[0x0f, 0x01, 0xd0];
    const XSETBV: &[u8] = &[0x0f, 0x01, 0xd1];

    /// x87, SSE, AVX and the three AVX-512 components, at Intel's offsets.
    const XCR0: u64 = 0xe7;

    fn layout() -> &'static Layout {
        let mut c = [(0, 0); 64];
        c[2] = (576, 256);
        c[5] = (1088, 64);
        c[6] = (1152, 512);
        c[7] = (1664, 1024);
        Box::leak(Box::new(Layout::new(XCR0, c).unwrap()))
    }

    struct Machine {
        mem: GuestMemoryMmap,
        regs: kvm_regs,
        sregs: kvm_sregs,
        x: XState,
    }

    /// The vCPU's state: every byte of component i is 0x10 + i (the legacy region's
    /// x87 part 0x10, XMM 0x11), MXCSR 0x1f80, MXCSR_MASK 0xffff, XINUSE x87|SSE|AVX.
    fn vcpu_area(l: &Layout) -> Box<[u8; AREA]> {
        let mut a = Box::new([0u8; AREA]);
        a[legacy::X87_CONTROL].fill(0x10);
        a[legacy::X87_REGS].fill(0x10);
        a[legacy::XMM].fill(0x11);
        a[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        a[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for i in Layout::extended(XCR0) {
            a[l.range(i)].fill(0x10 + i as u8);
        }
        a[legacy::XSTATE_BV].copy_from_slice(&7u64.to_le_bytes());
        a
    }

    impl Machine {
        fn new() -> Self {
            let mem = memory();
            let pt = map_with(
                &mem,
                &[
                    (AREA_VA, 0x10_0000, 3),
                    // The second page is not physically next to the first.
                    (AREA_VA + 0x1000, 0x20_0000, 3),
                    (RO, 0x10_2000, 1),
                    (TEXT, 0x30_0000, 3),
                ],
            );
            let mut sregs = kvm_sregs {
                efer: (1 << 10) | (1 << 8),
                cr0: 0x8001_0001,
                cr3: pt.cr3,
                cr4: (1 << 5) | CR4_OSXSAVE,
                ..Default::default()
            };
            sregs.cs.l = 1;
            sregs.cs.selector = 0x10;
            let regs = kvm_regs {
                rip: TEXT + 0x100,
                rflags: 0x2,
                rdi: AREA_VA,
                rax: 0xffff_ffff,
                rdx: 0xffff_ffff,
                ..Default::default()
            };
            let layout = layout();
            Machine {
                mem,
                regs,
                sregs,
                x: XState {
                    xcr0: XCR0,
                    area: vcpu_area(layout),
                    layout,
                    allowed: XCR0,
                    area_changed: false,
                    xcr0_changed: false,
                },
            }
        }

        fn run(&mut self, bytes: &[u8]) -> Outcome {
            let f = Failed::decode(bytes, self.regs.rip, 64).unwrap();
            assert_eq!(f.needs_xstate(), handles(f.insn.mnemonic()));
            f.resolve(&mut Cpu {
                regs: &mut self.regs,
                sregs: &self.sregs,
                mem: Some(&self.mem),
                mxcsr: None,
                xstate: Some(&mut self.x),
            })
        }

        fn gpa(&self, gva: u64) -> u64 {
            PageTables::from_regs(self.sregs.cr3, self.sregs.cr4)
                .translate(&self.mem, gva)
                .unwrap()
        }

        /// The guest's bytes at `gva` (crossing pages as the guest sees them).
        fn guest(&self, gva: u64, len: usize) -> Vec<u8> {
            (0..len as u64)
                .map(|i| {
                    self.mem
                        .read_obj::<u8>(GuestAddress(self.gpa(gva + i)))
                        .unwrap()
                })
                .collect()
        }

        fn fill_guest(&self, gva: u64, bytes: &[u8]) {
            for (i, b) in bytes.iter().enumerate() {
                let at = self.gpa(gva + i as u64);
                self.mem.write_obj(*b, GuestAddress(at)).unwrap();
            }
        }

        fn request(&mut self, edx_eax: u64) {
            self.regs.rax = edx_eax & 0xffff_ffff;
            self.regs.rdx = edx_eax >> 32;
        }
    }

    fn bv(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(bytes[512..520].try_into().unwrap())
    }

    #[test]
    fn layout_checks() {
        let l = layout();
        assert_eq!(l.range(2), 576..832);
        assert_eq!(l.range(7), 1664..2688);
        let mut c = l.components;
        c[7] = (3584, 1024);
        assert!(Layout::new(XCR0, c).is_none(), "beyond the 4 KiB region");
        c[7] = (64, 8);
        assert!(Layout::new(XCR0, c).is_none(), "inside the legacy region");
        // The host's layout, when it has one, puts AVX right after the header.
        if let Some(h) = Layout::host() {
            if h.supported & 4 != 0 {
                assert_eq!(h.range(2), 576..832);
            }
        }
    }

    #[test]
    fn xsave_writes_the_requested_components_and_their_xstate_bv_bits() {
        let mut m = Machine::new();
        m.fill_guest(AREA_VA, &[0xee; 2688]);
        // x87 and AVX requested: MXCSR goes with AVX, the XMM registers do not.
        m.request(0x5);
        let rip = m.regs.rip;
        assert_eq!(m.run(XSAVE64_RDI), Outcome::Done);
        assert_eq!(m.regs.rip, rip + 4);
        let g = m.guest(AREA_VA, 2688);
        assert!(g[0..24].iter().all(|&b| b == 0x10));
        assert_eq!(&g[24..32], &m.x.area[24..32], "MXCSR and its mask");
        assert!(g[32..160].iter().all(|&b| b == 0x10));
        assert!(g[160..416].iter().all(|&b| b == 0xee), "XMM not requested");
        assert!(
            g[416..512].iter().all(|&b| b == 0xee),
            "reserved bytes kept"
        );
        // XSTATE_BV: requested bits from XINUSE (x87 and AVX in use), the rest kept.
        assert_eq!(bv(&g), (0xeeee_eeee_eeee_eeee & !0x5) | 0x5);
        assert!(g[520..576].iter().all(|&b| b == 0xee), "XCOMP_BV untouched");
        assert!(g[576..832].iter().all(|&b| b == 0x12));
        assert!(
            g[1088..2688].iter().all(|&b| b == 0xee),
            "AVX-512 not requested"
        );
        assert!(!m.x.area_changed, "XSAVE does not change the vCPU");

        // Everything (EDX:EAX all ones is masked by XCR0): the AVX-512 components are
        // written though not in use, and their XSTATE_BV bits are 0.
        m.fill_guest(AREA_VA + 512, &[0; 8]);
        m.request(u64::MAX);
        assert_eq!(m.run(XSAVE64_RDI), Outcome::Done);
        let g = m.guest(AREA_VA, 2688);
        assert!(g[160..416].iter().all(|&b| b == 0x11));
        assert_eq!(bv(&g), 0x7);
        assert!(g[1088..1152].iter().all(|&b| b == 0x15));
        assert!(g[1664..2688].iter().all(|&b| b == 0x17));
    }

    #[test]
    fn xsave_without_rex_w_stores_32_bit_x87_pointers() {
        let mut m = Machine::new();
        m.request(0x1);
        assert_eq!(m.run(XSAVE_RDI), Outcome::Done);
        let g = m.guest(AREA_VA, 32);
        assert_eq!(&g[8..12], &[0x10; 4]);
        assert_eq!(&g[12..16], &[0; 4], "FCS and reserved");
        assert_eq!(&g[16..20], &[0x10; 4]);
        assert_eq!(&g[20..24], &[0; 4], "FDS and reserved");
    }

    #[test]
    fn xsave_faults_before_writing_anything() {
        // Not 64-byte aligned: #GP(0), RIP on the instruction.
        let mut m = Machine::new();
        m.regs.rdi = AREA_VA + 0x20;
        let rip = m.regs.rip;
        assert_eq!(m.run(XSAVE64_RDI), Outcome::Inject(Exception::gp(0)));
        assert_eq!(m.regs.rip, rip);
        // An area whose AVX-512 part lies on a read-only page: #PF (present, write)
        // there, and the writable first page unchanged.
        let mut m = Machine::new();
        let start = RO - 0x800;
        m.regs.rdi = start;
        m.fill_guest(start, &[0xee; 0x800]);
        assert_eq!(
            m.run(XSAVE64_RDI),
            Outcome::Inject(Exception::page_fault(RO, 3))
        );
        assert!(m.guest(start, 0x800).iter().all(|&b| b == 0xee));
        // Unmapped: #PF (not present, write).
        m.regs.rdi = UNMAPPED;
        assert_eq!(
            m.run(XSAVE64_RDI),
            Outcome::Inject(Exception::page_fault(UNMAPPED, 2))
        );
        // CR4.OSXSAVE clear: #UD, for every instruction of the family.
        m.sregs.cr4 &= !CR4_OSXSAVE;
        m.regs.rdi = AREA_VA;
        for bytes in [XSAVE64_RDI, XRSTOR64_RDI, XGETBV, XSETBV] {
            assert_eq!(m.run(bytes), Outcome::Inject(Exception::ud()));
        }
    }

    #[test]
    fn xsave_area_may_cross_pages() {
        let mut m = Machine::new();
        // 64-byte aligned, 0x200 bytes before the page end: AVX and AVX-512 are on
        // the second (physically distant) page.
        let start = AREA_VA + 0x1000 - 0x200;
        m.regs.rdi = start;
        m.request(u64::MAX);
        assert_eq!(m.run(XSAVE64_RDI), Outcome::Done);
        let g = m.guest(start, 2688);
        assert!(g[160..416].iter().all(|&b| b == 0x11));
        assert!(g[576..832].iter().all(|&b| b == 0x12));
        assert!(g[1664..2688].iter().all(|&b| b == 0x17));
    }

    /// A saved image: x87 bytes 0x20, XMM 0x21, MXCSR 0x1fa0, component i 0x20 + i.
    fn image(l: &Layout, xstate_bv: u64) -> Vec<u8> {
        let mut g = vec![0u8; 2688];
        g[legacy::X87_CONTROL].fill(0x20);
        g[legacy::X87_REGS].fill(0x20);
        g[legacy::XMM].fill(0x21);
        g[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        for i in Layout::extended(XCR0) {
            g[l.range(i)].fill(0x20 + i as u8);
        }
        g[512..520].copy_from_slice(&xstate_bv.to_le_bytes());
        g
    }

    #[test]
    fn xrstor_loads_or_initialises_each_requested_component() {
        let mut m = Machine::new();
        // In memory: x87 and AVX and opmask marked; SSE requested but not marked, so
        // its registers are initialised; MXCSR is loaded all the same.
        m.fill_guest(AREA_VA, &image(m.x.layout, 0x25));
        m.request(0x7);
        let before = m.x.area.clone();
        assert_eq!(m.run(XRSTOR64_RDI), Outcome::Done);
        let a = &m.x.area;
        assert!(m.x.area_changed);
        assert!(a[0..24].iter().all(|&b| b == 0x20));
        assert!(a[32..160].iter().all(|&b| b == 0x20));
        assert!(a[160..416].iter().all(|&b| b == 0), "SSE initialised");
        assert_eq!(&a[24..28], &0x1fa0u32.to_le_bytes(), "MXCSR loaded");
        assert_eq!(&a[28..32], &before[28..32], "MXCSR_MASK is not loaded");
        assert!(a[576..832].iter().all(|&b| b == 0x22));
        // Opmask is marked but not requested: the vCPU keeps its own.
        assert_eq!(&a[1088..2688], &before[1088..2688]);
        // XINUSE: requested bits from XSTATE_BV (x87, AVX), the others kept (none).
        assert_eq!(bv(&a[..]), 0x5);

        // x87 requested and not marked: its initial state (FCW 0x37f, the rest 0).
        m.fill_guest(AREA_VA, &image(m.x.layout, 0x0));
        m.request(0x1);
        assert_eq!(m.run(XRSTOR64_RDI), Outcome::Done);
        let a = &m.x.area;
        assert_eq!(&a[0..2], &[0x7f, 0x03]);
        assert!(a[2..24].iter().all(|&b| b == 0));
        assert!(a[32..160].iter().all(|&b| b == 0));
        assert_eq!(&a[24..28], &0x1fa0u32.to_le_bytes(), "MXCSR not requested");
        assert_eq!(bv(&a[..]), 0x4, "x87 initialised, AVX kept");

        // Only MXCSR's components requested and none marked: MXCSR still loads, and
        // SSE counts as in use so that KVM_SET_XSAVE takes it.
        let mut img = image(m.x.layout, 0);
        img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        m.fill_guest(AREA_VA, &img);
        m.request(0x6);
        assert_eq!(m.run(XRSTOR64_RDI), Outcome::Done);
        assert_eq!(&m.x.area[24..28], &0x1f80u32.to_le_bytes());
        assert_eq!(bv(&m.x.area[..]), 0x2);
    }

    #[test]
    fn xsave_then_xrstor_gives_back_the_state() {
        let mut m = Machine::new();
        m.request(u64::MAX);
        let saved = m.x.area.clone();
        assert_eq!(m.run(XSAVE64_RDI), Outcome::Done);
        *m.x.area = [0x55; AREA];
        m.x.area[24..32].copy_from_slice(&saved[24..32]);
        m.regs.rip = TEXT + 0x100;
        assert_eq!(m.run(XRSTOR64_RDI), Outcome::Done);
        // The legacy state, AVX and XINUSE as saved; AVX-512 was not in use, so it is
        // restored to its initial value (zero), not to the vCPU's 0x15-0x17 bytes.
        assert_eq!(&m.x.area[..416], &saved[..416]);
        assert_eq!(&m.x.area[576..832], &saved[576..832]);
        assert_eq!(bv(&m.x.area[..]) & XCR0, 0x7);
        assert!(m.x.area[1088..2688].iter().all(|&b| b == 0));
    }

    #[test]
    fn xrstor_refuses_bad_areas_and_changes_nothing() {
        // (what, byte offset, bytes written there)
        let cases: [(&str, usize, &[u8]); 4] = [
            ("XCOMP_BV set (compacted form)", 527, &[0x80]),
            ("reserved header bytes", 530, &[1]),
            ("XSTATE_BV outside XCR0", 513, &[0x2]),
            ("a reserved MXCSR bit", 24, &[0, 0, 1, 0]),
        ];
        for (what, at, bytes) in cases {
            let mut m = Machine::new();
            let mut g = image(m.x.layout, 0x7);
            g[at..at + bytes.len()].copy_from_slice(bytes);
            m.fill_guest(AREA_VA, &g);
            let before = m.x.area.clone();
            assert_eq!(
                m.run(XRSTOR64_RDI),
                Outcome::Inject(Exception::gp(0)),
                "{what}"
            );
            assert_eq!(m.x.area[..], before[..], "{what}");
            assert!(!m.x.area_changed);
        }
        // A component on an unmapped page (the one after the read-only page, which
        // XRSTOR may read): #PF (not present, read), nothing loaded.
        let mut m = Machine::new();
        let start = RO + 0x1000 - 0x240;
        m.fill_guest(start, &image(m.x.layout, 0xe7)[..0x240]);
        m.regs.rdi = start;
        let before = m.x.area.clone();
        assert_eq!(
            m.run(XRSTOR64_RDI),
            Outcome::Inject(Exception::page_fault(RO + 0x1000, 0))
        );
        assert_eq!(m.x.area[..], before[..]);
        // Misaligned.
        m.regs.rdi = AREA_VA + 8;
        assert_eq!(m.run(XRSTOR64_RDI), Outcome::Inject(Exception::gp(0)));
    }

    #[test]
    fn xgetbv_and_xsetbv() {
        let mut m = Machine::new();
        m.regs.rcx = 0;
        assert_eq!(m.run(XGETBV), Outcome::Done);
        assert_eq!((m.regs.rdx, m.regs.rax), (0, XCR0));
        // ECX 1: XCR0 AND XINUSE.
        m.regs.rcx = 1;
        assert_eq!(m.run(XGETBV), Outcome::Done);
        assert_eq!(m.regs.rax, 0x7);
        m.regs.rcx = 2;
        assert_eq!(m.run(XGETBV), Outcome::Inject(Exception::gp(0)));
        // XSETBV: a valid value is taken and marked for KVM_SET_XCRS.
        m.regs.rcx = 0;
        m.request(0x7);
        assert_eq!(m.run(XSETBV), Outcome::Done);
        assert_eq!(m.x.xcr0, 0x7);
        assert!(m.x.xcr0_changed);
        // Invalid values: no x87, AVX without SSE, part of AVX-512, a component the
        // CPU lacks (PKRU), an XCR other than 0.
        for v in [0x6, 0x5, 0x27, 0x207] {
            m.request(v);
            assert_eq!(m.run(XSETBV), Outcome::Inject(Exception::gp(0)), "{v:#x}");
        }
        m.request(0x3);
        m.regs.rcx = 1;
        assert_eq!(m.run(XSETBV), Outcome::Inject(Exception::gp(0)));
        // A component the CPU has but KVM does not let the vCPU enable.
        m.regs.rcx = 0;
        m.x.allowed = 0x7;
        m.request(0xe7);
        assert_eq!(m.run(XSETBV), Outcome::Inject(Exception::gp(0)));
        m.x.allowed = XCR0;
        // Only at CPL 0.
        m.regs.rcx = 0;
        m.sregs.cs.selector = 0x33;
        assert_eq!(m.run(XSETBV), Outcome::Inject(Exception::gp(0)));
        assert_eq!(m.x.xcr0, 0x7);
    }

    #[test]
    fn hidden_forms_and_missing_state_are_refused_by_name() {
        let mut m = Machine::new();
        for bytes in [
            &[0x0f, 0xae, 0x37][..],       // xsaveopt [rdi]
            &[0x48, 0x0f, 0xc7, 0x27][..], // xsavec64 [rdi]
            &[0x48, 0x0f, 0xc7, 0x2f][..], // xsaves64 [rdi]
            &[0x48, 0x0f, 0xc7, 0x1f][..], // xrstors64 [rdi]
        ] {
            assert!(
                matches!(m.run(bytes), Outcome::Unhandled(s) if s.contains("clearcpuid=xsaveopt,xsavec,xsaves")),
            );
        }
        let f = Failed::decode(XSAVE64_RDI, m.regs.rip, 64).unwrap();
        let out = f.resolve(&mut Cpu {
            regs: &mut m.regs,
            sregs: &m.sregs,
            mem: Some(&m.mem),
            mxcsr: None,
            xstate: None,
        });
        assert!(matches!(out, Outcome::Unhandled(s) if s.contains("extended state")));
    }
}
