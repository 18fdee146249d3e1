//! The full mesh: establishment, per-peer reader and heartbeat threads, sending.

use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender as ChanSender};
use tracing::{debug, info, warn};

use crate::error::{LostReason, TransportError};
use crate::frame::{self, Kind, ReadError, MAX_HEADER_LEN, PAGE_SIZE};
use crate::handshake::{self, Params};
use crate::page::PageBuf;

/// Default for [`MeshConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`MeshConfig::peer_timeout`].
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest gap between two frames sent on an otherwise idle connection (the heartbeat
/// period is `min(HEARTBEAT_INTERVAL, peer_timeout / 4)`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// How long an incoming or outgoing connection may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes of incoming connections in progress at once; more are dropped.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Why an authenticated connection was not taken into the mesh.
#[derive(Debug, thiserror::Error)]
enum InstallError {
    /// The mesh is closing.
    #[error("mesh is shutting down")]
    ShuttingDown,
    /// The peer already has a connection.
    #[error("node {0} is already connected")]
    AlreadyConnected(u16),
    /// The socket's timeouts could not be set.
    #[error("cannot set socket timeouts: {0}")]
    Timeouts(#[source] std::io::Error),
    /// The Welcome frame could not be sent.
    #[error("sending welcome failed: {0}")]
    Welcome(#[source] std::io::Error),
    /// The connection's threads could not start.
    #[error(transparent)]
    Threads(TransportError),
}
/// Poll period of the (non-blocking) listener.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Dial retry backoff bounds.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(10);
const DIAL_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Write timeout for the goodbye frame at shutdown.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(100);

/// Configuration of one node of the mesh.
#[derive(Clone)]
pub struct MeshConfig {
    /// This node's id, `0..addrs.len()`.
    pub me: u16,
    /// Listen address of every node, indexed by node id. This node listens on
    /// `addrs[me]` (unless a pre-bound listener is given to [`MeshBuilder::listener`]).
    pub addrs: Vec<SocketAddr>,
    /// Shared cluster secret (non-empty; use at least 16 random bytes).
    pub secret: Vec<u8>,
    /// How long [`Mesh::establish`] waits for all nodes (default 30 s).
    pub connect_timeout: Duration,
    /// A peer from which no frame at all arrived for this long is declared lost
    /// (default 3 s). Must be at least 10 ms. Also bounds a blocked send.
    pub peer_timeout: Duration,
    /// **Test/bench knob**: delay every outgoing data frame by this much (the sending
    /// thread sleeps before writing), emulating network latency where `netem` is not
    /// available. Heartbeats are not delayed. `None` (the default) in production.
    pub inject_delay: Option<Duration>,
}

impl MeshConfig {
    /// A configuration with default timeouts and no injected delay.
    pub fn new(me: u16, addrs: Vec<SocketAddr>, secret: impl Into<Vec<u8>>) -> Self {
        MeshConfig {
            me,
            addrs,
            secret: secret.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            inject_delay: None,
        }
    }

    fn validate(&self) -> Result<u16, TransportError> {
        let n = u16::try_from(self.addrs.len()).map_err(|_| {
            TransportError::Config(format!("too many nodes ({})", self.addrs.len()))
        })?;
        if n == 0 {
            return Err(TransportError::Config("no node addresses".into()));
        }
        if self.me >= n {
            return Err(TransportError::Config(format!(
                "node id {} out of range for {n} nodes",
                self.me
            )));
        }
        if self.secret.is_empty() {
            return Err(TransportError::Config("the cluster secret is empty".into()));
        }
        if self.peer_timeout < Duration::from_millis(10) {
            return Err(TransportError::Config(format!(
                "peer_timeout {:?} is below 10ms",
                self.peer_timeout
            )));
        }
        Ok(n)
    }
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConfig")
            .field("me", &self.me)
            .field("addrs", &self.addrs)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("connect_timeout", &self.connect_timeout)
            .field("peer_timeout", &self.peer_timeout)
            .field("inject_delay", &self.inject_delay)
            .finish()
    }
}

/// Something that happened on the mesh.
#[derive(Debug)]
pub enum Event {
    /// A data frame from a peer. Frames from one peer arrive in the order it sent them.
    Frame {
        /// Sending node.
        from: u16,
        /// The channel byte given to [`Sender::send`].
        channel: u8,
        /// The opaque message header.
        header: Vec<u8>,
        /// The page payload, in a 4096-aligned buffer.
        payload: Option<PageBuf>,
        /// The next frame from this peer, on the same channel, is received already and
        /// follows at once: a handler may defer work it would do once per burst (such
        /// as writing its replies) to a frame with `more == false`, which always comes.
        more: bool,
    },
    /// The connection to `node` is gone for good (no reconnection). This is the last
    /// event from that node; sends to it now fail.
    PeerLost {
        /// The lost node.
        node: u16,
        /// Why.
        reason: LostReason,
    },
}

/// A handler called directly on a peer's reader thread.
type Handler = dyn Fn(Event) + Send + Sync + 'static;

/// Where reader threads deliver events.
#[derive(Clone)]
enum Sink {
    Channel(ChanSender<Event>),
    Handler(Arc<Handler>),
}

impl Sink {
    fn deliver(&self, ev: Event) {
        match self {
            // The receiver lives in the Mesh; if the caller dropped everything there is
            // nobody to tell, which is fine.
            Sink::Channel(tx) => {
                let _ = tx.send(ev);
            }
            Sink::Handler(h) => h(ev),
        }
    }
}

/// One established, authenticated connection.
struct Peer {
    id: u16,
    addr: SocketAddr,
    stream: TcpStream,
    /// Serialises writers of this peer (frames must not interleave).
    write_lock: Mutex<()>,
    lost: AtomicBool,
    reason: Mutex<Option<LostReason>>,
    /// Time of the last successful write, in ns since `Shared::epoch`.
    last_send_ns: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks leaves no broken invariant behind (the
    // protected data is plain state), so recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Peer {
    /// Marks the peer lost (first reason wins), closes the socket so the reader and
    /// any blocked writer wake up, and returns the recorded reason.
    fn fail(&self, reason: LostReason) -> LostReason {
        let recorded = {
            let mut r = lock(&self.reason);
            r.get_or_insert(reason).clone()
        };
        self.lost.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        recorded
    }

    fn lost_error(&self) -> TransportError {
        TransportError::PeerLost {
            node: self.id,
            reason: lock(&self.reason).clone().unwrap_or(LostReason::Closed),
        }
    }

    /// Writes frames back to back under the per-peer lock. A failed write poisons the
    /// stream (part of a frame may be out), so the peer is declared lost.
    fn write(
        &self,
        shared: &Shared,
        kind: Kind,
        channel: u8,
        frames: &[(&[u8], &[u8])],
    ) -> Result<(), TransportError> {
        let _guard = lock(&self.write_lock);
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error());
        }
        match frame::write_frames(&mut &self.stream, kind, channel, frames) {
            Ok(()) => {
                self.last_send_ns.store(shared.now_ns(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if !shared.closing.load(Ordering::SeqCst) {
                    warn!(node = self.id, remote = %self.addr, error = %e, "send failed; closing connection");
                }
                self.fail(LostReason::SendFailed(e.to_string()));
                Err(TransportError::Io {
                    node: self.id,
                    source: e,
                })
            }
        }
    }
}

struct State {
    connected: Vec<bool>,
}

struct Shared {
    me: u16,
    n: u16,
    secret: Vec<u8>,
    peer_timeout: Duration,
    heartbeat: Duration,
    inject_delay: Option<Duration>,
    epoch: Instant,
    peers: Vec<OnceLock<Arc<Peer>>>,
    state: Mutex<State>,
    cond: Condvar,
    closing: AtomicBool,
    /// Cloned into each reader thread; taken at shutdown so event channels disconnect.
    sink: Mutex<Option<Sink>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Never sends; disconnects when the Mesh drops its sender (interruptible sleeps).
    stop: Receiver<()>,
    pending_handshakes: AtomicUsize,
}

impl Shared {
    fn params(&self) -> Params<'_> {
        Params {
            me: self.me,
            nodes: self.n,
            secret: &self.secret,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), TransportError> {
        let h = thread::Builder::new()
            .name(name)
            .spawn(f)
            .map_err(TransportError::Spawn)?;
        lock(&self.threads).push(h);
        Ok(())
    }

    /// Sleeps for `d` unless the mesh shuts down first; returns false on shutdown.
    fn sleep(&self, d: Duration) -> bool {
        matches!(self.stop.recv_timeout(d), Err(RecvTimeoutError::Timeout))
    }

    /// Registers an authenticated connection and starts its threads. For an incoming
    /// connection (`welcome`), the Welcome frame is sent only once the id is reserved.
    fn install(
        self: &Arc<Self>,
        id: u16,
        mut stream: TcpStream,
        addr: SocketAddr,
        welcome: bool,
    ) -> Result<(), InstallError> {
        let mut st = lock(&self.state);
        // The reason of a refusal also travels to the peer, as text.
        let refuse = |stream: &mut TcpStream, reason: InstallError| {
            if welcome {
                handshake::reject(stream, &reason.to_string());
            }
            Err(reason)
        };
        if self.closing.load(Ordering::SeqCst) {
            return refuse(&mut stream, InstallError::ShuttingDown);
        }
        if st.connected[usize::from(id)] {
            return refuse(&mut stream, InstallError::AlreadyConnected(id));
        }
        let sink = match lock(&self.sink).clone() {
            Some(s) => s,
            None => return refuse(&mut stream, InstallError::ShuttingDown),
        };
        if let Err(e) = stream
            .set_read_timeout(Some(self.peer_timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.peer_timeout)))
        {
            return Err(InstallError::Timeouts(e));
        }
        if welcome {
            handshake::welcome(&mut stream).map_err(InstallError::Welcome)?;
        }
        let peer = Arc::new(Peer {
            id,
            addr,
            stream,
            write_lock: Mutex::new(()),
            lost: AtomicBool::new(false),
            reason: Mutex::new(None),
            last_send_ns: AtomicU64::new(self.now_ns()),
        });
        if self.peers[usize::from(id)].set(peer.clone()).is_err() {
            return Err(InstallError::AlreadyConnected(id));
        }
        st.connected[usize::from(id)] = true;
        self.cond.notify_all();

        let (shared, p) = (self.clone(), peer.clone());
        let reader = self.spawn(format!("dvmm-rx-{}-{id}", self.me), move || {
            reader_loop(&shared, &p, &sink)
        });
        let (shared, p) = (self.clone(), peer.clone());
        let beat = self.spawn(format!("dvmm-hb-{}-{id}", self.me), move || {
            heartbeat_loop(&shared, &p)
        });
        if let Err(e) = reader.and(beat) {
            peer.fail(LostReason::Io(e.to_string()));
            return Err(InstallError::Threads(e));
        }
        drop(st);
        info!(node = self.me, peer = id, remote = %addr, "peer connected");
        Ok(())
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads frames of one peer until the connection ends, delivering them to `sink`.
/// Bytes a reader thread takes from its socket per `read` at most: a burst of frames
/// (a batch of requests, a run of pages) costs a few system calls, not two per frame.
const READ_BUFFER: usize = 256 * 1024;

fn reader_loop(shared: &Shared, peer: &Peer, sink: &Sink) {
    let mut stream = std::io::BufReader::with_capacity(READ_BUFFER, &peer.stream);
    let reason = loop {
        match frame::read_frame(&mut stream) {
            Ok(f) => match f.kind {
                Kind::Data => sink.deliver(Event::Frame {
                    from: peer.id,
                    channel: f.channel,
                    header: f.header,
                    payload: f.payload,
                    more: frame::next_is_whole_data(stream.buffer(), f.channel),
                }),
                Kind::Heartbeat | Kind::Goodbye if !f.header.is_empty() || f.payload.is_some() => {
                    break LostReason::Protocol(format!("{:?} frame with a body", f.kind))
                }
                Kind::Heartbeat => {}
                Kind::Goodbye => break LostReason::Goodbye,
                other => {
                    break LostReason::Protocol(format!(
                        "unexpected {other:?} frame after the handshake"
                    ))
                }
            },
            Err(ReadError::Eof) => break LostReason::Closed,
            Err(ReadError::Io(e)) if is_timeout(&e) => {
                break LostReason::Timeout(shared.peer_timeout)
            }
            Err(ReadError::Io(e)) => break LostReason::Io(e.to_string()),
            Err(ReadError::Frame(e)) => break LostReason::Protocol(e.to_string()),
        }
    };
    let reason = peer.fail(reason);
    if shared.closing.load(Ordering::SeqCst) {
        return;
    }
    match &reason {
        LostReason::Goodbye => {
            info!(node = shared.me, peer = peer.id, remote = %peer.addr, "peer shut down")
        }
        r => {
            warn!(node = shared.me, peer = peer.id, remote = %peer.addr, reason = %r, "peer lost; connection closed")
        }
    }
    sink.deliver(Event::PeerLost {
        node: peer.id,
        reason,
    });
}

/// Sends a heartbeat whenever the connection has been idle for `shared.heartbeat`.
fn heartbeat_loop(shared: &Shared, peer: &Peer) {
    let tick = shared.heartbeat / 2;
    let interval_ns = u64::try_from(shared.heartbeat.as_nanos()).unwrap_or(u64::MAX);
    while shared.sleep(tick) {
        if peer.lost.load(Ordering::SeqCst) {
            return;
        }
        let idle = shared
            .now_ns()
            .saturating_sub(peer.last_send_ns.load(Ordering::Relaxed));
        if idle >= interval_ns
            && peer
                .write(shared, Kind::Heartbeat, 0, &[(&[], &[])])
                .is_err()
        {
            return;
        }
    }
}

/// Accepts connections for the lifetime of the mesh; each handshake runs on its own
/// short-lived thread so a slow or hostile client cannot stall the others.
fn listener_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.closing.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, addr)) => {
                if shared.pending_handshakes.fetch_add(1, Ordering::SeqCst)
                    >= MAX_PENDING_HANDSHAKES
                {
                    shared.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
                    warn!(node = shared.me, remote = %addr, "refused connection: too many pending handshakes");
                    continue;
                }
                let sh = shared.clone();
                let spawned = thread::Builder::new()
                    .name(format!("dvmm-hs-{}", shared.me))
                    .spawn(move || {
                        handle_incoming(&sh, stream, addr);
                        sh.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    shared.pending_handshakes.fetch_sub(1, Ordering::SeqCst);
                    warn!(node = shared.me, remote = %addr, error = %e, "refused connection: cannot spawn handshake thread");
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                if !shared.sleep(ACCEPT_POLL) {
                    return;
                }
            }
            Err(e) => {
                warn!(node = shared.me, error = %e, "accept failed");
                if !shared.sleep(ACCEPT_POLL * 10) {
                    return;
                }
            }
        }
    }
}

fn handle_incoming(shared: &Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
    if let Err(e) = setup {
        warn!(node = shared.me, remote = %addr, error = %e, "refused connection: socket setup failed");
        return;
    }
    match handshake::accept(&mut stream, &shared.params()) {
        Ok(id) => {
            if let Err(reason) = shared.install(id, stream, addr, true) {
                warn!(node = shared.me, remote = %addr, claimed = id, "refused connection: {reason}");
            }
        }
        Err(e) => warn!(node = shared.me, remote = %addr, "refused connection: {e}"),
    }
}

/// Dials node `target` until connected, the deadline passes or the mesh shuts down.
fn dialer_loop(shared: &Arc<Shared>, target: u16, addr: SocketAddr, deadline: Instant) {
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        if shared.closing.load(Ordering::SeqCst)
            || lock(&shared.state).connected[usize::from(target)]
        {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let remaining = deadline - now;
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(1))) {
            Ok(mut s) => {
                let setup = s
                    .set_nodelay(true)
                    .and_then(|()| s.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
                    .and_then(|()| s.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
                match setup
                    .map_err(handshake::HandshakeError::Io)
                    .and_then(|()| handshake::dial(&mut s, &shared.params(), target))
                {
                    Ok(()) => match shared.install(target, s, addr, false) {
                        Ok(()) => return,
                        Err(reason) => {
                            warn!(node = shared.me, peer = target, remote = %addr, "connection dropped: {reason}");
                            return;
                        }
                    },
                    Err(e) => {
                        warn!(node = shared.me, peer = target, remote = %addr, "handshake with node {target} failed: {e}")
                    }
                }
            }
            Err(e) => {
                debug!(node = shared.me, peer = target, remote = %addr, error = %e, "dial failed; retrying")
            }
        }
        if !shared.sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))) {
            return;
        }
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}

/// Builds a [`Mesh`] with optional pre-bound listener and event handler.
///
/// ```no_run
/// # use transport::{Mesh, MeshConfig, Event};
/// # fn main() -> Result<(), transport::TransportError> {
/// let addrs = vec!["10.0.0.1:7000".parse().unwrap(), "10.0.0.2:7000".parse().unwrap()];
/// let mesh = Mesh::builder(MeshConfig::new(0, addrs, b"cluster secret".to_vec()))
///     .handler(|ev| match ev {
///         Event::Frame { from, channel, header, payload, .. } => { /* handle */ }
///         Event::PeerLost { node, reason } => eprintln!("node {node} lost: {reason}"),
///     })
///     .establish()?;
/// # Ok(()) }
/// ```
pub struct MeshBuilder {
    cfg: MeshConfig,
    listener: Option<TcpListener>,
    handler: Option<Arc<Handler>>,
}

impl MeshBuilder {
    /// Use an already bound listener instead of binding `addrs[me]` (e.g. bound to port
    /// 0 in tests, with the real port put into every node's `addrs`).
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Deliver events by calling `handler` directly on the reader thread of the
    /// sending peer instead of through [`Mesh::events`] (lowest latency). It is called
    /// concurrently for different peers, in order for one peer, and already during
    /// establishment (before [`MeshBuilder::establish`] returns). [`Mesh::events`] is
    /// then a disconnected, empty channel.
    ///
    /// The handler should not block for long: while it runs nothing else from that
    /// peer is read, and if the peer's socket buffers fill up its sends block and,
    /// after `peer_timeout`, fail and declare this node lost. In particular, a handler
    /// that itself sends large volumes to a peer whose handler does the same can
    /// deadlock on full buffers until `peer_timeout`; hand such work to another thread.
    pub fn handler(mut self, handler: impl Fn(Event) + Send + Sync + 'static) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Binds (unless given a listener), then connects to all other nodes: dials every
    /// lower id (retrying with backoff) and accepts every higher id, authenticating
    /// each connection. Returns once all `N - 1` connections are up, or
    /// [`TransportError::Timeout`] naming the missing nodes after `connect_timeout`.
    pub fn establish(self) -> Result<Mesh, TransportError> {
        let MeshBuilder {
            cfg,
            listener,
            handler,
        } = self;
        let n = cfg.validate()?;
        let my_addr = cfg.addrs[usize::from(cfg.me)];
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(my_addr).map_err(|source| TransportError::Bind {
                addr: my_addr,
                source,
            })?,
        };
        let bind_err = |source| TransportError::Bind {
            addr: my_addr,
            source,
        };
        let local_addr = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;

        let (events_tx, events) = crossbeam_channel::unbounded();
        let sink = match handler {
            Some(h) => Sink::Handler(h),
            None => Sink::Channel(events_tx),
        };
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let mut connected = vec![false; usize::from(n)];
        connected[usize::from(cfg.me)] = true;
        let shared = Arc::new(Shared {
            me: cfg.me,
            n,
            secret: cfg.secret,
            peer_timeout: cfg.peer_timeout,
            heartbeat: HEARTBEAT_INTERVAL.min(cfg.peer_timeout / 4),
            inject_delay: cfg.inject_delay,
            epoch: Instant::now(),
            peers: (0..n).map(|_| OnceLock::new()).collect(),
            state: Mutex::new(State { connected }),
            cond: Condvar::new(),
            closing: AtomicBool::new(false),
            sink: Mutex::new(Some(sink)),
            threads: Mutex::new(Vec::new()),
            stop,
            pending_handshakes: AtomicUsize::new(0),
        });
        // From here on, dropping `mesh` (e.g. on error) shuts everything down.
        let mesh = Mesh {
            shared: shared.clone(),
            events,
            stop_tx: Mutex::new(Some(stop_tx)),
            local_addr,
        };

        let sh = shared.clone();
        shared.spawn(format!("dvmm-listen-{}", cfg.me), move || {
            listener_loop(&sh, &listener)
        })?;
        let deadline = Instant::now() + cfg.connect_timeout;
        for target in 0..cfg.me {
            let sh = shared.clone();
            let addr = cfg.addrs[usize::from(target)];
            shared.spawn(format!("dvmm-dial-{}-{target}", cfg.me), move || {
                dialer_loop(&sh, target, addr, deadline)
            })?;
        }

        let mut st = lock(&shared.state);
        loop {
            if st.connected.iter().all(|&c| c) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..n).filter(|&i| !st.connected[usize::from(i)]).collect();
                drop(st);
                let err = TransportError::Timeout {
                    waited: cfg.connect_timeout,
                    missing,
                };
                warn!(node = cfg.me, "mesh establishment failed: {err}");
                return Err(err);
            }
            st = shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        info!(node = cfg.me, nodes = n, listen = %local_addr, "mesh established");
        Ok(mesh)
    }
}

/// This node's view of the full mesh. Dropping it shuts it down.
pub struct Mesh {
    shared: Arc<Shared>,
    events: Receiver<Event>,
    stop_tx: Mutex<Option<ChanSender<()>>>,
    local_addr: SocketAddr,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("me", &self.shared.me)
            .field("nodes", &self.shared.n)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Binds `cfg.addrs[cfg.me]` and establishes the mesh, delivering events through
    /// [`Mesh::events`]. See [`MeshBuilder::establish`].
    pub fn establish(cfg: MeshConfig) -> Result<Mesh, TransportError> {
        Mesh::builder(cfg).establish()
    }

    /// A builder, to pass a pre-bound listener or an event handler.
    pub fn builder(cfg: MeshConfig) -> MeshBuilder {
        MeshBuilder {
            cfg,
            listener: None,
            handler: None,
        }
    }

    /// This node's id.
    pub fn me(&self) -> u16 {
        self.shared.me
    }

    /// Number of nodes in the mesh.
    pub fn nodes(&self) -> u16 {
        self.shared.n
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A cloneable, thread-safe sending handle.
    pub fn sender(&self) -> Sender {
        Sender {
            shared: self.shared.clone(),
        }
    }

    /// The event stream (disconnected and empty when a handler was installed with
    /// [`MeshBuilder::handler`]). It disconnects after [`Mesh::shutdown`].
    pub fn events(&self) -> Receiver<Event> {
        self.events.clone()
    }

    /// Whether `node` is a connected, not lost peer.
    pub fn is_alive(&self, node: u16) -> bool {
        self.sender().is_alive(node)
    }

    /// Closes the mesh: stops the listener, says goodbye to every live peer (peers see
    /// [`LostReason::Goodbye`]), closes all connections and joins all transport
    /// threads. Idempotent; also done on drop. Bounded in time (each goodbye write has
    /// a 100 ms timeout and is skipped if a sender holds the peer's lock).
    pub fn shutdown(&self) {
        {
            let _st = lock(&self.shared.state);
            self.shared.closing.store(true, Ordering::SeqCst);
        }
        lock(&self.stop_tx).take();
        lock(&self.shared.sink).take();
        for peer in self.shared.peers.iter().filter_map(OnceLock::get) {
            if !peer.lost.load(Ordering::SeqCst) {
                if let Ok(_guard) = peer.write_lock.try_lock() {
                    let _ = peer.stream.set_write_timeout(Some(GOODBYE_TIMEOUT));
                    let _ = frame::write_frame(&mut &peer.stream, Kind::Goodbye, 0, &[], &[]);
                }
            }
            peer.fail(LostReason::Goodbye);
        }
        let me = thread::current().id();
        loop {
            let handles = std::mem::take(&mut *lock(&self.shared.threads));
            if handles.is_empty() {
                break;
            }
            for h in handles {
                // A handler that shuts the mesh down runs on a reader thread; it cannot
                // join itself.
                if h.thread().id() != me {
                    let _ = h.join();
                }
            }
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Cloneable, thread-safe handle to send frames to peers.
///
/// Sends to one peer are serialised by a per-peer mutex (frames never interleave);
/// sends to different peers proceed in parallel.
#[derive(Clone)]
pub struct Sender {
    shared: Arc<Shared>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("me", &self.shared.me)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// This node's id.
    pub fn me(&self) -> u16 {
        self.shared.me
    }

    /// Number of nodes in the mesh.
    pub fn nodes(&self) -> u16 {
        self.shared.n
    }

    /// Whether `node` is a connected, not lost peer.
    pub fn is_alive(&self, node: u16) -> bool {
        self.peer(node)
            .is_ok_and(|p| !p.lost.load(Ordering::SeqCst))
    }

    fn peer(&self, to: u16) -> Result<&Arc<Peer>, TransportError> {
        if to == self.shared.me {
            return Err(TransportError::NoSuchPeer(to));
        }
        self.shared
            .peers
            .get(usize::from(to))
            .and_then(OnceLock::get)
            .ok_or(TransportError::NoSuchPeer(to))
    }

    /// Sends one frame to node `to`: `channel` and `header` (opaque bytes, at most
    /// [`MAX_HEADER_LEN`]) plus an optional page `payload` of exactly [`PAGE_SIZE`]
    /// bytes, written straight from `payload`'s memory with one vectored write.
    ///
    /// Blocks while another thread sends to the same peer, and at most `peer_timeout`
    /// on a full socket buffer. Fails with [`TransportError::PeerLost`] once the peer
    /// is lost; a failed write declares it lost.
    pub fn send(
        &self,
        to: u16,
        channel: u8,
        header: &[u8],
        payload: Option<&[u8]>,
    ) -> Result<(), TransportError> {
        self.send_batch(to, channel, &[(header, payload)])
    }

    /// Sends several frames to node `to` on `channel`, back to back and in order, with
    /// as few system calls as the kernel allows (one vectored write per 256 frames):
    /// what a burst of requests or a run of pages costs once instead of once per frame.
    /// Each frame is as for [`Sender::send`]; the whole batch is checked before any byte
    /// is written. The batch does not interleave with other senders' frames to `to`.
    pub fn send_batch(
        &self,
        to: u16,
        channel: u8,
        frames: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), TransportError> {
        let mut parts = Vec::with_capacity(frames.len());
        for (header, payload) in frames {
            if header.len() > MAX_HEADER_LEN {
                return Err(TransportError::HeaderTooLong(header.len()));
            }
            let payload = match payload {
                None => &[][..],
                Some(p) if p.len() == PAGE_SIZE => *p,
                Some(p) => return Err(TransportError::BadPayload(p.len())),
            };
            parts.push((*header, payload));
        }
        let peer = self.peer(to)?;
        if self.shared.closing.load(Ordering::SeqCst) {
            return Err(TransportError::Shutdown);
        }
        if peer.lost.load(Ordering::SeqCst) {
            return Err(peer.lost_error());
        }
        if parts.is_empty() {
            return Ok(());
        }
        if let Some(d) = self.shared.inject_delay {
            thread::sleep(d);
        }
        peer.write(&self.shared, Kind::Data, channel, &parts)
    }
}
