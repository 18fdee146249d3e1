//! Spawning a local cluster of node processes (for `dvmm bench dsm` and the tests).

use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to start the nodes of a local cluster.
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

fn random_secret() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..32).map(|_| format!("{:02x}", r.gen::<u8>())).collect()
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

/// One node process.
#[derive(Debug)]
pub struct NodeProc {
    /// Node id.
    pub id: u16,
    /// The process.
    pub child: Child,
    /// Its standard output.
    pub stdout: Captured,
    /// Its standard error.
    pub stderr: Captured,
    readers: Vec<JoinHandle<()>>,
    /// Exit status, once it exited.
    pub status: Option<ExitStatus>,
}

impl NodeProc {
    /// Waits for the reader threads (after the process exited) so the capture is complete.
    fn finish_capture(&mut self) {
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A running local cluster. Dropping it kills the nodes still running.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, by id.
    pub nodes: Vec<NodeProc>,
    /// Their listen addresses.
    pub addrs: Vec<SocketAddr>,
}

fn capture(
    src: impl Read + Send + 'static,
    echo: Option<String>,
    into: Captured,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dsm-capture".into())
        .spawn(move || {
            let mut r = BufReader::new(src);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if let Some(p) = &echo {
                            eprint!("{p}{line}");
                        }
                        into.0
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_str(&line);
                    }
                }
            }
        })
}

impl Cluster {
    /// Starts the nodes.
    pub fn spawn(l: &Launch) -> io::Result<Cluster> {
        let n = usize::from(l.nodes);
        let (addrs, mut listeners) = match &l.addrs {
            Some(a) => (a.clone(), Vec::new()),
            None => {
                let ls = (0..n)
                    .map(|_| TcpListener::bind("127.0.0.1:0"))
                    .collect::<io::Result<Vec<_>>>()?;
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
        let mut cluster = Cluster {
            nodes: Vec::new(),
            addrs: addrs.clone(),
        };
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
            if let Some(listener) = listeners.get_mut(i).and_then(Option::take) {
                let fd = listener.as_raw_fd();
                cmd.arg("--listen-fd").arg("3");
                // SAFETY: the closure runs in the child between fork and exec and only
                // calls async-signal-safe functions (dup2, fcntl) on descriptors it owns.
                unsafe {
                    cmd.pre_exec(move || {
                        if fd == 3 {
                            let flags = libc::fcntl(3, libc::F_GETFD);
                            if flags < 0
                                || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                            {
                                return Err(io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, 3) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn();
                drop(listener);
                cluster.push(id, child?, l.echo_stderr)?;
            } else {
                cluster.push(id, cmd.spawn()?, l.echo_stderr)?;
            }
        }
        Ok(cluster)
    }

    fn push(&mut self, id: u16, mut child: Child, echo: bool) -> io::Result<()> {
        let stdout = Captured::default();
        let stderr = Captured::default();
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(capture(o, None, stdout.clone())?);
        }
        if let Some(e) = child.stderr.take() {
            readers.push(capture(
                e,
                echo.then(|| format!("[node {id}] ")),
                stderr.clone(),
            )?);
        }
        self.nodes.push(NodeProc {
            id,
            child,
            stdout,
            stderr,
            readers,
            status: None,
        });
        Ok(())
    }

    /// Polls the nodes: records exit statuses. Returns how many are still running.
    pub fn poll(&mut self) -> usize {
        let mut running = 0;
        for n in &mut self.nodes {
            if n.status.is_none() {
                match n.child.try_wait() {
                    Ok(Some(s)) => {
                        n.status = Some(s);
                        n.finish_capture();
                    }
                    Ok(None) => running += 1,
                    Err(_) => {}
                }
            }
        }
        running
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
                if let Ok(s) = n.child.wait() {
                    n.status = Some(s);
                }
                n.finish_capture();
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
    }
}
