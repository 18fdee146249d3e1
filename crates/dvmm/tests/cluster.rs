//! Multi-node runs: real node processes, real sockets (loopback and network
//! namespaces), DSM-backed guest RAM, vCPUs on several nodes.

mod common;

use common::{kernel, lines, namespaces, node_pids, wait_for};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use transport::netns::NetnsLab;

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
            "locktorture.shutdown_secs=300",
        ])
        .arg("--kernel")
        .arg(&k)
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
        "smp: Brought up 1 node, 2 CPUs",
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
