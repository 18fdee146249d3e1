//! Two DSM nodes in one process over loopback: the install paths (read-only zero page,
//! upgrade through a write-protect fault, zero page at the home), stats and peer loss.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsm::{connect, Dsm, DsmOptions, Region};
use dsm_proto::AllOnNode;
use transport::{Mesh, MeshConfig};

/// These tests need root (userfaultfd with vm.unprivileged_userfaultfd=0): without it
/// they fail rather than pass without having checked anything.
fn require_root() {
    assert!(
        is_root(),
        "this test needs root (userfaultfd); run it as root, as `make test` does"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn pair(pages: u64) -> ((Mesh, Arc<Dsm>), (Mesh, Arc<Dsm>)) {
    pair_with(pages, DsmOptions::default())
}

/// Two nodes, all pages homed at node 0; node 1 runs with `opts1`.
fn pair_with(pages: u64, opts1: DsmOptions) -> ((Mesh, Arc<Dsm>), (Mesh, Arc<Dsm>)) {
    let l0 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addrs = vec![
        l0.local_addr().expect("addr"),
        l1.local_addr().expect("addr"),
    ];
    let a1 = addrs.clone();
    let t = std::thread::spawn(move || {
        connect(
            MeshConfig::new(1, a1, b"in-process secret".to_vec()),
            Some(l1),
            Region::new(pages).expect("region (needs root)"),
            Box::new(AllOnNode(0)),
            opts1,
            |_| {},
        )
        .expect("node 1")
    });
    let n0 = connect(
        MeshConfig::new(0, addrs, b"in-process secret".to_vec()),
        Some(l0),
        Region::new(pages).expect("region (needs root)"),
        Box::new(AllOnNode(0)),
        DsmOptions::default(),
        |_| {},
    )
    .expect("node 0");
    let n1 = t.join().expect("join");
    (n0, n1)
}

fn word(d: &Dsm, page: u64) -> &AtomicU64 {
    assert!(page < d.region().pages());
    // SAFETY: inside the region, 8-aligned; the region lives as long as `d`.
    unsafe { &*((d.region().page_addr(page)) as *const AtomicU64) }
}

/// Runs `f` on a fresh thread (faulting threads must never be a DSM or transport thread;
/// the test thread would do, but a thread keeps a blocked fault from hanging the test
/// harness forever: it is joined with a timeout).
fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("access did not complete within 20 s")
}

#[test]
fn install_paths_and_stats() {
    require_root();
    let ((m0, d0), (m1, d1)) = pair(8);
    let (a0, a1) = (d0.clone(), d1.clone());

    // Never-touched page read remotely: zero Data, installed read-only (COPY + WP).
    assert_eq!(on_thread(move || word(&a1, 3).load(Ordering::SeqCst)), 0);
    // Writing it: a write-protect fault, an upgrade (Grant).
    let a1 = d1.clone();
    on_thread(move || word(&a1, 3).store(0xfeed, Ordering::SeqCst));
    // The home reads it back (Forward from node 1, 3-party-free since node 0 is home).
    assert_eq!(
        on_thread(move || word(&a0, 3).load(Ordering::SeqCst)),
        0xfeed
    );

    // First touch at the home: a writable zero page, then shared with node 1.
    let a0 = d0.clone();
    on_thread(move || word(&a0, 5).fetch_add(7, Ordering::SeqCst));
    let a1 = d1.clone();
    assert_eq!(on_thread(move || word(&a1, 5).load(Ordering::SeqCst)), 7);
    // Node 0 writes again: node 1's copy is invalidated; node 1 sees the new value.
    let a0 = d0.clone();
    on_thread(move || word(&a0, 5).fetch_add(1, Ordering::SeqCst));
    let a1 = d1.clone();
    assert_eq!(on_thread(move || word(&a1, 5).load(Ordering::SeqCst)), 8);

    let s0 = d0.stats();
    let s1 = d1.stats();
    assert!(s1.read_faults >= 2, "{s1:?}");
    assert!(s1.upgrade_faults >= 1, "{s1:?}");
    assert!(s0.zero_fills >= 1, "{s0:?}");
    assert!(s0.invalidations_sent >= 1, "{s0:?}");
    assert!(s1.invalidations_received >= 1, "{s1:?}");
    assert!(s0.pages_received >= 1 && s1.pages_received >= 1);
    assert_eq!(s0.pages_sent, s1.pages_received);
    assert_eq!(s1.bytes_out, s0.bytes_in);
    assert!(s1.read_latency.count() >= 1 && s1.p50_us(dsm::FaultKind::Read) > 0.0);
    assert_eq!(s0.protocol_errors + s1.protocol_errors, 0);
    assert!(serde_json::to_string(&s1)
        .expect("json")
        .contains("read_latency"));
    assert!(d0.failure().is_none() && d1.failure().is_none());

    // Node 1 leaves without notice from node 0's point of view: a failure naming it.
    d1.shutdown();
    m1.shutdown();
    let f = d0
        .wait_failure(Duration::from_secs(10))
        .expect("node 0 noticed the loss");
    assert_eq!(f.node, Some(1));
    assert!(f.message.contains("node 1"), "{f}");
    d0.shutdown();
    m0.shutdown();
}

#[test]
fn expected_goodbyes_are_not_failures() {
    require_root();
    let ((m0, d0), (m1, d1)) = pair(4);
    d0.expect_goodbyes();
    d1.expect_goodbyes();
    d1.shutdown();
    m1.shutdown();
    assert!(d0.wait_failure(Duration::from_millis(500)).is_none());
    d0.shutdown();
    m0.shutdown();
}

#[test]
fn failure_hook_runs_on_a_watcher_thread() {
    require_root();
    let ((m0, d0), (m1, d1)) = pair(4);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let d = d0.clone();
    d0.set_failure_hook(move |f| {
        // The hook may call into the DSM.
        let _ = d.stats();
        let _ = tx.send((f.node, std::thread::current().name().map(String::from)));
    });
    d1.shutdown();
    m1.shutdown();
    let (node, thread) = rx.recv_timeout(Duration::from_secs(10)).expect("hook ran");
    assert_eq!(node, Some(1));
    assert_eq!(thread.as_deref(), Some("dsm-watch-0"));
    d0.shutdown();
    m0.shutdown();
}

#[test]
fn read_ahead_prefetches_and_stays_coherent() {
    require_root();
    let opts = DsmOptions {
        readahead: 8,
        ..DsmOptions::default()
    };
    let ((m0, d0), (m1, d1)) = pair_with(64, opts);
    let a0 = d0.clone();
    on_thread(move || {
        for p in 0..64 {
            word(&a0, p).store(p + 100, Ordering::SeqCst);
        }
    });
    let a1 = d1.clone();
    let seen = on_thread(move || {
        (0..64)
            .map(|p| word(&a1, p).load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    });
    assert_eq!(seen, (0..64).map(|p| p + 100).collect::<Vec<_>>());
    assert!(d1.stats().prefetches > 0, "{:?}", d1.stats());
    // The home writes everything again: prefetched copies must be invalidated.
    let a0 = d0.clone();
    on_thread(move || {
        for p in 0..64 {
            word(&a0, p).store(p + 200, Ordering::SeqCst);
        }
    });
    let a1 = d1.clone();
    let seen = on_thread(move || {
        (0..64)
            .map(|p| word(&a1, p).load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    });
    assert_eq!(seen, (0..64).map(|p| p + 200).collect::<Vec<_>>());
    d0.expect_goodbyes();
    d1.shutdown();
    m1.shutdown();
    d0.shutdown();
    m0.shutdown();
}
