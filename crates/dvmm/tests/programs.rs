//! Programs in the distributed guest: the busybox initramfs on 2 node processes, user
//! mode through the VMM's system-call repair on a software-KVM host (the ordinary path
//! on a hardware host), the interactive console through a pseudo-terminal.

mod common;

use common::{dvmm, initramfs, kernel, text, workspace};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest-virtual address of the kernel's system-call entry, from the symbols of
/// the guest kernel (`make guest` keeps them).
fn syscall_entry() -> String {
    let out = Command::new("nm")
        .arg(kernel())
        .output()
        .expect("run nm on the guest kernel");
    let syms = text(&out.stdout);
    let addr = syms
        .lines()
        .find(|l| l.ends_with(" entry_SYSCALL_64"))
        .and_then(|l| l.split_whitespace().next())
        .expect("entry_SYSCALL_64 in the guest kernel's symbols");
    format!("0x{addr}")
}

fn run_script(nodes: usize, vcpus: usize, script: &str) -> (String, String, bool) {
    run_script_with(nodes, vcpus, "", script)
}

/// As [`run_script`], with `extra` options before the script on the guest's command line.
fn run_script_with(
    nodes: usize,
    vcpus: usize,
    extra: &str,
    script: &str,
) -> (String, String, bool) {
    let k = kernel();
    let cmdline = format!("{extra} dvmm.script={script}").trim().to_string();
    let out = dvmm(&[
        "run",
        "--nodes",
        &nodes.to_string(),
        "--vcpus",
        &vcpus.to_string(),
        "--memory",
        "1G",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        &initramfs(),
        "--cmdline",
        &cmdline,
        "--timeout",
        "900",
    ]);
    (text(&out.stdout), text(&out.stderr), out.status.success())
}

/// The number after `key` in `line` (0 if there is none).
fn number(line: &str, key: &str) -> u64 {
    line.split(key)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn no_guest_errors(console: &str) {
    for bad in ["segfault", "Oops", "BUG:", "WARNING:", "Kernel panic"] {
        assert!(
            !console.contains(bad),
            "'{bad}' in the guest log:\n{}",
            tail(console, 60)
        );
    }
}

/// The line avxtest printed for `mode`, which must say `corrupt=0 ... ok`.
fn avx_line<'a>(console: &'a str, mode: &str) -> &'a str {
    console
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with(&format!("AVXTEST mode={mode} ")))
        .unwrap_or_else(|| panic!("no avxtest {mode} line:\n{}", tail(console, 30)))
}

/// The programs the 2-node guest of [`programs_and_console_on_2_nodes`] runs from its
/// command line before the console part: the repair's guest tests (100,000 checked
/// system calls, 30 fork+exec+wait, signals, a program that jumps to the system-call
/// entry and must die of SIGSEGV, and nothing else happens) and the extended state (two
/// processes on one vCPU keep their own vector registers through 10,000 checks after
/// context switches, 5,000 rounds; two threads that swap vCPUs, and so nodes, every
/// round through 1,000 more: the state saved on one node, restored on the other).
fn programs_script(jump: &str) -> String {
    format!(
        "smptest;usertest+syscalls+100000;usertest+fork+30;usertest+signals;usertest+jump+{jump};usertest+syscalls+1000;avxtest+procs+5000;avxtest+threads+500"
    )
}

/// Checks what [`programs_script`] printed (`out`: the guest console and the VMM's
/// messages, as one text or two).
fn check_programs(console: &str, err: &str, jump: &str) {
    let t = tail(console, 40);
    assert!(
        console.contains("DVMM-GUEST nproc=2 "),
        "no init line:\n{t}\n{err}"
    );
    assert!(console.contains("SMPTEST PASS "), "smptest:\n{t}");
    assert!(
        console.contains("ran_on=0,1"),
        "smptest did not run on both CPUs:\n{t}"
    );
    assert!(
        console.contains("USERTEST syscalls=100000 ok"),
        "syscalls:\n{t}"
    );
    assert!(console.contains("USERTEST fork=30 ok"), "fork:\n{t}");
    assert!(console.contains("USERTEST signals ok"), "signals:\n{t}");
    assert!(console.contains("USERTEST jump=SIGSEGV ok"), "jump:\n{t}");
    assert!(
        console.contains("USERTEST syscalls=1000 ok"),
        "after the jump:\n{t}"
    );
    common::hidden_features_cleared(console);
    for (mode, checks) in [("procs", 10_000), ("threads", 1_000)] {
        let line = avx_line(console, mode);
        assert!(
            line.contains(&format!(" checked={checks} corrupt=0 ")) && line.ends_with(" ok"),
            "{line}\n{t}"
        );
    }
    assert!(
        avx_line(console, "threads").contains(" moved=1000 "),
        "the threads did not swap vCPUs every round:\n{t}"
    );
    // Every command exited 0 but the jumping child, which the kernel reports once.
    assert_eq!(
        console.matches("DVMM-GUEST exit=0").count(),
        8,
        "a command failed:\n{t}"
    );
    let segv: Vec<&str> = console.lines().filter(|l| l.contains("segfault")).collect();
    assert!(
        segv.len() <= 1 && segv.iter().all(|l| l.contains(&jump[2..])),
        "unexpected segfaults: {segv:?}"
    );
    for bad in ["Oops", "BUG:", "WARNING:", "Kernel panic"] {
        assert!(!console.contains(bad), "'{bad}' in the guest log:\n{t}");
    }
    // Both nodes repaired system calls of their own vCPU. (On a terminal a node's
    // line may follow the guest's last console line, which has no newline at the end.)
    for node in 0..2 {
        let key = format!("dvmm: node {node} stats vcpu");
        let line = err
            .lines()
            .find_map(|l| l.find(&key).map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("no vCPU stats of node {node}:\n{err}"));
        let n = number(line, "syscall=");
        assert!(n > 0, "node {node} repaired no system call: {line}");
    }
}

/// The kernel's XSAVE support off (`noxsave`, 1 node): the kernel then saves only the
/// legacy FXSAVE image on a context switch while the processes use the host's full
/// vector registers, and avxtest must find corrupt checks: the check of
/// [`check_programs`] can fail.
#[test]
fn avx_state_mixes_without_xsave() {
    let (console, err, ok) = run_script_with(1, 1, "noxsave", "avxtest+procs+200;poweroff+-f");
    let line = avx_line(&console, "procs");
    assert!(
        number(line, "corrupt=") > 0 && line.ends_with(" FAIL"),
        "no corruption seen with noxsave: {line}"
    );
    assert!(
        console.contains("AVXTEST first corruption: "),
        "{}",
        tail(&console, 20)
    );
    assert!(console.contains("DVMM-GUEST exit=1 cmd=avxtest procs 200"));
    assert!(ok, "dvmm run failed:\n{err}");
}

/// The second acceptance shape: heavy (about 4 minutes here), run by `make test-heavy`.
#[test]
#[ignore = "heavy: run by make test-heavy"]
fn smptest_on_2_nodes_4_vcpus() {
    let (console, err, ok) = run_script(2, 4, "smptest;poweroff+-f");
    let t = tail(&console, 30);
    assert!(console.contains("DVMM-GUEST nproc=4 "), "{t}\n{err}");
    assert!(console.contains("SMPTEST PASS threads=4 cpus=4"), "{t}");
    assert!(console.contains("ran_on=0,1,2,3"), "{t}");
    no_guest_errors(&console);
    assert!(ok, "dvmm run failed:\n{err}");
}

/// A pseudo-terminal pair: (controller, terminal).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills the two descriptors; the name and settings pointers may be
    // null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data; tcgetattr fills it from a terminal descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

/// Reads the controller side on a thread; everything seen is collected.
struct Screen {
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Screen {
    fn new(master: std::fs::File) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut m = master;
            let mut buf = [0u8; 4096];
            loop {
                match m.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => s.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Screen { seen }
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
    /// Waits until `needle` appears after byte offset `from`; returns the end offset.
    fn wait(&self, from: usize, needle: &str, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            {
                let seen = self.seen.lock().unwrap();
                let hay = String::from_utf8_lossy(&seen[from.min(seen.len())..]).into_owned();
                if let Some(i) = hay.find(needle) {
                    return from + i + needle.len();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "'{needle}' not seen on the console; tail:\n{}",
                    tail(&self.text(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// The programs of [`programs_script`] (the acceptance run of guest user mode), then
/// the interactive console through a pseudo-terminal, in the same 2-node guest: the
/// prompt, `nproc`, a pipeline, smptest, `poweroff -f`; exit status 0 and the
/// terminal's settings as they were.
#[test]
fn programs_and_console_on_2_nodes() {
    let jump = syscall_entry();
    let cmdline = format!("dvmm.script={}", programs_script(&jump));
    let (master, slave) = openpty();
    let before = termios(&slave);
    let k = kernel();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args(["run", "--nodes", "2", "--vcpus", "2", "--memory", "1G"])
        .arg("--kernel")
        .arg(&k)
        .args([
            "--initrd",
            &initramfs(),
            "--cmdline",
            &cmdline,
            "--timeout",
            "1800",
        ])
        .current_dir(workspace())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .spawn()
        .expect("start dvmm run");
    let m = std::fs::File::from(master);
    let mut keys = m.try_clone().unwrap();
    let screen = Screen::new(m);
    // The programs first (about 12 minutes here), then the shell.
    let mut at = screen.wait(0, "DVMM-GUEST shell", Duration::from_secs(1500));
    at = screen.wait(at, "# ", Duration::from_secs(120));
    // Raw mode while the guest runs: no echo, no line editing on the host side.
    let during = termios(&slave);
    assert_eq!(during.c_lflag & libc::ICANON, 0, "terminal not in raw mode");
    let mut type_line = |line: &str| {
        keys.write_all(line.as_bytes()).unwrap();
        keys.write_all(b"\r").unwrap();
    };
    type_line("nproc");
    at = screen.wait(at, "\n2\r", Duration::from_secs(120));
    type_line("echo hello-dvmm | tr a-z A-Z | sed s/-/_/");
    at = screen.wait(at, "HELLO_DVMM", Duration::from_secs(120));
    type_line("smptest");
    at = screen.wait(at, "SMPTEST PASS", Duration::from_secs(300));
    let _ = screen.wait(at, "# ", Duration::from_secs(60));
    let mark = screen.len();
    type_line("poweroff -f");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the run did not end after poweroff -f:\n{}",
                tail(&screen.text(), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = termios(&slave);
    let all = screen.text();
    assert!(
        status.success(),
        "dvmm run ended with {status}:\n{}",
        tail(&all, 30)
    );
    assert!(screen.len() > mark);
    assert!(all.contains("guest powered off"), "{}", tail(&all, 20));
    assert_eq!(
        (after.c_lflag, after.c_iflag, after.c_oflag, after.c_cflag),
        (
            before.c_lflag,
            before.c_iflag,
            before.c_oflag,
            before.c_cflag
        ),
        "terminal settings not restored"
    );
    // The programs' output and the VMM's messages are one text on the terminal.
    check_programs(&all, &all, &jump);
}
