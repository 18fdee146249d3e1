//! The one process launcher of the project: a set of node processes started on this
//! machine, their output read whole line by whole line, their exits recorded, and every
//! one still running killed on drop.
//!
//! Two users start clusters with it:
//! * [`Cluster::spawn`] — the DSM test/bench nodes (`dvmm bench dsm`, the multi-process
//!   tests): node arguments on the command line, output captured;
//! * `dvmm run --nodes N` (`crates/dvmm/src/local.rs`) — `dvmm node` processes built
//!   from a description file, node 0 holding the terminal, every node's stderr relayed
//!   a whole line at a time; it adds the console, SIGINT and the grace period.
//!
//! Both hand each node its already bound loopback listener ([`Cluster::start`] with a
//! listener: the node gets `--listen-fd FD`), so no other process can take a port
//! between its choice and its use.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start the nodes of a local DSM test cluster.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before the node arguments (e.g. `["dsm-node"]` for `dvmm`).
    pub prefix: Vec<String>,
    /// Number of nodes.
    pub nodes: u16,
    /// Arguments given to every node after `--id` and `--addrs`.
    pub args: Vec<String>,
    /// Per-node command wrapper (e.g. `ip netns exec NS`); the program follows it.
    pub wrappers: Option<Vec<Vec<String>>>,
    /// Fixed listen addresses (nodes bind them). `None`: loopback listeners on free
    /// ports, bound here and passed to each node as an inherited descriptor.
    pub addrs: Option<Vec<SocketAddr>>,
    /// Cluster secret (passed through the environment).
    pub secret: String,
    /// Copy every line of the nodes' stderr to this process's stderr, prefixed.
    pub echo_stderr: bool,
}

impl Launch {
    /// A loopback cluster of `nodes` processes of `program prefix… --id …`.
    pub fn new(program: impl Into<PathBuf>, prefix: &[&str], nodes: u16) -> Launch {
        Launch {
            program: program.into(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            nodes,
            args: Vec::new(),
            wrappers: None,
            addrs: None,
            secret: random_secret(),
            echo_stderr: false,
        }
    }

    /// Appends node arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Launch {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
}

/// A fresh cluster secret: 32 random bytes as 64 hex digits.
pub fn random_secret() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..32).map(|_| format!("{:02x}", r.gen::<u8>())).collect()
}

/// Listening sockets bound to free loopback ports, one per node.
pub fn bind_loopback(nodes: usize) -> io::Result<Vec<TcpListener>> {
    (0..nodes)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect()
}

/// Output captured from one node (shared with its reader threads).
#[derive(Clone, Default, Debug)]
pub struct Captured(Arc<Mutex<String>>);

impl Captured {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What happens to each line a node writes to a piped stdout or stderr.
#[derive(Clone, Debug, Default)]
pub struct Lines {
    /// Copy the line to this process's stderr after this prefix, in one write (so the
    /// lines of several nodes never cut into each other).
    pub echo: Option<String>,
    /// Keep the line in the node's [`Captured`] text.
    pub keep: bool,
}

/// One node process.
#[derive(Debug)]
pub struct NodeProc {
    /// Node id.
    pub id: u16,
    /// The process.
    pub child: Child,
    /// Its standard output (if piped and kept).
    pub stdout: Captured,
    /// Its standard error (if piped and kept).
    pub stderr: Captured,
    readers: Vec<JoinHandle<()>>,
    /// Exit status, once it exited.
    pub status: Option<ExitStatus>,
}

/// How long the reader threads get to pass on a node's last lines after it exited (a
/// descendant that kept the pipe open must not hold the launcher).
const READER_GRACE: Duration = Duration::from_secs(2);

impl NodeProc {
    /// Waits (a bounded time) for the reader threads so the capture is complete.
    fn finish_capture(&mut self) {
        let deadline = Instant::now() + READER_GRACE;
        for h in self.readers.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    fn record(&mut self, s: ExitStatus) {
        self.status = Some(s);
        self.finish_capture();
    }
}

/// A running local cluster. Dropping it kills the nodes still running.
#[derive(Debug, Default)]
pub struct Cluster {
    /// The nodes, in the order they were started.
    pub nodes: Vec<NodeProc>,
    /// Their listen addresses (empty if the caller started them with [`Cluster::start`]
    /// and did not fill it).
    pub addrs: Vec<SocketAddr>,
    first_exit: Option<Instant>,
}

fn read_lines(
    src: impl Read + Send + 'static,
    lines: Lines,
    into: Captured,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("node-output".into())
        .spawn(move || {
            let mut r = BufReader::new(src);
            let mut line = Vec::new();
            let mut out = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if let Some(p) = &lines.echo {
                            out.clear();
                            out.extend_from_slice(p.as_bytes());
                            out.extend_from_slice(&line);
                            let _ = io::stderr().lock().write_all(&out);
                        }
                        if lines.keep {
                            into.0
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push_str(&String::from_utf8_lossy(&line));
                        }
                    }
                }
            }
        })
}

/// Lets the process `cmd` starts inherit `listener` under its own descriptor number
/// (the flag close-on-exec is cleared in the child only, so no other child inherits
/// it) and appends `--listen-fd FD` to its arguments.
pub fn pass_listener(cmd: &mut Command, listener: &TcpListener) {
    let fd = listener.as_raw_fd();
    cmd.arg("--listen-fd").arg(fd.to_string());
    // SAFETY: the closure runs in the forked child before exec and only calls `fcntl`,
    // which is async-signal-safe, on a descriptor open in the parent (the listener
    // outlives `spawn`, as the caller holds it).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Cluster {
    /// Starts the DSM test nodes `l` describes.
    pub fn spawn(l: &Launch) -> io::Result<Cluster> {
        let n = usize::from(l.nodes);
        let (addrs, mut listeners) = match &l.addrs {
            Some(a) => (a.clone(), Vec::new()),
            None => {
                let ls = bind_loopback(n)?;
                let a = ls
                    .iter()
                    .map(TcpListener::local_addr)
                    .collect::<io::Result<Vec<_>>>()?;
                (a, ls.into_iter().map(Some).collect())
            }
        };
        let addr_list = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster::default();
        cluster.addrs = addrs;
        for id in 0..l.nodes {
            let i = usize::from(id);
            let mut cmd = match l.wrappers.as_ref().and_then(|w| w.get(i)) {
                Some(w) if !w.is_empty() => {
                    let mut c = Command::new(&w[0]);
                    c.args(&w[1..]).arg(&l.program);
                    c
                }
                _ => Command::new(&l.program),
            };
            cmd.args(&l.prefix)
                .arg("--id")
                .arg(id.to_string())
                .arg("--addrs")
                .arg(&addr_list)
                .args(&l.args)
                .env("DVMM_DSM_SECRET", &l.secret)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let stderr = Lines {
                echo: l.echo_stderr.then(|| format!("[node {id}] ")),
                keep: true,
            };
            let listener = listeners.get_mut(i).and_then(Option::take);
            cluster.start(id, cmd, listener, stderr)?;
        }
        Ok(cluster)
    }

    /// Starts node `id` with `cmd` (its stdin and stdout as the caller set them; a
    /// piped stdout is kept, a piped stderr goes through `stderr`). With a listener, the
    /// node inherits it ([`pass_listener`]) and this process's copy is closed once the
    /// node started.
    pub fn start(
        &mut self,
        id: u16,
        mut cmd: Command,
        listener: Option<TcpListener>,
        stderr: Lines,
    ) -> io::Result<()> {
        if let Some(l) = &listener {
            pass_listener(&mut cmd, l);
        }
        let spawned = cmd.spawn();
        drop(listener);
        let mut child = spawned?;
        let out = Captured::default();
        let err = Captured::default();
        let mut readers = Vec::new();
        let started = || -> io::Result<()> {
            if let Some(o) = child.stdout.take() {
                let keep = Lines {
                    echo: None,
                    keep: true,
                };
                readers.push(read_lines(o, keep, out.clone())?);
            }
            if let Some(e) = child.stderr.take() {
                readers.push(read_lines(e, stderr, err.clone())?);
            }
            Ok(())
        };
        let r = started();
        self.nodes.push(NodeProc {
            id,
            child,
            stdout: out,
            stderr: err,
            readers,
            status: None,
        });
        r
    }

    /// Polls the nodes: records exit statuses. Returns how many are still running.
    pub fn poll(&mut self) -> usize {
        let mut running = 0;
        for n in &mut self.nodes {
            if n.status.is_none() {
                match n.child.try_wait() {
                    Ok(Some(s)) => {
                        self.first_exit.get_or_insert_with(Instant::now);
                        n.record(s);
                    }
                    Ok(None) => running += 1,
                    Err(_) => {}
                }
            }
        }
        running
    }

    /// When [`poll`](Self::poll) first saw a node exited.
    pub fn first_exit(&self) -> Option<Instant> {
        self.first_exit
    }

    /// Waits until every node exited or `timeout` passed; then kills the rest.
    /// Returns whether all exited by themselves.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.poll() > 0 {
            if Instant::now() >= deadline {
                self.kill_all();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Kills (SIGKILL) node `id`.
    pub fn kill(&mut self, id: u16) -> io::Result<()> {
        match self.nodes.iter_mut().find(|n| n.id == id) {
            Some(n) => n.child.kill(),
            None => Err(io::Error::other(format!("no node {id}"))),
        }
    }

    /// Kills every node still running and reaps them.
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            if n.status.is_none() {
                let _ = n.child.kill();
            }
        }
        for n in &mut self.nodes {
            if n.status.is_none() {
                if let Ok(s) = n.child.wait() {
                    n.record(s);
                }
            }
        }
    }

    /// A summary of every node's status and output, for test failure messages.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s += &format!(
                "--- node {} status {:?}\n[stdout]\n{}[stderr]\n{}",
                n.id,
                n.status,
                n.stdout.text(),
                n.stderr.text()
            );
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_all();
        for n in &mut self.nodes {
            n.finish_capture();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child inherits its own listener (and only it), and whole lines are kept.
    #[test]
    fn passes_the_listener_and_keeps_lines() {
        let ls = bind_loopback(2).unwrap();
        let fd0 = ls[0].as_raw_fd();
        let fd1 = ls[1].as_raw_fd();
        let mut c = Cluster::default();
        let mut cmd = Command::new("sh");
        // The script sees its arguments after `--listen-fd`; it reports which of the
        // two descriptors are open in it.
        cmd.arg("-c")
            .arg(format!(
                "for f in {fd0} {fd1}; do if [ -e /proc/self/fd/$f ]; then echo open $f; else echo closed $f; fi; done; echo args \"$@\" >&2"
            ))
            .arg("sh")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut it = ls.into_iter();
        let l0 = it.next();
        let keep = Lines {
            echo: None,
            keep: true,
        };
        c.start(0, cmd, l0, keep).unwrap();
        assert!(c.wait(Duration::from_secs(20)), "{}", c.report());
        assert!(c.nodes[0].status.is_some_and(|s| s.success()));
        let out = c.nodes[0].stdout.text();
        assert!(out.contains(&format!("open {fd0}\n")), "{out}");
        assert!(out.contains(&format!("closed {fd1}\n")), "{out}");
        let err = c.nodes[0].stderr.text();
        assert_eq!(err, format!("args --listen-fd {fd0}\n"));
        assert!(c.first_exit().is_some());
    }

    #[test]
    fn kill_all_reaps_and_drop_is_quiet() {
        let mut c = Cluster::default();
        let mut cmd = Command::new("sleep");
        cmd.arg("60").stdout(Stdio::piped()).stderr(Stdio::piped());
        c.start(3, cmd, None, Lines::default()).unwrap();
        assert_eq!(c.poll(), 1);
        assert!(c.kill(4).is_err());
        c.kill_all();
        assert!(c.nodes[0].status.is_some());
        assert_eq!(c.poll(), 0);
    }
}
