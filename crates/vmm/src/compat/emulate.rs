//! Instructions a software KVM backend cannot run: one table, one path.
//!
//! The backend's instruction emulator stops on some instructions with
//! `KVM_EXIT_INTERNAL_ERROR`, suberror 1 (emulation), and the exit data carries the
//! instruction bytes. The VMM decodes them with iced-x86 ([`Failed::from_exit`]) and
//! looks the instruction up in [`TABLE`], which says, per instruction, what the VMM
//! does with it ([`Action`]):
//!
//! * **emulate** it: the VMM executes the instruction on the vCPU's registers and on
//!   guest memory (reached through the guest's page tables, see [`Cpu`]) and steps
//!   over it; faults the instruction raises (#GP, #SS, #PF) are injected as the CPU
//!   would raise them;
//! * **inject #BP** (`int3`): step over it and deliver the trap the guest expects;
//! * **skip** it (`fwait`);
//! * **hidden**: the feature is turned off through the kernel command line
//!   ([`super::HIDDEN`]), so a guest that honours it never executes the
//!   instruction. These entries are in the table too, so that the table is the whole
//!   story and an instruction that arrives anyway is named with the option that should
//!   have kept it away.
//!
//! Anything else ends the VM with a message naming the decoded instruction ("emulation
//! failure at rip 0x... on `xrstor [rax]` (not emulated)"): a new surprise becomes one
//! more table entry, not a new code path.
//!
//! Memory operands are atomic where the instruction is: `lock cmpxchg16b` runs as a
//! host `lock cmpxchg16b` on the host mapping of guest RAM, which other vCPU threads
//! share (and which, on a node of a cluster, is the DSM region: a page the node lacks
//! is faulted in by the DSM like any access of the VMM). The emulation core sees the
//! vCPU only through [`Cpu`] (registers, segment and control registers, guest memory)
//! so the unit tests below run every emulated instruction without KVM.
//!
//! Limits: the emulated instructions run in 64-bit mode only (the guest kernel's mode;
//! guest user code runs natively on this host and never reaches this exit); a
//! `cmpxchg8b` operand that crosses a page and an operand outside guest RAM (MMIO) are
//! refused with a clear message. The VMM's write does not go through KVM's shadow
//! page tables: an emulated write to a guest page-table page would not be seen by them
//! (the instructions emulated here are not used on page tables).

use std::fmt::Write as _;

use iced_x86::{
    Code, CpuidFeature, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic,
    OpKind, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::xstate::{self, XState};
use crate::paging::{PageTables, PagingError};

/// What the VMM does with an instruction the backend failed on.
#[derive(Clone, Copy)]
pub enum Action {
    /// The VMM executes it ([`Emulator`]) and steps over it.
    Emulate(Emulator),
    /// `int3`: step over it and inject #BP, the trap the guest expects.
    Breakpoint,
    /// Step over it: it has no effect the guest needs here.
    Skip,
    /// Not emulated: hidden from the guest by the command line (the entry's
    /// [`Entry::hidden_by`]); a guest that honours the option never executes it.
    Hidden,
    /// Neither emulated nor hidden (the entry says why): the VM ends with the reason.
    Fail,
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Emulate(_) => "Emulate",
            Action::Breakpoint => "Breakpoint",
            Action::Skip => "Skip",
            Action::Hidden => "Hidden",
            Action::Fail => "Fail",
        })
    }
}

/// Executes one decoded instruction on `cpu`. On `Ok` the caller steps RIP over the
/// instruction; an emulator changes registers and memory only once it cannot fault.
pub type Emulator = fn(&Instruction, &mut Cpu<'_>) -> Result<(), Stop>;

/// Which instructions an entry covers.
#[derive(Debug, Clone, Copy)]
pub enum Match {
    /// These mnemonics (every form of each).
    Mnemonics(&'static [Mnemonic]),
    /// Every instruction that needs one of these CPUID features.
    Features(&'static [CpuidFeature]),
}

/// One row of [`TABLE`].
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The instruction(s), as docs/COMPAT.md names them.
    pub instruction: &'static str,
    /// Which decoded instructions the entry covers.
    pub matches: Match,
    /// What the VMM does when the backend fails on one.
    pub action: Action,
    /// The `clearcpuid=` feature of [`super::HIDDEN`] that hides the
    /// instructions from the guest, if they are hidden.
    pub hidden_by: Option<&'static str>,
    /// Why.
    pub why: &'static str,
}

/// What the VMM does with each instruction the backend cannot run. Entries are tried
/// in order (the mnemonic entries come before the feature-wide ones).
pub static TABLE: &[Entry] = &[
    Entry {
        instruction: "cmpxchg16b m128 (with or without lock)",
        matches: Match::Mnemonics(&[Mnemonic::Cmpxchg16b]),
        action: Action::Emulate(cmpxchg16b),
        hidden_by: Some("cx16"),
        why: "a distribution kernel (Debian 6.1) stopped on it (seen): SLUB's per-CPU fast \
              path uses it whenever CPUID shows CX16, i.e. on most allocations, and an exit \
              each would be slow, so CX16 is hidden (SLUB then takes its locked path; \
              Debian's kernel boots so); emulated for a kernel that uses it anyway",
    },
    Entry {
        instruction: "cmpxchg8b m64 (with or without lock)",
        matches: Match::Mnemonics(&[Mnemonic::Cmpxchg8b]),
        action: Action::Emulate(cmpxchg8b),
        hidden_by: None,
        why: "same family and code as cmpxchg16b; CX8 cannot be hidden from a 64-bit kernel",
    },
    Entry {
        instruction: "popcnt r, r/m",
        matches: Match::Mnemonics(&[Mnemonic::Popcnt]),
        action: Action::Emulate(popcnt),
        hidden_by: Some("popcnt"),
        why: "failed in the emulator (seen); hidden, so the kernel's hweight uses its \
              software fallback; emulated for a kernel built to use it unconditionally",
    },
    Entry {
        instruction: "ldmxcsr m32, stmxcsr m32",
        matches: Match::Mnemonics(&[Mnemonic::Ldmxcsr, Mnemonic::Stmxcsr]),
        action: Action::Emulate(mxcsr),
        hidden_by: None,
        why: "a distribution kernel (Debian 6.1) stopped on ldmxcsr (seen): \
              kernel_fpu_begin loads the default MXCSR before any kernel SIMD code, and SSE \
              cannot be hidden from a 64-bit kernel; rare (once per kernel SIMD section)",
    },
    Entry {
        instruction: "SSSE3, SSE4.1, SSE4.2, AES-NI, PCLMULQDQ, SHA instructions",
        matches: Match::Features(&[
            CpuidFeature::SSSE3,
            CpuidFeature::SSE4_1,
            CpuidFeature::SSE4_2,
            CpuidFeature::AES,
            CpuidFeature::PCLMULQDQ,
            CpuidFeature::SHA,
        ]),
        action: Action::Hidden,
        hidden_by: Some("ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni"),
        why: "the backend's emulator runs no vector instructions in kernel mode: a \
              distribution kernel (Debian 6.1) stopped in its SSSE3 BLAKE2s (random pool) \
              at boot (seen); the kernel's accelerated crypto and checksums need these \
              features and fall back to generic C without them",
    },
    Entry {
        instruction: "int3",
        matches: Match::Mnemonics(&[Mnemonic::Int3]),
        action: Action::Breakpoint,
        hidden_by: None,
        why: "the kernel's int3 self-test, kprobes and text patching, and the VMM's own \
              breakpoint for the system-call repair (compat::usermode)",
    },
    Entry {
        instruction: "fwait",
        matches: Match::Mnemonics(&[Mnemonic::Wait]),
        action: Action::Skip,
        hidden_by: None,
        why: "the kernel issues it only to flush pending x87 exceptions (fpu__drop when a \
              task exits, seen); with exceptions masked there are none",
    },
    Entry {
        instruction: "xsave m, xrstor m (standard form), xgetbv, xsetbv",
        matches: Match::Mnemonics(&[
            Mnemonic::Xsave,
            Mnemonic::Xsave64,
            Mnemonic::Xrstor,
            Mnemonic::Xrstor64,
            Mnemonic::Xgetbv,
            Mnemonic::Xsetbv,
        ]),
        action: Action::Emulate(xstate::run),
        hidden_by: None,
        why: "XRSTOR failed in the emulator (seen). Guest user code runs natively and uses \
              the host's AVX/AVX-512 registers whatever the guest kernel thinks, so the \
              kernel must save and restore them on every context switch (with XSAVE \
              hidden it saved only the FXSAVE image and processes saw each other's ymm \
              registers, seen): emulated against KVM_GET/SET_XSAVE (compat::xstate)",
    },
    Entry {
        instruction: "xsaveopt, xsavec, xsaves, xrstors",
        matches: Match::Mnemonics(&[
            Mnemonic::Xsaveopt,
            Mnemonic::Xsaveopt64,
            Mnemonic::Xsavec,
            Mnemonic::Xsavec64,
            Mnemonic::Xsaves,
            Mnemonic::Xsaves64,
            Mnemonic::Xrstors,
            Mnemonic::Xrstors64,
        ]),
        action: Action::Hidden,
        hidden_by: Some("xsaveopt,xsavec,xsaves"),
        why: "the optimised, compacted and supervisor forms; the kernel picks the best one \
              it sees, so they are hidden and it uses the standard form, which is emulated",
    },
    Entry {
        instruction: "clac, stac",
        matches: Match::Features(&[CpuidFeature::SMAP]),
        action: Action::Hidden,
        hidden_by: Some("smap"),
        why: "CLAC failed in the emulator (seen); they bracket every user-memory access of \
              the kernel, an exit each would be costly; without SMAP the kernel patches \
              them out",
    },
    Entry {
        instruction: "rdfsbase, rdgsbase, wrfsbase, wrgsbase",
        matches: Match::Features(&[CpuidFeature::FSGSBASE]),
        action: Action::Hidden,
        hidden_by: Some("fsgsbase"),
        why: "on every context switch and paranoid entry when available; hidden from the \
              first boots (not minimised); the kernel falls back to the FS/GS base MSRs",
    },
    Entry {
        instruction: "andn, bextr, blsi, blsmsk, blsr, tzcnt (BMI1); bzhi, mulx, pdep, pext, rorx, sarx, shlx, shrx (BMI2)",
        matches: Match::Features(&[CpuidFeature::BMI1, CpuidFeature::BMI2]),
        action: Action::Hidden,
        hidden_by: Some("bmi1,bmi2"),
        why: "VEX-encoded general-purpose instructions; hidden from the first boots (not \
              minimised); emulable like popcnt if a kernel needs them",
    },
    Entry {
        instruction: "AVX2 instructions",
        matches: Match::Features(&[CpuidFeature::AVX2]),
        action: Action::Hidden,
        hidden_by: Some("avx2"),
        why: "the backend's emulator runs no vector instructions in kernel mode; hiding \
              AVX2 keeps the kernel's AVX2 crypto, checksum and RAID code off (and the \
              AVX-512 paths that also need it)",
    },
    Entry {
        instruction: "AVX and AVX-512 instructions",
        matches: Match::Features(&[
            CpuidFeature::AVX,
            CpuidFeature::AVX512F,
            CpuidFeature::AVX512VL,
            CpuidFeature::AVX512BW,
            CpuidFeature::AVX512DQ,
        ]),
        action: Action::Fail,
        hidden_by: None,
        why: "not emulated and not hidden: the kernel enables a register state in XCR0 \
              (and so saves it for user processes) only when CPUID shows its feature, \
              and its XSAVE size check must match the host's CPUID; no code of the \
              project's kernel or Debian 6.1's reached one in kernel mode (seen); a \
              kernel that does stops with this message",
    },
    Entry {
        instruction: "rdrand",
        matches: Match::Features(&[CpuidFeature::RDRAND]),
        action: Action::Hidden,
        hidden_by: Some("rdrand"),
        why: "hidden from the first boots (not minimised); the kernel's entropy comes from \
              its other sources",
    },
    Entry {
        instruction: "rdseed",
        matches: Match::Features(&[CpuidFeature::RDSEED]),
        action: Action::Hidden,
        hidden_by: Some("rdseed"),
        why: "as rdrand",
    },
    Entry {
        instruction: "invpcid",
        matches: Match::Features(&[CpuidFeature::INVPCID]),
        action: Action::Hidden,
        hidden_by: Some("invpcid"),
        why: "TLB invalidation by PCID; PCIDs are hidden too (see the features below), the \
              kernel flushes with CR3 writes and invlpg",
    },
    Entry {
        instruction: "rdpkru, wrpkru",
        matches: Match::Features(&[CpuidFeature::PKU]),
        action: Action::Hidden,
        hidden_by: Some("pku"),
        why: "protection keys; hidden from the first boots (not minimised)",
    },
];

/// `clearcpuid=` features of [`super::HIDDEN`] that are not instructions
/// (so not in [`TABLE`]), with the reason each is hidden.
pub static HIDDEN_FEATURES: &[(&str, &str)] = &[
    (
        "hypervisor",
        "hides the outer hypervisor's KVM paravirtual features (PV IPI, PV spinlock kick, \
         PV EOI, kvmclock), whose hypercalls need an in-kernel LAPIC",
    ),
    (
        "smep",
        "supervisor-mode execution prevention (a CR4 bit); hidden from the first boots, \
         not minimised",
    ),
    (
        "umip",
        "user-mode instruction prevention (a CR4 bit); hidden from the first boots, not \
         minimised",
    ),
    (
        "pcid",
        "process-context identifiers (CR4.PCIDE, tagged TLB entries) under the backend's \
         shadow page tables; hidden from the first boots, not minimised",
    ),
    (
        "erms",
        "enhanced `rep movsb`: only changes which memcpy the kernel picks; hidden from the \
         first boots, not minimised",
    ),
    ("fsrm", "fast short `rep movsb`: as erms"),
    (
        "x2apic",
        "the user-space LAPIC model has the xAPIC (MMIO) interface only and refuses the \
         x2APIC enable bit of IA32_APIC_BASE with #GP; a kernel without interrupt \
         remapping stays in xAPIC mode anyway (Debian 6.1 did, seen), hiding makes that \
         certain for any kernel; on a hardware host the VMM's CPUID table clears the bit",
    ),
];

/// Looks a decoded instruction up in [`TABLE`].
pub fn lookup(insn: &Instruction) -> Option<&'static Entry> {
    let mnemonic = insn.mnemonic();
    let features = insn.cpuid_features();
    TABLE.iter().find(|e| match e.matches {
        Match::Mnemonics(m) => m.contains(&mnemonic),
        Match::Features(f) => features.iter().any(|x| f.contains(x)),
    })
}

/// An exception the VMM injects into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// The vector (3 #BP, 12 #SS, 13 #GP, 14 #PF).
    pub vector: u8,
    /// The error code, for the exceptions that have one.
    pub error_code: Option<u32>,
    /// The faulting address a #PF leaves in CR2.
    pub cr2: Option<u64>,
}

impl Exception {
    /// #BP (a trap: RIP is past the `int3`).
    pub const BREAKPOINT: Exception = Exception {
        vector: 3,
        error_code: None,
        cr2: None,
    };

    /// #UD (no error code).
    pub fn ud() -> Self {
        Exception {
            vector: 6,
            error_code: None,
            cr2: None,
        }
    }

    /// #GP(code).
    pub fn gp(code: u32) -> Self {
        Exception {
            vector: 13,
            error_code: Some(code),
            cr2: None,
        }
    }

    /// #SS(code).
    pub fn ss(code: u32) -> Self {
        Exception {
            vector: 12,
            error_code: Some(code),
            cr2: None,
        }
    }

    /// #PF at `addr` with `error` (P, W/R, U/S bits).
    pub fn page_fault(addr: u64, error: u32) -> Self {
        Exception {
            vector: 14,
            error_code: Some(error),
            cr2: Some(addr),
        }
    }
}

/// Why an emulator did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The instruction faults, as on the CPU: inject this, RIP stays on the instruction.
    Fault(Exception),
    /// The VMM does not emulate this case (the reason is shown to the user).
    Refuse(String),
}

/// What the vCPU loop does after an emulation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Continue the guest with the registers of the [`Cpu`] (RIP past the instruction).
    Done,
    /// Continue with the registers of the [`Cpu`] and this exception injected.
    Inject(Exception),
    /// The VM cannot go on: the message names the instruction and why.
    Unhandled(String),
}

/// The vCPU state and guest memory an emulated instruction works on.
pub struct Cpu<'a> {
    /// General registers, RIP and RFLAGS (the emulator updates them).
    pub regs: &'a mut kvm_regs,
    /// Segment and control registers (FS/GS bases, CR0, CR3, CR4, EFER, CPL).
    pub sregs: &'a kvm_sregs,
    /// Guest RAM (None: memory operands are refused).
    pub mem: Option<&'a GuestMemoryMmap>,
    /// The SSE control and status register, for the instructions that
    /// [`Failed::needs_mxcsr`] (the caller fetches it with KVM_GET_FPU and writes it
    /// back after [`Outcome::Done`]); None: those instructions are refused.
    pub mxcsr: Option<&'a mut u32>,
    /// XCR0 and the extended state, for the instructions that [`Failed::needs_xstate`]
    /// (the caller fetches them with KVM_GET_XCRS and KVM_GET_XSAVE and writes back
    /// what changed after [`Outcome::Done`]); None: those instructions are refused.
    pub xstate: Option<&'a mut XState>,
}

/// RFLAGS bits.
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// Alignment check / SMAP override.
    pub const AC: u64 = 1 << 18;
}

const EFER_LMA: u64 = 1 << 10;
const CR0_WP: u64 = 1 << 16;
const CR4_SMAP: u64 = 1 << 21;
/// #PF error code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

/// The kind of a memory access, for the page-table rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

impl Cpu<'_> {
    /// The current privilege level.
    pub(super) fn cpl(&self) -> u8 {
        (self.sregs.cs.selector & 3) as u8
    }

    /// Whether the vCPU is in 64-bit mode (long mode with a 64-bit code segment).
    pub fn is_64bit(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0 && self.sregs.cs.l != 0
    }

    fn mem(&self) -> Result<&GuestMemoryMmap, Stop> {
        self.mem
            .ok_or_else(|| Stop::Refuse("no access to guest memory".into()))
    }

    /// The effective (linear) address of the instruction's memory operand: base +
    /// index * scale + displacement (or RIP-relative), truncated to the address size,
    /// plus the FS/GS base. A non-canonical result faults (#SS for a stack access).
    pub(super) fn effective_address(&self, insn: &Instruction) -> Result<u64, Stop> {
        let base = insn.memory_base();
        let index = insn.memory_index();
        let mut ea = insn.memory_displacement64();
        let mut addr32 = false;
        match base {
            Register::None => {}
            // iced gives RIP/EIP-relative operands as the absolute address.
            Register::RIP => {}
            Register::EIP => addr32 = true,
            r => {
                ea = ea.wrapping_add(self.gpr_for_address(r)?);
                addr32 |= r.is_gpr32();
            }
        }
        if index != Register::None {
            let scale = u64::from(insn.memory_index_scale());
            ea = ea.wrapping_add(self.gpr_for_address(index)?.wrapping_mul(scale));
            addr32 |= index.is_gpr32();
        }
        if addr32 {
            ea &= 0xffff_ffff;
        }
        let segment = insn.memory_segment();
        ea = ea.wrapping_add(match segment {
            Register::FS => self.sregs.fs.base,
            Register::GS => self.sregs.gs.base,
            // In 64-bit mode the other segment bases are zero.
            _ => 0,
        });
        let la57 = self.sregs.cr4 & crate::paging::CR4_LA57 != 0;
        let bits = if la57 { 57 } else { 48 };
        let canonical = ((ea as i64) << (64 - bits)) >> (64 - bits) == ea as i64;
        if !canonical {
            return Err(Stop::Fault(if segment == Register::SS {
                Exception::ss(0)
            } else {
                Exception::gp(0)
            }));
        }
        Ok(ea)
    }

    fn gpr_for_address(&self, r: Register) -> Result<u64, Stop> {
        if r.is_gpr64() || r.is_gpr32() {
            read_gpr(self.regs, r).ok_or_else(|| unsupported_register(r))
        } else {
            Err(unsupported_register(r))
        }
    }

    /// The guest-physical address of `gva` for `access`, with the checks of the page
    /// tables (present, R/W with CR0.WP, U/S, SMAP): a failed check is the #PF the CPU
    /// would raise.
    fn translate(&self, gva: u64, access: Access) -> Result<u64, Stop> {
        let mem = self.mem()?;
        let pt = PageTables::from_regs(self.sregs.cr3, self.sregs.cr4);
        let cpl3 = self.cpl() == 3;
        let mut error = if access == Access::Write { PF_WRITE } else { 0 };
        if cpl3 {
            error |= PF_USER;
        }
        let t = match pt.walk(mem, gva) {
            Ok(t) => t,
            Err(PagingError::NotMapped(_)) => {
                return Err(Stop::Fault(Exception::page_fault(gva, error)))
            }
            Err(PagingError::OutsideRam(gpa)) => {
                return Err(Stop::Refuse(format!(
                    "the operand at {gva:#x} is outside guest RAM ({gpa:#x})"
                )))
            }
        };
        let write_denied =
            access == Access::Write && !t.writable && (cpl3 || self.sregs.cr0 & CR0_WP != 0);
        let user_denied = cpl3 && !t.user;
        let smap_denied =
            !cpl3 && t.user && self.sregs.cr4 & CR4_SMAP != 0 && self.regs.rflags & rflags::AC == 0;
        if write_denied || user_denied || smap_denied {
            return Err(Stop::Fault(Exception::page_fault(gva, error | PF_PRESENT)));
        }
        Ok(t.gpa)
    }

    /// A host pointer to `len` bytes of guest memory at `gva` (within one page), after
    /// the checks of [`Self::translate`]. The pointer stays valid while `self.mem` does
    /// (the guest RAM mapping lives as long as the VM).
    fn host_ptr(&self, gva: u64, len: usize, access: Access) -> Result<*mut u8, Stop> {
        debug_assert!((gva & 0xfff) as usize + len <= 0x1000);
        let gpa = self.translate(gva, access)?;
        let slice = self.mem()?.get_slice(GuestAddress(gpa), len).map_err(|_| {
            Stop::Refuse(format!(
                "the operand at {gva:#x} is outside guest RAM ({gpa:#x})"
            ))
        })?;
        Ok(slice.ptr_guard_mut().as_ptr())
    }

    /// Writes `bytes` at `gva`: both pages are checked for write access before
    /// anything is written, so a fault leaves memory unchanged.
    pub(super) fn write(&self, gva: u64, bytes: &[u8]) -> Result<(), Stop> {
        let first = ((0x1000 - (gva & 0xfff)) as usize).min(bytes.len());
        let a = self.host_ptr(gva, first, Access::Write)?;
        let b = if first < bytes.len() {
            Some(self.host_ptr(
                gva.wrapping_add(first as u64),
                bytes.len() - first,
                Access::Write,
            )?)
        } else {
            None
        };
        // SAFETY: host_ptr checked that `a` has `first` bytes of guest RAM and `b` the
        // rest (each within one page of a region that lives as long as `self.mem`);
        // `bytes` is a separate host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), a, first);
            if let Some(b) = b {
                std::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), b, bytes.len() - first);
            }
        }
        Ok(())
    }

    /// Checks every page of the `len` bytes at `gva` for `access` (the #PF the first
    /// failing page raises), so that an instruction can fault before it writes.
    pub(super) fn check(&self, gva: u64, len: usize, access: Access) -> Result<(), Stop> {
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            self.translate(va, access)?;
            done += (0x1000 - (va & 0xfff)) as usize;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `gva` (the range may cross pages).
    pub(super) fn read(&self, gva: u64, buf: &mut [u8]) -> Result<(), Stop> {
        let mut done = 0usize;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let gpa = self.translate(va, Access::Read)?;
            let n = ((0x1000 - (va & 0xfff)) as usize).min(buf.len() - done);
            self.mem()?
                .read_slice(&mut buf[done..done + n], GuestAddress(gpa))
                .map_err(|_| {
                    Stop::Refuse(format!("the operand at {va:#x} is outside guest RAM"))
                })?;
            done += n;
        }
        Ok(())
    }
}

fn unsupported_register(r: Register) -> Stop {
    Stop::Refuse(format!("register {r:?} is not emulated"))
}

/// The kvm_regs slot of a 64-bit general register.
fn slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// Reads a 16-, 32- or 64-bit general register (zero-extended).
fn read_gpr(regs: &kvm_regs, r: Register) -> Option<u64> {
    let mut copy = *regs;
    let v = *slot(&mut copy, r.full_register())?;
    match r.size() {
        8 => Some(v),
        4 => Some(v & 0xffff_ffff),
        2 => Some(v & 0xffff),
        _ => None,
    }
}

/// Writes a 16-, 32- or 64-bit general register as the CPU does: a 32-bit write
/// clears the upper half, a 16-bit write keeps the other bits.
fn write_gpr(regs: &mut kvm_regs, r: Register, value: u64) -> Option<()> {
    let size = r.size();
    let s = slot(regs, r.full_register())?;
    *s = match size {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => (*s & !0xffff) | (value & 0xffff),
        _ => return None,
    };
    Some(())
}

fn set_zf(regs: &mut kvm_regs, zero: bool) {
    if zero {
        regs.rflags |= rflags::ZF;
    } else {
        regs.rflags &= !rflags::ZF;
    }
}

fn memory_operand(insn: &Instruction) -> Result<(), Stop> {
    if insn.op0_kind() == OpKind::Memory {
        Ok(())
    } else {
        Err(Stop::Refuse("expected a memory operand".into()))
    }
}

/// Compares `old` with the 16 bytes at `ptr` and stores `new` there if equal, as one
/// host `lock cmpxchg16b`; returns the bytes found.
///
/// RBX cannot be an operand of inline assembly (LLVM reserves it), so the low half of
/// `new` is swapped into it around the instruction.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned, and the
/// CPU must have CMPXCHG16B.
unsafe fn host_cmpxchg16b(ptr: *mut u128, old: u128, new: u128) -> u128 {
    let (lo, hi): (u64, u64);
    // SAFETY: the caller guarantees the 16 bytes at `ptr` may be read and written, the
    // alignment and the CPU feature; RBX is restored before the block ends and the
    // instruction touches nothing else (flags are clobbered, which asm! assumes).
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {tmp}",
            ptr = in(reg) ptr,
            tmp = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") old as u64 => lo,
            inout("rdx") (old >> 64) as u64 => hi,
            options(nostack),
        );
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

/// Compares `old` with the 8 bytes at `ptr` and stores `new` there if equal, as one
/// host `lock cmpxchg` (the 64-bit form does what `cmpxchg8b` does, and has no
/// alignment requirement either); returns the bytes found.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 8 bytes.
unsafe fn host_cmpxchg8(ptr: *mut u64, old: u64, new: u64) -> u64 {
    let found: u64;
    // SAFETY: the caller guarantees the 8 bytes at `ptr` may be read and written; the
    // instruction touches nothing else (flags are clobbered, which asm! assumes).
    unsafe {
        std::arch::asm!(
            "lock cmpxchg qword ptr [{ptr}], {new}",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("rax") old => found,
            options(nostack),
        );
    }
    found
}

/// `cmpxchg16b m128`: compare RDX:RAX with the 16 bytes at the operand; if equal set ZF
/// and store RCX:RBX, else clear ZF and load RDX:RAX. The operand must be 16-byte
/// aligned (#GP(0) otherwise). Done as a host `lock cmpxchg16b` on the guest RAM
/// mapping, so the locked form is atomic against the other vCPUs (the unlocked one
/// may be, too).
pub fn cmpxchg16b(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    memory_operand(insn)?;
    let ea = cpu.effective_address(insn)?;
    if ea % 16 != 0 {
        return Err(Stop::Fault(Exception::gp(0)));
    }
    if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
        return Err(Stop::Refuse("the host CPU has no cmpxchg16b".into()));
    }
    let ptr = cpu.host_ptr(ea, 16, Access::Write)?.cast::<u128>();
    let r = &mut *cpu.regs;
    let expected = (u128::from(r.rdx) << 64) | u128::from(r.rax);
    let new = (u128::from(r.rcx) << 64) | u128::from(r.rbx);
    // SAFETY: `ptr` points at 16 bytes of the guest RAM mapping inside one region
    // (host_ptr checked the range), 16-byte aligned because the guest address is and
    // mappings are page aligned; the CPU feature was checked above. Other threads only
    // access guest RAM with volatile or atomic accesses or from the guest.
    let found = unsafe { host_cmpxchg16b(ptr, expected, new) };
    if found == expected {
        set_zf(r, true);
    } else {
        set_zf(r, false);
        r.rax = found as u64;
        r.rdx = (found >> 64) as u64;
    }
    Ok(())
}

/// `cmpxchg8b m64`: compare EDX:EAX with the 8 bytes at the operand; if equal set ZF
/// and store ECX:EBX, else clear ZF and load EDX:EAX (zero-extended, as any 32-bit
/// register write in 64-bit mode). Atomic as a host `lock cmpxchg`; an operand that
/// crosses a page is refused.
pub fn cmpxchg8b(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    memory_operand(insn)?;
    let ea = cpu.effective_address(insn)?;
    if (ea & 0xfff) + 8 > 0x1000 {
        return Err(Stop::Refuse(format!(
            "the operand at {ea:#x} crosses a page boundary"
        )));
    }
    let ptr = cpu.host_ptr(ea, 8, Access::Write)?.cast::<u64>();
    let r = &mut *cpu.regs;
    let expected = ((r.rdx & 0xffff_ffff) << 32) | (r.rax & 0xffff_ffff);
    let new = ((r.rcx & 0xffff_ffff) << 32) | (r.rbx & 0xffff_ffff);
    // SAFETY: `ptr` points at 8 bytes of the guest RAM mapping inside one region
    // (host_ptr checked the range).
    let found = unsafe { host_cmpxchg8(ptr, expected, new) };
    if found == expected {
        set_zf(r, true);
    } else {
        set_zf(r, false);
        r.rax = found & 0xffff_ffff;
        r.rdx = found >> 32;
    }
    Ok(())
}

/// `ldmxcsr m32` / `stmxcsr m32`: load MXCSR from memory (#GP(0) if a reserved bit
/// is set, as the CPU does) or store it.
pub fn mxcsr(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    /// The MXCSR bits a CPU without AVX-512 defines (FZ, RC, the masks, DAZ, the
    /// flags); AVX-512 adds none. Loading any other bit raises #GP(0).
    const MXCSR_MASK: u32 = 0xffff;
    memory_operand(insn)?;
    let ea = cpu.effective_address(insn)?;
    let Some(cur) = cpu.mxcsr.as_deref().copied() else {
        return Err(Stop::Refuse(
            "MXCSR is not available to the emulator".into(),
        ));
    };
    match insn.mnemonic() {
        Mnemonic::Ldmxcsr => {
            let mut b = [0u8; 4];
            cpu.read(ea, &mut b)?;
            let v = u32::from_le_bytes(b);
            if v & !MXCSR_MASK != 0 {
                return Err(Stop::Fault(Exception::gp(0)));
            }
            if let Some(m) = cpu.mxcsr.as_deref_mut() {
                *m = v;
            }
        }
        _ => cpu.write(ea, &cur.to_le_bytes())?,
    }
    Ok(())
}

/// `popcnt r, r/m` (16, 32 or 64 bits): the number of set bits of the source into the
/// destination; ZF set if the source is zero, CF, PF, AF, SF and OF cleared.
pub fn popcnt(insn: &Instruction, cpu: &mut Cpu<'_>) -> Result<(), Stop> {
    let dst = insn.op0_register();
    let size = dst.size();
    if !matches!(size, 2 | 4 | 8) {
        return Err(unsupported_register(dst));
    }
    let src = match insn.op1_kind() {
        OpKind::Register => read_gpr(cpu.regs, insn.op1_register())
            .ok_or_else(|| unsupported_register(insn.op1_register()))?,
        OpKind::Memory => {
            let ea = cpu.effective_address(insn)?;
            let mut b = [0u8; 8];
            cpu.read(ea, &mut b[..size])?;
            u64::from_le_bytes(b)
        }
        other => return Err(Stop::Refuse(format!("operand kind {other:?}"))),
    };
    let r = &mut *cpu.regs;
    write_gpr(r, dst, u64::from(src.count_ones())).ok_or_else(|| unsupported_register(dst))?;
    r.rflags &= !(rflags::CF | rflags::PF | rflags::AF | rflags::SF | rflags::OF);
    set_zf(r, src == 0);
    Ok(())
}

/// The instruction an emulation-failure exit stopped at.
#[derive(Debug, Clone)]
pub struct Failed {
    /// The decoded instruction (its IP is the guest RIP).
    pub insn: Instruction,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The instruction bytes of an emulation-failure exit's data: with
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES (bit 0 of data[0]) the layout is
/// u64 flags, then u8 insn_size followed by up to 15 instruction bytes.
pub fn exit_bytes(data: &[u64]) -> Option<Vec<u8>> {
    let (flags, rest) = data.split_first()?;
    if flags & 1 == 0 {
        return None;
    }
    let raw: Vec<u8> = rest.iter().take(2).flat_map(|w| w.to_le_bytes()).collect();
    let (&size, bytes) = raw.split_first()?;
    let n = usize::from(size).min(15).min(bytes.len());
    (n > 0).then(|| bytes[..n].to_vec())
}

/// The decoder's bitness for the vCPU's mode.
fn bitness(sregs: &kvm_sregs) -> u32 {
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, b) in bytes.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(s, "{sep}{b:02x}");
    }
    s
}

impl Failed {
    /// Decodes the instruction of an emulation-failure exit (suberror 1) from its data
    /// words, at `rip`, in the vCPU's mode. Err: a message for the user.
    pub fn from_exit(data: &[u64], rip: u64, sregs: &kvm_sregs) -> Result<Failed, String> {
        let bytes = exit_bytes(data).ok_or_else(|| {
            format!("emulation failure at rip {rip:#x} (the exit carries no instruction bytes)")
        })?;
        Self::decode(&bytes, rip, bitness(sregs))
    }

    /// Decodes `bytes` at `rip` with the given bitness (16, 32, 64).
    pub fn decode(bytes: &[u8], rip: u64, bitness: u32) -> Result<Failed, String> {
        let insn = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode();
        if insn.is_invalid() {
            return Err(format!(
                "emulation failure at rip {rip:#x} on undecodable bytes {}",
                hex(bytes)
            ));
        }
        Ok(Failed {
            bytes: bytes[..insn.len()].to_vec(),
            insn,
        })
    }

    /// The instruction in Intel syntax, e.g. `lock cmpxchg16b oword ptr [rsi]`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        IntelFormatter::new().format(&self.insn, &mut s);
        s
    }

    /// Its entry in [`TABLE`].
    pub fn entry(&self) -> Option<&'static Entry> {
        lookup(&self.insn)
    }

    /// Whether its emulation needs the vCPU's MXCSR ([`Cpu::mxcsr`]).
    pub fn needs_mxcsr(&self) -> bool {
        matches!(self.insn.mnemonic(), Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr)
    }

    /// Whether its emulation needs XCR0 and the extended state ([`Cpu::xstate`]).
    pub fn needs_xstate(&self) -> bool {
        xstate::handles(self.insn.mnemonic())
    }

    /// Whether it is an `int3` (the user-mode repair's breakpoint may be behind it).
    pub fn is_breakpoint(&self) -> bool {
        self.insn.code() == Code::Int3
    }

    fn unhandled(&self, why: &str) -> Outcome {
        Outcome::Unhandled(format!(
            "emulation failure at rip {:#x} on `{}` ({why}; bytes {})",
            self.insn.ip(),
            self.text(),
            hex(&self.bytes)
        ))
    }

    /// Does what [`TABLE`] says for this instruction, on `cpu`.
    pub fn resolve(&self, cpu: &mut Cpu<'_>) -> Outcome {
        let Some(entry) = self.entry() else {
            return self.unhandled("not emulated");
        };
        let next = self.insn.next_ip();
        match entry.action {
            Action::Breakpoint => {
                cpu.regs.rip = next;
                Outcome::Inject(Exception::BREAKPOINT)
            }
            Action::Skip => {
                cpu.regs.rip = next;
                Outcome::Done
            }
            Action::Hidden => self.unhandled(&format!(
                "not emulated: hidden by clearcpuid={}, which the guest kernel did not honour",
                entry.hidden_by.unwrap_or("?")
            )),
            Action::Fail => self.unhandled(&format!("not emulated: {}", entry.why)),
            Action::Emulate(run) => {
                if !cpu.is_64bit() {
                    return self.unhandled("emulated in 64-bit mode only");
                }
                match run(&self.insn, cpu) {
                    Ok(()) => {
                        cpu.regs.rip = next;
                        Outcome::Done
                    }
                    Err(Stop::Fault(e)) => Outcome::Inject(e),
                    Err(Stop::Refuse(why)) => self.unhandled(&format!("not emulated: {why}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::tests::{map_with, memory};

    const P: u64 = 1;
    const RW: u64 = 3;
    /// Kernel data (read-write), a read-only page, kernel text.
    const DATA: u64 = 0xffff_8880_0010_0000;
    const RO: u64 = 0xffff_8880_0010_1000;
    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const UNMAPPED: u64 = 0xffff_8880_0020_0000;

    struct Machine {
        mem: GuestMemoryMmap,
        regs: kvm_regs,
        sregs: kvm_sregs,
        mxcsr: u32,
    }

    impl Machine {
        /// A vCPU in 64-bit kernel mode with DATA, RO and TEXT mapped.
        fn new() -> Self {
            let mem = memory();
            let pt = map_with(
                &mem,
                &[
                    (DATA, 0x10_0000, RW),
                    (DATA + 0x1000 * 2, 0x10_2000, RW),
                    (RO, 0x10_1000, P),
                    (TEXT, 0x20_0000, RW),
                ],
            );
            let mut sregs = kvm_sregs {
                efer: EFER_LMA | (1 << 8),
                cr0: 0x8000_0001 | CR0_WP,
                cr3: pt.cr3,
                cr4: 1 << 5,
                ..Default::default()
            };
            sregs.cs.l = 1;
            sregs.cs.selector = 0x10;
            let regs = kvm_regs {
                rip: TEXT + 0x100,
                rflags: 0x2,
                ..Default::default()
            };
            Machine {
                mem,
                regs,
                sregs,
                mxcsr: 0x1f80,
            }
        }

        /// Runs `bytes` as the instruction at RIP.
        fn run(&mut self, bytes: &[u8]) -> Outcome {
            let f = Failed::decode(bytes, self.regs.rip, 64).unwrap();
            let mut cpu = Cpu {
                regs: &mut self.regs,
                sregs: &self.sregs,
                mem: Some(&self.mem),
                mxcsr: Some(&mut self.mxcsr),
                xstate: None,
            };
            f.resolve(&mut cpu)
        }

        fn at(&self, gva: u64) -> u64 {
            PageTables::from_regs(self.sregs.cr3, self.sregs.cr4)
                .translate(&self.mem, gva)
                .unwrap()
        }

        fn write_u128(&self, gva: u64, v: u128) {
            self.mem.write_obj(v, GuestAddress(self.at(gva))).unwrap();
        }

        fn read_u128(&self, gva: u64) -> u128 {
            self.mem.read_obj(GuestAddress(self.at(gva))).unwrap()
        }
    }

    /// Exit data as the kernel lays it out: flags, then size + bytes.
    fn exit_data(bytes: &[u8]) -> Vec<u64> {
        let mut raw = vec![bytes.len() as u8];
        raw.extend_from_slice(bytes);
        raw.resize(16, 0);
        let w = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
        vec![1, w(0), w(1), 0x1000]
    }

    const LOCK_CMPXCHG16B_RSI: &[u8] = &[0xf0, 0x48, 0x0f, 0xc7, 0x0e];
    const CMPXCHG16B_RSI: &[u8] = &[0x48, 0x0f, 0xc7, 0x0e];
    /// lock cmpxchg16b [r8+r9*4+0x20]
    const LOCK_CMPXCHG16B_SIB: &[u8] = &[0xf0, 0x4b, 0x0f, 0xc7, 0x4c, 0x88, 0x20];
    /// cmpxchg16b [rip+0x100]
    const CMPXCHG16B_RIPREL: &[u8] = &[0x48, 0x0f, 0xc7, 0x0d, 0x00, 0x01, 0x00, 0x00];
    /// cmpxchg16b gs:[rsi] (the per-CPU form, this_cpu_cmpxchg_double)
    const CMPXCHG16B_GS: &[u8] = &[0x65, 0x48, 0x0f, 0xc7, 0x0e];
    const LOCK_CMPXCHG8B_RSI: &[u8] = &[0xf0, 0x0f, 0xc7, 0x0e];
    /// cmpxchg8b [rdi+rcx*8-8]
    const CMPXCHG8B_SIB: &[u8] = &[0x0f, 0xc7, 0x4c, 0xcf, 0xf8];

    const LOW: u128 = 0x1111_2222_3333_4444;
    const HIGH: u128 = 0x5555_6666_7777_8888;

    fn set_compare(m: &mut Machine, expected: u128, new: u128) {
        m.regs.rax = expected as u64;
        m.regs.rdx = (expected >> 64) as u64;
        m.regs.rbx = new as u64;
        m.regs.rcx = (new >> 64) as u64;
    }

    #[test]
    fn cmpxchg16b_equal_stores_and_sets_zf_keeping_other_flags() {
        for bytes in [LOCK_CMPXCHG16B_RSI, CMPXCHG16B_RSI] {
            let mut m = Machine::new();
            let old = (HIGH << 64) | LOW;
            let new = (LOW << 64) | HIGH;
            m.write_u128(DATA + 0x40, old);
            set_compare(&mut m, old, new);
            m.regs.rsi = DATA + 0x40;
            let others = rflags::CF | rflags::SF | rflags::OF | (1 << 9);
            m.regs.rflags = 0x2 | others;
            let rip = m.regs.rip;
            assert_eq!(m.run(bytes), Outcome::Done);
            assert_eq!(m.read_u128(DATA + 0x40), new);
            assert_eq!(m.regs.rflags, 0x2 | others | rflags::ZF);
            assert_eq!(m.regs.rip, rip + bytes.len() as u64);
            // RDX:RAX and RCX:RBX untouched.
            assert_eq!((m.regs.rax, m.regs.rdx), (old as u64, (old >> 64) as u64));
            assert_eq!((m.regs.rbx, m.regs.rcx), (new as u64, (new >> 64) as u64));
        }
    }

    #[test]
    fn cmpxchg16b_unequal_loads_and_clears_zf() {
        let mut m = Machine::new();
        let found = (HIGH << 64) | LOW;
        m.write_u128(DATA + 0x40, found);
        set_compare(&mut m, 7, 9);
        m.regs.rsi = DATA + 0x40;
        m.regs.rflags = 0x2 | rflags::ZF | rflags::CF;
        assert_eq!(m.run(LOCK_CMPXCHG16B_RSI), Outcome::Done);
        assert_eq!(m.read_u128(DATA + 0x40), found, "memory unchanged");
        assert_eq!(m.regs.rflags, 0x2 | rflags::CF);
        assert_eq!((m.regs.rax, m.regs.rdx), (LOW as u64, HIGH as u64));
        assert_eq!((m.regs.rbx, m.regs.rcx), (9, 0));
    }

    #[test]
    fn cmpxchg16b_addresses_base_index_scale_disp_rip_relative_and_gs() {
        // [r8 + r9*4 + 0x20]
        let mut m = Machine::new();
        m.regs.r8 = DATA + 0x100;
        m.regs.r9 = 0x8;
        let at = DATA + 0x100 + 0x20 + 0x20;
        m.write_u128(at, 5);
        set_compare(&mut m, 5, 6);
        assert_eq!(m.run(LOCK_CMPXCHG16B_SIB), Outcome::Done);
        assert_eq!(m.read_u128(at), 6);
        // [rip + 0x100]: relative to the next instruction.
        let mut m = Machine::new();
        m.regs.rip = TEXT + 0x8;
        let at = TEXT + 0x8 + CMPXCHG16B_RIPREL.len() as u64 + 0x100;
        m.write_u128(at, 11);
        set_compare(&mut m, 11, 12);
        assert_eq!(m.run(CMPXCHG16B_RIPREL), Outcome::Done);
        assert_eq!(m.read_u128(at), 12);
        assert_ne!(m.regs.rflags & rflags::ZF, 0);
        // gs:[rsi]: the GS base from the segment registers.
        let mut m = Machine::new();
        m.sregs.gs.base = DATA + 0x2000;
        m.regs.rsi = 0x30;
        m.write_u128(DATA + 0x2030, 21);
        set_compare(&mut m, 21, 22);
        assert_eq!(m.run(CMPXCHG16B_GS), Outcome::Done);
        assert_eq!(m.read_u128(DATA + 0x2030), 22);
    }

    #[test]
    fn cmpxchg16b_faults_like_the_cpu() {
        // Misaligned: #GP(0), nothing changed, RIP stays.
        let mut m = Machine::new();
        m.regs.rsi = DATA + 0x48;
        set_compare(&mut m, 0, 1);
        let before = m.regs;
        assert_eq!(
            m.run(LOCK_CMPXCHG16B_RSI),
            Outcome::Inject(Exception::gp(0))
        );
        assert_eq!(m.regs, before);
        // Not mapped: #PF, not present, write access, CR2 = the address.
        m.regs.rsi = UNMAPPED + 0x10;
        assert_eq!(
            m.run(LOCK_CMPXCHG16B_RSI),
            Outcome::Inject(Exception::page_fault(UNMAPPED + 0x10, PF_WRITE))
        );
        assert_eq!(m.regs.rip, before.rip);
        // Read-only with CR0.WP: #PF, protection violation on a write.
        m.regs.rsi = RO;
        assert_eq!(
            m.run(LOCK_CMPXCHG16B_RSI),
            Outcome::Inject(Exception::page_fault(RO, PF_PRESENT | PF_WRITE))
        );
        // Without CR0.WP the kernel may write there.
        m.sregs.cr0 &= !CR0_WP;
        assert_eq!(m.run(LOCK_CMPXCHG16B_RSI), Outcome::Done);
        assert_eq!(m.read_u128(RO), 1);
        // Non-canonical: #GP(0).
        m.regs.rsi = 0x0000_8000_0000_0000;
        assert_eq!(m.run(CMPXCHG16B_RSI), Outcome::Inject(Exception::gp(0)));
    }

    #[test]
    fn lock_cmpxchg16b_is_atomic_across_vcpu_threads() {
        // Two "vCPUs" add 1 to a 128-bit counter with a cmpxchg16b loop, as a guest
        // would; with a real atomic no increment is lost.
        let m = Machine::new();
        m.write_u128(DATA + 0x80, 0);
        const N: u64 = 5000;
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let (mut regs, sregs) = (m.regs, m.sregs);
                    regs.rsi = DATA + 0x80;
                    let f = Failed::decode(LOCK_CMPXCHG16B_RSI, regs.rip, 64).unwrap();
                    (regs.rax, regs.rdx) = (0, 0);
                    for _ in 0..N {
                        loop {
                            let cur = (u128::from(regs.rdx) << 64) | u128::from(regs.rax);
                            let new = cur + (1 << 64) + 1;
                            (regs.rbx, regs.rcx) = (new as u64, (new >> 64) as u64);
                            regs.rip = m.regs.rip;
                            let mut cpu = Cpu {
                                regs: &mut regs,
                                sregs: &sregs,
                                mem: Some(&m.mem),
                                mxcsr: None,
                                xstate: None,
                            };
                            assert_eq!(f.resolve(&mut cpu), Outcome::Done);
                            if regs.rflags & rflags::ZF != 0 {
                                (regs.rax, regs.rdx) = (regs.rbx, regs.rcx);
                                break;
                            }
                        }
                    }
                });
            }
        });
        let total = u128::from(2 * N);
        assert_eq!(m.read_u128(DATA + 0x80), (total << 64) | total);
    }

    #[test]
    fn cmpxchg8b_equal_and_unequal() {
        let mut m = Machine::new();
        m.mem
            .write_obj(0xaaaa_bbbb_cccc_ddddu64, GuestAddress(m.at(DATA + 0x8)))
            .unwrap();
        // Equal: upper halves of the registers are ignored and kept.
        m.regs.rax = 0xffff_ffff_cccc_dddd;
        m.regs.rdx = 0xffff_ffff_aaaa_bbbb;
        m.regs.rbx = 0x2222;
        m.regs.rcx = 0x1111;
        m.regs.rsi = DATA + 0x8;
        assert_eq!(m.run(LOCK_CMPXCHG8B_RSI), Outcome::Done);
        let v: u64 = m.mem.read_obj(GuestAddress(m.at(DATA + 0x8))).unwrap();
        assert_eq!(v, 0x1111_0000_2222);
        assert_ne!(m.regs.rflags & rflags::ZF, 0);
        assert_eq!(m.regs.rax, 0xffff_ffff_cccc_dddd);
        // Unequal, through [rdi + rcx*8 - 8]: EDX:EAX loaded, zero-extended.
        m.regs.rdi = DATA;
        m.regs.rcx = 2;
        m.regs.rflags |= rflags::CF;
        assert_eq!(m.run(CMPXCHG8B_SIB), Outcome::Done);
        assert_eq!((m.regs.rax, m.regs.rdx), (0x2222, 0x1111));
        assert_eq!(m.regs.rflags & (rflags::ZF | rflags::CF), rflags::CF);
        // A misaligned operand is allowed; one across a page is refused.
        m.regs.rsi = DATA + 0x13;
        assert_eq!(m.run(LOCK_CMPXCHG8B_RSI), Outcome::Done);
        m.regs.rsi = DATA + 0xffc;
        assert!(matches!(
            m.run(LOCK_CMPXCHG8B_RSI),
            Outcome::Unhandled(s) if s.contains("crosses a page")
        ));
    }

    #[test]
    fn popcnt_registers_memory_and_flags() {
        let mut m = Machine::new();
        // popcnt rax, rbx
        m.regs.rbx = 0xf0f0_0000_0000_0001;
        m.regs.rax = u64::MAX;
        m.regs.rflags =
            0x2 | rflags::CF | rflags::PF | rflags::AF | rflags::SF | rflags::OF | rflags::ZF;
        assert_eq!(m.run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]), Outcome::Done);
        assert_eq!(m.regs.rax, 9);
        assert_eq!(m.regs.rflags, 0x2);
        // popcnt eax, ecx with ecx = 0: ZF, upper half of rax cleared.
        m.regs.rcx = 0xffff_0000_0000_0000;
        m.regs.rax = u64::MAX;
        assert_eq!(m.run(&[0xf3, 0x0f, 0xb8, 0xc1]), Outcome::Done);
        assert_eq!(m.regs.rax, 0);
        assert_eq!(m.regs.rflags, 0x2 | rflags::ZF);
        // popcnt ax, cx: the other bits of rax stay.
        m.regs.rcx = 0xffff_ffff_0000_0007;
        m.regs.rax = 0x1234_5678_9abc_def0;
        assert_eq!(m.run(&[0x66, 0xf3, 0x0f, 0xb8, 0xc1]), Outcome::Done);
        assert_eq!(m.regs.rax, 0x1234_5678_9abc_0003);
        // popcnt r10, [rsi + 8]: a memory operand, read through the page tables.
        m.mem
            .write_obj(0x8000_0000_0000_00ffu64, GuestAddress(m.at(DATA + 0x18)))
            .unwrap();
        m.regs.rsi = DATA + 0x10;
        assert_eq!(m.run(&[0xf3, 0x4c, 0x0f, 0xb8, 0x56, 0x08]), Outcome::Done);
        assert_eq!(m.regs.r10, 9);
        // A read of an unmapped address: #PF without the write bit.
        m.regs.rsi = UNMAPPED;
        assert_eq!(
            m.run(&[0xf3, 0x4c, 0x0f, 0xb8, 0x56, 0x08]),
            Outcome::Inject(Exception::page_fault(UNMAPPED + 8, 0))
        );
    }

    #[test]
    fn ldmxcsr_and_stmxcsr_move_mxcsr_and_fault_like_the_cpu() {
        let mut m = Machine::new();
        // ldmxcsr [rsp+4] (the form a distribution kernel's kernel_fpu_begin used).
        m.mem
            .write_obj(0x7f80u32, GuestAddress(m.at(DATA + 0x24)))
            .unwrap();
        m.regs.rsp = DATA + 0x20;
        let rip = m.regs.rip;
        assert_eq!(m.run(&[0x0f, 0xae, 0x54, 0x24, 0x04]), Outcome::Done);
        assert_eq!(m.mxcsr, 0x7f80);
        assert_eq!(m.regs.rip, rip + 5);
        // stmxcsr [rdi]: stored.
        m.mxcsr = 0x1fbf;
        m.regs.rdi = DATA + 0x40;
        assert_eq!(m.run(&[0x0f, 0xae, 0x1f]), Outcome::Done);
        let v: u32 = m.mem.read_obj(GuestAddress(m.at(DATA + 0x40))).unwrap();
        assert_eq!(v, 0x1fbf);
        // A reserved bit: #GP(0), MXCSR unchanged.
        m.mem
            .write_obj(0x1_0000u32, GuestAddress(m.at(DATA + 0x24)))
            .unwrap();
        assert_eq!(
            m.run(&[0x0f, 0xae, 0x54, 0x24, 0x04]),
            Outcome::Inject(Exception::gp(0))
        );
        assert_eq!(m.mxcsr, 0x1fbf);
        // stmxcsr to a read-only page: #PF with the write bit, nothing written; one
        // that straddles DATA's last bytes and the read-only page faults as a whole.
        m.regs.rdi = RO;
        assert_eq!(
            m.run(&[0x0f, 0xae, 0x1f]),
            Outcome::Inject(Exception::page_fault(RO, PF_PRESENT | PF_WRITE))
        );
        m.mem
            .write_obj(0u32, GuestAddress(m.at(DATA + 0xffc)))
            .unwrap();
        m.regs.rdi = DATA + 0xffe;
        assert_eq!(
            m.run(&[0x0f, 0xae, 0x1f]),
            Outcome::Inject(Exception::page_fault(RO, PF_PRESENT | PF_WRITE))
        );
        let v: u32 = m.mem.read_obj(GuestAddress(m.at(DATA + 0xffc))).unwrap();
        assert_eq!(v, 0, "a faulting store writes nothing");
        // Without MXCSR from the caller: refused with a message.
        let f = Failed::decode(&[0x0f, 0xae, 0x1f], m.regs.rip, 64).unwrap();
        assert!(f.needs_mxcsr());
        let out = f.resolve(&mut Cpu {
            regs: &mut m.regs,
            sregs: &m.sregs,
            mem: Some(&m.mem),
            mxcsr: None,
            xstate: None,
        });
        assert!(
            matches!(out, Outcome::Unhandled(ref w) if w.contains("stmxcsr")),
            "{out:?}"
        );
    }

    #[test]
    fn int3_and_fwait_keep_their_behaviour() {
        // As seen on this host: flags = 1, insn_size = 15, bytes cc 90 90 90 90 ...
        let seen = [1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        let mut m = Machine::new();
        let rip = m.regs.rip;
        let f = Failed::from_exit(&seen, rip, &m.sregs).unwrap();
        assert!(f.is_breakpoint());
        assert_eq!(f.bytes, [0xcc]);
        let mut cpu = Cpu {
            regs: &mut m.regs,
            sregs: &m.sregs,
            mem: None,
            mxcsr: None,
            xstate: None,
        };
        assert_eq!(f.resolve(&mut cpu), Outcome::Inject(Exception::BREAKPOINT));
        assert_eq!(m.regs.rip, rip + 1);
        // fwait in fpu__drop, as seen on this host: stepped over (one byte).
        let fwait = [1, 0x40d0_05c7_4865_9b0f, 0x65c3_0000_0000_7f00, 0x1000];
        let f = Failed::from_exit(&fwait, rip, &m.sregs).unwrap();
        assert!(!f.is_breakpoint());
        m.regs.rip = rip;
        let mut cpu = Cpu {
            regs: &mut m.regs,
            sregs: &m.sregs,
            mem: None,
            mxcsr: None,
            xstate: None,
        };
        assert_eq!(f.resolve(&mut cpu), Outcome::Done);
        assert_eq!(m.regs.rip, rip + 1);
        // fwait before an x87 instruction is still one byte (the decoder does not fuse).
        let f = Failed::decode(&[0x9b, 0xdb, 0xe3], rip, 64).unwrap();
        assert_eq!(f.insn.len(), 1);
        // int3 in real mode (the decoder follows the vCPU's mode).
        let mut real = kvm_sregs::default();
        real.cs.selector = 0;
        assert!(Failed::from_exit(&exit_data(&[0xcc]), 0x7c00, &real)
            .unwrap()
            .is_breakpoint());
        // Exit data without instruction bytes, or with none.
        assert!(Failed::from_exit(&[0, 0xcc01], rip, &m.sregs).is_err());
        assert!(Failed::from_exit(&[1, 0], rip, &m.sregs).is_err());
        assert!(Failed::from_exit(&[], rip, &m.sregs).is_err());
    }

    #[test]
    fn unknown_and_hidden_instructions_are_named() {
        let mut m = Machine::new();
        let rip = m.regs.rip;
        // xsaveopt [rax]: hidden by clearcpuid=xsaveopt,xsavec,xsaves.
        let f = Failed::from_exit(&exit_data(&[0x0f, 0xae, 0x30]), rip, &m.sregs).unwrap();
        assert_eq!(f.text(), "xsaveopt [rax]");
        let mut cpu = Cpu {
            regs: &mut m.regs,
            sregs: &m.sregs,
            mem: Some(&m.mem),
            mxcsr: None,
            xstate: None,
        };
        let Outcome::Unhandled(msg) = f.resolve(&mut cpu) else {
            panic!("xsaveopt handled")
        };
        assert_eq!(
            msg,
            format!(
                "emulation failure at rip {rip:#x} on `xsaveopt [rax]` (not emulated: hidden by \
                 clearcpuid=xsaveopt,xsavec,xsaves, which the guest kernel did not honour; \
                 bytes 0f ae 30)"
            )
        );
        // An AVX instruction (vmovaps xmm1, xmm5): neither emulated nor hidden, the
        // message says why.
        assert!(
            matches!(m.run(&[0xc5, 0xf8, 0x28, 0xcd]), Outcome::Unhandled(s) if s.contains("not emulated and not hidden"))
        );
        // clac (SMAP), an AVX2 instruction (vpaddd ymm0, ymm1, ymm2), andn (BMI1):
        // hidden, each by its option.
        for (bytes, option) in [
            (&[0x0f, 0x01, 0xca][..], "smap"),
            (&[0xc5, 0xf5, 0xfe, 0xc2][..], "avx2"),
            (&[0xc4, 0xe2, 0x78, 0xf2, 0xc3][..], "bmi1,bmi2"),
            (&[0x48, 0x0f, 0xc7, 0xf0][..], "rdrand"),
        ] {
            let f = Failed::decode(bytes, rip, 64).unwrap();
            assert_eq!(f.entry().unwrap().hidden_by, Some(option), "{}", f.text());
            assert!(matches!(m.run(bytes), Outcome::Unhandled(s) if s.contains(option)));
        }
        // wrmsr: not in the table.
        assert_eq!(
            m.run(&[0x0f, 0x30]),
            Outcome::Unhandled(format!(
                "emulation failure at rip {rip:#x} on `wrmsr` (not emulated; bytes 0f 30)"
            ))
        );
        // The locked form is named as such.
        let f = Failed::decode(LOCK_CMPXCHG16B_RSI, rip, 64).unwrap();
        assert!(f.insn.has_lock_prefix());
        assert!(f.text().starts_with("lock cmpxchg16b"), "{}", f.text());
        // Undecodable bytes (cmpxchg16b with a register operand).
        assert!(Failed::decode(&[0x48, 0x0f, 0xc7, 0xce], rip, 64)
            .unwrap_err()
            .contains("undecodable bytes 48 0f c7 ce"));
        // An emulated instruction outside 64-bit mode is refused.
        m.sregs.cs.l = 0;
        m.sregs.cs.db = 1;
        assert!(
            matches!(m.run(&[0x0f, 0xc7, 0x0e]), Outcome::Unhandled(s) if s.contains("64-bit mode"))
        );
    }

    /// The features the software host's command line clears.
    fn cleared() -> Vec<&'static str> {
        super::super::HIDDEN.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn table_agrees_with_the_command_line_and_the_docs() {
        let cleared = cleared();
        let mut documented: Vec<&str> = HIDDEN_FEATURES.iter().map(|(f, _)| *f).collect();
        for e in TABLE {
            if matches!(e.action, Action::Hidden) {
                assert!(e.hidden_by.is_some(), "{}", e.instruction);
            }
            for f in e.hidden_by.into_iter().flat_map(|h| h.split(',')) {
                assert!(cleared.contains(&f), "{f} is not in compat::HIDDEN");
                documented.push(f);
            }
        }
        for f in &cleared {
            assert!(documented.contains(f), "clearcpuid={f} is in no table");
        }
        let compat = include_str!("../../../../docs/COMPAT.md");
        for e in TABLE {
            assert!(
                compat.contains(e.instruction),
                "{} is not in COMPAT.md",
                e.instruction
            );
        }
        for (f, _) in HIDDEN_FEATURES {
            assert!(
                compat.contains(&format!("`{f}`")),
                "{f} is not in COMPAT.md"
            );
        }
    }
}
