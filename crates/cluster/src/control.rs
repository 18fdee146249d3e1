//! A node's control socket: `dvmm stats`, `dvmm stop` and the metrics endpoint talk to
//! the running nodes through it.
//!
//! Every node of a running cluster listens on a Unix stream socket
//! `<run dir>/<cluster name>/node<id>.sock` ([`socket_path`]; the run dir is
//! `/run/dvmm`, or `$DVMM_RUN_DIR`). The directory and the socket are the owner's only
//! (mode 0700 / 0600): whoever may stop the guest may read its counters. A client
//! writes one request line and reads one reply line of JSON; the node then closes the
//! connection:
//!
//! * `stats`: the node's [`NodeSnapshot`];
//! * `stop`: asks the guest to power off (node 0 presses its ACPI power button; another
//!   node passes the request to node 0). Reply `{"ok":"..."}` or `{"error":"..."}`.
//!
//! The socket is removed when the node ends; one left by a node that was killed is
//! found stale (nobody accepts) and replaced or skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm::stats::{DeviceCounters, VcpuSnapshot};

/// Where the control sockets live unless `$DVMM_RUN_DIR` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/dvmm";

/// Longest request line a node reads.
const MAX_REQUEST: u64 = 256;

/// How long a node waits for a client's request line, and a client for the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory of every cluster's control sockets.
pub fn run_dir() -> PathBuf {
    std::env::var_os("DVMM_RUN_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from)
}

/// The directory of cluster `cluster`'s control sockets (an unnamed cluster is
/// `cluster`).
pub fn cluster_dir(cluster: &str) -> PathBuf {
    run_dir().join(if cluster.is_empty() {
        "cluster"
    } else {
        cluster
    })
}

/// Node `node`'s control socket in cluster `cluster`.
pub fn socket_path(cluster: &str, node: u16) -> PathBuf {
    cluster_dir(cluster).join(format!("node{node}.sock"))
}

/// A cluster name must be usable as one directory name: 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// not starting with a dot. Empty means unnamed (a description file's stem is used).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name '{name}': use 1 to 64 letters, digits, '.', '_' or '-' (not starting with '.')"
        ))
    }
}

/// Cross-node traffic counters of a node (see [`crate::node::LinkStats`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkSnapshot {
    /// Interrupts sent to other nodes.
    pub irqs_sent: u64,
    /// Interrupts received from other nodes.
    pub irqs_received: u64,
    /// Device accesses forwarded to node 0.
    pub io_forwarded: u64,
    /// Device accesses served for other nodes (node 0).
    pub io_served: u64,
    /// Shadow page-table flushes (software-KVM clusters).
    pub shadow_flushes: u64,
}

/// One of the pages with the most DSM faults on a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HotPage {
    /// Guest-physical address.
    pub gpa: u64,
    /// Fault events on it since the start.
    pub faults: u64,
    /// What the guest kernel keeps there, when known (a kernel symbol, or a per-CPU
    /// area and the per-CPU variable at that offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

/// A node's counters at one moment: the reply to `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// The cluster's name.
    pub cluster: String,
    /// This node.
    pub node: u16,
    /// Nodes in the cluster.
    pub nodes: u16,
    /// The node process.
    pub pid: u32,
    /// Time since the node started, in µs.
    pub uptime_us: u64,
    /// Where the node is: connecting, starting, running, ending.
    pub phase: String,
    /// The node's vCPUs (empty before the VM exists).
    pub vcpus: Vec<VcpuSnapshot>,
    /// Cross-node interrupts and device accesses.
    pub link: LinkSnapshot,
    /// The DSM's counters (None before the DSM starts).
    pub dsm: Option<dsm::DsmStats>,
    /// The devices on this node (node 0's disk).
    pub devices: Vec<DeviceCounters>,
    /// The DSM's hottest pages, with what the guest keeps there when known.
    pub hot_pages: Vec<HotPage>,
}

/// What a node answers: `(request) -> reply line`.
pub type Handler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A listening control socket and the thread that serves it; dropping it stops the
/// thread and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (its directory is created, owner-only) and serves requests
    /// with `handler` on a thread of its own; `tick` runs about every 100 ms on that
    /// thread too (e.g. to look at a signal flag). Fails if a live node already listens
    /// there; a stale socket file is replaced.
    pub fn start(
        path: &Path,
        handler: Handler,
        tick: Box<dyn Fn() + Send>,
    ) -> Result<ControlServer, String> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("control socket: cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "control socket {} is in use: a node with this cluster name and id is \
                     running (give the cluster another name)",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "control socket: cannot remove the stale {}: {e}",
                    path.display()
                )
            })?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("control socket: cannot listen on {}: {e}", path.display()))?;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("control socket: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(&listener, &handler, &*tick, &s))
            .map_err(|e| format!("control socket: cannot start its thread: {e}"))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        // The cluster's directory goes with its last node (fails while others remain).
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn serve(listener: &UnixListener, handler: &Handler, tick: &dyn Fn(), stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        tick();
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = answer(conn, handler) {
                    tracing::debug!(error = %e, "control request not answered");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request line (bounded in size and time) and writes the reply.
fn answer(conn: UnixStream, handler: &Handler) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = handler(line.trim());
    let mut w = &conn;
    w.write_all(reply.as_bytes())?;
    w.write_all(b"\n")
}

/// The handler of a node's requests: `stats` answers `snapshot()` as JSON, `stop` runs
/// `stop()`; anything else is refused.
pub fn handler(
    snapshot: impl Fn() -> NodeSnapshot + Send + Sync + 'static,
    stop: impl Fn() -> Result<String, String> + Send + Sync + 'static,
) -> Handler {
    Arc::new(move |req: &str| match req {
        "stats" => {
            serde_json::to_string(&snapshot()).unwrap_or_else(|e| error_reply(&e.to_string()))
        }
        "stop" => match stop() {
            Ok(what) => ok_reply(&what),
            Err(e) => error_reply(&e),
        },
        other => error_reply(&format!(
            "unknown request '{}' (stats, stop)",
            other.chars().take(40).collect::<String>()
        )),
    })
}

/// A JSON error reply.
pub fn error_reply(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// A JSON success reply.
pub fn ok_reply(msg: &str) -> String {
    serde_json::json!({ "ok": msg }).to_string()
}

/// Sends `request` to the socket at `path` and returns the reply line.
pub fn request(path: &Path, request: &str) -> Result<String, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| conn.write_all(format!("{request}\n").as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reply = String::new();
    BufReader::new(conn.take(64 << 20))
        .read_line(&mut reply)
        .map_err(|e| format!("{}: no answer: {e}", path.display()))?;
    if reply.is_empty() {
        return Err(format!(
            "{}: the node closed without answering",
            path.display()
        ));
    }
    Ok(reply)
}

/// A `stats` request: the node's snapshot.
pub fn fetch_snapshot(path: &Path) -> Result<NodeSnapshot, String> {
    let reply = request(path, "stats")?;
    serde_json::from_str(&reply).map_err(|e| {
        match serde_json::from_str::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        {
            Some(err) => format!("{}: {err}", path.display()),
            None => format!("{}: unreadable answer: {e}", path.display()),
        }
    })
}

/// The control sockets of the running nodes of a cluster: of `name`, or, without a
/// name, of the only cluster running. Stale sockets (nobody accepts) are skipped.
/// Returns the cluster's name and its nodes' sockets in node order.
pub fn find_cluster(name: Option<&str>) -> Result<(String, Vec<(u16, PathBuf)>), String> {
    let dir = run_dir();
    let live = |cluster: &str| -> Vec<(u16, PathBuf)> {
        let mut v: Vec<(u16, PathBuf)> = std::fs::read_dir(cluster_dir(cluster))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let id = file
                    .strip_prefix("node")?
                    .strip_suffix(".sock")?
                    .parse()
                    .ok()?;
                Some((id, e.path()))
            })
            .filter(|(_, p)| UnixStream::connect(p).is_ok())
            .collect();
        v.sort();
        v
    };
    if let Some(n) = name {
        check_name(n)?;
        let nodes = live(n);
        if nodes.is_empty() {
            return Err(format!(
                "no running cluster named '{n}' (no live control socket in {})",
                cluster_dir(n).display()
            ));
        }
        return Ok((n.to_string(), nodes));
    }
    let mut running: Vec<(String, Vec<(u16, PathBuf)>)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .map(|c| {
            let nodes = live(&c);
            (c, nodes)
        })
        .filter(|(_, nodes)| !nodes.is_empty())
        .collect();
    running.sort();
    match running.len() {
        0 => Err(format!(
            "no cluster is running (no live control socket under {})",
            dir.display()
        )),
        1 => Ok(running.remove(0)),
        _ => Err(format!(
            "{} clusters are running ({}): choose one with --cluster NAME",
            running.len(),
            running
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["", "lab", "run-1234", "a.b_c-9"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [".hidden", "a/b", "a b", "x".repeat(65).as_str(), "é"] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert!(socket_path("lab", 3).ends_with("lab/node3.sock"));
        assert!(socket_path("", 0).ends_with("cluster/node0.sock"));
    }

    /// Finding clusters in a run dir of its own: none, one, two (a name is needed),
    /// stale sockets skipped. The only test here that sets `DVMM_RUN_DIR`.
    #[test]
    fn finds_running_clusters() {
        let dir = std::env::temp_dir().join(format!("dvmm-find-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var("DVMM_RUN_DIR", &dir);
        let e = find_cluster(None).unwrap_err();
        assert!(e.contains("no cluster is running"), "{e}");
        let handler: Handler = Arc::new(|_: &str| ok_reply("x"));
        let a0 =
            ControlServer::start(&socket_path("a", 0), handler.clone(), Box::new(|| {})).unwrap();
        let a1 =
            ControlServer::start(&socket_path("a", 1), handler.clone(), Box::new(|| {})).unwrap();
        // A stale socket of a killed node: listed by nobody.
        std::fs::create_dir_all(cluster_dir("dead")).unwrap();
        drop(UnixListener::bind(socket_path("dead", 0)).unwrap());
        let (name, nodes) = find_cluster(None).unwrap();
        assert_eq!(name, "a");
        assert_eq!(
            nodes.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let b0 = ControlServer::start(&socket_path("b", 0), handler, Box::new(|| {})).unwrap();
        let e = find_cluster(None).unwrap_err();
        assert!(
            e.contains("2 clusters are running (a, b)") && e.contains("--cluster"),
            "{e}"
        );
        assert_eq!(find_cluster(Some("b")).unwrap().1.len(), 1);
        let e = find_cluster(Some("dead")).unwrap_err();
        assert!(e.contains("no running cluster named 'dead'"), "{e}");
        assert!(find_cluster(Some("../x")).is_err());
        drop((a0, a1, b0));
        assert!(
            !cluster_dir("a").exists(),
            "the last node removes the cluster's directory"
        );
        std::env::remove_var("DVMM_RUN_DIR");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A real socket: requests answered, a second server on the same path refused, a
    /// stale socket replaced, the socket removed on drop; requests are bounded.
    #[test]
    fn serves_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("dvmm-control-test-{}", std::process::id()));
        let path = dir.join("c1").join("node0.sock");
        let handler: Handler = Arc::new(|req: &str| match req {
            "stats" => serde_json::to_string(&NodeSnapshot {
                cluster: "c1".into(),
                nodes: 2,
                ..Default::default()
            })
            .unwrap(),
            other => error_reply(&format!("unknown request '{other}'")),
        });
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = ticks.clone();
        let server = ControlServer::start(
            &path,
            handler.clone(),
            Box::new(move || {
                t.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        let snap = fetch_snapshot(&path).unwrap();
        assert_eq!((snap.cluster.as_str(), snap.nodes), ("c1", 2));
        let r = request(&path, "frobnicate").unwrap();
        assert!(r.contains("unknown request 'frobnicate'"), "{r}");
        // An over-long request is cut at MAX_REQUEST bytes, not read forever.
        let r = request(&path, &"x".repeat(10_000)).unwrap();
        assert!(r.contains("unknown request"), "{r}");
        // A live socket is not taken over.
        let e = ControlServer::start(&path, handler.clone(), Box::new(|| {}))
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("in use"), "{e}");
        std::thread::sleep(Duration::from_millis(250));
        assert!(ticks.load(Ordering::Relaxed) >= 2);
        drop(server);
        assert!(!path.exists());
        assert!(request(&path, "stats").is_err());
        // A stale socket file (its server gone without cleaning up) is replaced.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = ControlServer::start(&path, handler, Box::new(|| {})).unwrap();
        assert!(fetch_snapshot(&path).is_ok());
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
