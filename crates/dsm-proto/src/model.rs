//! A model of a whole cluster running the protocol, and a checker for it.
//!
//! The model has `nodes` [`Engine`]s, `threads` guest threads per node that each perform
//! `ops` memory operations (a read or a write of one page), per-ordered-pair FIFO channels
//! between nodes, and per-node page mappings and contents. It executes the engines'
//! [`Action`]s exactly as the runtime must (in order, `with_page` copies taken when the
//! `Send` is executed). Page contents are modelled as a single value per copy: 0 for a
//! zero page, and a unique number for every write.
//!
//! A transition is either a thread step (perform the next operation if the local mapping
//! allows it, else call [`Engine::fault`] and block until `Wake`) or the delivery of the
//! oldest message of one channel. [`explore`] visits every reachable state (depth first,
//! with a set of 128-bit state fingerprints); [`simulate`] follows one schedule (for
//! property tests of larger configurations). In every state they check:
//!
//! * **single writer / multiple readers**, both for the engines' access rights and for
//!   the actual mappings: at most one node with `Write`, and then no node with `Read`;
//! * **no stale copies**: every mapped copy holds the latest written value;
//! * **sequential consistency**: every read returns the value of the most recent write to
//!   that page in the global order of completed operations (a write takes effect
//!   atomically when the writer has write access);
//! * **runtime contract**: engine rights agree with the mappings, pages are only copied
//!   while mapped read-only, `Install` only targets missing pages and has contents,
//!   `SetAccess` only targets present pages, no message is refused by an engine
//!   ([`ProtocolError`]), no queued request is dropped;
//! * **progress**: no cycles in the state graph, and every terminal state has all
//!   operations done, all channels empty and every engine quiescent (no deadlock).

use crate::{
    Access, Action, AllOnNode, Blocked, Bug, Engine, HomePolicy, Interleaved, LocalAccess, Msg,
    NodeId, PageId, ProtocolError,
};
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};

/// Which [`HomePolicy`] the modelled cluster uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HomeKind {
    /// [`Interleaved`]: page % nodes.
    Interleaved,
    /// [`AllOnNode`]: every page on this node.
    AllOnNode(NodeId),
    /// [`Blocked`]: contiguous blocks.
    Blocked,
}

impl HomeKind {
    fn policy(self, nodes: u16, pages: u64) -> Box<dyn HomePolicy + Send> {
        match self {
            HomeKind::Interleaved => Box::new(Interleaved::new(nodes)),
            HomeKind::AllOnNode(n) => Box::new(AllOnNode(n)),
            HomeKind::Blocked => Box::new(Blocked::new(pages, nodes)),
        }
    }
}

/// One memory operation of a guest thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    /// The page.
    pub page: PageId,
    /// Read or write.
    pub access: Access,
}

/// A modelled cluster configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of nodes.
    pub nodes: u16,
    /// Number of pages.
    pub pages: u64,
    /// Guest threads per node (each faults independently; faults on one node merge).
    pub threads: usize,
    /// Operations per thread.
    pub ops: usize,
    /// Home policy.
    pub homes: HomeKind,
    /// Deliberate protocol bug to inject in every engine.
    pub bug: Option<Bug>,
    /// Fixed programs, one per thread (node-major: thread `i` runs on node
    /// `i / threads`). `None`: every operation is chosen nondeterministically among all
    /// reads and writes of all pages, so all programs are covered at once.
    pub programs: Option<Vec<Vec<Op>>>,
}

impl Config {
    /// `nodes` nodes x `pages` pages x `ops` operations per node (one thread per node),
    /// interleaved homes, all programs, no bug.
    pub fn new(nodes: u16, pages: u64, ops: usize) -> Self {
        Config {
            nodes,
            pages,
            threads: 1,
            ops,
            homes: HomeKind::Interleaved,
            bug: None,
            programs: None,
        }
    }
}

/// Contents of a page copy: 0 = zero page, else a unique write.
type Val = u32;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Thread {
    node: NodeId,
    pc: usize,
    /// Operation being attempted (set once a fault was taken).
    current: Option<Op>,
    blocked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct InFlight {
    msg: Msg,
    data: Option<Val>,
}

/// A state of the modelled cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    engines: Vec<Engine>,
    /// `chans[from * nodes + to]`
    chans: Vec<VecDeque<InFlight>>,
    /// `map[node * pages + page]`: what is mapped.
    map: Vec<LocalAccess>,
    /// `mem[node * pages + page]`: contents of the mapped copy (0 if none).
    mem: Vec<Val>,
    threads: Vec<Thread>,
    /// Value of the most recent write per page.
    latest: Vec<Val>,
}

/// A transition of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Thread `thread` performs (or faults on) `op`.
    Op {
        /// Thread index.
        thread: usize,
        /// The operation.
        op: Op,
    },
    /// Deliver the oldest message from `from` to `to`.
    Deliver {
        /// Sender.
        from: NodeId,
        /// Receiver.
        to: NodeId,
    },
    /// The runtime of `node` calls [`Engine::release`] for `page`; enabled once every
    /// thread woken for that page has retried its access.
    Release {
        /// The node.
        node: NodeId,
        /// The page.
        page: PageId,
    },
}

/// Which property failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// An engine refused a message or fault.
    Protocol,
    /// Two writers, or a writer and a reader.
    SingleWriter,
    /// A read returned something else than the latest write.
    StaleRead,
    /// A mapped copy differs from the latest write.
    StaleCopy,
    /// An action broke the runtime contract.
    BadAction,
    /// A terminal state with work left.
    Deadlock,
    /// A cycle in the state graph, or a fault that never makes progress.
    NoProgress,
}

/// A failed property, with details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which property.
    pub kind: ViolationKind,
    /// What exactly.
    pub detail: String,
}

fn violation(kind: ViolationKind, detail: impl Into<String>) -> Violation {
    Violation {
        kind,
        detail: detail.into(),
    }
}

impl From<ProtocolError> for Violation {
    fn from(e: ProtocolError) -> Self {
        violation(ViolationKind::Protocol, e.to_string())
    }
}

/// A violation and the schedule that leads to it.
#[derive(Clone, Debug)]
pub struct Counterexample {
    /// What failed.
    pub violation: Violation,
    /// Human readable trace from the initial state, one line per event.
    pub trace: Vec<String>,
    /// States visited before the violation was found.
    pub states: u64,
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "counterexample ({} steps):", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "VIOLATION {:?}: {}",
            self.violation.kind, self.violation.detail
        )
    }
}

/// Result of a successful exploration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Distinct states visited.
    pub states: u64,
    /// Transitions executed.
    pub transitions: u64,
    /// Terminal states (all operations done).
    pub terminal: u64,
    /// Longest path explored.
    pub max_depth: usize,
}

/// The modelled cluster: transition relation and invariants.
#[derive(Clone, Debug)]
pub struct Model {
    cfg: Config,
}

impl Model {
    /// A model of `cfg`.
    pub fn new(cfg: Config) -> Self {
        Model { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn n(&self) -> usize {
        usize::from(self.cfg.nodes)
    }

    fn p(&self) -> usize {
        usize::try_from(self.cfg.pages).unwrap_or(usize::MAX)
    }

    fn idx(&self, node: NodeId, page: PageId) -> usize {
        usize::from(node) * self.p() + usize::try_from(page).unwrap_or(usize::MAX)
    }

    /// The initial state: nothing materialised, no messages.
    pub fn initial(&self) -> State {
        let (n, p, c) = (self.n(), self.p(), &self.cfg);
        let engines = (0..c.nodes)
            .map(|me| {
                let e = Engine::new(me, c.nodes, c.pages, c.homes.policy(c.nodes, c.pages));
                match c.bug {
                    Some(b) => e.with_fault_injection(b),
                    None => e,
                }
            })
            .collect();
        let threads = (0..n * c.threads)
            .map(|i| Thread {
                node: NodeId::try_from(i / c.threads).unwrap_or(NodeId::MAX),
                pc: 0,
                current: None,
                blocked: false,
            })
            .collect();
        State {
            engines,
            chans: vec![VecDeque::new(); n * n],
            map: vec![LocalAccess::None; n * p],
            mem: vec![0; n * p],
            threads,
            latest: vec![0; p],
        }
    }

    /// Enabled transitions, in a fixed order.
    pub fn steps(&self, s: &State) -> Vec<Step> {
        let mut v = Vec::new();
        for (i, t) in s.threads.iter().enumerate() {
            if t.blocked || t.pc >= self.cfg.ops {
                continue;
            }
            if let Some(op) = t.current {
                v.push(Step::Op { thread: i, op });
            } else if let Some(progs) = &self.cfg.programs {
                if let Some(&op) = progs.get(i).and_then(|p| p.get(t.pc)) {
                    v.push(Step::Op { thread: i, op });
                }
            } else {
                for page in 0..self.cfg.pages {
                    for access in [Access::Read, Access::Write] {
                        v.push(Step::Op {
                            thread: i,
                            op: Op { page, access },
                        });
                    }
                }
            }
        }
        for (node, e) in s.engines.iter().enumerate() {
            for page in 0..self.cfg.pages {
                if e.is_held(page)
                    && !s.threads.iter().any(|t| {
                        usize::from(t.node) == node
                            && !t.blocked
                            && t.current.map(|o| o.page) == Some(page)
                    })
                {
                    let node = e.me();
                    v.push(Step::Release { node, page });
                }
            }
        }
        for from in 0..self.cfg.nodes {
            for to in 0..self.cfg.nodes {
                if !s.chans[usize::from(from) * self.n() + usize::from(to)].is_empty() {
                    v.push(Step::Deliver { from, to });
                }
            }
        }
        v
    }

    /// Execute one transition. With `log`, describe what happens.
    pub fn apply(
        &self,
        s: &mut State,
        step: Step,
        mut log: Option<&mut Vec<String>>,
    ) -> Result<(), Violation> {
        match step {
            Step::Op { thread, op } => self.exec_op(s, thread, op, log),
            Step::Deliver { from, to } => {
                let ch = usize::from(from) * self.n() + usize::from(to);
                let m = s.chans[ch]
                    .pop_front()
                    .ok_or_else(|| violation(ViolationKind::BadAction, "empty channel"))?;
                if let Some(l) = log.as_deref_mut() {
                    let data = match m.data {
                        Some(v) => format!(" +page(v{v})"),
                        None => String::new(),
                    };
                    l.push(format!("n{to} <- n{from}: {:?}{data}", m.msg));
                }
                let actions = s.engines[usize::from(to)].receive(from, m.msg)?;
                self.run_actions(s, to, actions, m.data, log)
            }
            Step::Release { node, page } => {
                if let Some(l) = log.as_deref_mut() {
                    l.push(format!("n{node}: release p{page}"));
                }
                let actions = s.engines[usize::from(node)].release(page)?;
                self.run_actions(s, node, actions, None, log)
            }
        }
    }

    fn exec_op(
        &self,
        s: &mut State,
        i: usize,
        op: Op,
        mut log: Option<&mut Vec<String>>,
    ) -> Result<(), Violation> {
        let node = s.threads[i].node;
        let idx = self.idx(node, op.page);
        for _ in 0..3 {
            if s.map[idx].allows(op.access) {
                let t = &mut s.threads[i];
                let page = usize::try_from(op.page).unwrap_or(usize::MAX);
                let what = match op.access {
                    Access::Read => {
                        let v = s.mem[idx];
                        if v != s.latest[page] {
                            return Err(violation(
                                ViolationKind::StaleRead,
                                format!(
                                    "t{i}@n{node} read p{} = v{v}, latest write is v{}",
                                    op.page, s.latest[page]
                                ),
                            ));
                        }
                        format!("read p{} = v{v}", op.page)
                    }
                    Access::Write => {
                        let v = Val::try_from(1 + i * self.cfg.ops + t.pc).unwrap_or(Val::MAX);
                        s.mem[idx] = v;
                        s.latest[page] = v;
                        format!("write p{} := v{v}", op.page)
                    }
                };
                if let Some(l) = log.as_deref_mut() {
                    l.push(format!("t{i}@n{node}: {what}"));
                }
                t.pc += 1;
                t.current = None;
                t.blocked = false;
                return Ok(());
            }
            let actions = s.engines[usize::from(node)].fault(op.page, op.access)?;
            if let Some(l) = log.as_deref_mut() {
                l.push(format!("t{i}@n{node}: fault {:?} p{}", op.access, op.page));
            }
            s.threads[i].current = Some(op);
            s.threads[i].blocked = true;
            self.run_actions(s, node, actions, None, log.as_deref_mut())?;
            if s.threads[i].blocked {
                return Ok(());
            }
        }
        Err(violation(
            ViolationKind::NoProgress,
            format!("t{i}@n{node}: woken 3 times without getting {op:?}"),
        ))
    }

    /// Execute `actions` of `node` in order, as the runtime does. `data` is the page
    /// contents that came with the message being processed.
    fn run_actions(
        &self,
        s: &mut State,
        node: NodeId,
        actions: Vec<Action>,
        data: Option<Val>,
        mut log: Option<&mut Vec<String>>,
    ) -> Result<(), Violation> {
        let bad = |d: String| Err(violation(ViolationKind::BadAction, format!("n{node}: {d}")));
        for a in actions {
            if let Some(l) = log.as_deref_mut() {
                l.push(format!("    n{node} does {a:?}"));
            }
            match a {
                Action::Send { to, msg, with_page } => {
                    if to == node || to >= self.cfg.nodes {
                        return bad(format!("send to n{to}"));
                    }
                    if msg.carries_page() != with_page.is_some() {
                        return bad(format!("{msg:?} with_page={with_page:?}"));
                    }
                    let data = match with_page {
                        Some(p) => {
                            if p != msg.page() || p >= self.cfg.pages {
                                return bad(format!("{msg:?} with page {p}"));
                            }
                            let idx = self.idx(node, p);
                            if s.map[idx] != LocalAccess::Read {
                                return bad(format!(
                                    "copies p{p} while it is mapped {:?} (must be Read)",
                                    s.map[idx]
                                ));
                            }
                            Some(s.mem[idx])
                        }
                        None => None,
                    };
                    let ch = usize::from(node) * self.n() + usize::from(to);
                    s.chans[ch].push_back(InFlight { msg, data });
                }
                Action::Install { page, access, zero } => {
                    if page >= self.cfg.pages || access == LocalAccess::None {
                        return bad(format!("install p{page} {access:?}"));
                    }
                    let idx = self.idx(node, page);
                    if s.map[idx] != LocalAccess::None {
                        return bad(format!("install over present p{page}"));
                    }
                    let v = if zero {
                        0
                    } else {
                        match data {
                            Some(v) => v,
                            None => return bad(format!("install p{page} without contents")),
                        }
                    };
                    s.map[idx] = access;
                    s.mem[idx] = v;
                }
                Action::SetAccess { page, access } => {
                    if page >= self.cfg.pages {
                        return bad(format!("set access p{page}"));
                    }
                    let idx = self.idx(node, page);
                    if s.map[idx] == LocalAccess::None {
                        return bad(format!("set access {access:?} on missing p{page}"));
                    }
                    s.map[idx] = access;
                    if access == LocalAccess::None {
                        s.mem[idx] = 0;
                    }
                }
                Action::Wake { page } => {
                    for t in s.threads.iter_mut().filter(|t| t.node == node) {
                        if t.blocked && t.current.map(|o| o.page) == Some(page) {
                            t.blocked = false;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Check the state invariants.
    pub fn check(&self, s: &State) -> Result<(), Violation> {
        for page in 0..self.cfg.pages {
            let pi = usize::try_from(page).unwrap_or(usize::MAX);
            let rights: Vec<LocalAccess> = s.engines.iter().map(|e| e.local_access(page)).collect();
            let maps: Vec<LocalAccess> = (0..self.cfg.nodes)
                .map(|n| s.map[self.idx(n, page)])
                .collect();
            for (what, v) in [("rights", &rights), ("mappings", &maps)] {
                let w = v.iter().filter(|a| **a == LocalAccess::Write).count();
                let r = v.iter().filter(|a| **a == LocalAccess::Read).count();
                if w > 1 || (w == 1 && r > 0) {
                    return Err(violation(
                        ViolationKind::SingleWriter,
                        format!("p{page}: {what} per node {v:?}"),
                    ));
                }
            }
            for n in 0..self.cfg.nodes {
                let e = &s.engines[usize::from(n)];
                let idx = self.idx(n, page);
                let expect = if e.is_materialized(page) {
                    e.local_access(page)
                } else {
                    LocalAccess::None
                };
                if s.map[idx] != expect {
                    return Err(violation(
                        ViolationKind::BadAction,
                        format!(
                            "n{n} p{page}: mapped {:?} but engine says {expect:?}",
                            s.map[idx]
                        ),
                    ));
                }
                if s.map[idx] != LocalAccess::None && s.mem[idx] != s.latest[pi] {
                    return Err(violation(
                        ViolationKind::StaleCopy,
                        format!(
                            "n{n} maps p{page} ({:?}) with v{}, latest write is v{}",
                            s.map[idx], s.mem[idx], s.latest[pi]
                        ),
                    ));
                }
            }
        }
        for e in &s.engines {
            if e.stats().dropped_requests != 0 {
                return Err(violation(
                    ViolationKind::Protocol,
                    format!("n{} dropped a queued request", e.me()),
                ));
            }
        }
        Ok(())
    }

    /// Check a state without enabled transitions: everything must be finished.
    pub fn check_terminal(&self, s: &State) -> Result<(), Violation> {
        for (i, t) in s.threads.iter().enumerate() {
            if t.pc < self.cfg.ops {
                return Err(violation(
                    ViolationKind::Deadlock,
                    format!(
                        "t{i}@n{} stuck at op {} ({:?}, blocked={})",
                        t.node, t.pc, t.current, t.blocked
                    ),
                ));
            }
        }
        if let Some(e) = s.engines.iter().find(|e| !e.is_quiescent()) {
            return Err(violation(
                ViolationKind::Deadlock,
                format!("n{} not quiescent at the end: {e:?}", e.me()),
            ));
        }
        Ok(())
    }

    /// Replay `path` from the initial state and describe it.
    pub fn trace(&self, path: &[Step]) -> Vec<String> {
        let mut s = self.initial();
        let mut log = Vec::new();
        for &step in path {
            if let Err(v) = self.apply(&mut s, step, Some(&mut log)) {
                log.push(format!("  -> {:?}: {}", v.kind, v.detail));
                break;
            }
        }
        log
    }

    /// A 128-bit fingerprint of a state.
    pub fn fingerprint(s: &State) -> u128 {
        let mut h = Fp128::default();
        s.hash(&mut h);
        h.finish128()
    }
}

/// Two independent 64-bit lanes of a multiply-xorshift hash.
struct Fp128 {
    a: u64,
    b: u64,
    len: u64,
}

impl Default for Fp128 {
    fn default() -> Self {
        Fp128 {
            a: 0x243f_6a88_85a3_08d3,
            b: 0x1319_8a2e_0370_7344,
            len: 0,
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Fp128 {
    fn word(&mut self, w: u64) {
        self.len = self.len.wrapping_add(1);
        self.a = mix(self.a ^ w).wrapping_add(self.len);
        self.b = mix(self.b.rotate_left(23) ^ w ^ 0xa409_3822_299f_31d0);
    }

    fn finish128(&self) -> u128 {
        (u128::from(mix(self.a ^ self.len)) << 64) | u128::from(mix(self.b ^ self.a))
    }
}

impl Hasher for Fp128 {
    fn finish(&self) -> u64 {
        mix(self.a ^ self.b)
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.word(u64::from_le_bytes(w) ^ ((c.len() as u64) << 56));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.word(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.word(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.word(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.word(i as u64);
    }
}

struct Frame {
    state: State,
    fp: u128,
    steps: Vec<Step>,
    next: usize,
}

/// Visit every reachable state of `cfg` (depth first), checking all invariants.
/// `progress` is called every 2^20 states with the number of states so far.
pub fn explore(cfg: &Config, mut progress: impl FnMut(u64)) -> Result<Report, Counterexample> {
    let model = Model::new(cfg.clone());
    let init = model.initial();
    let fail = |violation: Violation, path: &[Step], states: u64| Counterexample {
        trace: model.trace(path),
        violation,
        states,
    };
    if let Err(v) = model.check(&init) {
        return Err(fail(v, &[], 0));
    }
    let mut report = Report::default();
    let mut visited: HashSet<u128> = HashSet::new();
    let mut on_stack: HashSet<u128> = HashSet::new();
    let fp = Model::fingerprint(&init);
    visited.insert(fp);
    on_stack.insert(fp);
    let steps = model.steps(&init);
    let mut stack = vec![Frame {
        state: init,
        fp,
        steps,
        next: 0,
    }];
    let path =
        |stack: &[Frame]| -> Vec<Step> { stack.iter().map(|f| f.steps[f.next - 1]).collect() };
    while let Some(top) = stack.last_mut() {
        if top.next == top.steps.len() {
            if top.steps.is_empty() {
                report.terminal += 1;
                if let Err(v) = model.check_terminal(&top.state) {
                    stack.pop();
                    return Err(fail(v, &path(&stack), visited.len() as u64));
                }
            }
            on_stack.remove(&top.fp);
            stack.pop();
            continue;
        }
        let step = top.steps[top.next];
        top.next += 1;
        let mut s = top.state.clone();
        report.transitions += 1;
        if let Err(v) = model
            .apply(&mut s, step, None)
            .and_then(|()| model.check(&s))
        {
            return Err(fail(v, &path(&stack), visited.len() as u64));
        }
        let fp = Model::fingerprint(&s);
        if on_stack.contains(&fp) {
            let v = violation(ViolationKind::NoProgress, "cycle in the state graph");
            return Err(fail(v, &path(&stack), visited.len() as u64));
        }
        if !visited.insert(fp) {
            continue;
        }
        if visited.len() % (1 << 20) == 0 {
            progress(visited.len() as u64);
        }
        on_stack.insert(fp);
        let steps = model.steps(&s);
        stack.push(Frame {
            state: s,
            fp,
            steps,
            next: 0,
        });
        report.max_depth = report.max_depth.max(stack.len() - 1);
    }
    report.states = visited.len() as u64;
    Ok(report)
}

/// Result of one simulated schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Transitions executed.
    pub steps: usize,
    /// Messages delivered.
    pub messages: usize,
}

/// Run one schedule of `cfg`: at step `k` take enabled transition number
/// `schedule[k] % enabled` (after the schedule ends, a fixed pseudo-random sequence),
/// checking all invariants, until nothing is enabled.
pub fn simulate(cfg: &Config, schedule: &[u32]) -> Result<SimReport, Counterexample> {
    let model = Model::new(cfg.clone());
    let mut s = model.initial();
    let mut path = Vec::new();
    let mut report = SimReport::default();
    let fail = |violation: Violation, path: &[Step]| Counterexample {
        trace: model.trace(path),
        violation,
        states: path.len() as u64,
    };
    let limit =
        1000 + 200 * usize::from(cfg.nodes) * cfg.threads.max(1) * cfg.ops * usize::from(cfg.nodes);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    loop {
        let steps = model.steps(&s);
        if steps.is_empty() {
            return match model.check_terminal(&s) {
                Ok(()) => Ok(report),
                Err(v) => Err(fail(v, &path)),
            };
        }
        let k = path.len();
        let pick = match schedule.get(k) {
            Some(&x) => x as usize,
            None => {
                rng = mix(rng.wrapping_add(k as u64));
                (rng >> 16) as usize
            }
        };
        let step = steps[pick % steps.len()];
        path.push(step);
        if let Step::Deliver { .. } = step {
            report.messages += 1;
        }
        report.steps += 1;
        if let Err(v) = model
            .apply(&mut s, step, None)
            .and_then(|()| model.check(&s))
        {
            return Err(fail(v, &path));
        }
        if k > limit {
            let v = violation(ViolationKind::NoProgress, "schedule does not terminate");
            return Err(fail(v, &path));
        }
    }
}
