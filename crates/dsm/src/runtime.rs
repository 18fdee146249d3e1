//! The DSM runtime: one [`Dsm`] per node process.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use dsm_proto::{Access, Action, Engine, HomePolicy, LocalAccess, Msg, NodeId, PageId, PAGE_SIZE};
use tracing::{debug, error, warn};
use transport::{LostReason, PageBuf, Sender, TransportError};

use crate::ahead::Streams;
use crate::hist::Histogram;
use crate::region::Region;
use crate::stats::{Counters, DsmStats, FaultKind};
use crate::uffd::Fault;
use crate::{wire, DsmError, DSM_CHANNEL};

/// How many pages [`DsmStats::hot_pages`] lists.
const HOT_PAGES: usize = 8;

/// The `n` pages with the most faults, most first (ties: lower page first).
fn hottest(counts: &HashMap<PageId, u64>, n: usize) -> Vec<(PageId, u64)> {
    let mut v: Vec<(PageId, u64)> = counts.iter().map(|(&p, &c)| (p, c)).collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Default for [`DsmOptions::hold`].
pub const DEFAULT_HOLD: Duration = Duration::from_micros(50);

/// Tuning knobs of a [`Dsm`].
#[derive(Clone, Debug)]
pub struct DsmOptions {
    /// How long after a `Wake` a page is held (orders to give it away are deferred) so
    /// the woken threads can retry their access before the page can be taken again.
    /// Zero releases right away (correct, but two writers may ping-pong a page forever).
    pub hold: Duration,
    /// After handling faults, the fault thread keeps polling the userfaultfd (yielding
    /// the CPU in between) for this long before it sleeps. Zero: sleep at once.
    pub spin: Duration,
    /// Read-ahead: the largest window, in pages, of the adaptive read-ahead on
    /// sequential or strided remote read faults (see [`crate::ahead`]); read copies
    /// are fetched ahead. 0 disables it.
    pub readahead: u64,
    /// Write-ahead: the same for write faults (ownership of the next pages of a write
    /// stream is fetched ahead). 0 disables it.
    pub writeahead: u64,
}

/// Default for [`DsmOptions::readahead`], pages.
pub const DEFAULT_READAHEAD: u64 = 256;
/// Default for [`DsmOptions::writeahead`], pages.
pub const DEFAULT_WRITEAHEAD: u64 = 0;

impl Default for DsmOptions {
    fn default() -> Self {
        DsmOptions {
            hold: DEFAULT_HOLD,
            spin: Duration::ZERO,
            readahead: DEFAULT_READAHEAD,
            writeahead: DEFAULT_WRITEAHEAD,
        }
    }
}

/// Why the DSM of a node failed (the first fatal error; see [`Dsm::failure`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DsmFailure {
    /// The peer whose loss (or a send to which) caused the failure, if any.
    pub node: Option<NodeId>,
    /// Human-readable description, naming the node.
    pub message: String,
}

impl fmt::Display for DsmFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A callback run once, on the thread that detected the failure.
type FailureHook = Box<dyn Fn(&DsmFailure) + Send + Sync>;
type LostHook = Box<dyn Fn(PageId) + Send + Sync>;

/// Protocol state and latency bookkeeping, under one lock.
struct Core {
    engine: Engine,
    /// Faults waiting for a `Wake`, with the time their event was read and the faulting
    /// thread (0: unknown).
    waiting: HashMap<PageId, Vec<(Instant, FaultKind, u32)>>,
    lat: [Histogram; 3],
    /// When each held page was last woken (start of its hold).
    held_since: HashMap<PageId, Instant>,
    /// Peers with frames queued by the current engine call(s), to flush after unlocking.
    touched: Vec<NodeId>,
    /// Mapping changes and sends put off to the end of this hold of the lock, where
    /// runs of pages take one system call (see [`Deferred`]).
    deferred: Deferred,
    /// Streams of remote read and write faults (read-ahead, write-ahead).
    reads: Streams,
    writes: Streams,
    /// Fault events per page (for [`DsmStats::hot_pages`]).
    faults_per_page: HashMap<PageId, u64>,
}

/// What [`Dsm::execute`] puts off until the end of a hold of the core lock
/// ([`Dsm::apply_deferred`]), so that the pages of a burst are installed,
/// write-protected or dropped with one system call per run of pages instead of one per
/// page. Applied in four phases — installs, write-protects, the sends (each copy taken
/// then), the drops — which is the order of the actions for any one page; an action
/// that would not keep that order, and every other kind of action, applies what is
/// deferred first. The mapping agrees with the engine whenever the lock is free.
#[derive(Default)]
struct Deferred {
    /// `Install`s by copy (received contents, or zeroes for a read-only zero page),
    /// applied first, in arrival order: page, access, whether to wake. The contents
    /// of the `k`-th are `install_bytes[k * PAGE_SIZE..][..PAGE_SIZE]`.
    installs: Vec<(PageId, LocalAccess, bool)>,
    install_bytes: Vec<u8>,
    /// `SetAccess Read`: pages to write-protect.
    protect: Vec<PageId>,
    /// `Send`s, in emission order (the copy of `with_page` is taken when applied).
    sends: Vec<(NodeId, Msg, Option<PageId>)>,
    /// `SetAccess None`: pages to drop.
    drop: Vec<PageId>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.installs.is_empty()
            && self.protect.is_empty()
            && self.sends.is_empty()
            && self.drop.is_empty()
    }

    /// Whether a later action on `page` may not be moved before what waits for it.
    fn touches(&self, page: PageId) -> bool {
        self.protect.contains(&page)
            || self.drop.contains(&page)
            || self.sends.iter().any(|s| s.2 == Some(page))
    }
}

/// Runs of consecutive pages in `pages` (sorted and deduplicated): `(first, count)`.
fn runs(pages: &mut Vec<PageId>) -> Vec<(PageId, u64)> {
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<(PageId, u64)> = Vec::new();
    for &p in pages.iter() {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Frames of one burst from one peer, waiting to be handled together.
type Burst = Vec<(Vec<u8>, Option<PageBuf>)>;

/// Most frames handled under one hold of the core lock.
const MAX_BURST: usize = 64;

/// A frame waiting in a peer's outgoing queue.
struct Outgoing {
    header: [u8; wire::MSG_LEN],
    page: Option<PageBuf>,
    kind: &'static str,
}

/// Outgoing frames to one peer.
#[derive(Default)]
struct OutQueue {
    queue: Mutex<VecDeque<Outgoing>>,
    /// Held while writing this peer's queue to the socket.
    sending: Mutex<()>,
}

enum ReleaseMsg {
    Release(Instant, PageId),
    Stop,
}

/// The DSM runtime of one node process.
///
/// Owns the guest-RAM [`Region`], the protocol [`Engine`] (under one lock) and two
/// threads:
///
/// * `dsm-fault-<me>`: polls the userfaultfd, hands every page fault to
///   [`Engine::fault`] and executes the actions (usually: send a `Request`).
/// * `dsm-release-<me>`: calls [`Engine::release`] for every woken page once its hold
///   time ([`DsmOptions::hold`]) has passed, executing deferred orders.
///
/// Incoming frames are handled by [`Dsm::on_frame`] on the caller's thread — normally
/// the transport's reader thread of the sending peer, so a reply is installed
/// (`UFFDIO_COPY`) and the faulting thread woken with no further thread hop.
///
/// All actions of one engine call are executed in order while the lock is held, so
/// sends to a peer leave in emission order and the local mapping always agrees with the
/// engine's view.
pub struct Dsm {
    me: NodeId,
    nodes: u16,
    region: Region,
    core: Mutex<Core>,
    out: Vec<OutQueue>,
    /// Per peer: DSM frames of a burst not handled yet (see [`Dsm::on_frame_in_burst`]).
    bursts: Vec<Mutex<Burst>>,
    sender: Sender,
    counters: Counters,
    hold: Duration,
    spin: Duration,
    release_tx: crossbeam_channel::Sender<ReleaseMsg>,
    failure: Mutex<Option<DsmFailure>>,
    failure_cv: Condvar,
    failure_hook: Mutex<Option<FailureHook>>,
    lost_hook: std::sync::OnceLock<LostHook>,
    closing: AtomicBool,
    goodbyes_ok: AtomicBool,
    stop_fd: OwnedFd,
    threads: Mutex<Vec<JoinHandle<()>>>,
    zero: PageBuf,
}

impl fmt::Debug for Dsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dsm")
            .field("me", &self.me)
            .field("nodes", &self.nodes)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn eventfd() -> Result<OwnedFd, DsmError> {
    // SAFETY: plain system call; returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(DsmError::Spawn(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Dsm {
    /// Starts the DSM of node `me` of `nodes` over `region` with default options.
    /// `sender` must belong to a mesh whose handler routes channel [`DSM_CHANNEL`] to
    /// [`Dsm::on_frame`] and peer losses to [`Dsm::on_peer_lost`] (see
    /// [`connect`](crate::connect) and [`DsmSlot`](crate::DsmSlot)).
    pub fn new(
        me: NodeId,
        nodes: u16,
        region: Region,
        homes: Box<dyn HomePolicy + Send>,
        sender: Sender,
    ) -> Result<Arc<Dsm>, DsmError> {
        Self::with_options(me, nodes, region, homes, sender, DsmOptions::default())
    }

    /// [`Dsm::new`] with explicit options.
    pub fn with_options(
        me: NodeId,
        nodes: u16,
        region: Region,
        homes: Box<dyn HomePolicy + Send>,
        sender: Sender,
        opts: DsmOptions,
    ) -> Result<Arc<Dsm>, DsmError> {
        if me >= nodes {
            return Err(DsmError::Config(format!(
                "node id {me} out of range for {nodes} nodes"
            )));
        }
        if sender.me() != me || sender.nodes() != nodes {
            return Err(DsmError::Config(format!(
                "the mesh is node {} of {}, the DSM node {me} of {nodes}",
                sender.me(),
                sender.nodes()
            )));
        }
        let engine = Engine::new(me, nodes, region.pages(), homes);
        let (release_tx, release_rx) = crossbeam_channel::unbounded();
        let dsm = Arc::new(Dsm {
            me,
            nodes,
            region,
            core: Mutex::new(Core {
                engine,
                waiting: HashMap::new(),
                lat: Default::default(),
                held_since: HashMap::new(),
                touched: Vec::new(),
                deferred: Deferred::default(),
                reads: Streams::new(opts.readahead),
                writes: Streams::new(opts.writeahead),
                faults_per_page: HashMap::new(),
            }),
            out: (0..nodes).map(|_| OutQueue::default()).collect(),
            bursts: (0..nodes).map(|_| Mutex::new(Vec::new())).collect(),
            sender,
            counters: Counters::default(),
            hold: opts.hold,
            spin: opts.spin,
            release_tx,
            failure: Mutex::new(None),
            failure_cv: Condvar::new(),
            failure_hook: Mutex::new(None),
            lost_hook: std::sync::OnceLock::new(),
            closing: AtomicBool::new(false),
            goodbyes_ok: AtomicBool::new(false),
            stop_fd: eventfd()?,
            threads: Mutex::new(Vec::new()),
            zero: PageBuf::new(),
        });
        let d = dsm.clone();
        let fault = thread::Builder::new()
            .name(format!("dsm-fault-{me}"))
            .spawn(move || d.fault_loop())
            .map_err(DsmError::Spawn)?;
        lock(&dsm.threads).push(fault);
        let d = dsm.clone();
        let release = thread::Builder::new()
            .name(format!("dsm-release-{me}"))
            .spawn(move || d.release_loop(&release_rx));
        match release {
            Ok(h) => lock(&dsm.threads).push(h),
            Err(e) => {
                dsm.shutdown();
                return Err(DsmError::Spawn(e));
            }
        }
        // Not joined by `shutdown` (a hook may run for long, e.g. wait for vCPUs); it
        // returns once the hook ran or the runtime is closing.
        let d = dsm.clone();
        if let Err(e) = thread::Builder::new()
            .name(format!("dsm-watch-{me}"))
            .spawn(move || d.watch_loop())
        {
            dsm.shutdown();
            return Err(DsmError::Spawn(e));
        }
        Ok(dsm)
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Number of nodes.
    pub fn nodes(&self) -> u16 {
        self.nodes
    }

    /// The guest-RAM mapping (host pointer and length), e.g. for KVM.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// A frame on [`DSM_CHANNEL`] from peer `from`: decode, run the engine, execute the
    /// actions (install the payload, wake faulting threads, send replies). Malformed or
    /// unexpected messages are logged and ignored.
    pub fn on_frame(&self, from: NodeId, header: &[u8], payload: Option<PageBuf>) {
        self.on_frame_in_burst(from, header.to_vec(), payload, false)
    }

    /// [`Dsm::on_frame`] for a frame of a burst: with `more` (the transport has the
    /// peer's next DSM frame already, see `transport::Event::Frame`), the frame waits
    /// for the rest of the burst; the burst's frames (at most 64) are then
    /// handled under one hold of the engine lock, their mapping changes made per run of
    /// pages and their replies written as one batch.
    pub fn on_frame_in_burst(
        &self,
        from: NodeId,
        header: Vec<u8>,
        payload: Option<PageBuf>,
        more: bool,
    ) {
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        let Some(slot) = self.bursts.get(usize::from(from)) else {
            Counters::add(&self.counters.bad_frames, 1);
            warn!(
                node = self.me,
                from, "DSM frame from a node outside the cluster"
            );
            return;
        };
        let frames = {
            let mut b = lock(slot);
            b.push((header, payload));
            if more && b.len() < MAX_BURST {
                return;
            }
            std::mem::take(&mut *b)
        };
        self.receive_burst(from, frames);
    }

    /// Decodes and handles the frames of a burst from `from`, in order.
    fn receive_burst(&self, from: NodeId, frames: Burst) {
        let mut msgs = Vec::with_capacity(frames.len());
        let mut abort = None;
        for (header, payload) in frames {
            let size = header.len() + payload.as_ref().map_or(0, |_| PAGE_SIZE);
            Counters::add(&self.counters.bytes_in, size as u64);
            match wire::decode_frame(&header) {
                Ok(wire::Frame::Msg(m)) => msgs.push((m, payload)),
                Ok(wire::Frame::Abort { culprit, reason }) => {
                    // Nothing after it matters: the peer's DSM is gone.
                    abort = Some((culprit, reason));
                    break;
                }
                Err(e) => {
                    Counters::add(&self.counters.bad_frames, 1);
                    warn!(node = self.me, from, "ignored DSM frame: {e}");
                }
            }
        }
        if !msgs.is_empty() {
            let mut core = lock(&self.core);
            for (msg, payload) in msgs {
                self.receive_locked(&mut core, from, msg, payload);
            }
            self.finish(core);
        }
        if let Some((culprit, reason)) = abort {
            let message = match culprit {
                Some(c) if c != self.me => {
                    format!("DSM peer node {c} lost (reported by node {from}: {reason})")
                }
                _ => format!("DSM of peer node {from} failed: {reason}"),
            };
            let culprit = culprit.filter(|&c| c != self.me).or(Some(from));
            self.fail(culprit, message);
        }
    }

    /// Runs the engine on one message (the core lock held); what it makes stays
    /// queued or deferred until [`Dsm::finish`].
    fn receive_locked(&self, core: &mut Core, from: NodeId, msg: Msg, payload: Option<PageBuf>) {
        match core
            .engine
            .receive_frame(from, msg.clone(), payload.is_some())
        {
            Ok(actions) => {
                if payload.is_some() {
                    Counters::add(&self.counters.pages_received, 1);
                }
                self.run(core, msg.page(), &actions, payload.as_ref());
            }
            Err(e) => {
                Counters::add(&self.counters.protocol_errors, 1);
                warn!(
                    node = self.me,
                    from,
                    ?msg,
                    "protocol error, message ignored: {e}"
                );
            }
        }
    }

    /// Ends a hold of the core lock in which the engine ran: applies what is deferred,
    /// releases the lock, then writes the queued frames.
    fn finish(&self, mut core: MutexGuard<'_, Core>) {
        self.apply_deferred(&mut core);
        let touched = std::mem::take(&mut core.touched);
        drop(core);
        self.flush(&touched);
    }

    /// Peer `node` is gone (the transport's `PeerLost`). Fatal for the DSM — pages
    /// homed or held there are unreachable — unless the runtime is shutting down, or
    /// `reason` is an orderly goodbye after [`Dsm::expect_goodbyes`]. Records the
    /// failure (see [`Dsm::wait_failure`]) and runs the failure hook.
    pub fn on_peer_lost(&self, node: NodeId, reason: &LostReason) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        if *reason == LostReason::Goodbye && self.goodbyes_ok.load(Ordering::SeqCst) {
            debug!(node = self.me, peer = node, "peer left in an orderly way");
            return;
        }
        self.fail(Some(node), format!("DSM peer node {node} lost: {reason}"));
    }

    /// From now on an orderly goodbye of a peer (its `shutdown`) is not a failure: call
    /// this once this node no longer needs any remote page (e.g. when entering the final
    /// barrier of a run).
    pub fn expect_goodbyes(&self) {
        self.goodbyes_ok.store(true, Ordering::SeqCst);
    }

    /// Installs a callback run (under the engine lock: it must only take note and
    /// return) every time this node gives up its copy of a page because another node is
    /// about to write it. A software-KVM host uses it to drop KVM's shadow page tables,
    /// which do not see writes made on other hosts. Only the first hook is kept.
    pub fn set_page_lost_hook(&self, hook: impl Fn(PageId) + Send + Sync + 'static) {
        let _ = self.lost_hook.set(Box::new(hook));
    }

    /// Installs a callback run once when the DSM fails (at once if it already failed), on
    /// a dedicated watcher thread, so it may call into the `Dsm`. Typical use: stop
    /// vCPUs and exit the process — threads blocked in a fault on an unreachable page
    /// cannot be woken otherwise.
    pub fn set_failure_hook(&self, hook: impl Fn(&DsmFailure) + Send + Sync + 'static) {
        *lock(&self.failure_hook) = Some(Box::new(hook));
        let _f = lock(&self.failure);
        self.failure_cv.notify_all();
    }

    /// Runs the failure hook on this (dedicated) thread, never under the engine lock.
    fn watch_loop(&self) {
        let mut f = lock(&self.failure);
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            if let Some(failure) = f.clone() {
                let hook = lock(&self.failure_hook).take();
                if let Some(h) = hook {
                    drop(f);
                    h(&failure);
                    return;
                }
            }
            f = self.failure_cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The first fatal error, if any.
    pub fn failure(&self) -> Option<DsmFailure> {
        lock(&self.failure).clone()
    }

    /// Waits up to `timeout` for a fatal error.
    pub fn wait_failure(&self, timeout: Duration) -> Option<DsmFailure> {
        let deadline = Instant::now() + timeout;
        let mut f = lock(&self.failure);
        loop {
            if f.is_some() {
                return f.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            f = self
                .failure_cv
                .wait_timeout(f, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Records a fatal error (the first one wins), logs it, tells the peers, and wakes
    /// the waiters and the hook's watcher thread.
    fn fail(&self, node: Option<NodeId>, message: String) {
        {
            let mut f = lock(&self.failure);
            if f.is_some() {
                return;
            }
            error!(node = self.me, "{message}");
            *f = Some(DsmFailure {
                node,
                message: message.clone(),
            });
            // Tell the others the root cause before this process goes away (data
            // precede the connection's close, so they see this first).
            let abort = wire::encode_abort(node, &message);
            for to in (0..self.nodes).filter(|&n| n != self.me && Some(n) != node) {
                let _ = self.sender.send(to, DSM_CHANNEL, &abort, None);
            }
            self.failure_cv.notify_all();
        }
    }

    /// The threads that wait for a page now (their faults are outstanding): (thread id,
    /// page, how long so far). Empty where the kernel does not report thread ids.
    pub fn waiting_threads(&self) -> Vec<(u32, PageId, Duration)> {
        let core = lock(&self.core);
        let now = Instant::now();
        core.waiting
            .iter()
            .flat_map(|(page, w)| {
                w.iter()
                    .filter(|(_, _, tid)| *tid != 0)
                    .map(move |(t, _, tid)| (*tid, *page, now.duration_since(*t)))
            })
            .collect()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DsmStats {
        let core = lock(&self.core);
        let s = core.engine.stats();
        let c = &self.counters;
        DsmStats {
            node: self.me,
            read_faults: s.read_faults,
            write_faults: s.write_faults,
            upgrade_faults: s.upgrade_faults,
            merged_faults: s.merged_faults,
            spurious_faults: s.spurious_faults,
            zero_fills: s.zero_fills,
            messages_sent: s.messages_sent,
            messages_received: s.messages_received,
            bytes_out: Counters::get(&c.bytes_out),
            bytes_in: Counters::get(&c.bytes_in),
            pages_sent: s.pages_sent,
            pages_received: Counters::get(&c.pages_received),
            zero_pages_sent: s.zero_pages_sent,
            invalidations_sent: s.invalidations_sent,
            invalidations_received: s.invalidations_received,
            forwards_sent: s.forwards_sent,
            requests_served: s.requests_served,
            requests_queued: s.requests_queued,
            bad_frames: Counters::get(&c.bad_frames),
            protocol_errors: Counters::get(&c.protocol_errors),
            prefetches: Counters::get(&c.prefetches),
            write_prefetches: Counters::get(&c.write_prefetches),
            read_latency: core.lat[0].clone(),
            write_latency: core.lat[1].clone(),
            upgrade_latency: core.lat[2].clone(),
            hot_pages: hottest(&core.faults_per_page, HOT_PAGES),
        }
    }

    /// Whether nothing is going on at this node (no outstanding request, busy directory
    /// entry, queued request or held page).
    pub fn is_quiescent(&self) -> bool {
        lock(&self.core).engine.is_quiescent()
    }

    /// Stops the runtime threads (idempotent). Frames and faults are ignored from now on;
    /// threads blocked in a fault stay blocked. The region stays mapped until the last
    /// `Arc<Dsm>` is dropped.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        {
            let _f = lock(&self.failure);
            self.failure_cv.notify_all();
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        let _ = unsafe {
            libc::write(
                self.stop_fd.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
        let _ = self.release_tx.send(ReleaseMsg::Stop);
        let me = thread::current().id();
        let handles = std::mem::take(&mut *lock(&self.threads));
        for h in handles {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }

    // ------------------------------------------------------------------ threads

    fn fault_loop(&self) {
        let mut faults = Vec::with_capacity(16);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.region.uffd().raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop_fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of 2 pollfd structs for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.fail(None, format!("poll on the userfaultfd failed: {e}"));
                return;
            }
            if self.closing.load(Ordering::SeqCst) || fds[1].revents != 0 {
                return;
            }
            // Handle what is queued. With `spin`, keep polling without sleeping for that
            // long (yielding the CPU) so a thread that faults again right after being
            // woken does not pay for waking this thread up.
            let mut idle_since = Instant::now();
            loop {
                faults.clear();
                let n = match self.region.uffd().read_faults(&mut faults) {
                    Ok(n) => n,
                    Err(e) => {
                        self.fail(None, format!("reading the userfaultfd failed: {e}"));
                        return;
                    }
                };
                for f in &faults {
                    self.handle_fault(*f);
                }
                if n > 0 {
                    idle_since = Instant::now();
                }
                if n == crate::uffd::READ_BATCH {
                    continue; // there may be more queued
                }
                if self.spin.is_zero()
                    || idle_since.elapsed() >= self.spin
                    || self.closing.load(Ordering::Relaxed)
                {
                    break;
                }
                thread::yield_now();
            }
        }
    }

    fn handle_fault(&self, f: Fault) {
        let Some(page) = self.region.page_of(f.address) else {
            warn!(
                node = self.me,
                addr = f.address,
                "fault outside the region ignored"
            );
            return;
        };
        let access = if f.write { Access::Write } else { Access::Read };
        let now = Instant::now();
        let mut core = lock(&self.core);
        *core.faults_per_page.entry(page).or_default() += 1;
        let kind = match access {
            Access::Read => FaultKind::Read,
            Access::Write if core.engine.local_access(page) == LocalAccess::Read => {
                FaultKind::Upgrade
            }
            Access::Write => FaultKind::Write,
        };
        match core.engine.fault(page, access) {
            Ok(actions) => {
                let immediate = actions
                    .iter()
                    .any(|a| matches!(a, Action::Wake { page: p } if *p == page));
                if !immediate {
                    core.waiting
                        .entry(page)
                        .or_default()
                        .push((now, kind, f.tid));
                }
                self.run(&mut core, page, &actions, None);
                if !immediate {
                    self.fetch_ahead(&mut core, page, access);
                }
                self.finish(core);
            }
            Err(e) => {
                drop(core);
                Counters::add(&self.counters.protocol_errors, 1);
                error!(node = self.me, page, "engine refused a local fault: {e}");
            }
        }
    }

    /// Read-ahead and write-ahead: a remote fault at `page` may continue a stream
    /// ([`Streams`]); the pages it names are asked for like faults no thread waits for
    /// (the engine installs them and the wake finds nobody), unless they are here with
    /// that access already or requested.
    fn fetch_ahead(&self, core: &mut Core, page: PageId, access: Access) {
        let pages = self.region.pages();
        let ahead = match access {
            Access::Read => core.reads.on_fault(page, pages),
            Access::Write => core.writes.on_fault(page, pages),
        };
        for q in ahead {
            if core.engine.local_access(q).allows(access) || core.engine.is_pending(q) {
                continue;
            }
            match core.engine.fault(q, access) {
                Ok(actions) => {
                    let c = match access {
                        Access::Read => &self.counters.prefetches,
                        Access::Write => &self.counters.write_prefetches,
                    };
                    Counters::add(c, 1);
                    self.run(core, q, &actions, None);
                }
                Err(e) => {
                    error!(node = self.me, page = q, "fetching ahead refused: {e}");
                    break;
                }
            }
        }
    }

    fn release_loop(&self, rx: &Receiver<ReleaseMsg>) {
        // Fine-grained timers: the default 50 µs slack would double short holds.
        // SAFETY: prctl with an integer argument affects only this thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        let mut timers: BinaryHeap<Reverse<(Instant, PageId)>> = BinaryHeap::new();
        loop {
            let msg = match timers.peek() {
                Some(&Reverse((deadline, _))) => match rx.recv_deadline(deadline) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            match msg {
                Some(ReleaseMsg::Stop) => return,
                Some(ReleaseMsg::Release(d, p)) => timers.push(Reverse((d, p))),
                None => {}
            }
            let now = Instant::now();
            if timers.peek().is_some_and(|&Reverse((d, _))| d <= now) {
                if self.closing.load(Ordering::Relaxed) {
                    return;
                }
                let mut core = lock(&self.core);
                while let Some(&Reverse((d, page))) = timers.peek() {
                    if d > now {
                        break;
                    }
                    timers.pop();
                    match core.held_since.get(&page) {
                        // Re-woken since this timer was armed: hold it for its full time.
                        Some(&t) if t + self.hold > now => {
                            timers.push(Reverse((t + self.hold, page)))
                        }
                        _ => self.release_now(&mut core, page),
                    }
                }
                self.finish(core);
            }
        }
    }

    // ------------------------------------------------------------------ actions

    /// Executes the `actions` of an engine call about `page`, then settles the holds.
    fn run(&self, core: &mut Core, page: PageId, actions: &[Action], payload: Option<&PageBuf>) {
        let woken = self.execute(core, actions, payload);
        self.settle(core, page, &woken);
    }

    /// Calls `release(page)` and runs its actions.
    fn release_now(&self, core: &mut Core, page: PageId) {
        core.held_since.remove(&page);
        match core.engine.release(page) {
            Ok(actions) => self.run(core, page, &actions, None),
            Err(e) => error!(node = self.me, page, "release refused: {e}"),
        }
    }

    /// Hold bookkeeping after an engine call about `page` that woke `woken`.
    ///
    /// The engine defers a take-away order (`Forward`, `Invalidate`, or its own
    /// directory waiting for its held copy) that arrives while a page is held, until
    /// `release`. Rather than arming a timer after every wake, `release` is arranged
    /// only where a deferred order may exist:
    ///
    /// * a call that did not wake `page` but left it held may have deferred an order: release
    ///   at once if the hold time is over, else arm the timer for its end;
    /// * a call that woke a page starts its hold; only at the page's home can the same call
    ///   also defer an order (its directory serving a queued request), so only there the
    ///   timer is armed. Elsewhere orders arrive as later frames, handled by the first rule.
    fn settle(&self, core: &mut Core, page: PageId, woken: &[PageId]) {
        let now = Instant::now();
        for &w in woken {
            if !core.engine.is_held(w) {
                continue;
            }
            core.held_since.insert(w, now);
            if core.engine.home_of(w).is_ok_and(|h| h == self.me) {
                self.arm(now + self.hold, w);
            }
        }
        if woken.contains(&page) || !core.engine.is_held(page) {
            if !core.engine.is_held(page) {
                core.held_since.remove(&page);
            }
            return;
        }
        let since = core.held_since.get(&page).copied();
        match since.map(|t| t + self.hold) {
            Some(end) if end > now => self.arm(end, page),
            _ => self.release_now(core, page),
        }
    }

    fn arm(&self, at: Instant, page: PageId) {
        let _ = self.release_tx.send(ReleaseMsg::Release(at, page));
    }

    /// Executes `actions` in order. `payload` is the page of the frame being processed.
    /// Returns the pages woken.
    fn execute(
        &self,
        core: &mut Core,
        actions: &[Action],
        payload: Option<&PageBuf>,
    ) -> Vec<PageId> {
        let mut woken = Vec::new();
        let mut i = 0;
        while i < actions.len() {
            let taken = self.defer(core, &actions[i..], payload, &mut woken);
            if taken > 0 {
                i += taken;
                continue;
            }
            self.apply_deferred(core);
            match &actions[i] {
                Action::Send { to, msg, with_page } => self.enqueue(core, *to, msg, *with_page),
                Action::Install { page, access, zero } => {
                    // Fold an immediately following wake into the install ioctl.
                    let wake =
                        matches!(actions.get(i + 1), Some(Action::Wake { page: p }) if p == page);
                    self.install(*page, *access, *zero, payload, wake);
                    if wake {
                        self.woken(core, *page);
                        woken.push(*page);
                        i += 1;
                    }
                }
                Action::SetAccess { page, access } => self.set_access(*page, *access),
                Action::Wake { page } => {
                    let addr = self.region.page_addr(*page);
                    if let Err(e) = self.region.uffd().wake(addr, PAGE_SIZE as u64) {
                        self.fail(None, format!("node {}: {e}", self.me));
                    }
                    self.woken(core, *page);
                    woken.push(*page);
                }
            }
            i += 1;
        }
        woken
    }

    /// Puts `actions[0]` off to the end of the lock hold if it may wait there (see
    /// [`Deferred`]: installs of pages nobody waits for, write-protects, sends and
    /// drops, as long as each page's order holds). Returns how many actions it took:
    /// 0 (not deferred), 1, or 2 (an install and the wake that follows it).
    fn defer(
        &self,
        core: &mut Core,
        actions: &[Action],
        payload: Option<&PageBuf>,
        woken: &mut Vec<PageId>,
    ) -> usize {
        let d = &mut core.deferred;
        match &actions[0] {
            // A page a thread waits for is installed (and the thread woken) at once;
            // pages fetched ahead wait for the rest of their run.
            Action::Install { page, access, zero }
                if (!*zero || *access == LocalAccess::Read)
                    && (*zero || payload.is_some())
                    && !d.touches(*page)
                    && !core.waiting.contains_key(page) =>
            {
                match payload {
                    Some(p) if !*zero => d.install_bytes.extend_from_slice(p.as_slice()),
                    _ => d.install_bytes.resize(d.install_bytes.len() + PAGE_SIZE, 0),
                }
                let wake = matches!(actions.get(1), Some(Action::Wake { page: p }) if p == page);
                d.installs.push((*page, *access, wake));
                if !wake {
                    return 1;
                }
                self.woken(core, *page);
                woken.push(*page);
                2
            }
            Action::SetAccess {
                page,
                access: LocalAccess::Read,
            } if !d.drop.contains(page) && !d.sends.iter().any(|s| s.2 == Some(*page)) => {
                d.protect.push(*page);
                1
            }
            Action::SetAccess {
                page,
                access: LocalAccess::None,
            } => {
                d.drop.push(*page);
                1
            }
            Action::Send { to, msg, with_page }
                if with_page.is_none_or(|p| !d.drop.contains(&p)) =>
            {
                d.sends.push((*to, msg.clone(), *with_page));
                1
            }
            _ => 0,
        }
    }

    /// Applies what [`Dsm::execute`] deferred: installs (one `UFFDIO_COPY` per run of
    /// pages), write-protects (one ioctl per run), the sends in order (copies taken
    /// now), then drops (one `madvise` per run).
    fn apply_deferred(&self, core: &mut Core) {
        if core.deferred.is_empty() {
            return;
        }
        let mut d = std::mem::take(&mut core.deferred);
        self.apply_installs(&mut d);
        for (first, n) in runs(&mut d.protect) {
            let len = PAGE_SIZE as u64 * n;
            if let Err(e) =
                self.region
                    .uffd()
                    .write_protect(self.region.page_addr(first), len, true, false)
            {
                self.fail(
                    None,
                    format!("node {}: write-protecting pages {first}+{n}: {e}", self.me),
                );
            }
        }
        for (to, msg, with_page) in d.sends.drain(..) {
            self.enqueue(core, to, &msg, with_page);
        }
        for (first, n) in runs(&mut d.drop) {
            if let Err(e) = self.region.zap_range(first, n) {
                self.fail(
                    None,
                    format!("node {}: dropping pages {first}+{n}: {e}", self.me),
                );
            }
            if let Some(h) = self.lost_hook.get() {
                for p in first..first + n {
                    h(p);
                }
            }
        }
        // Keep the vectors' capacity for the next hold.
        d.protect.clear();
        d.drop.clear();
        core.deferred = d;
    }

    /// Installs deferred pages: one `UFFDIO_COPY` per run of consecutive pages (in
    /// arrival order) of the same access (read-only ones write-protected with the
    /// copy), waking the run if any of its pages was to be woken (a woken thread that
    /// still lacks access faults again, so waking more is harmless).
    fn apply_installs(&self, d: &mut Deferred) {
        let installs = &d.installs;
        let mut k = 0;
        while k < installs.len() {
            let (first, access, _) = installs[k];
            let mut end = k + 1;
            while end < installs.len()
                && installs[end].0 == first + (end - k) as u64
                && installs[end].1 == access
            {
                end += 1;
            }
            let wake = installs[k..end].iter().any(|i| i.2);
            let bytes = &d.install_bytes[k * PAGE_SIZE..end * PAGE_SIZE];
            // SAFETY: `bytes` holds the run's pages and lives across the call; the
            // destination is that many pages of our registered region from `first`
            // (consecutive page ids the engine named, all inside the region).
            let r = unsafe {
                self.region.uffd().copy(
                    bytes.as_ptr(),
                    self.region.page_addr(first),
                    bytes.len() as u64,
                    access == LocalAccess::Read,
                    wake,
                )
            };
            if let Err(e) = r {
                self.fail(
                    None,
                    format!(
                        "node {}: installing pages {first}+{}: {e}",
                        self.me,
                        end - k
                    ),
                );
            }
            k = end;
        }
        d.installs.clear();
        d.install_bytes.clear();
    }

    /// Bookkeeping after waking the faults on `page`: latencies.
    fn woken(&self, core: &mut Core, page: PageId) {
        let now = Instant::now();
        if let Some(w) = core.waiting.remove(&page) {
            for (t, kind, _) in w {
                let idx = match kind {
                    FaultKind::Read => 0,
                    FaultKind::Write => 1,
                    FaultKind::Upgrade => 2,
                };
                core.lat[idx].record(now.duration_since(t));
            }
        }
    }

    /// Queues a `Send` action: the frame (with a copy of the page, taken now, while
    /// the engine guarantees it is stable) goes to the peer's outgoing queue; it is
    /// written to the socket by [`Dsm::flush`] once the core lock is released.
    fn enqueue(&self, core: &mut Core, to: NodeId, msg: &Msg, with_page: Option<PageId>) {
        let page = with_page.map(|p| {
            // SAFETY: the engine emits `with_page` only for a page that is mapped here
            // and write-protected (it issued `SetAccess Read` first, or the copy is a
            // read-only one), so the 4 KiB are present — reading them cannot fault — and
            // nobody writes them while the slice lives (the core lock is held, so no
            // later action can change the mapping); the region outlives `self`.
            let src = unsafe {
                std::slice::from_raw_parts(self.region.page_addr(p) as *const u8, PAGE_SIZE)
            };
            let mut buf = PageBuf::recycled();
            buf.as_mut_slice().copy_from_slice(src);
            buf
        });
        let Some(q) = self.out.get(usize::from(to)) else {
            error!(
                node = self.me,
                to, "send to a node outside the cluster dropped"
            );
            return;
        };
        lock(&q.queue).push_back(Outgoing {
            header: wire::encode(msg),
            page,
            kind: msg.kind(),
        });
        if !core.touched.contains(&to) {
            core.touched.push(to);
        }
    }

    /// Writes the queued frames of `peers` to the mesh, in queue order, each peer's
    /// queue as one batch (a burst of read-ahead requests or of pages costs a few
    /// system calls). Called without the core lock, so a slow or blocking socket write
    /// never stalls the engine.
    fn flush(&self, peers: &[NodeId]) {
        for &to in peers {
            let Some(q) = self.out.get(usize::from(to)) else {
                continue;
            };
            // Whoever holds `sending` transmits everything queued so far in FIFO order,
            // so frames to one peer leave in the order the engine emitted them.
            let _sending = lock(&q.sending);
            loop {
                let batch: Vec<Outgoing> = lock(&q.queue).drain(..).collect();
                if batch.is_empty() {
                    break;
                }
                self.transmit(to, &batch);
            }
        }
    }

    fn transmit(&self, to: NodeId, batch: &[Outgoing]) {
        let frames: Vec<(&[u8], Option<&[u8]>)> = batch
            .iter()
            .map(|f| (&f.header[..], f.page.as_ref().map(PageBuf::as_slice)))
            .collect();
        let size: usize = frames
            .iter()
            .map(|(h, p)| h.len() + p.map_or(0, <[u8]>::len))
            .sum();
        Counters::add(&self.counters.bytes_out, size as u64);
        if let Err(e) = self.sender.send_batch(to, DSM_CHANNEL, &frames) {
            let node = match &e {
                TransportError::PeerLost { node, .. } | TransportError::Io { node, .. } => *node,
                _ => to,
            };
            if !self.closing.load(Ordering::SeqCst) {
                let kind = batch.first().map_or("a frame", |f| f.kind);
                self.fail(
                    Some(node),
                    format!("DSM peer node {node} lost: sending {kind} failed: {e}"),
                );
            }
        }
    }

    fn install(
        &self,
        page: PageId,
        access: LocalAccess,
        zero: bool,
        payload: Option<&PageBuf>,
        wake: bool,
    ) {
        let dst = self.region.page_addr(page);
        let uffd = self.region.uffd();
        let r = if zero && access == LocalAccess::Write {
            // A writable zero page: the kernel's shared zero page, copied on write.
            uffd.zeropage(dst, PAGE_SIZE as u64, wake)
        } else {
            // A read-only install must be write-protected atomically with the copy
            // (a write to a plain zero page would be copied on write without a fault).
            let src = if zero {
                &self.zero
            } else if let Some(p) = payload {
                p
            } else {
                error!(node = self.me, page, "install without page contents");
                return;
            };
            // SAFETY: `src` is a 4 KiB buffer alive for the call; `dst` is a page of
            // our registered region.
            unsafe {
                uffd.copy(
                    src.as_ptr(),
                    dst,
                    PAGE_SIZE as u64,
                    access == LocalAccess::Read,
                    wake,
                )
            }
        };
        if let Err(e) = r {
            self.fail(
                None,
                format!("node {}: installing page {page}: {e}", self.me),
            );
        }
    }

    fn set_access(&self, page: PageId, access: LocalAccess) {
        let addr = self.region.page_addr(page);
        let r = match access {
            LocalAccess::None => {
                let r = self.region.zap(page);
                if let Some(h) = self.lost_hook.get() {
                    h(page);
                }
                r
            }
            LocalAccess::Read => self
                .region
                .uffd()
                .write_protect(addr, PAGE_SIZE as u64, true, false)
                .map_err(DsmError::from),
            LocalAccess::Write => self
                .region
                .uffd()
                .write_protect(addr, PAGE_SIZE as u64, false, false)
                .map_err(DsmError::from),
        };
        if let Err(e) = r {
            self.fail(
                None,
                format!("node {}: SetAccess {access:?} on page {page}: {e}", self.me),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_pages() {
        let mut v = vec![7, 3, 4, 5, 9, 4, 10, 11, 1];
        assert_eq!(runs(&mut v), vec![(1, 1), (3, 3), (7, 1), (9, 3)]);
        assert!(runs(&mut Vec::new()).is_empty());
    }

    #[test]
    fn deferred_order_per_page() {
        let mut d = Deferred::default();
        assert!(d.is_empty());
        d.protect.push(3);
        assert!(d.touches(3) && !d.touches(4));
        d.sends.push((1, Msg::Grant { page: 5 }, Some(5)));
        d.drop.push(6);
        assert!(d.touches(5) && d.touches(6) && !d.is_empty());
    }
}
