//! One DSM test/bench node process: `dvmm dsm-node` and the `dsm-node` binary of this
//! crate both call [`node_main`].
//!
//! A node joins the mesh, starts its [`Dsm`] and runs a workload:
//!
//! * `counters` (the multi-process tests): every thread does, `iters` times, a
//!   lock-protected increment (spinlock on an atomic in the shared region), an atomic
//!   `fetch_add` on a shared counter, a write + re-read of one of its own slots (slots
//!   of all threads are interleaved on the same pages, so pages are heavily shared) and
//!   a read of a random slot of any thread. After a barrier every node checks its own
//!   slots, node 0 checks the counters, and every node prints one `RESULT` line.
//! * `bench`: the measurements of `dvmm bench dsm` (see [`crate::bench`]).
//! * `idle`: joins, waits for the start barrier and the final barrier.
//!
//! Phases are separated by barriers over a control channel of the mesh. Any DSM
//! failure (a peer lost mid-run) makes the process print a `FATAL` line naming the node
//! and exit with status 3.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use dsm_proto::{AllOnNode, Blocked, HomePolicy, Interleaved, PAGE_SIZE};
use rand::{Rng, SeedableRng};
use tracing::warn;
use transport::{Event, MeshConfig, PageBuf, Sender};

use dsm::{connect, Dsm, DsmOptions, Region};

/// Control channel (barriers).
const CTL_CHANNEL: u8 = transport::channel::LAB_CTL;
/// Bench floor channel (4 KiB request/response).
const FLOOR_CHANNEL: u8 = transport::channel::LAB_FLOOR;

/// How pages get their home.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Homes {
    /// `page % nodes`.
    Interleaved,
    /// Contiguous blocks, block `i` on node `i`.
    Blocked,
    /// Every page on node 0.
    Node0,
}

/// What the node does once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Shared counters, spinlock and slot writes with exact final checks.
    Counters,
    /// The `dvmm bench dsm` measurements.
    Bench,
    /// Nothing (join, barrier, leave).
    Idle,
    /// Node 0 streams through the region (read-ahead) while the others rewrite its
    /// pages in strided order (write-ahead); coherence checks on every read.
    Stream,
}

/// Arguments of one node process.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// This node's id, `0..N`.
    #[arg(long)]
    pub id: u16,
    /// Listen address of every node, comma separated, indexed by id.
    #[arg(long, value_delimiter = ',', required = true)]
    pub addrs: Vec<SocketAddr>,
    /// Cluster secret.
    #[arg(long, env = "DVMM_DSM_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// File holding the cluster secret (instead of --secret).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Inherited, already listening socket to use instead of binding `addrs[id]`.
    #[arg(long)]
    pub listen_fd: Option<i32>,
    /// Size of the shared region in pages.
    #[arg(long, default_value_t = 64)]
    pub pages: u64,
    /// Home policy.
    #[arg(long, value_enum, default_value_t = Homes::Interleaved)]
    pub homes: Homes,
    /// Workload.
    #[arg(long, value_enum, default_value_t = Workload::Counters)]
    pub workload: Workload,
    /// Worker threads (counters workload).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Iterations per thread (counters workload).
    #[arg(long, default_value_t = 200)]
    pub iters: u64,
    /// Sleep this many µs between iterations (counters workload), so that the nodes'
    /// runs overlap and pages really move back and forth.
    #[arg(long, default_value_t = 0)]
    pub think_us: u64,
    /// Bench measurements and DSM settings (hold time, read-ahead).
    #[command(flatten)]
    pub bench: crate::bench::BenchArgs,
    /// The fault thread keeps polling for this many µs after handling faults.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Seconds to wait for all nodes to join.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout_s: u64,
    /// A silent peer is declared lost after this many ms.
    #[arg(long, default_value_t = 3000)]
    pub peer_timeout_ms: u64,
    /// Log filter (tracing-subscriber syntax); logs go to stderr.
    #[arg(long, default_value = "warn")]
    pub log: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Barriers over [`CTL_CHANNEL`] (node 0 counts arrivals and releases everyone) and
/// the bench floor's responder / receiver.
pub(crate) struct Ctl {
    me: u16,
    nodes: u16,
    state: Mutex<CtlState>,
    cv: Condvar,
    sender: OnceLock<Sender>,
    dsm: OnceLock<Arc<Dsm>>,
    /// Bench floor receiver state (node 0 while measuring).
    pub(crate) floor: Mutex<Option<Arc<crate::bench::FloorRx>>>,
    /// Bench floor reply page (node 1).
    floor_page: PageBuf,
    /// Bench bulk transfer (node 0 while measuring): pages still to come, and whom to
    /// tell when the last one came.
    bulk: Mutex<Option<(u64, crossbeam_channel::Sender<()>)>>,
}

#[derive(Default)]
struct CtlState {
    arrived: HashMap<u32, u16>,
    released: HashSet<u32>,
}

impl Ctl {
    fn new(me: u16, nodes: u16) -> Arc<Ctl> {
        let mut floor_page = PageBuf::new();
        for (i, b) in floor_page.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        Arc::new(Ctl {
            me,
            nodes,
            state: Mutex::new(CtlState::default()),
            cv: Condvar::new(),
            sender: OnceLock::new(),
            dsm: OnceLock::new(),
            floor: Mutex::new(None),
            floor_page,
            bulk: Mutex::new(None),
        })
    }

    /// Number of nodes.
    pub fn nodes(&self) -> u16 {
        self.nodes
    }

    fn send(&self, to: u16, channel: u8, header: &[u8], payload: Option<&[u8]>) {
        if let Some(s) = self.sender.get() {
            if let Err(e) = s.send(to, channel, header, payload) {
                warn!(node = self.me, to, "control send failed: {e}");
            }
        }
    }

    fn arrive(&self, st: &mut CtlState, id: u32) {
        let c = st.arrived.entry(id).or_insert(0);
        *c += 1;
        if *c == self.nodes {
            st.arrived.remove(&id);
            st.released.insert(id);
            let mut h = [2u8, 0, 0, 0, 0];
            h[1..].copy_from_slice(&id.to_le_bytes());
            for to in 1..self.nodes {
                self.send(to, CTL_CHANNEL, &h, None);
            }
            self.cv.notify_all();
        }
    }

    /// Waits until every node reached barrier `id` (ids must increase run-wide).
    pub fn barrier(&self, id: u32) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut st = lock(&self.state);
        if self.me == 0 {
            self.arrive(&mut st, id);
        } else {
            let mut h = [1u8, 0, 0, 0, 0];
            h[1..].copy_from_slice(&id.to_le_bytes());
            self.send(0, CTL_CHANNEL, &h, None);
        }
        while !st.released.contains(&id) {
            if let Some(f) = self.dsm.get().and_then(|d| d.failure()) {
                return Err(f.message);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("node {}: barrier {id} timed out", self.me));
            }
            st = self
                .cv
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn on_event(&self, ev: Event) {
        match ev {
            Event::Frame {
                from,
                channel: CTL_CHANNEL,
                header,
                ..
            } => {
                let Some((&kind, id)) = header.split_first() else {
                    warn!(node = self.me, from, "empty control frame");
                    return;
                };
                let Ok(id) = <[u8; 4]>::try_from(id).map(u32::from_le_bytes) else {
                    warn!(node = self.me, from, "bad control frame");
                    return;
                };
                let mut st = lock(&self.state);
                match kind {
                    1 if self.me == 0 => self.arrive(&mut st, id),
                    2 if from == 0 => {
                        st.released.insert(id);
                        self.cv.notify_all();
                    }
                    _ => warn!(node = self.me, from, kind, "unexpected control frame"),
                }
            }
            Event::Frame {
                from,
                channel: FLOOR_CHANNEL,
                header,
                payload,
                ..
            } => match (header.first(), payload) {
                (Some(1), None) => {
                    // Ping: answer with a page, straight from the reader thread.
                    let mut h = header.clone();
                    h[0] = 2;
                    self.send(from, FLOOR_CHANNEL, &h, Some(self.floor_page.as_slice()));
                }
                (Some(2), Some(p)) => {
                    let rx = lock(&self.floor).clone();
                    match rx {
                        Some(rx) => rx.on_pong(&header, &p),
                        None => warn!(node = self.me, "unexpected floor reply"),
                    }
                }
                (Some(3), None) => {
                    // Bulk request: stream that many pages back, in batches, as fast
                    // as the transport takes them.
                    let count = header
                        .get(1..9)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map_or(0, u64::from_le_bytes);
                    self.send_bulk(from, count);
                }
                (Some(4), Some(_)) => {
                    let mut b = lock(&self.bulk);
                    match b.as_mut() {
                        Some((left, done)) => {
                            *left = left.saturating_sub(1);
                            if *left == 0 {
                                let _ = done.send(());
                                *b = None;
                            }
                        }
                        None => warn!(node = self.me, "unexpected bulk page"),
                    }
                }
                _ => warn!(node = self.me, from, "bad floor frame"),
            },
            Event::Frame { from, channel, .. } => {
                warn!(
                    node = self.me,
                    from, channel, "frame on unknown channel ignored"
                );
            }
            Event::PeerLost { .. } => {
                // The DSM has recorded it (or ignored an expected goodbye); wake
                // barrier waiters so they notice a failure.
                self.cv.notify_all();
            }
        }
    }

    /// Streams `count` pages to `to` on the floor channel, 64 frames per batch.
    fn send_bulk(&self, to: u16, count: u64) {
        const BATCH: u64 = 64;
        let Some(s) = self.sender.get() else {
            return;
        };
        let head = [4u8];
        let page = self.floor_page.as_slice();
        let mut left = count;
        while left > 0 {
            let n = left.min(BATCH);
            let frames: Vec<(&[u8], Option<&[u8]>)> =
                (0..n).map(|_| (&head[..], Some(page))).collect();
            if let Err(e) = s.send_batch(to, FLOOR_CHANNEL, &frames) {
                warn!(node = self.me, to, "bulk send failed: {e}");
                return;
            }
            left -= n;
        }
    }

    /// The transport's bulk throughput: asks `from` for `pages` pages streamed back to
    /// back and waits (at most `timeout`) until all came. Returns the elapsed time.
    pub(crate) fn bulk(
        &self,
        from: u16,
        pages: u64,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *lock(&self.bulk) = Some((pages, tx));
        let mut h = [0u8; 9];
        h[0] = 3;
        h[1..].copy_from_slice(&pages.to_le_bytes());
        let t = Instant::now();
        self.send(from, FLOOR_CHANNEL, &h, None);
        let r = rx.recv_timeout(timeout);
        let elapsed = t.elapsed();
        *lock(&self.bulk) = None;
        r.map(|()| elapsed).map_err(|_| {
            format!("bulk transfer of {pages} pages from node {from} incomplete after {timeout:?}")
        })
    }

    /// The bench floor: sends a ping to `to` (who answers with a 4 KiB page).
    pub(crate) fn ping(&self, to: u16, seq: u64) {
        let mut h = [0u8; 9];
        h[0] = 1;
        h[1..].copy_from_slice(&seq.to_le_bytes());
        self.send(to, FLOOR_CHANNEL, &h, None);
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// A connected node: mesh, DSM and control channel.
pub(crate) struct Node {
    /// The mesh (dropping it shuts it down).
    pub mesh: transport::Mesh,
    /// The DSM.
    pub dsm: Arc<Dsm>,
    /// Barriers and the bench floor.
    pub ctl: Arc<Ctl>,
}

/// Joins the cluster described by `args` and starts the DSM.
pub(crate) fn join(args: &NodeArgs) -> Result<Node, String> {
    let me = args.id;
    let nodes = u16::try_from(args.addrs.len()).map_err(|_| "too many nodes".to_string())?;
    if me >= nodes {
        return Err(format!("--id {me} out of range for {nodes} addresses"));
    }
    let secret = match (&args.secret, &args.secret_file) {
        (_, Some(f)) => {
            std::fs::read(f).map_err(|e| format!("cannot read secret file {}: {e}", f.display()))?
        }
        (Some(s), None) => s.clone().into_bytes(),
        (None, None) => {
            return Err("no cluster secret (--secret, DVMM_DSM_SECRET or --secret-file)".into())
        }
    };
    let listener = match args.listen_fd {
        Some(fd) => {
            // SAFETY: the parent passed this descriptor to us (`--listen-fd`) as a
            // listening socket that nothing else in this process owns.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            Some(l)
        }
        None => None,
    };
    let region = Region::new(args.pages).map_err(|e| format!("node {me}: {e}"))?;
    let homes: Box<dyn HomePolicy + Send> = match args.homes {
        Homes::Interleaved => Box::new(Interleaved::new(nodes)),
        Homes::Blocked => Box::new(Blocked::new(args.pages, nodes)),
        Homes::Node0 => Box::new(AllOnNode(0)),
    };
    let ctl = Ctl::new(me, nodes);
    let c = ctl.clone();
    let mut cfg = MeshConfig::new(me, args.addrs.clone(), secret);
    cfg.connect_timeout = Duration::from_secs(args.connect_timeout_s);
    cfg.peer_timeout = Duration::from_millis(args.peer_timeout_ms);
    let opts = DsmOptions {
        hold: Duration::from_micros(args.bench.hold_us),
        spin: Duration::from_micros(args.spin_us),
        readahead: args.bench.readahead,
        writeahead: args.bench.writeahead,
    };
    let (mesh, dsm) = connect(cfg, listener, region, homes, opts, move |ev| c.on_event(ev))
        .map_err(|e| format!("node {me}: {e}"))?;
    let _ = ctl.sender.set(mesh.sender());
    let _ = ctl.dsm.set(dsm.clone());
    Ok(Node { mesh, dsm, ctl })
}

/// Entry point of `dvmm dsm-node` / `dsm-node`: joins, runs the workload, leaves.
/// Exits the process with status 3 (after a `FATAL` line on stderr) if the DSM fails.
pub fn node_main(args: NodeArgs) -> Result<(), String> {
    init_logging(&args.log);
    let node = join(&args)?;
    let me = args.id;
    let d = node.dsm.clone();
    std::thread::Builder::new()
        .name("dsm-watch".into())
        .spawn(move || loop {
            if let Some(f) = d.wait_failure(Duration::from_secs(3600)) {
                eprintln!("dsm-node {me}: FATAL: {f}");
                std::process::exit(3);
            }
        })
        .map_err(|e| format!("cannot spawn watcher: {e}"))?;
    let result = match args.workload {
        Workload::Counters => counters(&args, &node),
        Workload::Bench => crate::bench::node_bench(&args, &node),
        Workload::Idle => node.ctl.barrier(1),
        Workload::Stream => stream(&args, &node),
    };
    // Leave together: nobody needs remote pages past the final barrier.
    node.dsm.expect_goodbyes();
    let fin = node.ctl.barrier(u32::MAX);
    let stats = node.dsm.stats();
    if let Ok(json) = serde_json::to_string(&stats) {
        println!("STATS {json}");
    }
    node.dsm.shutdown();
    node.mesh.shutdown();
    result.and(fin)
}

/// Prints a workload's first verification errors and returns its verdict.
fn verdict(me: impl std::fmt::Display, errors: &[String]) -> Result<(), String> {
    for e in errors.iter().take(20) {
        eprintln!("dsm-node {me}: ERROR {e}");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("node {me}: {} verification errors", errors.len()))
    }
}

// ---------------------------------------------------------------- stream workload

/// The stream workload: node 0 reads the whole region `iters` times in address order
/// (so read-ahead fetches copies ahead of it) while every other node `k` rewrites the
/// pages `p` with `p % (N-1) == k-1`, ascending (a strided write stream: write-ahead
/// takes ownership ahead), `iters` rounds, round `r` writing `r + 1` to the page's first
/// word and then its last. Read copies fetched ahead are invalidated under the reader
/// all the time. Checks: on every read the last word is never newer than the first
/// (writes are seen in order), a page's value never goes back, and after the run
/// every node reads every page's final value.
fn stream(args: &NodeArgs, node: &Node) -> Result<(), String> {
    let region = node.dsm.region();
    let pages = region.pages();
    let writers = u64::from(node.ctl.nodes()).saturating_sub(1).max(1);
    let me = u64::from(args.id);
    let rounds = args.iters;
    let last_word = PAGE_SIZE / 8 - 1;
    let mut errors = Vec::new();
    node.ctl.barrier(1)?;
    let start = Instant::now();
    if me == 0 {
        let mut seen = vec![0u64; pages as usize];
        for _ in 0..rounds {
            for p in 0..pages {
                let tail = word(region, p, last_word).load(Ordering::SeqCst);
                let head = word(region, p, 0).load(Ordering::SeqCst);
                if tail > head {
                    errors.push(format!(
                        "page {p}: last word {tail} newer than first {head}"
                    ));
                }
                if head < seen[p as usize] {
                    errors.push(format!("page {p}: read {head} after {}", seen[p as usize]));
                }
                seen[p as usize] = head;
            }
        }
    } else {
        let think = Duration::from_micros(args.think_us);
        for r in 0..rounds {
            for p in (me - 1..pages).step_by(writers as usize) {
                word(region, p, 0).store(r + 1, Ordering::SeqCst);
                word(region, p, last_word).store(r + 1, Ordering::SeqCst);
                if !think.is_zero() {
                    std::thread::sleep(think);
                }
            }
        }
    }
    let elapsed = start.elapsed();
    node.ctl.barrier(2)?;
    for p in 0..pages {
        for w in [0, last_word] {
            let v = word(region, p, w).load(Ordering::SeqCst);
            if v != rounds {
                errors.push(format!("page {p} word {w}: final {v}, expected {rounds}"));
            }
        }
    }
    node.ctl.barrier(3)?;
    let st = node.dsm.stats();
    println!(
        "RESULT node={me} stream pages={pages} rounds={rounds} elapsed_ms={} prefetches={} write_prefetches={} errors={} ok={}",
        elapsed.as_millis(),
        st.prefetches,
        st.write_prefetches,
        errors.len(),
        errors.is_empty()
    );
    verdict(me, &errors)
}

// ---------------------------------------------------------------- counters workload

/// Page of the spinlock word.
const LOCK_PAGE: u64 = 0;
/// Page of the lock-protected counter and the lock-holder word.
const LOCKED_PAGE: u64 = 1;
/// Page of the atomic counter.
const ATOMIC_PAGE: u64 = 2;
/// First page of the slots.
const SLOT_PAGE: u64 = 3;
/// Number of slot pages.
const SLOT_PAGES: u64 = 8;
/// Pages the counters workload needs.
pub(crate) const COUNTERS_PAGES: u64 = SLOT_PAGE + SLOT_PAGES;

/// A 64-bit word of the region.
fn word(region: &Region, page: u64, index: usize) -> &AtomicU64 {
    debug_assert!(page < region.pages() && index < PAGE_SIZE / 8);
    let addr = region.page_addr(page) as usize + index * 8;
    // SAFETY: the address is inside the region (checked by callers via COUNTERS_PAGES
    // and the slot arithmetic), 8-aligned, and the mapping lives as long as `region`.
    // All accesses to shared words go through atomics.
    unsafe { &*(addr as *const AtomicU64) }
}

struct Slots<'a> {
    region: &'a Region,
}

impl Slots<'_> {
    const PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;
    fn count(&self) -> u64 {
        SLOT_PAGES * Self::PER_PAGE
    }
    fn get(&self, s: u64) -> &AtomicU64 {
        word(
            self.region,
            SLOT_PAGE + s / Self::PER_PAGE,
            (s % Self::PER_PAGE) as usize,
        )
    }
}

fn tag(gtid: u64, seq: u64) -> u64 {
    ((gtid + 1) << 40) | (seq + 1)
}

#[derive(Default)]
struct ThreadReport {
    errors: Vec<String>,
    /// Last value written to each owned slot.
    last: HashMap<u64, u64>,
}

fn counters_thread(
    region: &Region,
    gtid: u64,
    gthreads: u64,
    iters: u64,
    think: Duration,
) -> ThreadReport {
    let mut rep = ThreadReport::default();
    let lockw = word(region, LOCK_PAGE, 0);
    let holder = word(region, LOCKED_PAGE, 0);
    let counter = word(region, LOCKED_PAGE, 1);
    let atomic = word(region, ATOMIC_PAGE, 0);
    let slots = Slots { region };
    let owned = slots.count() / gthreads;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed ^ gtid);
    let me = gtid + 1;
    for i in 0..iters {
        // Lock-protected increment (test-and-test-and-set spinlock).
        loop {
            if lockw.load(Ordering::Relaxed) == 0
                && lockw
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            std::thread::yield_now();
        }
        holder.store(me, Ordering::Relaxed);
        let c = counter.load(Ordering::Relaxed);
        counter.store(c + 1, Ordering::Relaxed);
        if holder.load(Ordering::Relaxed) != me {
            rep.errors.push(format!(
                "thread {gtid}: lock holder overwritten in critical section"
            ));
        }
        lockw.store(0, Ordering::Release);

        // Atomic increment.
        atomic.fetch_add(1, Ordering::SeqCst);

        // Write one of our slots and read it back.
        let s = gtid + gthreads * rng.gen_range(0..owned);
        let v = tag(gtid, i);
        slots.get(s).store(v, Ordering::SeqCst);
        let back = slots.get(s).load(Ordering::SeqCst);
        if back != v {
            rep.errors.push(format!(
                "thread {gtid}: slot {s} read back {back:#x}, wrote {v:#x}"
            ));
        }
        rep.last.insert(s, v);

        // Read anybody's slot: it is zero or carries its owner's tag.
        let s2 = rng.gen_range(0..owned * gthreads);
        let v2 = slots.get(s2).load(Ordering::SeqCst);
        if v2 != 0 && (v2 >> 40) != (s2 % gthreads) + 1 {
            rep.errors.push(format!(
                "thread {gtid}: slot {s2} holds {v2:#x}, not its owner's"
            ));
        }
        if !think.is_zero() {
            std::thread::sleep(think);
        }
    }
    rep
}

fn counters(args: &NodeArgs, node: &Node) -> Result<(), String> {
    let me = args.id;
    let region = node.dsm.region();
    if region.pages() < COUNTERS_PAGES {
        return Err(format!(
            "the counters workload needs --pages >= {COUNTERS_PAGES}"
        ));
    }
    let threads = args.threads.max(1) as u64;
    let gthreads = threads * u64::from(node.ctl.nodes());
    node.ctl.barrier(1)?;
    let t0 = Instant::now();
    let reports: Vec<ThreadReport> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let gtid = u64::from(me) * threads + t;
                let think = Duration::from_micros(args.think_us);
                s.spawn(move || counters_thread(region, gtid, gthreads, args.iters, think))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| ThreadReport {
                    errors: vec!["worker thread panicked".into()],
                    ..Default::default()
                })
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    node.ctl.barrier(2)?;

    // Everybody is done writing: check our slots' final values.
    let slots = Slots { region };
    let mut errors: Vec<String> = Vec::new();
    let mut writes = 0;
    for r in &reports {
        errors.extend(r.errors.iter().cloned());
        for (&s, &v) in &r.last {
            writes += 1;
            let now = slots.get(s).load(Ordering::SeqCst);
            if now != v {
                errors.push(format!("slot {s}: final {now:#x}, last written {v:#x}"));
            }
        }
    }
    let expected = gthreads * args.iters;
    let mut line = format!(
        "RESULT node={me} threads={threads} iters={} elapsed_ms={} slots_checked={writes}",
        args.iters,
        elapsed.as_millis()
    );
    if me == 0 {
        let locked = word(region, LOCKED_PAGE, 1).load(Ordering::SeqCst);
        let atomic = word(region, ATOMIC_PAGE, 0).load(Ordering::SeqCst);
        let lockw = word(region, LOCK_PAGE, 0).load(Ordering::SeqCst);
        line += &format!(" expected={expected} locked={locked} atomic={atomic}");
        if locked != expected {
            errors.push(format!(
                "lock-protected counter {locked}, expected {expected}"
            ));
        }
        if atomic != expected {
            errors.push(format!("atomic counter {atomic}, expected {expected}"));
        }
        if lockw != 0 {
            errors.push(format!("lock word {lockw} after the run"));
        }
    }
    node.ctl.barrier(3)?;
    line += &format!(" errors={} ok={}", errors.len(), errors.is_empty());
    println!("{line}");
    verdict(me, &errors)
}
