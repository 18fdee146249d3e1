//! Multi-node runs: real node processes, real sockets (loopback and network
//! namespaces), DSM-backed guest RAM, vCPU 1 on another node than vCPU 0.
//!
//! The guest's SMP bring-up crosses nodes (INIT/SIPI/IPIs over the mesh, every page
//! through the DSM); these tests stop there, because a full locktorture run across
//! nodes is still far too slow on these 2-core, software-KVM machines (see
//! docs/PERFORMANCE.md).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kernel() -> PathBuf {
    let k = workspace().join("guest/out/vmlinux");
    assert!(k.is_file(), "{} is missing: run `make guest` first", k.display());
    k
}

/// Reads `child`'s stdout on a thread; lines arrive on the returned channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
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

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Result<(), String> {
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
    Err(format!("'{needle}' not seen; console tail:\n{}", tail.join("\n")))
}

fn node_pids(tag: &str) -> Vec<i32> {
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

#[test]
fn killing_a_node_stops_the_whole_cluster() {
    let k = kernel();
    let mut run = Command::new(env!("CARGO_BIN_EXE_dvmm"))
        .args(["run", "--nodes", "2", "--vcpus", "2", "--memory", "512M", "--timeout", "400"])
        .arg("--kernel")
        .arg(&k)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dvmm run");
    let tag = format!("dvmm-run-{}", run.id());
    let rx = lines(&mut run);
    let seen = wait_for(&rx, "smp: Brought up 1 node, 2 CPUs", Duration::from_secs(300));
    let victims: Vec<i32> = node_pids(&tag)
        .into_iter()
        .filter(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&c).contains("--id\u{0}1")
        })
        .collect();
    if let Err(e) = seen {
        let _ = run.kill();
        panic!("{e}");
    }
    assert_eq!(victims.len(), 1, "node 1 process not found");
    let killed_at = Instant::now();
    Command::new("kill").args(["-9", &victims[0].to_string()]).status().unwrap();
    let status = loop {
        if let Some(st) = run.try_wait().unwrap() {
            break st;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "the cluster did not stop within 15 s of node 1's death"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "dvmm run exited 0 after a node died: {err}");
    assert!(killed_at.elapsed() < Duration::from_secs(12), "took {:?}", killed_at.elapsed());
    assert!(err.contains("node 1"), "no message names node 1: {err}");
    assert!(node_pids(&tag).is_empty(), "node processes left behind");
}

struct Ns(Vec<String>);

impl Drop for Ns {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

#[test]
fn nodes_started_in_reverse_order_in_namespaces_boot_the_guest() {
    let k = kernel();
    let tag = format!("dvt{}", std::process::id());
    let hub = format!("{tag}h");
    let mut ns = Ns(vec![]);
    ip(&["netns", "add", &hub]);
    ns.0.push(hub.clone());
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &hub, "link", "set", "br0", "up"]);
    for i in 0..2 {
        let n = format!("{tag}n{i}");
        ip(&["netns", "add", &n]);
        ns.0.push(n.clone());
        let peer = format!("b{i}");
        ip(&["-n", &n, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &hub]);
        ip(&["-n", &n, "addr", "add", &format!("10.214.0.{}/24", i + 1), "dev", "eth0"]);
        ip(&["-n", &n, "link", "set", "eth0", "up"]);
        ip(&["-n", &n, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "set", &peer, "master", "br0"]);
        ip(&["-n", &hub, "link", "set", &peer, "up"]);
    }
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
            .args(["netns", "exec", &format!("{tag}n{id}")])
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
    let r = wait_for(&rx, "smp: Brought up 1 node, 2 CPUs", Duration::from_secs(300));
    let _ = n0.kill();
    let _ = n1.kill();
    let _ = n0.wait();
    let _ = n1.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(ns);
    r.unwrap();
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains(&tag), "namespaces left behind");
}
