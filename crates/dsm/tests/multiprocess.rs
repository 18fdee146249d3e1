//! Multi-process DSM tests: real node processes (the `dsm-node` binary), real sockets.
//!
//! They need root (userfaultfd is restricted to root on these hosts); as non-root they
//! print why and pass without checking anything. The tests are serialised (one cluster
//! at a time) so that time bounds hold on a small machine.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dsm::cluster::{Cluster, Launch};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!(
                "SKIPPED: not root (userfaultfd needs root with vm.unprivileged_userfaultfd=0)"
            );
            return;
        }
    };
}

const BIN: &str = env!("CARGO_BIN_EXE_dsm-node");

/// The counters workload with enough overlap between the nodes that pages move a lot.
fn counters(nodes: u16, iters: u64) -> Launch {
    Launch::new(BIN, &[], nodes).args(
        [
            "--workload",
            "counters",
            "--pages",
            "16",
            "--threads",
            "2",
            "--think-us",
            "20",
            "--iters",
        ]
        .iter()
        .map(ToString::to_string)
        .chain([iters.to_string()]),
    )
}

/// Asserts that every node succeeded and node 0 saw exact counters.
fn assert_exact(c: &Cluster, nodes: u16, iters: u64) {
    for n in &c.nodes {
        assert!(
            n.status.is_some_and(|s| s.success()),
            "node {} failed\n{}",
            n.id,
            c.report()
        );
        assert!(
            n.stdout.text().contains(&format!("RESULT node={} ", n.id))
                && n.stdout.text().contains("errors=0 ok=true"),
            "node {} did not report success\n{}",
            n.id,
            c.report()
        );
    }
    let expected = u64::from(nodes) * 2 * iters;
    let out = c.nodes[0].stdout.text();
    assert!(
        out.contains(&format!(
            "expected={expected} locked={expected} atomic={expected}"
        )),
        "wrong counters\n{}",
        c.report()
    );
}

#[test]
fn three_nodes_loopback_exact_counters() {
    require_root!();
    let _g = serial();
    let t = Instant::now();
    let mut c = Cluster::spawn(&counters(3, 600)).expect("spawn");
    assert!(c.wait(Duration::from_secs(60)), "timed out\n{}", c.report());
    assert_exact(&c, 3, 600);
    eprintln!("three_nodes_loopback_exact_counters: {:?}", t.elapsed());
}
