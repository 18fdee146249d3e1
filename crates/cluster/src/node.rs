//! One node process: joins the mesh, maps guest RAM under the DSM, creates its part of
//! the VM and serves the other nodes' interrupts, EOIs and device accesses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmSlot};
use dsm_proto::{HomePolicy, NodeId, PageId};
use irqchip::Interrupt;
use transport::{Event, Mesh, MeshConfig, Sender};
use vmm::compat::HostKind;
use vmm::devices::{ConsoleOut, PortEvent};
use vmm::term::eprint_line;
use vmm::{ClusterLink, GuestEnd, IoAccess, Placement, Vm, VmConfig, VmHandle};

use crate::config::ClusterConfig;
use crate::msg::{Ctrl, CTRL_CHANNEL};

/// Errors of a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad arguments.
    #[error("{0}")]
    Config(String),
    /// The mesh could not be formed.
    #[error("node {me}: {source}")]
    Transport {
        /// This node.
        me: u16,
        /// Cause.
        source: transport::TransportError,
    },
    /// The DSM could not start.
    #[error("node {me}: DSM: {msg}")]
    Dsm {
        /// This node.
        me: u16,
        /// Cause.
        msg: String,
    },
    /// Start-up did not complete.
    #[error("node {me}: {msg}")]
    Startup {
        /// This node.
        me: u16,
        /// What went wrong.
        msg: String,
    },
    /// The VM failed.
    #[error("node {me}: {source}")]
    Vm {
        /// This node.
        me: u16,
        /// Cause.
        source: vmm::VmError,
    },
}

/// Each node is home of a contiguous block of pages (its memory share).
#[derive(Debug)]
pub struct ShareHomes {
    bounds: Vec<u64>,
}

impl ShareHomes {
    /// From the first page of every node plus the end (see
    /// [`ClusterConfig::home_bounds`]).
    pub fn new(bounds: Vec<u64>) -> Self {
        ShareHomes { bounds }
    }
}

impl HomePolicy for ShareHomes {
    fn home(&self, page: PageId) -> NodeId {
        let n = self.bounds.len().saturating_sub(1).max(1);
        let i = self
            .bounds
            .partition_point(|b| *b <= page)
            .saturating_sub(1);
        i.min(n - 1) as NodeId
    }
}

#[derive(Default)]
struct Slot {
    resp: Mutex<Option<(u8, Vec<u8>)>>,
    cv: Condvar,
}

/// Counters of the cross-node traffic of one node.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Interrupts sent to other nodes.
    pub irqs_sent: AtomicU64,
    /// Interrupts received from other nodes.
    pub irqs_received: AtomicU64,
    /// Device accesses forwarded to node 0.
    pub io_forwarded: AtomicU64,
    /// Device accesses served for other nodes (node 0).
    pub io_served: AtomicU64,
}

struct Node {
    me: u16,
    nodes: u16,
    sender: OnceLock<Sender>,
    /// The DSM, attached once the mesh is up; DSM frames that arrive earlier wait in it.
    dsm: Arc<DsmSlot>,
    vm: OnceLock<VmHandle>,
    early: Mutex<Vec<Ctrl>>,
    start: Mutex<Option<u64>>,
    ready: Mutex<u16>,
    cv: Condvar,
    failure: Mutex<Option<String>>,
    slots: Vec<Slot>,
    stopping: AtomicBool,
    stats: LinkStats,
    /// Forwarded device accesses, served in arrival order by the `io-server` thread so
    /// that a device that blocks (a full console pipe, a device reading guest memory
    /// through the DSM) never holds up the transport reader that DSM frames need.
    io_jobs: mpsc::Sender<IoJob>,
}

/// A device access forwarded from `from`'s vCPU `vcpu`.
struct IoJob {
    from: u16,
    vcpu: u32,
    access: IoAccess,
    data: Vec<u8>,
}

impl Node {
    fn send(&self, to: u16, msg: &Ctrl) {
        if let Some(s) = self.sender.get() {
            if let Err(e) = s.send(to, CTRL_CHANNEL, &msg.encode(), None) {
                tracing::debug!(to, error = %e, "control message not sent");
            }
        }
    }

    fn broadcast(&self, msg: &Ctrl) {
        for n in (0..self.nodes).filter(|n| *n != self.me) {
            self.send(n, msg);
        }
    }

    fn fail(&self, why: String) {
        self.stopping.store(true, Ordering::SeqCst);
        match self.vm.get() {
            Some(vm) => vm.fail(why),
            None => {
                let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert(why);
                self.cv.notify_all();
            }
        }
        for s in &self.slots {
            s.cv.notify_all();
        }
    }

    fn on_event(&self, ev: Event) {
        // A lost peer stops the VM with a message naming it before the DSM (which the
        // slot also tells) reports its own view of the loss.
        if let Event::PeerLost { node, reason } = &ev {
            if !self.stopping.load(Ordering::SeqCst) || self.vm.get().is_none() {
                self.fail(format!("node {node} is gone ({reason})"));
            }
        }
        match self.dsm.route(ev) {
            Some(Event::Frame {
                from,
                channel: CTRL_CHANNEL,
                header,
                ..
            }) => match Ctrl::decode(&header) {
                Ok(m) => self.on_ctrl(from, m),
                Err(e) => tracing::warn!(from, error = %e, "undecodable control message dropped"),
            },
            Some(Event::Frame { from, channel, .. }) => {
                tracing::warn!(from, channel, "frame on unknown channel dropped")
            }
            Some(Event::PeerLost { .. }) | None => {}
        }
    }

    fn on_ctrl(&self, from: u16, m: Ctrl) {
        match m {
            Ctrl::Start { tsc_base } => {
                *self.start.lock().unwrap_or_else(|p| p.into_inner()) = Some(tsc_base);
                self.cv.notify_all();
            }
            Ctrl::Ready => {
                *self.ready.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                self.cv.notify_all();
            }
            Ctrl::Irq { .. } | Ctrl::Logical { .. } => {
                let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
                match self.vm.get() {
                    Some(vm) => {
                        drop(early);
                        self.apply(vm, m);
                    }
                    None => early.push(m),
                }
            }
            Ctrl::Eoi { vector } => {
                if let Some(vm) = self.vm.get() {
                    vm.eoi(vector)
                }
            }
            Ctrl::IoReq {
                vcpu,
                kind,
                addr,
                data,
            } => {
                let access = match kind {
                    0 => IoAccess::PioRead(addr as u16),
                    1 => IoAccess::PioWrite(addr as u16),
                    2 => IoAccess::MmioRead(addr),
                    _ => IoAccess::MmioWrite(addr),
                };
                if data.len() > 8 {
                    tracing::warn!(from, "oversized I/O request dropped");
                    return;
                }
                let job = IoJob {
                    from,
                    vcpu,
                    access,
                    data,
                };
                // Fails only once the io-server has ended, i.e. the node is stopping.
                let _ = self.io_jobs.send(job);
            }
            Ctrl::IoResp { vcpu, event, data } => {
                if let Some(s) = self.slots.get(vcpu as usize) {
                    *s.resp.lock().unwrap_or_else(|p| p.into_inner()) = Some((event, data));
                    s.cv.notify_all();
                }
            }
            Ctrl::End { outcome } => {
                self.stopping.store(true, Ordering::SeqCst);
                if let Some(d) = self.dsm.get() {
                    d.expect_goodbyes();
                }
                let outcome = match outcome {
                    Ok(1) => Ok(GuestEnd::Reboot),
                    Ok(_) => Ok(GuestEnd::PowerOff),
                    Err(e) => Err(e),
                };
                match self.vm.get() {
                    Some(vm) => vm.remote_end(outcome),
                    None => {
                        if let Err(e) = outcome {
                            self.fail(e)
                        }
                    }
                }
            }
        }
    }

    /// Serves forwarded device accesses until the node stops.
    fn io_server(&self, jobs: mpsc::Receiver<IoJob>) {
        while !self.stopping.load(Ordering::SeqCst) {
            let Ok(mut job) = jobs.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            // The VM exists before any vCPU can forward an access.
            let Some(vm) = self.vm.get() else { continue };
            self.stats.io_served.fetch_add(1, Ordering::Relaxed);
            let event = match vm.io(job.vcpu as usize, job.access, &mut job.data) {
                PortEvent::None => 0,
                PortEvent::Reset => 1,
                PortEvent::PowerOff => 2,
            };
            self.send(
                job.from,
                &Ctrl::IoResp {
                    vcpu: job.vcpu,
                    event,
                    data: job.data,
                },
            );
        }
    }

    fn apply(&self, vm: &VmHandle, m: Ctrl) {
        match m {
            Ctrl::Irq { vcpu, irq } => {
                self.stats.irqs_received.fetch_add(1, Ordering::Relaxed);
                vm.deliver(vcpu as usize, &irq)
            }
            Ctrl::Logical { vcpu, ldr, dfr } => vm.set_logical(vcpu as usize, ldr, dfr),
            _ => {}
        }
    }

    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(f) = g.as_ref() {
                return Err(f.clone());
            }
            if let Some(v) = ready() {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?} waiting for {what}"));
            }
            g = self
                .cv
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

struct Link(Arc<Node>);

impl ClusterLink for Link {
    fn deliver(&self, node: u16, vcpu: usize, irq: &Interrupt) {
        self.0.stats.irqs_sent.fetch_add(1, Ordering::Relaxed);
        self.0.send(
            node,
            &Ctrl::Irq {
                vcpu: vcpu as u32,
                irq: *irq,
            },
        );
    }
    fn set_logical(&self, vcpu: usize, ldr: u32, dfr: u32) {
        self.0.broadcast(&Ctrl::Logical {
            vcpu: vcpu as u32,
            ldr,
            dfr,
        });
    }
    fn eoi(&self, vector: u8) {
        self.0.send(0, &Ctrl::Eoi { vector });
    }
    fn io(&self, vcpu: usize, access: IoAccess, data: &mut [u8]) -> PortEvent {
        let node = &self.0;
        let Some(slot) = node.slots.get(vcpu) else {
            return PortEvent::None;
        };
        node.stats.io_forwarded.fetch_add(1, Ordering::Relaxed);
        let (kind, addr) = match access {
            IoAccess::PioRead(p) => (0, u64::from(p)),
            IoAccess::PioWrite(p) => (1, u64::from(p)),
            IoAccess::MmioRead(a) => (2, a),
            IoAccess::MmioWrite(a) => (3, a),
        };
        *slot.resp.lock().unwrap_or_else(|p| p.into_inner()) = None;
        node.send(
            0,
            &Ctrl::IoReq {
                vcpu: vcpu as u32,
                kind,
                addr,
                data: data.to_vec(),
            },
        );
        let mut g = slot.resp.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((event, d)) = g.take() {
                let n = d.len().min(data.len());
                data[..n].copy_from_slice(&d[..n]);
                return match event {
                    1 => PortEvent::Reset,
                    2 => PortEvent::PowerOff,
                    _ => PortEvent::None,
                };
            }
            if node.stopping.load(Ordering::SeqCst) {
                data.fill(0xff);
                return PortEvent::None;
            }
            g = slot
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    fn ended(&self, outcome: &Result<GuestEnd, String>) {
        self.0.stopping.store(true, Ordering::SeqCst);
        if let Some(d) = self.0.dsm.get() {
            d.expect_goodbyes();
        }
        let outcome = match outcome {
            Ok(GuestEnd::PowerOff) => Ok(0),
            Ok(GuestEnd::Reboot) => Ok(1),
            Err(e) => Err(format!("node {}: {e}", self.0.me)),
        };
        self.0.broadcast(&Ctrl::End { outcome });
    }
}

/// Options of a node run that are not in the cluster description.
pub struct NodeOptions {
    /// Ends the run with an error after this long.
    pub timeout: Option<Duration>,
}

/// What a node reports at the end of a run.
#[derive(Debug)]
pub struct NodeReport {
    /// How the guest ended.
    pub end: GuestEnd,
    /// One line per local vCPU.
    pub vcpu_stats: Vec<String>,
    /// DSM counters.
    pub dsm_stats: String,
    /// Cross-node interrupt and I/O counters.
    pub link_stats: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Marks the node as stopping when dropped (ends its helper threads on any return).
struct StopOnDrop(Arc<Node>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }
}

/// Runs node `me` of the cluster until the guest ends.
pub fn run_node(cfg: &ClusterConfig, me: u16, opts: NodeOptions) -> Result<NodeReport, NodeError> {
    let nodes = cfg.nodes.len() as u16;
    if me >= nodes {
        return Err(NodeError::Config(format!(
            "--id {me}: the cluster has nodes 0 to {}",
            nodes - 1
        )));
    }
    let total_vcpus = cfg.total_vcpus();
    let (io_tx, io_rx) = mpsc::channel();
    let node = Arc::new(Node {
        me,
        nodes,
        sender: OnceLock::new(),
        dsm: DsmSlot::new(),
        vm: OnceLock::new(),
        early: Mutex::new(Vec::new()),
        start: Mutex::new(None),
        ready: Mutex::new(0),
        cv: Condvar::new(),
        failure: Mutex::new(None),
        slots: (0..total_vcpus).map(|_| Slot::default()).collect(),
        stopping: AtomicBool::new(false),
        stats: LinkStats::default(),
        io_jobs: io_tx,
    });
    {
        let n = node.clone();
        // Detached: it ends within 100 ms of `stopping`, which `_stop` sets on every
        // return from here on.
        std::thread::Builder::new()
            .name(format!("io-server-{me}"))
            .spawn(move || n.io_server(io_rx))
            .map_err(|e| NodeError::Config(format!("cannot start the I/O thread: {e}")))?;
    }
    let _stop = StopOnDrop(node.clone());
    let mut mcfg = MeshConfig::new(
        me,
        cfg.nodes.iter().map(|n| n.addr).collect(),
        cfg.secret.clone(),
    );
    mcfg.connect_timeout = cfg.connect_timeout;
    let h = node.clone();
    let mesh = Mesh::builder(mcfg)
        .handler(move |ev| h.on_event(ev))
        .establish()
        .map_err(|source| NodeError::Transport { me, source })?;
    let sender = mesh.sender();
    let _ = node.sender.set(sender.clone());
    tracing::info!(me, nodes, "mesh established");

    let total_mem = cfg.total_memory();
    let region = dsm::Region::new(total_mem / 4096).map_err(|e| NodeError::Dsm {
        me,
        msg: e.to_string(),
    })?;
    let homes = Box::new(ShareHomes::new(cfg.home_bounds()));
    let dsm_opts = dsm::DsmOptions {
        hold: cfg.dsm_hold,
        ..Default::default()
    };
    let d = Dsm::with_options(me, nodes, region, homes, sender.clone(), dsm_opts).map_err(|e| {
        NodeError::Dsm {
            me,
            msg: e.to_string(),
        }
    })?;
    node.dsm.attach(d.clone());
    {
        let n = node.clone();
        d.set_failure_hook(move |f| n.fail(format!("{f}")));
    }
    // SAFETY: the DSM region maps exactly total_mem bytes and lives in `d`, which this
    // function keeps until the VM is gone.
    let mem =
        unsafe { vmm::memory::guest_memory_over(d.region().as_ptr(), total_mem) }.map_err(|e| {
            NodeError::Dsm {
                me,
                msg: e.to_string(),
            }
        })?;

    let startup = |msg: String| NodeError::Startup { me, msg };
    let tsc_base = if me == 0 {
        host_tsc()
    } else {
        node.wait(
            "node 0 to start the guest",
            cfg.connect_timeout + Duration::from_secs(60),
            || *node.start.lock().unwrap_or_else(|p| p.into_inner()),
        )
        .map_err(startup)?
    };
    let console = if me == 0 {
        ConsoleOut::new(Box::new(std::io::stdout())).0
    } else {
        ConsoleOut::capture().0
    };
    let vm = Vm::create(VmConfig {
        vcpus: total_vcpus,
        memory: total_mem,
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline_extra: cfg.cmdline.clone(),
        console,
        host: HostKind::detect(),
        timeout: opts.timeout,
        placement: Some(Placement {
            node: me,
            vcpu_nodes: cfg.vcpu_nodes(),
            link: Arc::new(Link(node.clone())),
            tsc_base: Some(tsc_base),
            tsc_khz: None,
        }),
        guest_memory: Some(mem),
    })
    .map_err(|source| {
        node.broadcast(&Ctrl::End {
            outcome: Err(format!("node {me}: {source}")),
        });
        NodeError::Vm { me, source }
    })?;
    {
        let mut early = node.early.lock().unwrap_or_else(|p| p.into_inner());
        let _ = node.vm.set(vm.handle());
        for m in early.drain(..) {
            node.apply(&vm.handle(), m);
        }
    }
    if let Some(f) = node
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        vm.handle().fail(f);
    }
    {
        // KVM's shadow page tables must not outlive a page another node writes.
        let h = vm.handle();
        d.set_page_lost_hook(move |_| h.page_lost());
    }
    if me == 0 {
        // The console's input: the terminal or pipe this process was given.
        if let Err(e) = vmm::term::spawn_console_input(vm.handle()) {
            tracing::warn!("no console input: {e}");
        }
        node.broadcast(&Ctrl::Start { tsc_base });
        let others = nodes - 1;
        let r = node.wait(
            "the other nodes to create their VMs",
            Duration::from_secs(120),
            || {
                let n = *node.ready.lock().unwrap_or_else(|p| p.into_inner());
                (n >= others).then_some(())
            },
        );
        if let Err(e) = r {
            vm.handle().fail(e);
        }
    } else {
        node.send(0, &Ctrl::Ready);
    }
    let handle = vm.handle();
    let result = vm.run();
    node.stopping.store(true, Ordering::SeqCst);
    let dsm_stats = d.stats().to_string();
    let s = &node.stats;
    let link_stats = format!(
        "irqs_sent={} irqs_received={} shadow_flushes={} io_forwarded={} io_served={}",
        s.irqs_sent.load(Ordering::Relaxed),
        s.irqs_received.load(Ordering::Relaxed),
        handle.shadow_flushes(),
        s.io_forwarded.load(Ordering::Relaxed),
        s.io_served.load(Ordering::Relaxed)
    );
    let vcpu_stats = handle.vcpu_stats();
    // Let the End message leave before the goodbye.
    std::thread::sleep(Duration::from_millis(100));
    mesh.shutdown();
    d.shutdown();
    if result.is_err() {
        for line in &vcpu_stats {
            eprint_line(&format!("dvmm: node {me} stats {line}"));
        }
        eprint_line(&format!("dvmm: node {me} stats {link_stats}"));
        eprint_line(&format!("dvmm: node {me} stats dsm {dsm_stats}"));
    }
    let report = result.map_err(|source| NodeError::Vm { me, source })?;
    Ok(NodeReport {
        end: report.end,
        vcpu_stats,
        dsm_stats,
        link_stats,
        elapsed: report.elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_follow_shares() {
        let h = ShareHomes::new(vec![0, 100, 150, 400]);
        assert_eq!(h.home(0), 0);
        assert_eq!(h.home(99), 0);
        assert_eq!(h.home(100), 1);
        assert_eq!(h.home(149), 1);
        assert_eq!(h.home(150), 2);
        assert_eq!(h.home(399), 2);
        assert_eq!(h.home(10_000), 2);
    }
}
