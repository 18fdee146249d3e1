//! `dvmm bench dsm`: DSM fault latencies, invalidation cost and throughput, with the
//! floor measured in the same run.
//!
//! The driver ([`run`]) starts `N` node processes on loopback with the `bench`
//! workload and homes in contiguous blocks (block `k` on node `k`). Node 0 measures,
//! the others serve (and set up pages); phases are separated by barriers:
//!
//! 1. setup: node 1 writes the pages node 0 will read / write (so they are
//!    materialised, non-zero and owned by their home); node 2 (if any) takes ownership of
//!    pages homed at node 1 (for 3-hop writes); node 0 writes its own pages.
//! 2. floor (alternating with 3., sample by sample): node 0 sends a small request to node 1 over the same mesh (a `Sender`
//!    on another channel, TCP_NODELAY); node 1's reader thread answers with 4 KiB; node 0's
//!    reader thread `UFFDIO_COPY`s it into a registered page and wakes the waiting thread.
//!    This is what a remote read fault cannot avoid: one request/response carrying a page,
//!    one install, one thread wakeup.
//! 3. read faults: node 0 reads one word of each of `samples` pages held by their home
//!    (node 1), timing each access from the faulting thread (Request + Data, 2 hops), in
//!    descending order so that read-ahead (`--readahead`) stays out of it.
//! 4. write faults: node 0 writes pages owned by their home node 1 (ownership transfer,
//!    2 hops); with N >= 3, also pages homed at node 1 but owned by node 2 (3 hops +
//!    Done). Descending, like 3. and 5., so that write-ahead stays out of it.
//! 5. invalidations: for k = 1..N-1, nodes 1..=k read a set of pages homed at node 0
//!    (and written by it), then node 0 writes each of them: an upgrade at the home that
//!    must invalidate k remote copies (parallel `Invalidate`s, then all acks).
//! 6. bandwidth: the transport's own (node 1 streams `seq_mib` MiB of 4 KiB frames to
//!    node 0 in batches of 64 over the same mesh), measured just before and just after
//!    the sequential read (the better of the two counts): node 0 reads every byte of
//!    `seq_mib` MiB homed at node 1, in address order (this is where read-ahead
//!    helps); the ratio of the two.
//! 7. sequential write: node 0 writes every word of `seq_mib` MiB owned by node 1
//!    (write-ahead); node 1 then reads some back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use transport::PageBuf;

use crate::launch::{Cluster, Launch};
use crate::node::{Node, NodeArgs};
use dsm::{Histogram, Region};

const PAGE: u64 = dsm_proto::PAGE_SIZE as u64;

/// Invalidation cost for one number of sharers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InvalidationCost {
    /// Remote read copies invalidated by each write.
    pub sharers: u16,
    /// Median write-fault latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

/// The result of one `dvmm bench dsm` run (the `--json` object).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    /// Node processes.
    pub nodes: u16,
    /// Samples per latency measurement.
    pub samples: u64,
    /// Remote read fault (page held by its home), as seen by the faulting thread: p50 µs.
    pub read_fault_p50_us: f64,
    /// Same, p99.
    pub read_fault_p99_us: f64,
    /// Write fault with ownership transfer from the home (2 hops): p50 µs.
    pub write_fault_p50_us: f64,
    /// Same, p99.
    pub write_fault_p99_us: f64,
    /// Write fault on a page owned by a third node (3 hops + Done), p50 µs (0 if N < 3).
    pub write_fault_3hop_p50_us: f64,
    /// Same, p99.
    pub write_fault_3hop_p99_us: f64,
    /// Write (upgrade) at the home with 1..N-1 remote sharers.
    pub invalidation: Vec<InvalidationCost>,
    /// Sequential read throughput of remote pages, MiB/s.
    pub seq_read_mib_s: f64,
    /// Size of the sequential pass, MiB.
    pub seq_mib: u64,
    /// Sequential write throughput of remote pages (each owned by its home, which
    /// holds its contents), MiB/s.
    #[serde(default)]
    pub seq_write_mib_s: f64,
    /// The floor for bandwidth: `seq_mib` MiB of pages streamed over the same mesh
    /// (4 KiB frames in batches of 64, nothing installed), MiB/s; the better of two
    /// runs, just before and just after the sequential read.
    #[serde(default)]
    pub tcp_bulk_mib_s: f64,
    /// `seq_read_mib_s / tcp_bulk_mib_s` (goal: >= 0.25).
    #[serde(default)]
    pub seq_read_ratio: f64,
    /// Page faults the reading thread took during the sequential read (the rest of
    /// the pages were there before it touched them).
    #[serde(default)]
    pub seq_read_faults: u64,
    /// The floor: 4 KiB request/response over the mesh + one `UFFDIO_COPY` + waking the
    /// waiting thread, p50 µs.
    pub floor_p50_us: f64,
    /// Same, p99.
    pub floor_p99_us: f64,
    /// The floor without the final thread wakeup (request sent to page copied, timed on
    /// the reader thread), p50 µs.
    pub floor_nowake_p50_us: f64,
    /// `read_fault_p50_us / floor_p50_us` (goal: <= 1.5).
    pub read_fault_ratio: f64,
    /// The runtime's own fault-to-wake read latency (from reading the uffd event), p50 µs.
    pub runtime_read_p50_us: f64,
    /// Page hold time used, µs.
    pub hold_us: u64,
    /// Largest read-ahead window used, pages.
    #[serde(default)]
    pub readahead: u64,
    /// Largest write-ahead window used, pages.
    #[serde(default)]
    pub writeahead: u64,
}

/// Node 0's receiver of floor replies.
pub(crate) struct FloorRx {
    region: Region,
    t0: AtomicU64,
    epoch: Instant,
    nowake: Mutex<Histogram>,
    done: crossbeam_channel::Sender<u64>,
}

impl FloorRx {
    /// A reply arrived on the reader thread: install it, record, wake the client.
    pub(crate) fn on_pong(&self, header: &[u8], page: &PageBuf) {
        let Some(seq) = header
            .get(1..9)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
        else {
            return;
        };
        if seq >= self.region.pages() {
            return;
        }
        let dst = self.region.page_addr(seq);
        // SAFETY: `page` is a live 4 KiB buffer and `dst` a never-touched page of our
        // registered floor region (one page per sequence number).
        let r = unsafe {
            self.region
                .uffd()
                .copy(page.as_ptr(), dst, PAGE, false, true)
        };
        if let Err(e) = r {
            tracing::warn!("floor copy failed: {e}");
        }
        let t = self.epoch.elapsed().as_nanos() as u64;
        let t0 = self.t0.load(Ordering::SeqCst);
        self.nowake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_ns(t.saturating_sub(t0));
        let _ = self.done.send(seq);
    }
}

/// Pages of each node's block.
struct Layout {
    samples: u64,
    seq: u64,
    block: u64,
}

impl Layout {
    fn new(args: &NodeArgs) -> Layout {
        let samples = args.bench.samples.max(1);
        let seq = args.bench.seq_mib.max(1) * (1 << 20) / PAGE;
        // Node 1's block: read pages, write pages, 3-hop pages, sequential read and
        // sequential write pages. Node 0's block: (N-1) invalidation sets. Take the
        // larger.
        let nodes = args.addrs.len() as u64;
        let block = (3 * samples + 2 * seq).max(nodes.saturating_sub(1) * samples);
        Layout {
            samples,
            seq,
            block,
        }
    }
    fn pages(&self, nodes: u64) -> u64 {
        self.block * nodes
    }
    fn read_pages(&self) -> std::ops::Range<u64> {
        self.block..self.block + self.samples
    }
    fn write_pages(&self) -> std::ops::Range<u64> {
        let s = self.block + self.samples;
        s..s + self.samples
    }
    fn hop3_pages(&self) -> std::ops::Range<u64> {
        let s = self.block + 2 * self.samples;
        s..s + self.samples
    }
    fn seq_pages(&self) -> std::ops::Range<u64> {
        let s = self.block + 3 * self.samples;
        s..s + self.seq
    }
    /// MiB/s of one sequential pass that took `d`.
    fn seq_mib_s(&self, d: Duration) -> f64 {
        (self.seq * PAGE) as f64 / (1 << 20) as f64 / d.as_secs_f64()
    }
    fn seq_write_pages(&self) -> std::ops::Range<u64> {
        let s = self.block + 3 * self.samples + self.seq;
        s..s + self.seq
    }
    fn inval_pages(&self, k: u64) -> std::ops::Range<u64> {
        let s = (k - 1) * self.samples;
        s..s + self.samples
    }
}

/// `a / b`, or 0 when there is no `b` to compare with.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Number of pages the bench workload needs for `nodes` nodes.
pub(crate) fn bench_pages(args: &NodeArgs) -> u64 {
    Layout::new(args).pages(args.addrs.len() as u64)
}

fn ptr(region: &Region, page: u64) -> *mut u64 {
    region.page_addr(page) as *mut u64
}

fn write_page(region: &Region, page: u64, v: u64) {
    // SAFETY: `page` is inside the region (layout checked against its size); volatile
    // so every write really touches the page (and faults as the protocol requires).
    unsafe { std::ptr::write_volatile(ptr(region, page), v) }
}

fn read_page(region: &Region, page: u64) -> u64 {
    // SAFETY: as `write_page`.
    unsafe { std::ptr::read_volatile(ptr(region, page)) }
}

fn timed(h: &mut Histogram, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    h.record(t.elapsed());
}

/// The bench workload of one node.
pub(crate) fn node_bench(args: &NodeArgs, node: &Node) -> Result<(), String> {
    let me = args.id;
    let nodes = node.ctl.nodes();
    if nodes < 2 {
        return Err("the DSM bench needs at least 2 nodes".into());
    }
    let lay = Layout::new(args);
    let region = node.dsm.region();
    if region.pages() < lay.pages(u64::from(nodes)) {
        return Err(format!(
            "the bench needs --pages >= {}",
            lay.pages(u64::from(nodes))
        ));
    }
    let ctl = &node.ctl;
    let mut barrier_id = 10;
    let mut barrier = || {
        barrier_id += 1;
        ctl.barrier(barrier_id)
    };

    // 1. setup
    match me {
        0 => {
            for k in 1..u64::from(nodes) {
                for p in lay.inval_pages(k) {
                    write_page(region, p, p);
                }
            }
        }
        1 => {
            for p in lay
                .read_pages()
                .chain(lay.write_pages())
                .chain(lay.seq_pages())
                .chain(lay.seq_write_pages())
            {
                write_page(region, p, p);
            }
        }
        2 => {
            for p in lay.hop3_pages() {
                write_page(region, p, p);
            }
        }
        _ => {}
    }
    barrier()?;

    // 2.+3. the floor and remote read faults, sample by sample alternately, so both
    // see the same machine conditions (this host is shared and noisy).
    let mut floor = Histogram::new();
    let mut floor_nowake = Histogram::new();
    let mut read = Histogram::new();
    if me == 0 {
        let (tx, rx) = crossbeam_channel::unbounded();
        let frx = Arc::new(FloorRx {
            region: Region::new(lay.samples + 1).map_err(|e| e.to_string())?,
            t0: AtomicU64::new(0),
            epoch: Instant::now(),
            nowake: Mutex::new(Histogram::new()),
            done: tx,
        });
        *ctl.floor.lock().unwrap_or_else(|p| p.into_inner()) = Some(frx.clone());
        // In descending order, so read-ahead (if enabled) does not kick in.
        for (seq, p) in lay.read_pages().rev().enumerate() {
            let seq = seq as u64;
            let t = Instant::now();
            frx.t0
                .store(frx.epoch.elapsed().as_nanos() as u64, Ordering::SeqCst);
            ctl.ping(1, seq);
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(s) if s == seq => floor.record(t.elapsed()),
                Ok(s) => return Err(format!("floor reply {s}, expected {seq}")),
                Err(_) => return Err("no floor reply from node 1 within 10 s".into()),
            }
            let mut v = 0;
            timed(&mut read, || v = read_page(region, p));
            if v != p {
                return Err(format!("page {p} read {v}, expected {p}"));
            }
        }
        floor_nowake = frx.nowake.lock().unwrap_or_else(|p| p.into_inner()).clone();
        *ctl.floor.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    barrier()?;

    // 4. write faults: 2 hops, then 3 hops (descending, so write-ahead stays out)
    let mut write = Histogram::new();
    let mut write3 = Histogram::new();
    if me == 0 {
        for p in lay.write_pages().rev() {
            timed(&mut write, || write_page(region, p, p + 1));
        }
        if nodes >= 3 {
            for p in lay.hop3_pages().rev() {
                timed(&mut write3, || write_page(region, p, p + 1));
            }
        }
    }
    barrier()?;

    // 5. invalidations with k sharers
    let mut inval = Vec::new();
    for k in 1..nodes {
        if me >= 1 && me <= k {
            for p in lay.inval_pages(u64::from(k)) {
                if read_page(region, p) != p {
                    return Err(format!("node {me}: page {p} has wrong contents"));
                }
            }
        }
        barrier()?;
        if me == 0 {
            let mut h = Histogram::new();
            for p in lay.inval_pages(u64::from(k)).rev() {
                timed(&mut h, || write_page(region, p, p + 1));
            }
            inval.push(InvalidationCost {
                sharers: k,
                p50_us: h.p50_us(),
                p99_us: h.p99_us(),
            });
        }
        barrier()?;
    }

    // 6. the transport's bulk throughput, the sequential read, the transport again,
    //    right after each other (the host is noisy).
    let mut bulk_mib_s = 0.0;
    if me == 0 {
        let d = ctl.bulk(1, lay.seq, Duration::from_secs(120))?;
        bulk_mib_s = lay.seq_mib_s(d);
    }
    barrier()?;
    let mut seq_mib_s = 0.0;
    let mut seq_faults = 0;
    if me == 0 {
        let pages = lay.seq_pages();
        let before = node.dsm.stats();
        let t = Instant::now();
        let mut sum = 0u64;
        for p in pages.clone() {
            let base = ptr(region, p);
            for i in 0..(PAGE / 8) as usize {
                // SAFETY: inside page `p` of the region.
                sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(base.add(i)) });
            }
        }
        let took = t.elapsed();
        let expect: u64 = pages.clone().fold(0u64, |a, p| a.wrapping_add(p));
        if sum != expect {
            return Err(format!("sequential pass checksum {sum}, expected {expect}"));
        }
        seq_mib_s = lay.seq_mib_s(took);
        let after = node.dsm.stats();
        seq_faults = (after.read_faults - before.read_faults)
            .saturating_sub(after.prefetches - before.prefetches);
        // The transport again: the better of the two runs is the floor (the host's
        // load changes from one second to the next).
        let d = ctl.bulk(1, lay.seq, Duration::from_secs(120))?;
        bulk_mib_s = f64::max(bulk_mib_s, lay.seq_mib_s(d));
    }
    barrier()?;

    // 7. sequential write: every word of pages owned by node 1.
    let mut seq_write_mib_s = 0.0;
    if me == 0 {
        let pages = lay.seq_write_pages();
        let t = Instant::now();
        for p in pages.clone() {
            let base = ptr(region, p);
            for i in 0..(PAGE / 8) as usize {
                // SAFETY: inside page `p` of the region.
                unsafe { std::ptr::write_volatile(base.add(i), p ^ i as u64) };
            }
        }
        seq_write_mib_s = lay.seq_mib_s(t.elapsed());
    }
    barrier()?;
    if me == 1 {
        // The writes are visible at the home (a read takes a copy back).
        for p in lay.seq_write_pages().step_by(97) {
            let v = read_page(region, p);
            if v != p {
                return Err(format!(
                    "node 1: page {p} reads {v:#x} after node 0 wrote {p:#x}"
                ));
            }
        }
    }
    barrier()?;

    if me == 0 {
        let stats = node.dsm.stats();
        let res = BenchResult {
            nodes,
            samples: lay.samples,
            read_fault_p50_us: read.p50_us(),
            read_fault_p99_us: read.p99_us(),
            write_fault_p50_us: write.p50_us(),
            write_fault_p99_us: write.p99_us(),
            write_fault_3hop_p50_us: write3.p50_us(),
            write_fault_3hop_p99_us: write3.p99_us(),
            invalidation: inval,
            seq_read_mib_s: seq_mib_s,
            seq_mib: (lay.seq * PAGE) >> 20,
            seq_write_mib_s,
            seq_read_faults: seq_faults,
            tcp_bulk_mib_s: bulk_mib_s,
            seq_read_ratio: ratio(seq_mib_s, bulk_mib_s),
            floor_p50_us: floor.p50_us(),
            floor_p99_us: floor.p99_us(),
            floor_nowake_p50_us: floor_nowake.p50_us(),
            read_fault_ratio: ratio(read.p50_us(), floor.p50_us()),
            runtime_read_p50_us: stats.read_latency.p50_us(),
            hold_us: args.bench.hold_us,
            readahead: args.bench.readahead,
            writeahead: args.bench.writeahead,
        };
        let json = serde_json::to_string(&res).map_err(|e| e.to_string())?;
        println!("BENCH {json}");
    }
    Ok(())
}

/// What a bench run measures and with which DSM settings: the arguments `dvmm bench
/// dsm` takes and hands on to every node process (one definition, one set of defaults).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct BenchArgs {
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub samples: u64,
    /// Size of the sequential-read pass in MiB.
    #[arg(long, default_value_t = 16)]
    pub seq_mib: u64,
    /// Page hold time after a wake, in µs.
    #[arg(long, default_value_t = 50)]
    pub hold_us: u64,
    /// Largest adaptive read-ahead window, pages, on sequential or strided remote
    /// read faults (0 = off).
    #[arg(long, default_value_t = dsm::DEFAULT_READAHEAD)]
    pub readahead: u64,
    /// Largest adaptive write-ahead window, pages, on sequential or strided remote
    /// write faults (0 = off).
    #[arg(long, default_value_t = dsm::DEFAULT_WRITEAHEAD)]
    pub writeahead: u64,
}

impl Default for BenchArgs {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            b: BenchArgs,
        }
        <Defaults as clap::Parser>::parse_from(["bench"]).b
    }
}

impl BenchArgs {
    /// The same settings as node-process arguments.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--samples", self.samples),
            ("--seq-mib", self.seq_mib),
            ("--hold-us", self.hold_us),
            ("--readahead", self.readahead),
            ("--writeahead", self.writeahead),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect()
    }
}

/// Options of the bench driver.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Node processes (>= 2).
    pub nodes: u16,
    /// What to measure.
    pub bench: BenchArgs,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            nodes: 3,
            bench: BenchArgs::default(),
        }
    }
}

/// Runs the bench: spawns `opts.nodes` processes of `program prefix…` (which must run
/// [`node_main`](crate::node::node_main) with the node arguments that follow) and
/// returns node 0's result.
pub fn run(
    program: &std::path::Path,
    prefix: &[&str],
    opts: &BenchOptions,
) -> Result<BenchResult, String> {
    if opts.nodes < 2 {
        return Err("--nodes must be at least 2".into());
    }
    let probe = NodeArgs {
        id: 0,
        addrs: vec!["127.0.0.1:1".parse().map_err(|_| "addr")?; usize::from(opts.nodes)],
        secret: None,
        secret_file: None,
        listen_fd: None,
        pages: 0,
        homes: crate::node::Homes::Blocked,
        workload: crate::node::Workload::Bench,
        threads: 1,
        iters: 0,
        think_us: 0,
        bench: opts.bench.clone(),
        spin_us: 0,
        connect_timeout_s: 30,
        peer_timeout_ms: 3000,
        log: "warn".into(),
    };
    let pages = bench_pages(&probe);
    let mut launch = Launch::new(program, prefix, opts.nodes).args([
        "--workload".to_string(),
        "bench".into(),
        "--homes".into(),
        "blocked".into(),
        "--pages".into(),
        pages.to_string(),
    ]);
    launch = launch.args(opts.bench.to_args());
    launch.echo_stderr = true;
    let mut cluster = Cluster::spawn(&launch).map_err(|e| format!("cannot start nodes: {e}"))?;
    let ok = cluster.wait(Duration::from_secs(600));
    let failed: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| !n.status.is_some_and(|s| s.success()))
        .map(|n| format!("node {} ({:?})", n.id, n.status))
        .collect();
    if !ok || !failed.is_empty() {
        return Err(format!("bench nodes failed: {}", failed.join(", ")));
    }
    let out = cluster.nodes[0].stdout.text();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or("node 0 printed no result")?;
    serde_json::from_str(line).map_err(|e| format!("bad result from node 0: {e}"))
}

/// Prints `r` as human-readable lines.
pub fn print_human(r: &BenchResult) {
    println!(
        "dsm bench: {} nodes on loopback, {} samples per latency, hold {} us, read-ahead up to {} pages, write-ahead up to {}",
        r.nodes, r.samples, r.hold_us, r.readahead, r.writeahead
    );
    println!(
        "floor (4 KiB request/response over the mesh + UFFDIO_COPY + wake): p50 {:.1} us  p99 {:.1} us  (without the wake: p50 {:.1} us)",
        r.floor_p50_us, r.floor_p99_us, r.floor_nowake_p50_us
    );
    println!(
        "read fault, page at its home (2 hops):       p50 {:.1} us  p99 {:.1} us  ratio to floor {:.2}",
        r.read_fault_p50_us, r.read_fault_p99_us, r.read_fault_ratio
    );
    println!(
        "write fault, ownership from home (2 hops):   p50 {:.1} us  p99 {:.1} us",
        r.write_fault_p50_us, r.write_fault_p99_us
    );
    if r.nodes >= 3 {
        println!(
            "write fault, owner is a third node (3 hops): p50 {:.1} us  p99 {:.1} us",
            r.write_fault_3hop_p50_us, r.write_fault_3hop_p99_us
        );
    }
    for i in &r.invalidation {
        println!(
            "write at home invalidating {} sharer(s):     p50 {:.1} us  p99 {:.1} us",
            i.sharers, i.p50_us, i.p99_us
        );
    }
    println!(
        "transport bulk, {} MiB of 4 KiB frames over the mesh: {:.1} MiB/s",
        r.seq_mib, r.tcp_bulk_mib_s
    );
    println!(
        "sequential read of {} MiB of remote pages:   {:.1} MiB/s  ratio to bulk {:.3}  ({} faults taken)",
        r.seq_mib, r.seq_read_mib_s, r.seq_read_ratio, r.seq_read_faults
    );
    println!(
        "sequential write of {} MiB of remote pages:  {:.1} MiB/s",
        r.seq_mib, r.seq_write_mib_s
    );
    println!(
        "runtime fault-to-wake, all read faults of node 0 (from the uffd event): p50 {:.1} us",
        r.runtime_read_p50_us
    );
}
