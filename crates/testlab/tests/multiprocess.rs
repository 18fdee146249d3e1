//! Multi-process DSM tests: real node processes (the `dsm-node` binary), real sockets.
//!
//! They need root (userfaultfd is restricted to root on these hosts); as non-root they
//! print why and pass without checking anything. The tests are serialised (one cluster
//! at a time) so that time bounds hold on a small machine.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use testlab::launch::{Cluster, Launch};
use testlab::netns::NetnsLab;

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
        // Without root these tests fail rather than pass without having checked.
        assert!(
            is_root(),
            "this test needs root (userfaultfd, network namespaces); run it as root, as `make test` does"
        );
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

/// `nodes` namespaces joined by a bridge, node `i` at 10.213.0.(i+1); names unique
/// per run. Removed when the guard drops (also when the test fails).
fn netns(nodes: u16) -> Result<(NetnsLab, Vec<String>), String> {
    let tag = format!("dsmt{}x{:04x}", std::process::id(), rand::random::<u16>());
    let lab = NetnsLab::create(&tag, nodes as usize, "10.213.0")?;
    let names = (0..nodes as usize)
        .map(|k| lab.host(k).to_owned())
        .collect();
    Ok((lab, names))
}

#[test]
fn three_nodes_in_network_namespaces_exact_counters() {
    require_root!();
    let _g = serial();
    let t = Instant::now();
    let (guard, names) = netns(3).expect("create network namespaces");
    let mut l = counters(3, 400);
    l.addrs = Some(
        (0..3)
            .map(|i| format!("10.213.0.{}:7000", i + 1).parse().expect("addr"))
            .collect(),
    );
    l.wrappers = Some(
        names
            .iter()
            .map(|n| vec!["ip".into(), "netns".into(), "exec".into(), n.clone()])
            .collect(),
    );
    let mut c = Cluster::spawn(&l).expect("spawn");
    assert!(c.wait(Duration::from_secs(60)), "timed out\n{}", c.report());
    assert_exact(&c, 3, 400);
    drop(c);
    drop(guard);
    eprintln!(
        "three_nodes_in_network_namespaces_exact_counters: {:?}",
        t.elapsed()
    );
}

#[test]
fn garbage_and_wrong_secret_are_refused_while_the_workload_completes() {
    require_root!();
    let _g = serial();
    let t = Instant::now();
    let iters = 1200;
    // Also covers another home policy and read-ahead.
    let l = counters(3, iters).args(["--homes", "node0", "--readahead", "4", "--writeahead", "4"]);
    let mut c = Cluster::spawn(&l).expect("spawn");
    let target = c.addrs[0];
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.poll(), 3, "nodes exited early\n{}", c.report());

    // 1. A garbage frame.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(target).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(&[0xAB; 64]).expect("write garbage");
        let mut buf = [0u8; 256];
        // The node closes the connection (possibly after a reject frame).
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    }

    // 2. The handshake with a wrong secret, claiming to be node 1.
    {
        let me = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut addrs = c.addrs.clone();
        addrs[1] = me.local_addr().expect("addr");
        let mut cfg = transport::MeshConfig::new(1, addrs, b"not the cluster secret".to_vec());
        cfg.connect_timeout = Duration::from_secs(1);
        let r = transport::Mesh::builder(cfg).listener(me).establish();
        assert!(r.is_err(), "a mesh with the wrong secret was established");
    }

    assert!(c.wait(Duration::from_secs(60)), "timed out\n{}", c.report());
    assert_exact(&c, 3, iters);
    let err = c.nodes[0].stderr.text();
    let refused: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("refused connection"))
        .collect();
    assert!(
        refused.iter().any(|l| !l.contains("authentication")),
        "no refusal of the garbage frame logged\n{err}"
    );
    assert!(
        refused.iter().any(|l| l.contains("authentication failed")),
        "no refusal of the wrong secret logged\n{err}"
    );
    eprintln!(
        "garbage_and_wrong_secret_are_refused_while_the_workload_completes: {:?}",
        t.elapsed()
    );
}

#[test]
fn killing_a_node_makes_the_others_exit_naming_it() {
    require_root!();
    let _g = serial();
    let t = Instant::now();
    let mut c = Cluster::spawn(&counters(3, 1_000_000)).expect("spawn");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(c.poll(), 3, "nodes exited early\n{}", c.report());
    c.kill(2).expect("kill node 2");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(10);
    loop {
        c.poll();
        if c.nodes[0].status.is_some() && c.nodes[1].status.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "survivors still running 10 s after the kill\n{}",
            {
                c.kill_all();
                c.report()
            }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    for id in [0, 1] {
        let n = &c.nodes[id];
        assert!(
            n.status.is_some_and(|s| !s.success()),
            "node {id} exited successfully\n{}",
            c.report()
        );
        assert!(
            n.stderr
                .text()
                .lines()
                .any(|l| l.contains("FATAL") && l.contains("peer node 2 lost")),
            "node {id} did not name node 2\n{}",
            c.report()
        );
    }
    eprintln!(
        "killing_a_node_makes_the_others_exit_naming_it: {:?} (survivors exited {took:?} after the kill)",
        t.elapsed()
    );
}

/// A reader streams through the region (read-ahead on by default) while two writers
/// rewrite its pages in strided order (write-ahead, asked for): copies fetched ahead are
/// invalidated under the reader all the time. Every read sees writes in order and
/// never goes back; afterwards every node reads every final value.
#[test]
fn a_stream_read_ahead_races_writers_and_stays_coherent() {
    require_root!();
    let _g = serial();
    let t = Instant::now();
    let rounds = 1000;
    let l = Launch::new(BIN, &[], 3).args(
        [
            "--workload",
            "stream",
            "--pages",
            "512",
            "--iters",
            &rounds.to_string(),
            // Write-ahead is off by default (it costs the guest's boot more traffic
            // than it saves); the race covers it too.
            "--writeahead",
            "16",
        ]
        .map(String::from),
    );
    let mut c = Cluster::spawn(&l).expect("spawn");
    assert!(
        c.wait(Duration::from_secs(120)),
        "timed out\n{}",
        c.report()
    );
    let field = |out: &str, name: &str| -> u64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for n in &c.nodes {
        let out = n.stdout.text();
        assert!(
            n.status.is_some_and(|s| s.success()) && out.contains("errors=0 ok=true"),
            "node {} failed\n{}",
            n.id,
            c.report()
        );
        let ahead = if n.id == 0 {
            field(&out, "prefetches=")
        } else {
            field(&out, "write_prefetches=")
        };
        assert!(
            ahead > 0,
            "node {} fetched nothing ahead\n{}",
            n.id,
            c.report()
        );
    }
    eprintln!(
        "a_stream_read_ahead_races_writers_and_stays_coherent: {:?}",
        t.elapsed()
    );
}
