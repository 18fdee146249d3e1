//! Host compatibility: what a software-backed KVM (no VMX/SVM, e.g. the `kvm_pvm`
//! backend) needs that a hardware-virtualized host does not.
//!
//! Everything that differs between the two kinds of host is decided here, once, from
//! [`HostKind::detect`]:
//!
//! * **CPUID.** On a software backend `KVM_SET_CPUID2` has no visible effect: the guest
//!   sees the host's CPUID. Features whose instructions the backend's emulator cannot run
//!   (XSAVE/XRSTOR, CLAC/STAC, POPCNT, AVX...) are therefore turned off through the
//!   kernel command line ([`HostKind::extra_cmdline`], [`HIDDEN`]). On a hardware host the VMM's own
//!   CPUID table is in force and nothing is added.
//! * **Paravirtual features.** The host's CPUID, which the guest sees here, announces
//!   the outer hypervisor's KVM paravirtual features (PV IPIs, PV spinlock kicks, PV
//!   EOI) whose hypercalls this host's KVM would handle with an in-kernel LAPIC that
//!   does not exist: IPIs sent that way are lost and the guest hangs at SMP bring-up.
//!   `clearcpuid=hypervisor` hides the hypervisor from the guest, and with it every PV
//!   feature, kvmclock included; the VMM then tells the kernel its TSC frequency with
//!   `tsc_early_khz=` (see [`HostKind::tsc_cmdline`]). On a hardware host the VMM's own
//!   CPUID table keeps kvmclock and drops the PV features that need an in-kernel LAPIC.
//! * **Timers.** Nothing to do: the guest uses the TSC-deadline timer, whose MSR the
//!   VMM traps (MSR filter) to the user-space LAPIC on both kinds of host. With it Linux
//!   needs neither a PIT nor a LAPIC timer calibration.
//! * **Instructions the backend cannot run.** Its emulator fails on some instructions
//!   with `KVM_EXIT_INTERNAL_ERROR` (suberror 1, emulation) carrying the instruction
//!   bytes. One table ([`emulate::TABLE`]) says what the VMM does with each: emulate it
//!   (`cmpxchg16b`, `cmpxchg8b`, `popcnt`), step over it and inject #BP (`int3`, so the
//!   kernel's int3 self-test and kprobes work), skip it (`fwait`), or keep it away by
//!   hiding its feature on the command line (XSAVE, SMAP, AVX...).
//! * **Guest user mode.** On `syscall` from guest CPL 3 the backend loads RIP = LSTAR
//!   but leaves CS/SS at the user selectors, so the fetch at LSTAR faults. The VMM
//!   repairs that at a breakpoint on the guest's page-fault handler ([`usermode`]); the
//!   `syscall` MSRs are trapped for it ([`HostKind::traps_syscall_msrs`]). A hardware
//!   host runs `syscall` in hardware and needs nothing.

pub mod emulate;
pub mod shadow;
pub mod usermode;
pub mod xstate;

/// Which kind of KVM this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VMX or SVM: the ordinary path.
    Hardware,
    /// KVM without hardware virtualization (software backend).
    Software,
}

/// The CPU features a software backend hides from the guest kernel (`clearcpuid=`), by
/// the name the kernel prints and by its bit number (`32 * word + bit` of the kernel's
/// `cpufeatures.h`; the words used here are the CPUID registers themselves: 4 is
/// CPUID.1:ECX, 9 CPUID.7:EBX, 10 CPUID.(0xD,1):EAX, 16 CPUID.7:ECX, 18 CPUID.7:EDX,
/// which are the same in every kernel). Why each is hidden: [`emulate::TABLE`] and
/// [`emulate::HIDDEN_FEATURES`].
///
/// The command line gives the numbers: the kernel copies the `clearcpuid=` value into
/// a 128-byte buffer (Linux 6.1, `cpu_parse_early_param`) and silently drops what does
/// not fit, and the names of all these features do not fit (the kernel prints what it
/// cleared, by name: "Clearing CPUID bits: hypervisor xsaveopt ...").
pub const HIDDEN: &[(&str, u16)] = &[
    ("hypervisor", 4 * 32 + 31),
    ("xsaveopt", 10 * 32),
    ("xsavec", 10 * 32 + 1),
    ("xsaves", 10 * 32 + 3),
    ("smap", 9 * 32 + 20),
    ("smep", 9 * 32 + 7),
    ("popcnt", 4 * 32 + 23),
    ("avx2", 9 * 32 + 5),
    ("bmi1", 9 * 32 + 3),
    ("bmi2", 9 * 32 + 8),
    ("fsgsbase", 9 * 32),
    ("erms", 9 * 32 + 9),
    ("fsrm", 18 * 32 + 4),
    ("rdrand", 4 * 32 + 30),
    ("rdseed", 9 * 32 + 18),
    ("pcid", 4 * 32 + 17),
    ("invpcid", 9 * 32 + 10),
    ("pku", 16 * 32 + 3),
    ("umip", 16 * 32 + 2),
    ("cx16", 4 * 32 + 13),
    ("ssse3", 4 * 32 + 9),
    ("sse4_1", 4 * 32 + 19),
    ("sse4_2", 4 * 32 + 20),
    ("aes", 4 * 32 + 25),
    ("pclmulqdq", 4 * 32 + 1),
    ("sha_ni", 9 * 32 + 29),
    ("x2apic", 4 * 32 + 21),
];

/// The longest `clearcpuid=` value the kernel reads whole (its buffer is 128 bytes).
pub const CLEARCPUID_MAX: usize = 127;

/// Command-line options a software backend needs (see the module docs): the
/// `clearcpuid=` of [`HIDDEN`], `nowatchdog`, because guest kernel code runs under
/// instruction emulation, tens of times slower than on hardware, and the lockup
/// detectors' fixed thresholds then report false lockups (a Debian 6.1 kernel on 2
/// nodes logged "BUG: soft lockup - CPU#1 stuck for 26s" in a `stop_machine` that was
/// only slow, seen); `cryptomgr.notests`, because the kernel's crypto self-tests (RSA
/// private-key vectors, multi-precision loops) ran for more than 20 minutes under
/// emulation in that kernel.
pub fn software_cmdline() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        let bits: Vec<String> = HIDDEN.iter().map(|(_, b)| b.to_string()).collect();
        format!("nowatchdog cryptomgr.notests clearcpuid={}", bits.join(","))
    })
}

impl HostKind {
    /// Detects the host kind from the CPU flags the host kernel reports.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(&cpuinfo)
    }

    /// Decides from the text of /proc/cpuinfo.
    pub fn from_cpuinfo(cpuinfo: &str) -> Self {
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw {
            HostKind::Hardware
        } else {
            HostKind::Software
        }
    }

    /// The command-line option that gives the guest its TSC frequency, where the host
    /// needs it (no kvmclock on a software backend, see the module docs).
    pub fn tsc_cmdline(self, tsc_khz: u32) -> String {
        match self {
            HostKind::Hardware => String::new(),
            HostKind::Software => format!("tsc_early_khz={tsc_khz}"),
        }
    }

    /// Whether the VMM repairs guest system calls (and so traps the `syscall` MSRs and
    /// places its breakpoint): software backends only.
    pub fn traps_syscall_msrs(self) -> bool {
        self == HostKind::Software
    }

    /// Kernel command-line options this host needs, appended after the VMM's defaults.
    pub fn extra_cmdline(self) -> &'static str {
        match self {
            HostKind::Hardware => "",
            HostKind::Software => software_cmdline(),
        }
    }
}

/// KVM_INTERNAL_ERROR_EMULATION: the suberror of an emulation failure, whose data
/// carries the instruction bytes ([`emulate::Failed::from_exit`]).
pub const INTERNAL_ERROR_EMULATION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_host_kind() {
        assert_eq!(
            HostKind::from_cpuinfo("flags\t\t: fpu vme de pse tsc msr svm lm\n"),
            HostKind::Hardware
        );
        assert_eq!(
            HostKind::from_cpuinfo("flags\t\t: fpu vme vmx\n"),
            HostKind::Hardware
        );
        assert_eq!(
            HostKind::from_cpuinfo("flags\t\t: fpu vme de pse tsc hypervisor\n"),
            HostKind::Software
        );
        assert_eq!(HostKind::Hardware.extra_cmdline(), "");
        assert!(HostKind::Software
            .extra_cmdline()
            .contains("clearcpuid=159,320,321,323,"));
        assert!(HostKind::Software.extra_cmdline().contains("nowatchdog"));
        assert_eq!(
            HostKind::Software.tsc_cmdline(2_596_000),
            "tsc_early_khz=2596000"
        );
        assert_eq!(HostKind::Hardware.tsc_cmdline(2_596_000), "");
    }

    #[test]
    fn clearcpuid_fits_the_kernel_buffer_and_names_each_feature_once() {
        let line = software_cmdline();
        let value = line
            .split_whitespace()
            .find_map(|o| o.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(
            value.len() <= CLEARCPUID_MAX,
            "clearcpuid= is {} bytes, the kernel reads {CLEARCPUID_MAX}",
            value.len()
        );
        assert_eq!(value.split(',').count(), HIDDEN.len());
        for (i, (name, bit)) in HIDDEN.iter().enumerate() {
            for (other, obit) in &HIDDEN[i + 1..] {
                assert!(name != other && bit != obit, "{name} twice");
            }
            // Only the CPUID words whose numbering every kernel shares.
            assert!([4, 9, 10, 16, 18].contains(&(bit / 32)), "{name}: {bit}");
        }
    }
}
