//! `dvmm run --nodes N`: a whole cluster on this machine.
//!
//! The launcher writes a cluster description and a fresh secret into a private
//! temporary directory, starts one `dvmm node` process per node (on loopback, or with
//! `--netns` each in its own network namespace joined to the others by veth pairs on a
//! bridge), shows node 0's console, and returns node 0's status. If any node fails, the
//! others stop (they hear of it over the mesh); whatever is still running after a grace
//! period is killed. Namespaces and the temporary directory are removed on every exit.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use testlab::launch::{Cluster, Lines};
use testlab::netns::NetnsLab;
use vmm::boot::bzimage::UnpackBzImage;

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
    /// Who unpacks a bzImage kernel.
    pub unpack_bzimage: UnpackBzImage,
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
    /// ACPI tables for the guest.
    pub acpi: bool,
    /// One guest NUMA node per node process (with `acpi`).
    pub numa: bool,
    /// The virtio disk (node 0).
    pub disk: Option<vmm::vm::DiskSpec>,
    /// Seconds the guest has to power off after a stop request.
    pub stop_timeout: u64,
    /// Serve every node's counters here (Prometheus text format).
    pub metrics: Option<SocketAddr>,
    /// The virtio network device (node 0 creates the TAP).
    pub net: Option<vmm::vm::NetSpec>,
}

/// SIGTERM and SIGINT received so far: the first asks the guest to power off, the second
/// stops every node at once.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn secret() -> Vec<u8> {
    testlab::launch::random_secret().into_bytes()
}

/// The name of the cluster `dvmm run` starts (its control sockets' directory):
/// `run-<pid of dvmm run>`.
pub fn local_name() -> String {
    format!("run-{}", std::process::id())
}

/// Splits `total` into `n` parts, the first ones one larger.
pub fn spread(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect()
}

/// Most node processes `dvmm run` starts on this one machine (a limit of the local
/// machine's processes and memory, not of the cluster: see [`cluster::config::MAX_NODES`]).
pub const MAX_LOCAL_NODES: usize = 16;

/// The launcher's own check: how many node processes fit on this machine. Everything
/// else is checked by [`cluster::ClusterConfig::validate`], as for `dvmm node`.
pub fn check_local_nodes(nodes: usize) -> Result<(), String> {
    if nodes == 0 || nodes > MAX_LOCAL_NODES {
        return Err(format!(
            "--nodes {nodes}: use 1 to {MAX_LOCAL_NODES} node processes on this machine \
             (larger clusters: `dvmm node` on several hosts, see docs/CLUSTER.md)"
        ));
    }
    Ok(())
}

/// The cluster description of a local run with node `k` at `addrs[k]`: the vCPUs
/// spread over the nodes (the first ones one more), guest RAM in equal 2 MiB-aligned
/// shares (node 0 takes the rest). Not validated here.
pub fn cluster_config(
    run: &LocalRun,
    addrs: &[SocketAddr],
    secret: Vec<u8>,
) -> cluster::ClusterConfig {
    let n = addrs.len().max(1);
    let unit = 2u64 << 20;
    let per = (run.memory / n as u64) / unit * unit;
    let vcpus = spread(run.vcpus, n);
    cluster::ClusterConfig {
        name: local_name(),
        kernel: run.kernel.clone(),
        unpack_bzimage: run.unpack_bzimage,
        initrd: run.initrd.clone(),
        cmdline: run.cmdline.clone(),
        secret,
        connect_timeout: Duration::from_secs(30),
        dsm_hold: run
            .dsm_hold_us
            .map_or(cluster::config::DEFAULT_DSM_HOLD, Duration::from_micros),
        acpi: run.acpi,
        numa: run.numa,
        disk: run.disk.clone(),
        net: run.net.clone(),
        nodes: addrs
            .iter()
            .enumerate()
            .map(|(k, &addr)| cluster::config::NodeConfig {
                addr,
                vcpus: vcpus[k],
                memory: if k == 0 {
                    run.memory.saturating_sub(per * (n as u64 - 1))
                } else {
                    per
                },
            })
            .collect(),
    }
}

/// The listening socket `dvmm run` handed down as descriptor `fd`; it must be bound to
/// node `id`'s address in `cfg`.
pub fn inherited_listener(
    fd: i32,
    cfg: &cluster::ClusterConfig,
    id: u16,
) -> Result<TcpListener, String> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let want = cfg
        .nodes
        .get(usize::from(id))
        .map(|n| n.addr)
        .ok_or_else(|| format!("--id {id}: the cluster has {} nodes", cfg.nodes.len()))?;
    // SAFETY: `fcntl(F_GETFD)` only reads the descriptor's flags; it fails (EBADF) if
    // `fd` is not open, and nothing is owned until it succeeds.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--listen-fd {fd}: not an open descriptor"));
    }
    // SAFETY: `fd` is open (checked above) and, by the contract of `--listen-fd`, was
    // handed to this process for it alone to own; nothing else in it uses or closes it.
    let l = unsafe { TcpListener::from_raw_fd(fd) };
    let refused = match l.local_addr() {
        Ok(a) if a == want => return Ok(l),
        Ok(a) => format!("--listen-fd {fd}: bound to {a}, but node {id}'s address is {want}"),
        Err(e) => format!("--listen-fd {fd}: not a listening TCP socket: {e}"),
    };
    // Refused: give the descriptor back rather than close what is not ours to use.
    let _ = l.into_raw_fd();
    Err(refused)
}

/// Runs a local cluster; returns the exit code for the process.
pub fn run(run: &LocalRun) -> Result<i32, String> {
    check_local_nodes(run.nodes)?;
    // Loopback: ports bound now and handed down. Namespaces: the same port on every
    // node's own address (the namespaces themselves are made only after the checks).
    let listeners = if run.netns {
        Vec::new()
    } else {
        testlab::launch::bind_loopback(run.nodes)
            .map_err(|e| format!("cannot bind a loopback listener: {e}"))?
    };
    let addrs: Vec<SocketAddr> = if run.netns {
        (0..run.nodes)
            .map(|k| SocketAddr::from(([10, 213, 0, k as u8 + 1], 7100)))
            .collect()
    } else {
        listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot read a bound port: {e}"))?
    };
    // The same checks as `dvmm node` makes of a description file.
    cluster_config(run, &addrs, secret())
        .validate()
        .map_err(|e| e.to_string())?;
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
    let disk = match &run.disk {
        Some(d) => Some(vmm::vm::DiskSpec {
            path: std::fs::canonicalize(&d.path)
                .map_err(|e| format!("disk image {}: {e}", d.path.display()))?,
            read_only: d.read_only,
        }),
        None => None,
    };
    let run = LocalRun {
        kernel,
        initrd,
        disk,
        ..run.clone()
    };
    // Every node's counters, gathered from their control sockets at each scrape; an
    // address in use is refused before anything starts.
    let _metrics = run
        .metrics
        .map(|addr| {
            crate::metrics::MetricsServer::start(
                addr,
                crate::metrics::Source::Cluster(local_name()),
            )
        })
        .transpose()?;
    // SAFETY: installing a handler that only stores to an atomic is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let dir = std::env::temp_dir().join(format!("dvmm-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _tmp = TempDir(dir.clone());
    // The nodes' control sockets: each node removes its own, but one killed by SIGKILL
    // cannot; the cluster's directory goes with the run.
    let _sockets = TempDir(cluster::control::cluster_dir(&local_name()));
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
    if let Some(ns) = &netns {
        for (k, a) in addrs.iter().enumerate() {
            debug_assert_eq!(ns.addr(k), a.ip().to_string());
        }
    }
    let config = cluster_config(&run, &addrs, secret())
        .save(&dir)
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cluster = Cluster::default();
    let mut listeners = listeners.into_iter();
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
            .arg("--stop-timeout")
            .arg(run.stop_timeout.to_string())
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
        // Every node's stderr reaches ours one whole line at a time, never cut into by
        // another node's; nothing is kept in memory (a run can be long).
        let relay = Lines {
            echo: Some(String::new()),
            keep: false,
        };
        // If this process dies without stopping its nodes (SIGKILL, a crash), each node
        // gets SIGTERM: it asks the guest to power off and ends within its stop timeout,
        // so nothing outlives the launcher for long.
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec and only makes
            // one async-signal-safe system call (prctl), touching no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let id = u16::try_from(k).map_err(|_| format!("node {k}: too many nodes"))?;
        if let Err(e) = cluster.start(id, cmd, listeners.next(), relay) {
            cluster.kill_all();
            return Err(format!("cannot start node {k}: {e}"));
        }
    }
    Ok(supervise(
        &mut cluster,
        Duration::from_secs(run.stop_timeout),
    ))
}

/// How long the other nodes get to stop after the first node process ended.
const STOP_GRACE: Duration = Duration::from_secs(8);

fn supervise(cluster: &mut Cluster, stop_timeout: Duration) -> i32 {
    // When the first SIGTERM/SIGINT was passed on to node 0.
    let mut stop_asked: Option<std::time::Instant> = None;
    while cluster.poll() > 0 {
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals >= 2 {
            eprintln!("dvmm: interrupted again: stopping every node now");
            cluster.kill_all();
            return 130;
        }
        if signals == 1 && stop_asked.is_none() {
            // Node 0 presses the guest's power button and, if the guest does not power
            // off in time, stops the cluster itself; this is the last resort.
            eprintln!(
                "dvmm: stop requested: asking the guest to power off (up to {} s; \
                 interrupt again to stop at once)",
                stop_timeout.as_secs()
            );
            stop_asked = Some(std::time::Instant::now());
            if let Some(n) = cluster.nodes.first().filter(|n| n.status.is_none()) {
                if let Ok(pid) = i32::try_from(n.child.id()) {
                    // SAFETY: kill(2) on our own child's pid; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
        if stop_asked.is_some_and(|t| t.elapsed() > stop_timeout + STOP_GRACE * 2) {
            eprintln!("dvmm: the cluster did not stop in time: killing every node");
            cluster.kill_all();
            return 1;
        }
        // Every node hears of the first one's end over the mesh (at once on a closed
        // connection, within the 3 s heartbeat timeout on a silent link) and stops;
        // whatever is left after the grace period is killed, so that the whole
        // cluster is gone within 10 s.
        if cluster
            .first_exit()
            .is_some_and(|t| t.elapsed() > STOP_GRACE)
        {
            for n in cluster.nodes.iter().filter(|n| n.status.is_none()) {
                eprintln!("dvmm: node {} did not stop: killing it", n.id);
            }
            cluster.kill_all();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = |n: &testlab::launch::NodeProc| n.status.and_then(|s| s.code()).unwrap_or(1);
    let node0 = cluster.nodes.first().map_or(1, code);
    if node0 != 0 {
        return node0;
    }
    if cluster.nodes.iter().all(|n| code(n) == 0) {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn spreads_vcpus() {
        assert_eq!(spread(4, 2), vec![2, 2]);
        assert_eq!(spread(5, 2), vec![3, 2]);
        assert_eq!(spread(4, 4), vec![1, 1, 1, 1]);
    }

    fn run_of(nodes: usize, vcpus: usize, memory: u64) -> LocalRun {
        LocalRun {
            nodes,
            vcpus,
            memory,
            kernel: "/k".into(),
            unpack_bzimage: UnpackBzImage::Always,
            initrd: None,
            cmdline: "a=\"b\"".into(),
            netns: false,
            timeout: 0,
            dsm_hold_us: Some(250),
            acpi: true,
            numa: true,
            disk: None,
            stop_timeout: 60,
            metrics: None,
            net: None,
        }
    }

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|k| SocketAddr::from(([127, 0, 0, 1], 7100 + k as u16)))
            .collect()
    }

    #[test]
    fn config_round_trips() {
        let dir = std::env::temp_dir().join(format!("dvmm-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = cluster_config(&run_of(2, 3, 1 << 30), &addrs(2), secret())
            .save(&dir)
            .unwrap();
        let c = cluster::ClusterConfig::load(&p).unwrap();
        assert_eq!(c.total_vcpus(), 3);
        assert_eq!(c.vcpu_nodes(), vec![0, 0, 1]);
        assert_eq!(c.dsm_hold, Duration::from_micros(250));
        assert_eq!(c.total_memory(), 1 << 30);
        assert_eq!(c.cmdline, "a=\"b\"");
        assert_eq!(c.connect_timeout, Duration::from_secs(30));
        assert_eq!(c.unpack_bzimage, UnpackBzImage::Always);
        assert_eq!(c.net, None);
        // The network of `--net` reaches node 0 as it was given.
        let net = vmm::vm::NetSpec::default_for(std::process::id());
        let run = LocalRun {
            net: Some(net.clone()),
            ..run_of(2, 2, 1 << 30)
        };
        let p = cluster_config(&run, &addrs(2), secret())
            .save(&dir)
            .unwrap();
        assert_eq!(cluster::ClusterConfig::load(&p).unwrap().net, Some(net));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `dvmm run` refuses what `dvmm node` refuses in a file, with the same message.
    #[test]
    fn launcher_checks_like_a_description_file() {
        let dir = std::env::temp_dir().join(format!("dvmm-cfg-alike-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), secret()).unwrap();
        let mib = 1u64 << 20;
        let mut hold = run_of(2, 2, 1 << 30);
        hold.dsm_hold_us = Some(2_000_000);
        let bad = [
            (
                run_of(2, 0, 1 << 30),
                "node 0 (the boot node) must run at least one vCPU",
            ),
            (run_of(4, 4, 4 * mib), "node 1: memory share of 0 KiB"),
            (run_of(2, 2, 5 * mib), "node 0: memory share of 3072 KiB"),
            (run_of(2, 64, 1 << 30), "vCPU"),
            (hold, "dsm_hold_us"),
        ];
        for (run, want) in bad {
            let c = cluster_config(&run, &addrs(run.nodes), secret());
            let launcher = c.validate().unwrap_err().to_string();
            assert!(launcher.contains(want), "{want}: {launcher}");
            assert_eq!(launcher.lines().count(), 1);
            let text = c.to_toml(Path::new("secret"));
            let file = cluster::ClusterConfig::parse(&text, &dir)
                .unwrap_err()
                .to_string();
            assert_eq!(launcher, file);
        }
        // Fewer vCPUs than nodes: the last nodes only hold memory, as in a file.
        assert!(cluster_config(&run_of(4, 2, 1 << 30), &addrs(4), secret())
            .validate()
            .is_ok());
        assert!(check_local_nodes(0).is_err());
        assert!(check_local_nodes(MAX_LOCAL_NODES).is_ok());
        let e = check_local_nodes(MAX_LOCAL_NODES + 1).unwrap_err();
        assert!(e.contains("on this machine"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn takes_an_inherited_listener_only_at_its_address() {
        use std::os::fd::IntoRawFd;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd = l.into_raw_fd();
        let mut cfg = cluster_config(&run_of(2, 2, 1 << 30), &addrs(2), secret());
        let e = inherited_listener(fd, &cfg, 0).unwrap_err();
        assert!(e.contains("bound to"), "{e}");
        cfg.nodes[1].addr = addr;
        let l = inherited_listener(fd, &cfg, 1).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        assert!(inherited_listener(-1, &cfg, 1).is_err());
    }
}
