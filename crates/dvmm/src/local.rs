//! `dvmm run --nodes N`: a whole cluster on this machine.
//!
//! The launcher writes a cluster description and a fresh secret into a private
//! temporary directory, starts one `dvmm node` process per node (on loopback, or with
//! `--netns` each in its own network namespace joined to the others by veth pairs on a
//! bridge), shows node 0's console, and returns node 0's status. If any node fails, the
//! others stop (they hear of it over the mesh); whatever is still running after a grace
//! period is killed. Namespaces and the temporary directory are removed on every exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use testlab::netns::NetnsLab;

/// How to run the local cluster.
#[derive(Debug, Clone)]
pub struct LocalRun {
    /// Node processes.
    pub nodes: usize,
    /// Total vCPUs, spread over the nodes.
    pub vcpus: usize,
    /// Total guest RAM, spread over the nodes.
    pub memory: u64,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Extra command line.
    pub cmdline: String,
    /// Each node in its own network namespace.
    pub netns: bool,
    /// Run timeout in seconds (0: none).
    pub timeout: u64,
    /// DSM hold time in µs (None: the default).
    pub dsm_hold_us: Option<u64>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn secret() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// Splits `total` into `n` parts, the first ones one larger.
pub fn spread(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect()
}

/// Writes the cluster description for a local run.
pub fn write_config(dir: &Path, run: &LocalRun, addrs: &[String]) -> Result<PathBuf, String> {
    let unit = 2u64 << 20;
    let per = (run.memory / run.nodes as u64) / unit * unit;
    let mut text = String::new();
    text.push_str(&format!(
        "kernel = {:?}\n",
        run.kernel.display().to_string()
    ));
    if let Some(i) = &run.initrd {
        text.push_str(&format!("initrd = {:?}\n", i.display().to_string()));
    }
    text.push_str(&format!("cmdline = {:?}\n", run.cmdline));
    std::fs::write(dir.join("secret"), secret()).map_err(|e| e.to_string())?;
    text.push_str("secret_file = \"secret\"\nconnect_timeout_secs = 30\n");
    if let Some(h) = run.dsm_hold_us {
        text.push_str(&format!("dsm_hold_us = {h}\n"));
    }
    let vcpus = spread(run.vcpus, run.nodes);
    for (k, addr) in addrs.iter().enumerate() {
        let mem = if k == 0 {
            run.memory - per * (run.nodes as u64 - 1)
        } else {
            per
        };
        text.push_str(&format!(
            "\n[[node]]\naddr = \"{addr}\"\nvcpus = {}\nmemory = \"{}K\"\n",
            vcpus[k],
            mem >> 10
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    Ok(path)
}

fn kill_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Runs a local cluster; returns the exit code for the process.
pub fn run(run: &LocalRun) -> Result<i32, String> {
    if run.nodes == 0 || run.nodes > 16 {
        return Err(format!("--nodes {}: use 1 to 16", run.nodes));
    }
    if run.vcpus < run.nodes {
        return Err(format!(
            "{} vCPUs on {} nodes: every node needs at least one vCPU",
            run.vcpus, run.nodes
        ));
    }
    let per = (run.memory / run.nodes as u64) / (2 << 20) * (2 << 20);
    if per == 0 {
        return Err(format!(
            "--memory {} MiB on {} nodes: every node needs a share of at least 2 MiB",
            run.memory >> 20,
            run.nodes
        ));
    }
    let kernel = std::fs::canonicalize(&run.kernel).map_err(|_| {
        format!(
            "kernel {} not found (build one with `make guest`, or pass --kernel)",
            run.kernel.display()
        )
    })?;
    let initrd = match &run.initrd {
        Some(i) => Some(
            std::fs::canonicalize(i).map_err(|_| format!("initrd {} not found", i.display()))?,
        ),
        None => None,
    };
    let run = LocalRun {
        kernel,
        initrd,
        ..run.clone()
    };
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let dir = std::env::temp_dir().join(format!("dvmm-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _tmp = TempDir(dir.clone());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let netns = if run.netns {
        // Node k in namespace dvmm<pid>n<k> at 10.213.0.(k+1).
        let tag = format!("dvmm{}", std::process::id());
        Some(NetnsLab::create(&tag, run.nodes, "10.213.0")?)
    } else {
        None
    };
    let addrs: Vec<String> = match &netns {
        Some(ns) => (0..run.nodes)
            .map(|k| format!("{}:7100", ns.addr(k)))
            .collect(),
        None => (0..run.nodes)
            .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_, _>>()?,
    };
    let config = write_config(&dir, &run, &addrs)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut relays = Vec::new();
    for k in 0..run.nodes {
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.host(k)]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("node")
            .arg("--config")
            .arg(&config)
            .arg("--id")
            .arg(k.to_string())
            .arg("--timeout")
            .arg(run.timeout.to_string())
            // Node 0 holds the console: the terminal (or pipe) is its input and output.
            .stdin(if k == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stdout(if k == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        match cmd.spawn() {
            Ok(mut c) => {
                if let Some(err) = c.stderr.take() {
                    relays.push(relay_lines(err));
                }
                children.push((k, c))
            }
            Err(e) => {
                kill_all(&mut children);
                finish_relays(relays);
                return Err(format!("cannot start node {k}: {e}"));
            }
        }
    }
    let r = supervise(children);
    finish_relays(relays);
    r
}

/// Copies a node's stderr to ours one whole line at a time (each with one write under
/// the stderr lock), so that the lines of several nodes never cut into each other.
fn relay_lines(from: std::process::ChildStderr) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let mut r = std::io::BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&line);
                }
            }
        }
    })
}

/// Waits (a bounded time) for the relays to pass on the nodes' last lines.
fn finish_relays(relays: Vec<std::thread::JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in relays {
        vmm::vm::join_by(t, deadline);
    }
}

/// How long the other nodes get to stop after the first node process ended.
const STOP_GRACE: Duration = Duration::from_secs(8);

fn supervise(mut children: Vec<(usize, Child)>) -> Result<i32, String> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut first_end: Option<Instant> = None;
    loop {
        for (k, c) in children.iter_mut() {
            if statuses[*k].is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    statuses[*k] = Some(st);
                    first_end.get_or_insert_with(Instant::now);
                }
            }
        }
        if statuses.iter().all(|s| s.is_some()) {
            break;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("dvmm: interrupted: stopping every node");
            kill_all(&mut children);
            return Ok(130);
        }
        // Every node hears of the first one's end over the mesh (at once on a closed
        // connection, within the 3 s heartbeat timeout on a silent link) and stops;
        // whatever is left after the grace period is killed, so that the whole
        // cluster is gone within 10 s.
        if first_end.is_some_and(|t| t.elapsed() > STOP_GRACE) {
            for (k, c) in children.iter_mut() {
                if statuses[*k].is_none() {
                    eprintln!("dvmm: node {k} did not stop: killing it");
                    let _ = c.kill();
                    statuses[*k] = c.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = |s: &Option<ExitStatus>| s.and_then(|s| s.code()).unwrap_or(1);
    let node0 = code(&statuses[0]);
    if node0 != 0 {
        return Ok(node0);
    }
    Ok(if statuses.iter().all(|s| code(s) == 0) {
        0
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_vcpus() {
        assert_eq!(spread(4, 2), vec![2, 2]);
        assert_eq!(spread(5, 2), vec![3, 2]);
        assert_eq!(spread(4, 4), vec![1, 1, 1, 1]);
    }

    #[test]
    fn config_round_trips() {
        let dir = std::env::temp_dir().join(format!("dvmm-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = LocalRun {
            nodes: 2,
            vcpus: 3,
            memory: 1 << 30,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "a=\"b\"".into(),
            netns: false,
            timeout: 0,
            dsm_hold_us: Some(250),
        };
        let p = write_config(&dir, &run, &["127.0.0.1:1".into(), "127.0.0.1:2".into()]).unwrap();
        let c = cluster::ClusterConfig::load(&p).unwrap();
        assert_eq!(c.total_vcpus(), 3);
        assert_eq!(c.dsm_hold, Duration::from_micros(250));
        assert_eq!(c.total_memory(), 1 << 30);
        assert_eq!(c.cmdline, "a=\"b\"");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
