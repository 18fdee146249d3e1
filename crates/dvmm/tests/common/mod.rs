//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guest kernel built by `make guest`.
pub fn kernel() -> PathBuf {
    let k = workspace().join("guest/out/vmlinux");
    assert!(
        k.is_file(),
        "{} is missing: run `make guest` first (make test does)",
        k.display()
    );
    k
}

/// The initramfs whose /init only waits (for kernel-only runs such as locktorture).
pub fn idle_initrd() -> String {
    let i = workspace().join("guest/out/idle.cpio");
    assert!(
        i.is_file(),
        "{} is missing: run `make guest` first",
        i.display()
    );
    i.display().to_string()
}

/// The busybox initramfs (shell, test programs).
pub fn initramfs() -> String {
    let i = workspace().join("guest/out/initramfs.cpio.gz");
    assert!(
        i.is_file(),
        "{} is missing: run `make guest` first",
        i.display()
    );
    i.display().to_string()
}

/// The kernel options that run locktorture on `lock` with 2 writers per vCPU for
/// `secs` seconds, then power the guest off.
pub fn torture(lock: &str, vcpus: usize, secs: u32) -> String {
    format!(
        "locktorture.torture_type={lock} locktorture.nwriters_stress={} locktorture.shutdown_secs={secs}",
        2 * vcpus
    )
}

/// The last `n` bytes of `s` or a little fewer, for failure messages: the cut moves
/// forward to a character boundary, so a multi-byte character is never split.
pub fn tail_bytes(s: &str, n: usize) -> &str {
    let mut from = s.len().saturating_sub(n);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    &s[from..]
}

/// Runs `dvmm` with `args` from the workspace and waits for it.
pub fn dvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("run dvmm")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads `child`'s stdout on a thread; lines arrive on the returned channel.
pub fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits up to `limit` for a line containing `needle`; the error carries the last lines.
pub fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut tail = Vec::new();
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                if l.contains(needle) {
                    return Ok(());
                }
                tail.push(l);
                if tail.len() > 30 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(format!(
        "'{needle}' not seen; console tail:\n{}",
        tail.join("\n")
    ))
}

/// Pids of `dvmm node` processes whose command line contains `tag`.
pub fn node_pids(tag: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" node --config ") && cmd.contains(tag) {
            pids.push(pid);
        }
    }
    pids
}

/// Network namespaces whose name contains `tag`.
pub fn namespaces(tag: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.contains(tag))
        .map(str::to_owned)
        .collect()
}

/// On a software-KVM host: the guest kernel's "Clearing CPUID bits:" line names every
/// feature of `vmm::compat::HIDDEN`, in order, and nothing it did not know (a wrong bit
/// number or a `clearcpuid=` value longer than the kernel reads would show here).
pub fn hidden_features_cleared(console: &str) {
    use vmm::compat::{HostKind, HIDDEN};
    if HostKind::detect() != HostKind::Software {
        return;
    }
    let names: Vec<&str> = HIDDEN.iter().map(|(n, _)| *n).collect();
    let want = format!("Clearing CPUID bits: {}", names.join(" "));
    let got = console
        .lines()
        .find(|l| l.contains("Clearing CPUID bits:"))
        .map_or("(no such line)", str::trim_end);
    assert!(
        got.ends_with(&want),
        "the kernel printed\n{got}\nnot\n{want}"
    );
}
