//! Guest user mode on a software-KVM host: the system-call repair.
//!
//! On a KVM without VMX/SVM (the `kvm_pvm` backend) a `syscall` executed by guest user
//! code loads RIP = LSTAR, RCX and R11 and masks RFLAGS, but leaves CS/SS at the user
//! selectors. The fetch at LSTAR then faults (#PF, error 0x15: present, user,
//! instruction fetch) and the guest kernel would kill the program. No exit reaches the
//! VMM at the `syscall` itself, but one can be had at the first instruction of the
//! guest's page-fault handler, and that is enough to finish the `syscall` properly:
//!
//! 1. **The hook.** When a vCPU writes LSTAR (the MSR filter traps the write; the guest
//!    does it in `syscall_init`, after its IDT exists and before any user mode), the VMM
//!    finds the page-fault handler through IDT gate 14 (IDTR base, read through the
//!    guest's page tables, so KASLR does not matter), checks that it starts like Linux's
//!    `asm_exc_page_fault` (a 3-byte slot that the kernel's alternatives may rewrite,
//!    then `cld`, then `call`) and replaces the `cld` (offset 3) with a breakpoint byte
//!    (0xcc) in guest memory. The backend cannot emulate `int3`, so every #PF now makes
//!    `KVM_RUN` return with an emulation failure at that address. Guest text is shared
//!    memory: one node's patch serves every node; a node that did not patch finds the
//!    hook from its own vCPU's IDT at its first breakpoint exit.
//! 2. **The repair.** At the hook the exception frame lies at RSP. It is the broken
//!    `syscall` when the error code is 0x15, the faulting RIP is LSTAR, the frame's CS is
//!    a user selector, the frame's RFLAGS equal R11 masked with SFMASK (user mode always
//!    runs with IF set and SFMASK clears it, so a program that merely jumps to LSTAR is
//!    told apart) and the two bytes before RCX are `0f 05`. Then the VMM drops the frame
//!    and puts the vCPU where a correct `syscall` would have: RIP = LSTAR, RSP = the user
//!    RSP, RFLAGS = masked, CS/SS = the kernel selectors from STAR. The way back to user
//!    mode (`sysretq` or `iretq`) needs nothing: the backend performs both itself.
//! 3. **Everything else passes through**: the VMM does what the replaced `cld` would
//!    have done (clear DF, step over the byte) and the guest handles its page fault.
//!
//! The guest image is never modified on disk; the byte lives in guest RAM only. On a
//! hardware host none of this is active (the MSRs are not trapped, nothing is patched).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::paging::{PageTables, PagingError};

/// IA32_STAR: the kernel and user selectors of `syscall`/`sysret`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR: the compatibility-mode entry point (not trapped).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK: the RFLAGS bits `syscall` clears.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;

const PF_VECTOR: u64 = 14;
const CLD: u8 = 0xfc;
const INT3: u8 = 0xcc;
const CALL_REL32: u8 = 0xe8;
/// The breakpoint replaces the `cld` after the 3-byte slot.
const HOOK_OFFSET: u64 = 3;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_FIXED: u64 = 1 << 1;
/// #PF error code of the broken `syscall`: present | user | instruction fetch.
const PF_ERROR_SYSCALL: u64 = 0x15;
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// Why the hook could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The IDT has no gate 14 yet.
    #[error("the IDT (limit {0:#x}) has no page-fault gate")]
    NoGate(u16),
    /// The IDT or the handler could not be read.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// The handler does not start as expected.
    #[error("the page-fault handler at {handler:#x} starts with {bytes:02x?}, not <3-byte slot> cld call")]
    Unexpected {
        /// Handler address.
        handler: u64,
        /// Its first bytes.
        bytes: [u8; 5],
    },
    /// Writing the breakpoint byte failed.
    #[error("cannot write the breakpoint at guest-physical {0:#x}")]
    Write(u64),
}

/// What a breakpoint exit turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakpoint {
    /// Not the hook: the guest's own `int3`.
    NotOurs,
    /// A broken `syscall`, repaired: the vCPU now enters the kernel's system-call path.
    Syscall,
    /// An ordinary page fault: `cld` emulated, the guest handles it.
    PassThrough,
    /// Looked like the system-call entry but failed a check (e.g. a program jumping to
    /// LSTAR): passed through, so the guest delivers SIGSEGV.
    Refused,
}

/// The exception frame the CPU pushed for the page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Frame {
    /// Error code.
    pub error: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS (RF set by the fault).
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

/// A vCPU's `syscall` MSRs as the guest wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyscallMsrs {
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_FMASK.
    pub sfmask: u64,
}

impl SyscallMsrs {
    /// The kernel code selector `syscall` loads.
    pub fn kernel_cs(&self) -> u16 {
        ((self.star >> 32) & 0xfffc) as u16
    }
}

/// Decides what a hook exit is, from the frame, R11, the MSRs and the two bytes before
/// RCX (None: unreadable).
pub fn decide(frame: &Frame, r11: u64, msrs: &SyscallMsrs, insn: Option<[u8; 2]>) -> Breakpoint {
    let entry_fault =
        frame.error == PF_ERROR_SYSCALL && frame.rip == msrs.lstar && frame.cs & 3 == 3;
    if !entry_fault {
        return Breakpoint::PassThrough;
    }
    if msrs.lstar == 0
        || (r11 & !msrs.sfmask) != (frame.rflags & !RFLAGS_RF)
        || insn != Some(SYSCALL_INSN)
    {
        return Breakpoint::Refused;
    }
    Breakpoint::Syscall
}

/// The vCPU state a correct `syscall` would have produced.
pub fn repaired(frame: &Frame, msrs: &SyscallMsrs, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
    regs.rip = msrs.lstar;
    regs.rsp = frame.rsp;
    regs.rflags = (frame.rflags & !msrs.sfmask & !RFLAGS_RF) | RFLAGS_FIXED;
    let cs = msrs.kernel_cs();
    sregs.cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ss = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: cs + 8,
        type_: 0x3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
}

/// What `cld` does: clear DF and step over the one-byte instruction.
pub fn pass_through(regs: &mut kvm_regs) {
    regs.rflags &= !RFLAGS_DF;
    regs.rip += 1;
}

#[derive(Default)]
struct MsrCache {
    star: AtomicU64,
    lstar: AtomicU64,
    sfmask: AtomicU64,
}

/// Counters of the repair.
#[derive(Debug, Default)]
pub struct UserModeStats {
    /// System calls repaired.
    pub syscalls: AtomicU64,
    /// Ordinary page faults passed through.
    pub passed: AtomicU64,
    /// Entry faults refused (SIGSEGV in the guest).
    pub refused: AtomicU64,
}

/// The repair of one VM (one node's part of it).
pub struct UserMode {
    mem: GuestMemoryMmap,
    /// Guest-virtual address of the breakpoint; 0 while unknown.
    hook: AtomicU64,
    warned: AtomicBool,
    msrs: Vec<MsrCache>,
    /// Counters.
    pub stats: UserModeStats,
}

impl UserMode {
    /// For a VM of `vcpus` vCPUs over `mem`.
    pub fn new(mem: GuestMemoryMmap, vcpus: usize) -> Self {
        UserMode {
            mem,
            hook: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            msrs: (0..vcpus).map(|_| MsrCache::default()).collect(),
            stats: UserModeStats::default(),
        }
    }

    /// Whether this MSR's writes are trapped (and must be applied by the caller).
    pub fn traps(index: u32) -> bool {
        matches!(index, MSR_STAR | MSR_LSTAR | MSR_SYSCALL_MASK)
    }

    /// Records a trapped write of vCPU `vcpu`.
    pub fn msr_written(&self, vcpu: usize, index: u32, value: u64) {
        if let Some(c) = self.msrs.get(vcpu) {
            let slot = match index {
                MSR_STAR => &c.star,
                MSR_LSTAR => &c.lstar,
                MSR_SYSCALL_MASK => &c.sfmask,
                _ => return,
            };
            slot.store(value, Ordering::Relaxed);
        }
    }

    /// vCPU `vcpu`'s `syscall` MSRs.
    pub fn msrs(&self, vcpu: usize) -> SyscallMsrs {
        self.msrs
            .get(vcpu)
            .map_or_else(SyscallMsrs::default, |c| SyscallMsrs {
                star: c.star.load(Ordering::Relaxed),
                lstar: c.lstar.load(Ordering::Relaxed),
                sfmask: c.sfmask.load(Ordering::Relaxed),
            })
    }

    /// The breakpoint address, once known.
    pub fn hook(&self) -> Option<u64> {
        Some(self.hook.load(Ordering::Acquire)).filter(|h| *h != 0)
    }

    /// Finds the page-fault handler through the IDT and places the breakpoint (or finds
    /// it placed). Idempotent; returns the breakpoint address.
    pub fn install(&self, pt: PageTables, idt_base: u64, idt_limit: u16) -> Result<u64, HookError> {
        if let Some(h) = self.hook() {
            return Ok(h);
        }
        if u64::from(idt_limit) < PF_VECTOR * 16 + 15 {
            return Err(HookError::NoGate(idt_limit));
        }
        let mut gate = [0u8; 16];
        pt.read(&self.mem, idt_base + PF_VECTOR * 16, &mut gate)?;
        let handler = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
            | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
            | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32;
        let mut bytes = [0u8; 5];
        pt.read(&self.mem, handler, &mut bytes)?;
        let at = handler + HOOK_OFFSET;
        match (bytes[3], bytes[4]) {
            (CLD, CALL_REL32) => {
                let pa = pt.translate(&self.mem, at)?;
                self.mem
                    .write_obj(INT3, GuestAddress(pa))
                    .map_err(|_| HookError::Write(pa))?;
                tracing::info!(
                    handler = format_args!("{handler:#x}"),
                    "user-mode repair: breakpoint placed"
                );
            }
            // Placed already (by another node of the cluster).
            (INT3, CALL_REL32) => {}
            _ => return Err(HookError::Unexpected { handler, bytes }),
        }
        self.hook.store(at, Ordering::Release);
        Ok(at)
    }

    /// Logs why the hook is unavailable, once.
    pub fn warn_once(&self, e: &HookError) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("guest user mode unavailable (system calls will fail): {e}");
        }
    }

    /// Handles a breakpoint exit of vCPU `vcpu` at `regs.rip` (pointing at the 0xcc).
    /// On `Syscall` and `PassThrough`/`Refused` the registers are updated for the
    /// caller to write back; on `NotOurs` they are untouched.
    pub fn on_breakpoint(
        &self,
        vcpu: usize,
        regs: &mut kvm_regs,
        sregs: &mut kvm_sregs,
    ) -> Breakpoint {
        let pt = PageTables::from_regs(sregs.cr3, sregs.cr4);
        let hook = match self.hook() {
            Some(h) => h,
            // Another node may have placed it: look through this vCPU's IDT.
            None => match self.install(pt, sregs.idt.base, sregs.idt.limit) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(
                        vcpu,
                        rip = format_args!("{:#x}", regs.rip),
                        "user-mode repair: no hook yet: {e}"
                    );
                    return Breakpoint::NotOurs;
                }
            },
        };
        if regs.rip != hook {
            return Breakpoint::NotOurs;
        }
        let mut raw = [0u8; 48];
        let frame = match pt.read(&self.mem, regs.rsp, &mut raw) {
            Ok(()) => {
                let w = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(b)
                };
                Frame {
                    error: w(0),
                    rip: w(1),
                    cs: w(2),
                    rflags: w(3),
                    rsp: w(4),
                    ss: w(5),
                }
            }
            Err(e) => {
                tracing::warn!(vcpu, "user-mode repair: exception frame unreadable: {e}");
                pass_through(regs);
                self.stats.passed.fetch_add(1, Ordering::Relaxed);
                return Breakpoint::PassThrough;
            }
        };
        let msrs = self.msrs(vcpu);
        let mut insn = None;
        if frame.error == PF_ERROR_SYSCALL && frame.rip == msrs.lstar {
            let mut b = [0u8; 2];
            insn = pt
                .read(&self.mem, regs.rcx.wrapping_sub(2), &mut b)
                .ok()
                .map(|()| b);
        }
        let d = decide(&frame, regs.r11, &msrs, insn);
        match d {
            Breakpoint::Syscall => {
                repaired(&frame, &msrs, regs, sregs);
                self.stats.syscalls.fetch_add(1, Ordering::Relaxed);
            }
            Breakpoint::Refused => {
                pass_through(regs);
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    vcpu,
                    ?frame,
                    r11 = format_args!("{:#x}", regs.r11),
                    rcx = format_args!("{:#x}", regs.rcx),
                    ?msrs,
                    ?insn,
                    "user-mode repair: refused an entry fault"
                );
            }
            _ => {
                pass_through(regs);
                self.stats.passed.fetch_add(1, Ordering::Relaxed);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::tests::{map, memory};

    const LSTAR: u64 = 0xffff_ffff_8120_0040;
    const MSRS: SyscallMsrs = SyscallMsrs {
        star: 0x0023_0010_0000_0000,
        lstar: LSTAR,
        sfmask: 0x4_7700,
    };

    fn syscall_frame() -> Frame {
        // User RFLAGS 0x246 (IF, ZF, PF) masked by SFMASK (IF cleared), RF set.
        Frame {
            error: 0x15,
            rip: LSTAR,
            cs: 0x33,
            rflags: (0x246 & !MSRS.sfmask) | RFLAGS_RF,
            rsp: 0x7ffd_0000_1000,
            ss: 0x2b,
        }
    }

    #[test]
    fn decides_syscall_and_refuses_forgeries() {
        let f = syscall_frame();
        let ok = Some(SYSCALL_INSN);
        assert_eq!(decide(&f, 0x246, &MSRS, ok), Breakpoint::Syscall);
        // A program that jumps to LSTAR: user RFLAGS in the frame still has IF.
        let jump = Frame {
            rflags: 0x246 | RFLAGS_RF,
            ..f
        };
        assert_eq!(decide(&jump, 0x246, &MSRS, ok), Breakpoint::Refused);
        // Even with R11 prepared to match the frame.
        assert_eq!(
            decide(&jump, 0x246 | RFLAGS_RF, &MSRS, ok),
            Breakpoint::Refused
        );
        // No `syscall` instruction before RCX, or unreadable.
        assert_eq!(
            decide(&f, 0x246, &MSRS, Some([0x90, 0x90])),
            Breakpoint::Refused
        );
        assert_eq!(decide(&f, 0x246, &MSRS, None), Breakpoint::Refused);
        // Ordinary faults: a user data fault, a kernel fault, a fetch elsewhere.
        assert_eq!(
            decide(
                &Frame {
                    error: 0x6,
                    rip: 0x40_1000,
                    ..f
                },
                0,
                &MSRS,
                ok
            ),
            Breakpoint::PassThrough
        );
        assert_eq!(
            decide(&Frame { cs: 0x10, ..f }, 0x246, &MSRS, ok),
            Breakpoint::PassThrough
        );
        assert_eq!(
            decide(
                &Frame {
                    rip: LSTAR + 1,
                    ..f
                },
                0x246,
                &MSRS,
                ok
            ),
            Breakpoint::PassThrough
        );
        // MSRs never written: nothing can be repaired.
        let none = SyscallMsrs::default();
        assert_eq!(
            decide(&Frame { rip: 0, ..f }, 0x246, &none, ok),
            Breakpoint::Refused
        );
    }

    #[test]
    fn repair_enters_the_kernel_like_syscall() {
        let f = syscall_frame();
        let mut regs = kvm_regs {
            rip: LSTAR + HOOK_OFFSET,
            rsp: 0xffff_c900_0000_3f58,
            rcx: 0x40_1002,
            r11: 0x246,
            rflags: 0x2,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        repaired(&f, &MSRS, &mut regs, &mut sregs);
        assert_eq!(regs.rip, LSTAR);
        assert_eq!(regs.rsp, f.rsp);
        assert_eq!(regs.rflags, 0x46 | 0x2);
        assert_eq!(
            (regs.rcx, regs.r11),
            (0x40_1002, 0x246),
            "RCX/R11 untouched"
        );
        assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (0x10, 0, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.dpl), (0x18, 0));
        let mut r = kvm_regs {
            rip: 5,
            rflags: 0x646,
            ..Default::default()
        };
        pass_through(&mut r);
        assert_eq!((r.rip, r.rflags), (6, 0x246));
    }

    /// A guest image with an IDT whose gate 14 points at a handler, mapped by real
    /// page tables: install places the byte once, is idempotent, finds a byte another
    /// node placed, and refuses a handler of another shape.
    #[test]
    fn installs_through_the_idt() {
        let mem = memory();
        let idt_va = 0xffff_fe00_0000_0000u64;
        let text_va = 0xffff_ffff_8120_0000u64;
        let stack_va = 0xffff_c900_0000_3000u64;
        let pt = map(
            &mem,
            &[
                (idt_va, 0x10_0000),
                (text_va, 0x20_0000),
                (stack_va, 0x30_0000),
            ],
        );
        let handler = text_va + 0x100;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[5] = 0x8e;
        gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        mem.write_slice(&gate, GuestAddress(0x10_0000 + 14 * 16))
            .unwrap();
        mem.write_slice(
            &[0x0f, 0x1f, 0x00, CLD, CALL_REL32],
            GuestAddress(0x20_0100),
        )
        .unwrap();

        let um = UserMode::new(mem.clone(), 2);
        assert_eq!(um.install(pt, idt_va, 0x7f), Err(HookError::NoGate(0x7f)));
        assert_eq!(um.install(pt, idt_va, 0xfff).unwrap(), handler + 3);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0103)).unwrap(), INT3);
        assert_eq!(um.install(pt, idt_va, 0xfff).unwrap(), handler + 3);

        // A second node over the same memory finds the placed byte at its first exit.
        let other = UserMode::new(mem.clone(), 2);
        other.msr_written(1, MSR_STAR, MSRS.star);
        other.msr_written(1, MSR_LSTAR, LSTAR);
        other.msr_written(1, MSR_SYSCALL_MASK, MSRS.sfmask);
        assert_eq!(other.msrs(1), MSRS);
        let sregs0 = kvm_sregs {
            cr3: pt.cr3,
            idt: kvm_bindings::kvm_dtable {
                base: idt_va,
                limit: 0xfff,
                ..Default::default()
            },
            ..Default::default()
        };
        // The guest's own int3 elsewhere is not ours.
        let mut regs = kvm_regs {
            rip: text_va + 0x500,
            ..Default::default()
        };
        let mut sregs = sregs0;
        assert_eq!(
            other.on_breakpoint(1, &mut regs, &mut sregs),
            Breakpoint::NotOurs
        );
        assert_eq!(regs.rip, text_va + 0x500);

        // A broken syscall: frame on the stack, `syscall` before RCX in user text.
        let user_va = 0x40_1000u64;
        let pt_user = map(&mem, &[(user_va, 0x40_0000)]);
        assert_eq!(pt_user.cr3, pt.cr3);
        mem.write_slice(&SYSCALL_INSN, GuestAddress(0x40_0000))
            .unwrap();
        let f = syscall_frame();
        let words = [f.error, f.rip, f.cs, f.rflags, f.rsp, f.ss];
        for (i, w) in words.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(0x30_0f00 + i as u64 * 8))
                .unwrap();
        }
        let mut regs = kvm_regs {
            rip: handler + 3,
            rsp: stack_va + 0xf00,
            rcx: user_va + 2,
            r11: 0x246,
            rflags: 0x2,
            ..Default::default()
        };
        let mut sregs = sregs0;
        assert_eq!(
            other.on_breakpoint(1, &mut regs, &mut sregs),
            Breakpoint::Syscall
        );
        assert_eq!(
            (regs.rip, regs.rsp, sregs.cs.selector),
            (LSTAR, f.rsp, 0x10)
        );
        // vCPU 0 never wrote its MSRs on this node: refused, not repaired.
        let mut regs = kvm_regs {
            rip: handler + 3,
            rsp: stack_va + 0xf00,
            rcx: user_va + 2,
            r11: 0x246,
            ..Default::default()
        };
        let mut sregs = sregs0;
        assert_eq!(
            other.on_breakpoint(0, &mut regs, &mut sregs),
            Breakpoint::PassThrough
        );
        assert_eq!(regs.rip, handler + 4);
        assert_eq!(other.stats.syscalls.load(Ordering::Relaxed), 1);

        // A handler of another shape is left alone.
        mem.write_slice(&[0x55, 0x48, 0x89, 0xe5, 0x90], GuestAddress(0x20_0100))
            .unwrap();
        let third = UserMode::new(mem, 1);
        assert!(matches!(
            third.install(pt, idt_va, 0xfff),
            Err(HookError::Unexpected { .. })
        ));
    }
}
