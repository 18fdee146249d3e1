//! The kernel's lock torture test on one guest whose vCPUs are spread over several node
//! processes: writers on every CPU take a spinlock (or a mutex) for about 30 s, the lock
//! and the data it protects bouncing between nodes through the DSM, then the kernel
//! checks its counts and powers off.

mod common;

use common::{dvmm, idle_initrd, kernel, namespaces, text, torture};

/// Boots the guest on `nodes` nodes with 4 vCPUs and 1 GiB, runs locktorture on `lock`,
/// and checks the kernel's verdict, the exit status and (with `netns`) the clean-up.
fn locktorture(nodes: usize, lock: &str, netns: bool) {
    let k = kernel();
    let nodes = nodes.to_string();
    let cmdline = torture(lock, 4, 30);
    let initrd = idle_initrd();
    let mut args = vec!["run", "--nodes", &nodes, "--vcpus", "4", "--memory", "1G"];
    args.extend(["--initrd", &initrd]);
    args.extend(["--timeout", "600", "--cmdline", &cmdline]);
    let kernel = k.display().to_string();
    args.extend(["--kernel", &kernel]);
    if netns {
        args.push("--netns");
    }
    let before = namespaces("dvmm");
    let out = dvmm(&args);
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    let all: Vec<&str> = console.lines().collect();
    let tail = all[all.len().saturating_sub(40)..].join("\n");
    // One NUMA node per node process (the SRAT).
    assert!(
        console.contains(&format!("smp: Brought up {nodes} nodes, 4 CPUs")),
        "4 CPUs on {nodes} NUMA nodes not brought up:\n{tail}\n{err}"
    );
    assert!(
        console.contains(&format!("{lock}-torture:--- End of test: SUCCESS")),
        "no SUCCESS from {lock}-torture:\n{tail}\n{err}"
    );
    let writes: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("Writes:  Total:"))
        .collect();
    assert!(!writes.is_empty(), "no locktorture statistics:\n{tail}");
    for w in &writes {
        assert!(
            w.contains("Fail: 0") && !w.contains("!!!"),
            "lock failures: {w}"
        );
    }
    let total: u64 = writes
        .last()
        .and_then(|w| w.split("Total:").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        total > 0,
        "no lock acquisitions counted: {}",
        writes.last().unwrap()
    );
    assert!(
        out.status.success(),
        "dvmm run failed ({}):\n{err}",
        out.status
    );
    for n in (0..nodes.parse().unwrap()).map(|k| format!("node {k} stats dsm")) {
        assert!(err.contains(&n), "no DSM statistics line '{n}':\n{err}");
    }
    let left: Vec<String> = namespaces("dvmm")
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn spin_lock_on_2_nodes() {
    locktorture(2, "spin_lock", false);
}

#[test]
#[ignore = "heavy: make test-heavy (the other lock on the same shape runs in make test)"]
fn mutex_lock_on_2_nodes() {
    locktorture(2, "mutex_lock", false);
}

#[test]
#[ignore = "heavy: make test-heavy (the other lock on the same shape runs in make test)"]
fn spin_lock_on_4_nodes() {
    locktorture(4, "spin_lock", false);
}

#[test]
fn mutex_lock_on_4_nodes() {
    locktorture(4, "mutex_lock", false);
}

#[test]
#[ignore = "heavy: make test-heavy (the other lock on the same shape runs in make test)"]
fn spin_lock_on_2_nodes_in_namespaces() {
    locktorture(2, "spin_lock", true);
}

#[test]
#[ignore = "heavy: make test-heavy (a guest in namespaces boots in make test: cluster.rs)"]
fn mutex_lock_on_2_nodes_in_namespaces() {
    locktorture(2, "mutex_lock", true);
}
