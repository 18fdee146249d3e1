//! One node process: joins the mesh, maps guest RAM under the DSM, creates its part of
//! the VM and serves the other nodes' interrupts, EOIs and device accesses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
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
use crate::control::{self, ControlServer, HotPage, LinkSnapshot, NodeSnapshot};
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
    #[error("node {me}: {source}")]
    Startup {
        /// This node.
        me: u16,
        /// What went wrong.
        source: WaitError,
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

/// Why a node stopped waiting for a step of the start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The run failed meanwhile (the reason may come from another node, as text).
    #[error("{0}")]
    Failed(String),
    /// The run ended (an `End` came or was sent) before the step came.
    #[error("the run ended while waiting for {0}")]
    Ended(String),
    /// The step did not come in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
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

/// The forwarded device access of one vCPU (at most one outstanding).
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// A request is out and no answer has been taken yet.
    waiting: bool,
    /// The answer, until the vCPU takes it.
    resp: Option<(PortEvent, Vec<u8>)>,
}

/// Which nodes have reported [`Ctrl::Ready`] to node 0: each node other than node 0
/// counts once, however often it says so.
#[derive(Debug)]
struct ReadySet {
    seen: Vec<bool>,
    count: u16,
}

/// Why a [`Ctrl::Ready`] was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadyRefusal {
    /// This node said so before.
    Duplicate,
    /// Node 0 or an id outside the cluster.
    NotAPeer,
}

impl ReadySet {
    fn new(nodes: u16) -> Self {
        ReadySet {
            seen: vec![false; usize::from(nodes)],
            count: 0,
        }
    }

    /// Counts `from` unless it is not a peer of node 0 or was counted already.
    fn add(&mut self, from: u16) -> Result<(), ReadyRefusal> {
        match self.seen.get_mut(usize::from(from)) {
            Some(_) if from == 0 => Err(ReadyRefusal::NotAPeer),
            None => Err(ReadyRefusal::NotAPeer),
            Some(true) => Err(ReadyRefusal::Duplicate),
            Some(s) => {
                *s = true;
                self.count += 1;
                Ok(())
            }
        }
    }

    /// Every node but node 0 is ready.
    fn complete(&self) -> bool {
        usize::from(self.count) + 1 >= self.seen.len()
    }
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

/// Where a node is in its run. [`run_node`] takes the forward steps one at a time; any
/// phase before [`Phase::Ending`] may end early (a failure, an `End` from another node,
/// the guest ending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Forming the mesh and starting the DSM.
    Connecting,
    /// The mesh and the DSM are up: nodes other than 0 wait for node 0's [`Ctrl::Start`]
    /// (its TSC base), then the VM is created.
    WaitingStart,
    /// The VM exists and the messages that came before it were replayed: node 0 starts
    /// the others and waits for their [`Ctrl::Ready`], the others report ready.
    VmCreated,
    /// The local vCPUs run.
    Running,
    /// The run is ending (a failure, an `End`, the guest ended): peers leaving is
    /// expected and the helper threads stop.
    Ending,
    /// [`run_node`] returned.
    Ended,
}

impl Phase {
    /// Whether `self -> to` is a step of the life cycle.
    fn can_go(self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (Connecting, WaitingStart)
                | (WaitingStart, VmCreated)
                | (VmCreated, Running)
                | (Connecting | WaitingStart | VmCreated | Running, Ending)
                | (
                    Connecting | WaitingStart | VmCreated | Running | Ending,
                    Ended
                )
        )
    }

    /// The run is ending or over.
    fn stopping(self) -> bool {
        self >= Phase::Ending
    }

    /// Its name in `dvmm stats`.
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::WaitingStart => "waiting-start",
            Phase::VmCreated => "starting",
            Phase::Running => "running",
            Phase::Ending => "ending",
            Phase::Ended => "ended",
        }
    }
}

/// The state of a node's run, all under one lock ([`Node::life`]). Generic over the VM
/// handle so that the life cycle can be tested without KVM.
struct Life<V> {
    phase: Phase,
    /// The VM, once created (it stays set whatever the phase).
    vm: Option<V>,
    /// Interrupts and logical-destination updates that came before the VM: replayed
    /// once, in arrival order, when it is installed.
    early: Vec<Ctrl>,
    /// Node 0's TSC base, from its [`Ctrl::Start`] (nodes other than 0).
    start: Option<u64>,
    /// Node 0: which nodes reported [`Ctrl::Ready`].
    ready: ReadySet,
    /// Why the run failed before the VM existed (handed to the VM once it does).
    failure: Option<String>,
    /// The end of the run is known to every node (this node sent [`Ctrl::End`], or
    /// received one, which its sender broadcast): no further `End` is sent.
    end_known: bool,
}

impl<V: Clone> Life<V> {
    fn new(nodes: u16) -> Self {
        Life {
            phase: Phase::Connecting,
            vm: None,
            early: Vec::new(),
            start: None,
            ready: ReadySet::new(nodes),
            failure: None,
            end_known: false,
        }
    }

    /// Moves to `to` if that is a step of the life cycle; refuses and logs it otherwise
    /// (returning the phase the node stays in).
    fn go(&mut self, me: u16, to: Phase) -> Result<(), Phase> {
        let from = self.phase;
        if from.can_go(to) {
            tracing::debug!(me, ?from, ?to, "node phase");
            self.phase = to;
            Ok(())
        } else {
            if from.stopping() {
                tracing::debug!(me, ?from, ?to, "phase step refused: the node is stopping");
            } else {
                tracing::warn!(me, ?from, ?to, "impossible phase step refused");
            }
            Err(from)
        }
    }

    /// Moves to [`Phase::Ending`] unless the node is stopping already. Returns whether
    /// it moved.
    fn stop(&mut self, me: u16) -> bool {
        !self.phase.stopping() && self.go(me, Phase::Ending).is_ok()
    }

    /// An interrupt or logical-destination update: queued while there is no VM,
    /// otherwise handed back with the VM to apply it to.
    fn queue_unless_vm(&mut self, m: Ctrl) -> Option<(V, Ctrl)> {
        match &self.vm {
            Some(vm) => Some((vm.clone(), m)),
            None => {
                self.early.push(m);
                None
            }
        }
    }

    /// Node 0's start: taken until the VM exists, refused (false) after.
    fn accept_start(&mut self, tsc_base: u64) -> bool {
        if self.vm.is_some() {
            return false;
        }
        self.start = Some(tsc_base);
        true
    }

    /// Installs the VM and moves to [`Phase::VmCreated`] (unless the node is stopping,
    /// when the VM is installed all the same so that the end reaches it). Returns the
    /// queued messages to replay, each once; refuses a second VM.
    fn install(&mut self, me: u16, vm: V) -> Result<Vec<Ctrl>, V> {
        if self.vm.is_some() {
            tracing::warn!(me, phase = ?self.phase, "second VM refused");
            return Err(vm);
        }
        let _ = self.go(me, Phase::VmCreated);
        self.vm = Some(vm);
        Ok(std::mem::take(&mut self.early))
    }

    /// An `End` from another node: moves to [`Phase::Ending`] (once), notes that every
    /// node knows, and returns the VM to end, if it exists.
    fn remote_end(&mut self, me: u16) -> Option<V> {
        self.stop(me);
        self.end_known = true;
        self.vm.clone()
    }

    /// Whether this node is to send an `End` (the first time only).
    fn take_end(&mut self) -> bool {
        !std::mem::replace(&mut self.end_known, true)
    }
}

struct Node {
    me: u16,
    nodes: u16,
    /// The node of every vCPU (index = vCPU).
    vcpu_nodes: Vec<u16>,
    /// Set once the mesh is up (before [`Phase::WaitingStart`]); sends before go nowhere.
    sender: OnceLock<Sender>,
    /// The DSM, attached once the mesh is up; DSM frames that arrive earlier wait in it.
    dsm: Arc<DsmSlot>,
    /// The phase and everything that changes with it.
    life: Mutex<Life<VmHandle>>,
    /// Signalled when `life` changes in a way [`Node::wait`] may wait for.
    cv: Condvar,
    slots: Vec<Slot>,
    stats: LinkStats,
    /// Forwarded device accesses, served in arrival order by the `io-server` thread so
    /// that a device that blocks (a full console pipe, a device reading guest memory
    /// through the DSM) never holds up the transport reader that DSM frames need.
    io_jobs: mpsc::Sender<IoJob>,
    /// How long the guest has to power off after the power button.
    stop_timeout: Duration,
}

/// A device access forwarded from `from`'s vCPU `vcpu`.
struct IoJob {
    from: u16,
    vcpu: u32,
    access: IoAccess,
    data: Vec<u8>,
}

impl Node {
    fn new(me: u16, vcpu_nodes: Vec<u16>, nodes: u16, io_jobs: mpsc::Sender<IoJob>) -> Self {
        Node {
            me,
            nodes,
            slots: vcpu_nodes.iter().map(|_| Slot::default()).collect(),
            vcpu_nodes,
            sender: OnceLock::new(),
            dsm: DsmSlot::new(),
            life: Mutex::new(Life::new(nodes)),
            cv: Condvar::new(),
            stats: LinkStats::default(),
            io_jobs,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }

    /// The life-cycle state. Never held while calling into the VM or sending (the VM
    /// calls back into the node), except to replay early messages in order.
    fn life(&self) -> MutexGuard<'_, Life<VmHandle>> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn phase(&self) -> Phase {
        self.life().phase
    }

    /// The run is ending or over.
    fn stopping(&self) -> bool {
        self.phase().stopping()
    }

    fn vm(&self) -> Option<VmHandle> {
        self.life().vm.clone()
    }

    /// Takes a forward step of the life cycle (refused and logged if impossible).
    fn advance(&self, to: Phase) -> Result<(), Phase> {
        let r = self.life().go(self.me, to);
        self.cv.notify_all();
        r
    }

    /// Moves to [`Phase::Ending`] unless the node is stopping already.
    fn stop(&self) {
        self.life().stop(self.me);
        self.cv.notify_all();
    }

    fn send(&self, to: u16, msg: &Ctrl) {
        let Some(s) = self.sender.get() else { return };
        let frame = match msg.encode() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(to, error = %e, ?msg, "control message not encodable, not sent");
                return;
            }
        };
        if let Err(e) = s.send(to, CTRL_CHANNEL, &frame, None) {
            // Once the run stops, peers leave and sends to them fail as a matter of course.
            if self.stopping() {
                tracing::debug!(to, error = %e, "control message not sent");
            } else {
                tracing::warn!(to, error = %e, ?msg, "control message not sent");
            }
        }
    }

    /// Tells every other node that the run ended, unless they know already. Returns
    /// whether an `End` was sent.
    fn send_end(&self, outcome: Result<GuestEnd, String>) -> bool {
        let first = self.life().take_end();
        if !first {
            tracing::debug!(?outcome, "the other nodes know of the end already");
            return false;
        }
        self.broadcast(&Ctrl::End { outcome });
        true
    }

    /// Whether `vcpu` exists and runs on node `node`.
    fn vcpu_on(&self, vcpu: u32, node: u16) -> bool {
        usize::try_from(vcpu)
            .ok()
            .and_then(|v| self.vcpu_nodes.get(v))
            .is_some_and(|n| *n == node)
    }

    /// Logs a message from `from` that this node refuses.
    fn refuse(&self, from: u16, m: &Ctrl, why: &str) {
        tracing::warn!(me = self.me, from, msg = ?m, "control message refused: {why}");
    }

    fn broadcast(&self, msg: &Ctrl) {
        for n in (0..self.nodes).filter(|n| *n != self.me) {
            self.send(n, msg);
        }
    }

    fn fail(&self, why: String) {
        let mut l = self.life();
        l.stop(self.me);
        match l.vm.clone() {
            Some(vm) => {
                drop(l);
                vm.fail(why);
            }
            None => {
                l.failure.get_or_insert(why);
                drop(l);
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
            let (stopping, has_vm) = {
                let l = self.life();
                (l.phase.stopping(), l.vm.is_some())
            };
            if !stopping || !has_vm {
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
        if from == self.me || from >= self.nodes {
            self.refuse(from, &m, "the sender is not a peer");
            return;
        }
        match m {
            Ctrl::Start { tsc_base } => {
                if from != 0 || self.me == 0 {
                    self.refuse(from, &m, "only node 0 starts the others");
                    return;
                }
                let taken = self.life().accept_start(tsc_base);
                if taken {
                    self.cv.notify_all();
                } else {
                    self.refuse(from, &m, "the VM exists already");
                }
            }
            Ctrl::Ready => {
                if self.me != 0 {
                    self.refuse(from, &m, "only node 0 counts ready nodes");
                    return;
                }
                let r = self.life().ready.add(from);
                match r {
                    Ok(()) => self.cv.notify_all(),
                    Err(ReadyRefusal::Duplicate) => {
                        self.refuse(from, &m, "this node is ready already")
                    }
                    Err(ReadyRefusal::NotAPeer) => self.refuse(from, &m, "not a peer of node 0"),
                }
            }
            Ctrl::Irq { vcpu, .. } if !self.vcpu_on(vcpu, self.me) => {
                self.refuse(from, &m, "interrupt lost: the vCPU is not on this node")
            }
            Ctrl::Logical { vcpu, .. } if !self.vcpu_on(vcpu, from) => {
                self.refuse(from, &m, "the vCPU is not on the sending node")
            }
            Ctrl::Irq { .. } | Ctrl::Logical { .. } => {
                let now = self.life().queue_unless_vm(m);
                if let Some((vm, m)) = now {
                    self.apply(&vm, m);
                }
            }
            Ctrl::Eoi { vector } => {
                if self.me != 0 {
                    self.refuse(from, &m, "EOIs go to node 0");
                    return;
                }
                match self.vm() {
                    Some(vm) => vm.eoi(vector),
                    None => self.refuse(from, &m, "EOI before the VM exists"),
                }
            }
            Ctrl::IoReq { vcpu, .. } if self.me != 0 || !self.vcpu_on(vcpu, from) => self.refuse(
                from,
                &m,
                "device accesses go to node 0, for a vCPU of the sender",
            ),
            Ctrl::IoReq { ref data, .. } if data.len() > 8 => {
                self.refuse(from, &m, "oversized I/O request")
            }
            Ctrl::IoReq { vcpu, access, data } => {
                let job = IoJob {
                    from,
                    vcpu,
                    access,
                    data,
                };
                // Fails only once the io-server has ended, i.e. the node is stopping.
                let _ = self.io_jobs.send(job);
            }
            Ctrl::IoResp { vcpu, .. } if from != 0 || !self.vcpu_on(vcpu, self.me) => self.refuse(
                from,
                &m,
                "I/O answers come from node 0, for a vCPU of this node",
            ),
            Ctrl::IoResp { vcpu, event, data } => {
                let s = &self.slots[vcpu as usize];
                let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.waiting || st.resp.is_some() {
                    drop(st);
                    let m = Ctrl::IoResp { vcpu, event, data };
                    if self.stopping() {
                        tracing::debug!(from, msg = ?m, "late I/O answer dropped (stopping)");
                    } else {
                        self.refuse(from, &m, "I/O answer lost: no request outstanding");
                    }
                    return;
                }
                st.resp = Some((event, data));
                s.cv.notify_all();
            }
            Ctrl::StopRequest => {
                if self.me != 0 {
                    self.refuse(from, &m, "stop requests go to node 0");
                    return;
                }
                match self.request_stop() {
                    Ok(what) => tracing::info!(from, "stop requested by node {from}: {what}"),
                    Err(e) => tracing::warn!(from, "stop requested by node {from}: {e}"),
                }
            }
            Ctrl::End { outcome } => {
                // The sender told every node: nobody needs to hear it again from here.
                let vm = self.life().remote_end(self.me);
                self.cv.notify_all();
                if let Some(d) = self.dsm.get() {
                    d.expect_goodbyes();
                }
                match vm {
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

    /// Asks the guest to power off (SIGTERM, `dvmm stop`): node 0 presses the ACPI power
    /// button and gives the guest [`Node::stop_timeout`] to power off, then stops the
    /// run with an error; without ACPI it stops the run at once. Another node passes
    /// the request to node 0. Returns what was done.
    fn request_stop(&self) -> Result<String, String> {
        if self.me != 0 {
            if self.sender.get().is_none() {
                return Err("not connected to node 0 yet".into());
            }
            self.send(0, &Ctrl::StopRequest);
            return Ok("passed the request to node 0".into());
        }
        let Some(vm) = self.vm() else {
            let why = "stopped on request before the guest started".to_string();
            self.fail(why.clone());
            return Ok(why);
        };
        vm.request_power_off(self.stop_timeout)
    }

    /// The local vCPUs now; one in `KVM_RUN` whose thread waits for a DSM page is in
    /// state `page`.
    fn vcpus_now(&self, vm: Option<&VmHandle>) -> Vec<vmm::stats::VcpuSnapshot> {
        let mut vcpus = vm.map(|v| v.vcpu_snapshots()).unwrap_or_default();
        if let Some(d) = self.dsm.get() {
            let waiting = d.waiting_threads();
            for v in &mut vcpus {
                if v.state == "guest" && waiting.iter().any(|(tid, _, _)| *tid == v.tid) {
                    v.state = "page".into();
                }
            }
        }
        vcpus
    }

    /// The node's counters now (`dvmm stats`).
    fn snapshot(&self, cluster: &str, started: Instant) -> NodeSnapshot {
        let vm = self.vm();
        let dsm = self.dsm.get().map(|d| d.stats());
        let s = &self.stats;
        NodeSnapshot {
            cluster: cluster.to_string(),
            node: self.me,
            nodes: self.nodes,
            pid: std::process::id(),
            uptime_us: started.elapsed().as_micros() as u64,
            phase: self.phase().name().to_string(),
            vcpus: self.vcpus_now(vm.as_ref()),
            link: LinkSnapshot {
                irqs_sent: s.irqs_sent.load(Ordering::Relaxed),
                irqs_received: s.irqs_received.load(Ordering::Relaxed),
                io_forwarded: s.io_forwarded.load(Ordering::Relaxed),
                io_served: s.io_served.load(Ordering::Relaxed),
                shadow_flushes: vm.as_ref().map_or(0, |v| v.shadow_flushes()),
            },
            hot_pages: dsm
                .as_ref()
                .map(|d| {
                    d.hot_pages
                        .iter()
                        .map(|&(page, faults)| HotPage {
                            gpa: page * 4096,
                            faults,
                            what: vm.as_ref().and_then(|v| v.name_address(page * 4096)),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            dsm,
            devices: vm.as_ref().map(|v| v.device_counters()).unwrap_or_default(),
        }
    }

    /// Installs the new VM and replays, once and in order, the messages that came before
    /// it. Returns the failure that came before the VM, if any, for the caller to hand
    /// to it.
    fn install_vm(&self, vm: VmHandle) -> Option<String> {
        let mut l = self.life();
        if let Ok(early) = l.install(self.me, vm.clone()) {
            // Under the lock: messages that arrive meanwhile wait, and stay in order.
            // Delivering to local vCPUs and logical registers never calls back into the
            // node.
            for m in early {
                self.apply(&vm, m);
            }
        }
        let failure = l.failure.clone();
        drop(l);
        self.cv.notify_all();
        failure
    }

    /// Serves forwarded device accesses until the node stops.
    fn io_server(&self, jobs: mpsc::Receiver<IoJob>) {
        while !self.stopping() {
            let Ok(mut job) = jobs.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            // The VM exists before any vCPU can forward an access.
            let Some(vm) = self.vm() else { continue };
            self.stats.io_served.fetch_add(1, Ordering::Relaxed);
            let event = vm.io(job.vcpu as usize, job.access, &mut job.data);
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
        mut ready: impl FnMut(&Life<VmHandle>) -> Option<T>,
    ) -> Result<T, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.life();
        loop {
            if let Some(f) = g.failure.as_ref() {
                return Err(WaitError::Failed(f.clone()));
            }
            if let Some(v) = ready(&g) {
                return Ok(v);
            }
            // The end of the run is known: what is awaited will not come.
            if g.end_known {
                return Err(WaitError::Ended(what.to_string()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout {
                    what: what.to_string(),
                    timeout,
                });
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
        {
            let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiting = true;
            st.resp = None;
        }
        node.send(
            0,
            &Ctrl::IoReq {
                vcpu: vcpu as u32,
                access,
                data: data.to_vec(),
            },
        );
        let mut g = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((event, d)) = g.resp.take() {
                g.waiting = false;
                let n = d.len().min(data.len());
                data[..n].copy_from_slice(&d[..n]);
                return event;
            }
            if node.stopping() {
                g.waiting = false;
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
        self.0.stop();
        if let Some(d) = self.0.dsm.get() {
            d.expect_goodbyes();
        }
        // The VM reports each outcome once, when it is settled; `send_end` still sends
        // nothing if the end is known already (another node ended the run).
        let outcome = match outcome {
            Ok(e) => Ok(*e),
            Err(e) => Err(format!("node {}: {e}", self.0.me)),
        };
        self.0.send_end(outcome);
    }
}

/// How long the guest has to power off after a stop request unless told otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of a node run that are not in the cluster description.
#[derive(Debug, Default)]
pub struct NodeOptions {
    /// Ends the run with an error after this long.
    pub timeout: Option<Duration>,
    /// An already bound listening socket for this node's address (e.g. handed down by
    /// `dvmm run`, which bound it to a free port); `None`: the node binds its address.
    pub listener: Option<std::net::TcpListener>,
    /// Set (e.g. by a SIGTERM handler) to ask the guest to power off; looked at every
    /// 100 ms.
    pub stop_signal: Option<&'static AtomicBool>,
    /// How long the guest has to power off after a stop request (None: the default,
    /// [`DEFAULT_STOP_TIMEOUT`]).
    pub stop_timeout: Option<Duration>,
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

/// Ends the node's life cycle when dropped (stops its helper threads on any return).
struct StopOnDrop(Arc<Node>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.advance(Phase::Ended);
    }
}

/// Runs node `me` of the cluster until the guest ends.
pub fn run_node(
    cfg: &ClusterConfig,
    me: u16,
    mut opts: NodeOptions,
) -> Result<NodeReport, NodeError> {
    let node = new_node(cfg, me, opts.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))?;
    let _stop = StopOnDrop(node.clone());
    let _control = start_control(cfg, &node, opts.stop_signal.take())?;
    let mesh = connect_mesh(cfg, &node, opts.listener.take())?;
    let d = start_dsm(cfg, &node, mesh.sender())?;
    let (vm, tsc_base) = create_vm(cfg, &node, &d, opts)?;
    let handle = vm.handle();
    start_guest(&node, &handle, tsc_base);
    let result = vm.run();
    end_run(&node, &mesh, &d, &handle, result)
}

/// Listens on the node's control socket ([`control`]): `stats` and `stop` requests,
/// and the stop signal looked at on the same thread.
fn start_control(
    cfg: &ClusterConfig,
    node: &Arc<Node>,
    stop_signal: Option<&'static AtomicBool>,
) -> Result<ControlServer, NodeError> {
    let started = Instant::now();
    let (n, m, name) = (node.clone(), node.clone(), cfg.name.clone());
    let handler = control::handler(move || n.snapshot(&name, started), move || m.request_stop());
    let n = node.clone();
    let tick = Box::new(move || {
        if stop_signal.is_some_and(|s| s.swap(false, Ordering::SeqCst)) {
            if let Err(e) = n.request_stop() {
                eprint_line(&format!("dvmm: node {}: stop: {e}", n.me));
            }
        }
    });
    ControlServer::start(&control::socket_path(&cfg.name, node.me), handler, tick)
        .map_err(NodeError::Config)
}

/// Checks the node's place in the cluster and starts its io-server thread.
fn new_node(cfg: &ClusterConfig, me: u16, stop_timeout: Duration) -> Result<Arc<Node>, NodeError> {
    let nodes = cfg.nodes.len() as u16;
    if me >= nodes {
        return Err(NodeError::Config(format!(
            "--id {me}: the cluster has nodes 0 to {}",
            nodes - 1
        )));
    }
    let total_vcpus = cfg.total_vcpus();
    let (io_tx, io_rx) = mpsc::channel();
    let vcpu_nodes = cfg.vcpu_nodes();
    if vcpu_nodes.len() != total_vcpus {
        return Err(NodeError::Config(format!(
            "the cluster places {} vCPUs but has {total_vcpus}",
            vcpu_nodes.len()
        )));
    }
    let mut node = Node::new(me, vcpu_nodes, nodes, io_tx);
    node.stop_timeout = stop_timeout;
    let node = Arc::new(node);
    let n = node.clone();
    // Detached: it ends within 100 ms of the node stopping, which [`StopOnDrop`] ensures
    // on every return of `run_node` (or at once here if the caller never gets the node).
    std::thread::Builder::new()
        .name(format!("io-server-{me}"))
        .spawn(move || n.io_server(io_rx))
        .map_err(|e| NodeError::Config(format!("cannot start the I/O thread: {e}")))?;
    Ok(node)
}

/// [`Phase::Connecting`]: forms the mesh, whose handler feeds the node's messages.
fn connect_mesh(
    cfg: &ClusterConfig,
    node: &Arc<Node>,
    listener: Option<std::net::TcpListener>,
) -> Result<Mesh, NodeError> {
    let me = node.me;
    let mut mcfg = MeshConfig::new(
        me,
        cfg.nodes.iter().map(|n| n.addr).collect(),
        cfg.secret.clone(),
    );
    mcfg.connect_timeout = cfg.connect_timeout;
    let h = node.clone();
    let mut builder = Mesh::builder(mcfg).handler(move |ev| h.on_event(ev));
    if let Some(l) = listener {
        builder = builder.listener(l);
    }
    let mesh = builder
        .establish()
        .map_err(|source| NodeError::Transport { me, source })?;
    let _ = node.sender.set(mesh.sender());
    tracing::info!(me, nodes = node.nodes, "mesh established");
    Ok(mesh)
}

/// [`Phase::Connecting`] to [`Phase::WaitingStart`]: starts the DSM over the whole guest
/// RAM and attaches it to the node.
fn start_dsm(cfg: &ClusterConfig, node: &Arc<Node>, sender: Sender) -> Result<Arc<Dsm>, NodeError> {
    let me = node.me;
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
    let d = Dsm::with_options(me, node.nodes, region, homes, sender, dsm_opts).map_err(|e| {
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
    let _ = node.advance(Phase::WaitingStart);
    Ok(d)
}

/// [`Phase::WaitingStart`]: the TSC base of the run, node 0's own or the one its
/// [`Ctrl::Start`] brings.
fn wait_start(cfg: &ClusterConfig, node: &Node) -> Result<u64, NodeError> {
    if node.me == 0 {
        return Ok(host_tsc());
    }
    node.wait(
        "node 0 to start the guest",
        cfg.connect_timeout + Duration::from_secs(60),
        |l| l.start,
    )
    .map_err(|source| NodeError::Startup {
        me: node.me,
        source,
    })
}

/// [`Phase::WaitingStart`] to [`Phase::VmCreated`]: maps guest RAM over the DSM, waits
/// for the start ([`wait_start`]), creates this node's part of the VM and installs it
/// (replaying the messages that came before it). Returns the VM and the TSC base.
fn create_vm(
    cfg: &ClusterConfig,
    node: &Arc<Node>,
    d: &Arc<Dsm>,
    opts: NodeOptions,
) -> Result<(Vm, u64), NodeError> {
    let me = node.me;
    let total_mem = cfg.total_memory();
    // SAFETY: the DSM region maps exactly total_mem bytes and lives in `d`, which
    // `run_node` keeps until the VM is gone.
    let mem =
        unsafe { vmm::memory::guest_memory_over(d.region().as_ptr(), total_mem) }.map_err(|e| {
            NodeError::Dsm {
                me,
                msg: e.to_string(),
            }
        })?;
    let tsc_base = wait_start(cfg, node)?;
    let console = if me == 0 {
        ConsoleOut::new(Box::new(std::io::stdout())).0
    } else {
        ConsoleOut::capture().0
    };
    let vm = Vm::create(VmConfig {
        vcpus: cfg.total_vcpus(),
        memory: total_mem,
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline_extra: cfg.cmdline.clone(),
        console,
        host: HostKind::detect(),
        unpack_bzimage: cfg.unpack_bzimage,
        timeout: opts.timeout,
        placement: Some(Placement {
            node: me,
            vcpu_nodes: cfg.vcpu_nodes(),
            link: Arc::new(Link(node.clone())),
            tsc_base: Some(tsc_base),
            tsc_khz: None,
        }),
        guest_memory: Some(mem),
        acpi: cfg.acpi,
        numa: cfg.numa_nodes(),
        disk: cfg.disk.clone(),
        net: cfg.net.clone(),
    })
    .map_err(|source| {
        node.send_end(Err(format!("node {me}: {source}")));
        NodeError::Vm { me, source }
    })?;
    if let Some(f) = node.install_vm(vm.handle()) {
        vm.handle().fail(f);
    }
    {
        // KVM's shadow page tables must not outlive a page another node writes.
        let h = vm.handle();
        d.set_page_lost_hook(move |_| h.page_lost());
    }
    Ok((vm, tsc_base))
}

/// [`Phase::VmCreated`] to [`Phase::Running`]: node 0 starts the others and waits until
/// they are ready (failing the VM if they are not); the others report ready.
fn start_guest(node: &Node, vm: &VmHandle, tsc_base: u64) {
    if node.me == 0 {
        // The console's input: the terminal or pipe this process was given.
        if let Err(e) = vmm::term::spawn_console_input(vm.clone()) {
            tracing::warn!("no console input: {e}");
        }
        node.broadcast(&Ctrl::Start { tsc_base });
        let r = node.wait(
            "the other nodes to create their VMs",
            Duration::from_secs(120),
            |l| l.ready.complete().then_some(()),
        );
        if let Err(e) = r {
            vm.fail(e.to_string());
        }
    } else {
        node.send(0, &Ctrl::Ready);
    }
    let _ = node.advance(Phase::Running);
}

/// The run returned: moves to [`Phase::Ending`], leaves the mesh and the DSM and
/// reports the statistics (on stderr too if the run failed).
fn end_run(
    node: &Node,
    mesh: &Mesh,
    d: &Dsm,
    handle: &VmHandle,
    result: Result<vmm::RunReport, vmm::VmError>,
) -> Result<NodeReport, NodeError> {
    let me = node.me;
    node.stop();
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

    /// The NUMA nodes the guest is told of (SRAT) are the DSM's homes: every page of
    /// node i's ranges is at home on node i, also for a share that spans the 32-bit hole.
    #[test]
    fn srat_ranges_are_the_dsm_homes() {
        use vmm::memory::{HIGH_RAM_START, MMIO_HOLE_START};
        let g = 1u64 << 30;
        let mut cfg = crate::ClusterConfig::parse(
            "secret = \"0123456789abcdef\"\n\
             [[node]]\naddr = \"127.0.0.1:1\"\nvcpus = 1\nmemory = \"1G\"\n\
             [[node]]\naddr = \"127.0.0.1:2\"\nvcpus = 2\nmemory = \"3G\"\n\
             [[node]]\naddr = \"127.0.0.1:3\"\nvcpus = 0\nmemory = \"1G\"\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let homes = ShareHomes::new(cfg.home_bounds());
        let numa = cfg.numa_nodes();
        assert_eq!(numa.len(), 3);
        assert_eq!(numa[1].vcpus, 1..3);
        assert_eq!(numa[2].vcpus, 3..3);
        // Node 1's share [1G, 4G) of RAM order: [1G, 3G) below the hole, [4G, 5G) above.
        assert_eq!(numa[1].memory, vec![(g, 2 * g), (HIGH_RAM_START, g)]);
        let offset = |gpa: u64| {
            if gpa >= HIGH_RAM_START {
                gpa - (HIGH_RAM_START - MMIO_HOLE_START)
            } else {
                gpa
            }
        };
        for (i, n) in numa.iter().enumerate() {
            for &(start, len) in &n.memory {
                for gpa in [start, start + len / 2, start + len - 4096] {
                    assert_eq!(homes.home(offset(gpa) / 4096), i as u16, "{gpa:#x}");
                }
            }
        }
        cfg.numa = false;
        assert!(cfg.numa_nodes().is_empty());
    }

    #[test]
    fn ready_counts_distinct_peers() {
        let mut r = ReadySet::new(3);
        assert!(!r.complete());
        assert_eq!(r.add(0), Err(ReadyRefusal::NotAPeer));
        assert_eq!(r.add(3), Err(ReadyRefusal::NotAPeer));
        assert_eq!(r.add(u16::MAX), Err(ReadyRefusal::NotAPeer));
        assert_eq!(r.add(1), Ok(()));
        assert_eq!(r.add(1), Err(ReadyRefusal::Duplicate));
        assert!(!r.complete(), "a duplicate must not stand in for node 2");
        assert_eq!(r.add(2), Ok(()));
        assert!(r.complete());
        assert!(ReadySet::new(1).complete());
    }

    /// Node `me` of 3, vCPUs 0 on node 0, 1-2 on node 1, 3 on node 2; no mesh (sends
    /// go nowhere) and no VM.
    fn node(me: u16) -> (Arc<Node>, mpsc::Receiver<IoJob>) {
        let (tx, rx) = mpsc::channel();
        (Arc::new(Node::new(me, vec![0, 1, 1, 2], 3, tx)), rx)
    }

    fn ready_count(n: &Node) -> u16 {
        n.life().ready.count
    }

    #[test]
    fn ready_messages_are_checked() {
        let (n, _rx) = node(0);
        n.on_ctrl(1, Ctrl::Ready);
        n.on_ctrl(1, Ctrl::Ready);
        n.on_ctrl(0, Ctrl::Ready);
        n.on_ctrl(7, Ctrl::Ready);
        assert_eq!(ready_count(&n), 1);
        assert!(!n.life().ready.complete());
        n.on_ctrl(2, Ctrl::Ready);
        assert!(n.life().ready.complete());
        // Only node 0 counts.
        let (n1, _rx) = node(1);
        n1.on_ctrl(2, Ctrl::Ready);
        assert_eq!(ready_count(&n1), 0);
    }

    #[test]
    fn start_only_from_node_0() {
        let (n, _rx) = node(1);
        n.on_ctrl(2, Ctrl::Start { tsc_base: 5 });
        assert_eq!(n.life().start, None);
        n.on_ctrl(0, Ctrl::Start { tsc_base: 7 });
        assert_eq!(n.life().start, Some(7));
    }

    #[test]
    fn io_requests_are_checked() {
        let (n, rx) = node(0);
        let req = |vcpu, len| Ctrl::IoReq {
            vcpu,
            access: IoAccess::MmioWrite(0xfec0_0000),
            data: vec![0; len],
        };
        // vCPU 3 is node 2's, vCPU 9 does not exist, 9 bytes is no access.
        n.on_ctrl(1, req(3, 4));
        n.on_ctrl(1, req(9, 4));
        n.on_ctrl(1, req(1, 9));
        assert!(rx.try_recv().is_err());
        n.on_ctrl(1, req(2, 4));
        let job = rx.try_recv().unwrap();
        assert_eq!((job.from, job.vcpu), (1, 2));
        assert_eq!(job.access, IoAccess::MmioWrite(0xfec0_0000));
        // Only node 0 serves devices.
        let (n1, rx1) = node(1);
        n1.on_ctrl(2, req(3, 4));
        assert!(rx1.try_recv().is_err());
    }

    #[test]
    fn io_answers_need_an_outstanding_request() {
        let (n, _rx) = node(1);
        let resp = |vcpu| Ctrl::IoResp {
            vcpu,
            event: PortEvent::PowerOff,
            data: vec![1],
        };
        let state = |v: usize| {
            let st = n.slots[v].state.lock().unwrap();
            (st.waiting, st.resp.clone())
        };
        // Nobody asked: dropped (never a power-off).
        n.on_ctrl(0, resp(1));
        assert_eq!(state(1), (false, None));
        n.slots[1].state.lock().unwrap().waiting = true;
        // Not from node 0, or for a vCPU of another node: dropped.
        n.on_ctrl(2, resp(1));
        n.on_ctrl(0, resp(3));
        n.on_ctrl(0, resp(0));
        assert_eq!(state(1), (true, None));
        n.on_ctrl(0, resp(1));
        assert_eq!(state(1), (true, Some((PortEvent::PowerOff, vec![1]))));
        // A second answer to the same request is dropped.
        n.on_ctrl(
            0,
            Ctrl::IoResp {
                vcpu: 1,
                event: PortEvent::None,
                data: vec![2],
            },
        );
        assert_eq!(state(1), (true, Some((PortEvent::PowerOff, vec![1]))));
    }

    #[test]
    fn irqs_for_other_nodes_are_refused() {
        let (n, _rx) = node(1);
        let irq = |vcpu| Ctrl::Irq {
            vcpu,
            irq: Interrupt::fixed(0x30),
        };
        n.on_ctrl(0, irq(0));
        n.on_ctrl(0, irq(3));
        n.on_ctrl(0, irq(100));
        assert!(n.life().early.is_empty());
        n.on_ctrl(0, irq(2));
        assert_eq!(n.life().early, vec![irq(2)]);
        // Logical registers: only for the sender's own vCPUs.
        let l = |vcpu| Ctrl::Logical {
            vcpu,
            ldr: 1,
            dfr: 2,
        };
        n.on_ctrl(0, l(3));
        n.on_ctrl(2, l(3));
        assert_eq!(n.life().early.len(), 2);
    }

    #[test]
    fn end_is_sent_once() {
        // The VM reports an error when it happens and again when the run returns it.
        let (n, _rx) = node(1);
        let link = Link(n.clone());
        link.ended(&Err("triple fault".into()));
        assert!(n.life().end_known);
        assert!(!n.send_end(Err("node 1: triple fault".into())));
        // An End from another node was broadcast by that node: not echoed.
        let (n, _rx) = node(1);
        n.on_ctrl(
            2,
            Ctrl::End {
                outcome: Err("node 2: gone".into()),
            },
        );
        assert!(n.stopping());
        assert_eq!(n.life().failure.as_deref(), Some("node 2: gone"));
        assert!(!n.send_end(Err("node 1: node 2: gone".into())));
        let (n, _rx) = node(1);
        assert!(n.send_end(Ok(GuestEnd::PowerOff)));
        assert!(!n.send_end(Ok(GuestEnd::PowerOff)));
    }
    #[test]
    fn phases_follow_the_life_cycle() {
        use Phase::*;
        let steps = [Connecting, WaitingStart, VmCreated, Running, Ending, Ended];
        for w in steps.windows(2) {
            assert!(w[0].can_go(w[1]), "{:?} -> {:?}", w[0], w[1]);
            assert!(!w[1].can_go(w[0]), "{:?} -> {:?}", w[1], w[0]);
        }
        for p in steps {
            assert!(!p.can_go(p), "{p:?} -> {p:?}");
            assert_eq!(p.can_go(Ending), p < Ending, "{p:?} -> Ending");
            assert_eq!(p.can_go(Ended), p != Ended, "{p:?} -> Ended");
        }
        assert!(!Connecting.can_go(VmCreated));
        assert!(!WaitingStart.can_go(Running));
        let (n, _rx) = node(1);
        assert_eq!(n.phase(), Connecting);
        // Impossible steps are refused, not taken (and do not panic).
        assert_eq!(n.advance(Running), Err(Connecting));
        assert_eq!(n.advance(WaitingStart), Ok(()));
        assert_eq!(n.advance(WaitingStart), Err(WaitingStart));
        assert_eq!(n.advance(VmCreated), Ok(()));
        assert_eq!(n.advance(Running), Ok(()));
        assert!(!n.stopping());
        n.stop();
        assert_eq!(n.phase(), Ending);
        assert_eq!(n.advance(Running), Err(Ending));
        assert_eq!(n.advance(Ended), Ok(()));
        assert!(n.stopping());
    }

    #[test]
    fn early_messages_are_replayed_once() {
        let irq = |vcpu| Ctrl::Irq {
            vcpu,
            irq: Interrupt::fixed(0x30),
        };
        let mut l: Life<&str> = Life::new(3);
        l.phase = Phase::WaitingStart;
        assert_eq!(l.queue_unless_vm(irq(1)), None);
        assert_eq!(l.queue_unless_vm(irq(2)), None);
        assert_eq!(l.install(1, "vm"), Ok(vec![irq(1), irq(2)]));
        assert_eq!(l.phase, Phase::VmCreated);
        assert!(l.early.is_empty());
        // Once the VM exists, messages go straight to it.
        assert_eq!(l.queue_unless_vm(irq(2)), Some(("vm", irq(2))));
        assert!(l.early.is_empty());
        // A second VM is refused and replays nothing.
        assert_eq!(l.install(1, "other"), Err("other"));
        assert_eq!(l.vm, Some("vm"));
        assert_eq!(l.phase, Phase::VmCreated);
    }

    #[test]
    fn a_vm_created_while_stopping_is_installed() {
        let mut l: Life<&str> = Life::new(3);
        l.phase = Phase::WaitingStart;
        assert!(l.stop(1));
        assert_eq!(l.install(1, "vm"), Ok(vec![]));
        assert_eq!(l.phase, Phase::Ending);
        assert_eq!(l.vm, Some("vm"));
    }

    #[test]
    fn start_is_refused_once_the_vm_exists() {
        let mut l: Life<&str> = Life::new(3);
        assert!(l.accept_start(7));
        assert_eq!(l.start, Some(7));
        l.phase = Phase::WaitingStart;
        l.install(1, "vm").unwrap();
        assert!(!l.accept_start(9));
        assert_eq!(l.start, Some(7));
    }

    #[test]
    fn end_moves_to_ending_once() {
        let (n, _rx) = node(1);
        n.advance(Phase::WaitingStart).unwrap();
        let end = || Ctrl::End {
            outcome: Ok(GuestEnd::PowerOff),
        };
        n.on_ctrl(2, end());
        assert_eq!(n.phase(), Phase::Ending);
        assert!(n.life().end_known);
        assert_eq!(n.life().failure, None);
        n.on_ctrl(0, end());
        assert_eq!(n.phase(), Phase::Ending);
        // A wait stops at once (node 0 waiting for Ready would otherwise wait 120 s).
        let t = Instant::now();
        assert_eq!(
            n.wait("the others", Duration::from_secs(30), |_| None::<()>),
            Err(WaitError::Ended("the others".to_string()))
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // The run cannot go on once it is ending.
        assert_eq!(n.advance(Phase::VmCreated), Err(Phase::Ending));
        let mut l: Life<&str> = Life::new(3);
        assert_eq!(l.remote_end(1), None);
        assert!(!l.stop(1), "ending already");
        assert!(!l.take_end());
    }

    #[test]
    fn a_failure_before_the_vm_is_kept_for_it() {
        let (n, _rx) = node(1);
        n.fail("node 2 is gone".into());
        n.fail("second".into());
        assert_eq!(n.phase(), Phase::Ending);
        assert_eq!(n.life().failure.as_deref(), Some("node 2 is gone"));
        assert_eq!(
            n.wait("nothing", Duration::from_secs(5), |_| None::<()>),
            Err(WaitError::Failed("node 2 is gone".to_string()))
        );
    }
}
