//! Multi-node runs: real node processes, real sockets (loopback and network
//! namespaces), DSM-backed guest RAM, vCPUs on several nodes.

mod common;

use common::{idle_initrd, kernel, lines, namespaces, node_pids, torture, wait_for};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testlab::netns::NetnsLab;

/// Kills node 1 of a 2-node `--netns` cluster while the guest runs locktorture: the
/// other node and `dvmm run` stop within 10 s naming node 1, with a failure status, and
/// leave no process and no namespace behind.
#[test]
fn killing_a_node_during_locktorture_stops_the_whole_cluster() {
    let k = kernel();
    let mut run = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args([
            "run", "--nodes", "2", "--vcpus", "4", "--memory", "1G", "--netns",
        ])
        .args([
            "--timeout",
            "500",
            "--cmdline",
            &torture("spin_lock", 4, 300),
        ])
        .args(["--initrd", &idle_initrd()])
        .arg("--kernel")
        .arg(&k)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dvmm run");
    let pid = run.id();
    let tag = format!("dvmm-run-{pid}");
    let rx = lines(&mut run);
    let seen = wait_for(
        &rx,
        "lock_torture_writer task started",
        Duration::from_secs(400),
    );
    if let Err(e) = seen {
        let _ = run.kill();
        panic!("{e}");
    }
    // Let the writers take the lock across nodes for a moment.
    std::thread::sleep(Duration::from_secs(3));
    let victims: Vec<i32> = node_pids(&tag)
        .into_iter()
        .filter(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&c).contains("--id\u{0}1")
        })
        .collect();
    assert_eq!(victims.len(), 1, "node 1 process not found");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &victims[0].to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        if killed_at.elapsed() > Duration::from_secs(20) {
            let _ = run.kill();
            panic!("the cluster did not stop within 20 s of node 1's death");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed_at.elapsed();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        !status.success(),
        "dvmm run exited 0 after a node died: {err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?} to stop");
    assert!(err.contains("node 1"), "no message names node 1: {err}");
    assert!(node_pids(&tag).is_empty(), "node processes left behind");
    let ours: Vec<String> = namespaces(&format!("dvmm{pid}"))
        .into_iter()
        .filter(|n| n == &format!("dvmm{pid}h") || n.starts_with(&format!("dvmm{pid}n")))
        .collect();
    assert!(ours.is_empty(), "namespaces left behind: {ours:?}");
}

/// Nodes described by a config file, each started with `dvmm node --config` in its own
/// namespace, node 1 first: node 0 waits for it and the guest boots on both.
#[test]
fn nodes_started_in_reverse_order_in_namespaces_boot_the_guest() {
    let k = kernel();
    let tag = format!("dvt{}", std::process::id());
    let ns = NetnsLab::create(&tag, 2, "10.214.0").expect("create namespaces");
    let dir = std::env::temp_dir().join(format!("{tag}-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cluster.toml");
    std::fs::write(
        &cfg,
        format!(
            "kernel = {:?}\nsecret = \"test-secret-0123456789\"\nconnect_timeout_secs = 60\n\
             [[node]]\naddr = \"10.214.0.1:7100\"\nvcpus = 1\nmemory = \"256M\"\n\
             [[node]]\naddr = \"10.214.0.2:7100\"\nvcpus = 1\nmemory = \"256M\"\n",
            k.display().to_string()
        ),
    )
    .unwrap();
    let start = |id: usize| {
        Command::new("ip")
            .args(["netns", "exec", ns.host(id)])
            .arg(env!("CARGO_BIN_EXE_dvmm"))
            .args(["node", "--config"])
            .arg(&cfg)
            .args(["--id", &id.to_string(), "--timeout", "400"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node")
    };
    let mut n1 = start(1);
    std::thread::sleep(Duration::from_secs(2));
    let mut n0 = start(0);
    let rx = lines(&mut n0);
    let r = wait_for(
        &rx,
        "smp: Brought up 2 nodes, 2 CPUs",
        Duration::from_secs(300),
    );
    let _ = n0.kill();
    let _ = n1.kill();
    let _ = n0.wait();
    let _ = n1.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(ns);
    r.unwrap();
    assert!(namespaces(&tag).is_empty(), "namespaces left behind");
}

/// Checks one `stats` line a node printed: it must be whole (one node's line, from its
/// start to its last field).
fn whole_stats_line(l: &str) -> Result<(usize, &'static str), String> {
    let bad = || format!("cut or mixed stats line: {l:?}");
    let rest = l.strip_prefix("dvmm: node ").ok_or_else(bad)?;
    if rest.contains("dvmm:") || rest.contains("node ") {
        return Err(bad());
    }
    let (node, rest) = rest.split_once(" stats ").ok_or_else(bad)?;
    let node: usize = node.parse().map_err(|_| bad())?;
    let last_number = |s: &str, key: &str| {
        s.rsplit_once(key)
            .is_some_and(|(_, n)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    // The DSM line's last field is a counter (`errors=0`), a latency (`p99=35`) or a
    // hot page (`0x1000:3`): never empty.
    let whole_last_field = |s: &str| {
        let Some(t) = s.split_whitespace().last() else {
            return false;
        };
        let v = t.rsplit_once(['=', ':']).map(|(_, v)| v).unwrap_or("");
        !v.is_empty() && v.chars().all(|c| c.is_ascii_digit())
    };
    let kind = if rest.starts_with("vcpu") {
        (rest.contains(" exits io_in=") && last_number(rest, " ipis_sent=")).then_some("vcpu")
    } else if rest.starts_with("irqs_sent=") {
        last_number(rest, " io_served=").then_some("link")
    } else if rest.starts_with("dsm faults read=") {
        (rest.contains(" bad_frames=") && rest.contains(" errors=") && whole_last_field(rest))
            .then_some("dsm")
    } else {
        None
    };
    kind.map(|k| (node, k)).ok_or_else(bad)
}

/// Four node processes end at the same moment (each node's run timeout, 1 s) and all
/// print their statistics together: `dvmm run` passes every line on whole, 20 runs out
/// of 20.
#[test]
fn four_nodes_print_whole_stats_lines_at_the_same_moment() {
    let k = kernel();
    let k = k.to_str().unwrap();
    for run in 0..20 {
        let out = common::dvmm(&[
            "run",
            "--nodes",
            "4",
            "--vcpus",
            "4",
            "--memory",
            "256M",
            "--kernel",
            k,
            "--initrd",
            "none",
            "--timeout",
            "1",
        ]);
        let err = common::text(&out.stderr);
        assert!(
            !out.status.success(),
            "run {run}: a 1 s timeout must fail the run"
        );
        let mut seen = std::collections::BTreeSet::new();
        for l in err.lines().filter(|l| l.contains("stats")) {
            match whole_stats_line(l) {
                Ok(k) => {
                    seen.insert(k);
                }
                Err(e) => panic!("run {run}: {e}\n{err}"),
            }
        }
        for node in 0..4 {
            for kind in ["vcpu", "link", "dsm"] {
                assert!(
                    seen.contains(&(node, kind)),
                    "run {run}: no whole {kind} line of node {node}:\n{err}"
                );
            }
        }
    }
}

#[test]
fn stats_line_check_finds_cut_lines() {
    let dsm = "dvmm: node 1 stats dsm faults read=1 write=2 bad_frames=0 errors=0 read_us p50=3 p99=4 upgrade_us p50=5 p99=6 hot 0x1000:3";
    assert_eq!(whole_stats_line(dsm), Ok((1, "dsm")));
    assert_eq!(
        whole_stats_line(
            "dvmm: node 0 stats irqs_sent=1 irqs_received=2 io_forwarded=0 io_served=0"
        ),
        Ok((0, "link"))
    );
    assert_eq!(
        whole_stats_line("dvmm: node 2 stats vcpu2 exits io_in=1 hlt=2 injected=3 ipis_sent=4"),
        Ok((2, "vcpu"))
    );
    // The cut seen on a shared stderr: another node's text in the middle.
    assert!(whole_stats_line(
        "dvmm: node 0 stats irqs_sent=1 irqs_received=2 io_forwarded=0 io_served=0dvmm: node "
    )
    .is_err());
    assert!(whole_stats_line("1 stats dsm faults read=1").is_err());
    assert!(whole_stats_line("dvmm: node 3 stats vcpu3 exits io_in=1 hlt=2 ipis_sent=").is_err());
    // A node with no fault prints no latencies.
    let idle = "dvmm: node 1 stats dsm faults read=0 write=0 msgs out=0 in=0 bad_frames=0 errors=0";
    assert_eq!(whole_stats_line(idle), Ok((1, "dsm")));
    assert!(whole_stats_line("dvmm: node 1 stats dsm faults read=0 bad_frames=0 errors=").is_err());
    assert!(whole_stats_line(
        "dvmm: node 1 stats dsm faults read=0 bad_frames=0 errors=0 hot 0x1000:"
    )
    .is_err());
}
