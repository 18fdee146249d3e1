//! The per-node protocol engine.

use crate::{Access, Action, HomePolicy, LocalAccess, Msg, NodeId, PageId, ProtocolError};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Deliberate protocol bugs, for demonstrating that the model checker finds them. Never
/// enable one in production; they exist so tests and `check-dsm --broken` can use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bug {
    /// On a write to a shared page, the home does not invalidate one of the sharers
    /// (but still forgets it).
    SkipInvalidation,
    /// The home does not wait for `Done` after forwarding a request to a third node: its
    /// next `Invalidate`/`Forward` may overtake the data.
    NoDoneWait,
    /// A writer that forwards a read copy keeps its write access.
    KeepWriteOnForwardRead,
}

impl Bug {
    /// All bugs.
    pub const ALL: [Bug; 3] = [
        Bug::SkipInvalidation,
        Bug::NoDoneWait,
        Bug::KeepWriteOnForwardRead,
    ];

    /// Parse a command line name (`skip-invalidation`, `no-done-wait`, `keep-write`).
    pub fn from_name(s: &str) -> Option<Bug> {
        match s {
            "skip-invalidation" => Some(Bug::SkipInvalidation),
            "no-done-wait" => Some(Bug::NoDoneWait),
            "keep-write" => Some(Bug::KeepWriteOnForwardRead),
            _ => None,
        }
    }
}

/// Counters for the runtime's statistics. Not part of the protocol state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Read faults reported by the runtime.
    pub read_faults: u64,
    /// Write faults on a page without a local copy.
    pub write_faults: u64,
    /// Write faults on a page with a read-only copy (upgrades).
    pub upgrade_faults: u64,
    /// Faults merged into an outstanding request for the same page.
    pub merged_faults: u64,
    /// Faults that needed nothing (access already there): answered with `Wake` only.
    pub spurious_faults: u64,
    /// First touches of a never-materialised page at its home (zero fill, no message).
    pub zero_fills: u64,
    /// Messages sent to peers.
    pub messages_sent: u64,
    /// Messages received from peers.
    pub messages_received: u64,
    /// Requests received by this node's directory (including its own).
    pub requests_served: u64,
    /// Requests that had to wait in the directory queue because the page was busy.
    pub requests_queued: u64,
    /// `Forward`s sent by the directory (3-hop transfers).
    pub forwards_sent: u64,
    /// `Invalidate`s sent by the directory (plus local copies dropped inline).
    pub invalidations_sent: u64,
    /// `Invalidate`s received (copies dropped on request of a remote home).
    pub invalidations_received: u64,
    /// `Data` frames sent with 4 KiB of contents.
    pub pages_sent: u64,
    /// `Data` frames sent for never-touched pages, without contents.
    pub zero_pages_sent: u64,
    /// Queued requests dropped because they no longer fit the directory (only possible
    /// if a peer misbehaves; always 0 in the model checker).
    pub dropped_requests: u64,
}

/// Cache side of one page (every node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CachePage {
    /// Protocol access right.
    access: LocalAccess,
    /// Whether a local copy exists. `access >= Read && !mapped` only at the home of a
    /// never-written page (an implicit zero page).
    mapped: bool,
    /// Outstanding request to the home.
    pending: Option<Access>,
    /// A write fault arrived while a read request was outstanding: ask for write next.
    upgrade_after: bool,
    /// A `Wake` was issued and the runtime has not called `release` yet: the woken threads
    /// may not have retried, so the copy is not taken away (progress guarantee).
    held: bool,
    /// A take-away that arrived while `held`, processed on `release`.
    deferred: Option<Deferred>,
}

/// A home order that waits for `release`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Deferred {
    /// Send the page to `requester`.
    Forward { access: Access, requester: NodeId },
    /// Drop the read copy (and acknowledge).
    Invalidate,
}

/// Directory view of a page (home only).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum DirState {
    /// One node has the page writable (possibly the home, possibly not materialised).
    Exclusive(NodeId),
    /// These nodes have identical read-only copies.
    Shared(BTreeSet<NodeId>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Busy {
    /// Waiting for `InvalidateAck`s before granting write access.
    Invalidating {
        requester: NodeId,
        awaiting: BTreeSet<NodeId>,
        /// Node that supplies the data afterwards; `None`: the requester has a copy.
        supplier: Option<NodeId>,
    },
    /// A third node sends the data; waiting for the requester's `Done`.
    AwaitDone { requester: NodeId, next: DirState },
    /// The home's own copy must be sent to `requester`, but it is held.
    AwaitRelease { requester: NodeId, next: DirState },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DirPage {
    state: DirState,
    busy: Option<Busy>,
    queue: VecDeque<(NodeId, Access)>,
}

/// Work of one `fault`/`receive` call: actions for the runtime and messages to self
/// (cache side -> own directory), processed after the current handler.
#[derive(Default)]
struct Ctx {
    out: Vec<Action>,
    inbox: VecDeque<Msg>,
}

/// The protocol state of ONE node for all pages (allocated lazily per touched page).
pub struct Engine {
    me: NodeId,
    nodes: u16,
    pages: u64,
    homes: Arc<dyn HomePolicy>,
    cache: BTreeMap<PageId, CachePage>,
    dir: BTreeMap<PageId, DirPage>,
    bug: Option<Bug>,
    stats: Stats,
}

impl Clone for Engine {
    fn clone(&self) -> Self {
        Engine {
            me: self.me,
            nodes: self.nodes,
            pages: self.pages,
            homes: Arc::clone(&self.homes),
            cache: self.cache.clone(),
            dir: self.dir.clone(),
            bug: self.bug,
            stats: self.stats.clone(),
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("me", &self.me)
            .field("nodes", &self.nodes)
            .field("pages", &self.pages)
            .field("homes", &self.homes)
            .field("cache", &self.cache)
            .field("dir", &self.dir)
            .field("bug", &self.bug)
            .finish()
    }
}

/// Equality and hash cover the protocol state only (not statistics nor the policy).
impl PartialEq for Engine {
    fn eq(&self, o: &Self) -> bool {
        self.me == o.me
            && self.nodes == o.nodes
            && self.pages == o.pages
            && self.cache == o.cache
            && self.dir == o.dir
            && self.bug == o.bug
    }
}
impl Eq for Engine {}
impl Hash for Engine {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.me.hash(h);
        self.cache.hash(h);
        self.dir.hash(h);
        self.bug.hash(h);
    }
}

fn unexpected(from: NodeId, msg: &Msg, reason: &'static str) -> ProtocolError {
    ProtocolError::Unexpected {
        from,
        msg: msg.clone(),
        reason,
    }
}

impl Engine {
    /// The engine of node `me` in a cluster of `nodes` nodes, for a guest of `pages` pages
    /// whose homes are given by `homes` (the same policy on every node).
    pub fn new(me: NodeId, nodes: u16, pages: u64, homes: Box<dyn HomePolicy + Send>) -> Self {
        let homes: Box<dyn HomePolicy> = homes;
        Engine {
            me,
            nodes,
            pages,
            homes: Arc::from(homes),
            cache: BTreeMap::new(),
            dir: BTreeMap::new(),
            bug: None,
            stats: Stats::default(),
        }
    }

    /// Enable a deliberate protocol bug (tests and `check-dsm --broken` only).
    pub fn with_fault_injection(mut self, bug: Bug) -> Self {
        self.bug = Some(bug);
        self
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The home node of `page`.
    pub fn home_of(&self, page: PageId) -> Result<NodeId, ProtocolError> {
        self.check_page(page)?;
        let home = self.homes.home(page);
        if home >= self.nodes {
            return Err(ProtocolError::BadHome {
                page,
                home,
                nodes: self.nodes,
            });
        }
        Ok(home)
    }

    /// The protocol's access right of this node to `page`. At the home of a page that was
    /// never touched this is `Write` (or `Read`) although nothing is mapped yet (see
    /// [`Engine::is_materialized`]); the first local fault installs a zero page.
    pub fn local_access(&self, page: PageId) -> LocalAccess {
        self.cache_get(page).access
    }

    /// Whether this node holds an actual copy of `page` (installed or zero-filled).
    pub fn is_materialized(&self, page: PageId) -> bool {
        self.cache_get(page).mapped
    }

    /// Whether this node waits for an answer about `page` (a request is outstanding).
    pub fn is_pending(&self, page: PageId) -> bool {
        self.cache_get(page).pending.is_some()
    }

    /// No outstanding request, no busy directory entry, no queued request: nothing is
    /// going on at this node.
    pub fn is_quiescent(&self) -> bool {
        self.cache
            .values()
            .all(|c| c.pending.is_none() && !c.held && c.deferred.is_none())
            && self
                .dir
                .values()
                .all(|d| d.busy.is_none() && d.queue.is_empty())
    }

    /// A local thread faulted on `page` wanting `access`. Call once per fault; several
    /// faults on the same page may be outstanding and are merged. Every fault is
    /// eventually answered by a `Wake { page }` (possibly after an `Install`); the thread
    /// then retries its access and, if the access is still not allowed (a read copy
    /// arrived but it wants to write, or the copy was taken away again), faults again.
    pub fn fault(&mut self, page: PageId, access: Access) -> Result<Vec<Action>, ProtocolError> {
        let home = self.home_of(page)?;
        let mut ctx = Ctx::default();
        let mut c = self.cache_get(page);
        match access {
            Access::Read => self.stats.read_faults += 1,
            Access::Write if c.access == LocalAccess::Read => self.stats.upgrade_faults += 1,
            Access::Write => self.stats.write_faults += 1,
        }
        if c.access.allows(access) {
            if c.mapped {
                self.stats.spurious_faults += 1;
            } else {
                // First touch of a never-written page at its home.
                self.stats.zero_fills += 1;
                c.mapped = true;
                ctx.out.push(Action::Install {
                    page,
                    access: c.access,
                    zero: true,
                });
            }
            Self::wake(&mut c, page, &mut ctx);
            self.cache_put(page, c);
            return Ok(ctx.out);
        }
        match (c.pending, access) {
            (Some(Access::Write), _) | (Some(Access::Read), Access::Read) => {
                self.stats.merged_faults += 1;
            }
            (Some(Access::Read), Access::Write) => {
                self.stats.merged_faults += 1;
                c.upgrade_after = true;
            }
            (None, _) => {
                c.pending = Some(access);
                self.send(&mut ctx, home, Msg::Request { page, access }, None);
            }
        }
        self.cache_put(page, c);
        self.run_inbox(&mut ctx)?;
        Ok(ctx.out)
    }

    /// A message from peer `from`. The runtime must check that the frame carried page
    /// contents exactly when [`Msg::carries_page`] says so, and provide them to the
    /// `Install` action this returns. On `Err` the message was ignored (no state change).
    pub fn receive(&mut self, from: NodeId, msg: Msg) -> Result<Vec<Action>, ProtocolError> {
        if from >= self.nodes || from == self.me {
            return Err(ProtocolError::BadNode {
                node: from,
                nodes: self.nodes,
                me: self.me,
            });
        }
        self.home_of(msg.page())?;
        self.stats.messages_received += 1;
        let mut ctx = Ctx::default();
        self.dispatch(from, msg, &mut ctx)?;
        self.run_inbox(&mut ctx)?;
        Ok(ctx.out)
    }

    /// Whether `page` is held: a `Wake` was issued and `release` not called yet.
    pub fn is_held(&self, page: PageId) -> bool {
        self.cache_get(page).held
    }

    /// The threads woken by the last `Wake { page }` had their chance to retry: the copy
    /// may be taken away again. Executes a `Forward`/`Invalidate` that arrived meanwhile.
    ///
    /// The runtime must call this after every `Wake`, once the woken threads have had a
    /// chance to retry their access (e.g. after a short timer of some tens of
    /// microseconds). Calling it right after the `Wake` is correct too, but then two
    /// nodes writing the same page can take it from each other forever (livelock).
    /// Calling it for a page that is not held does nothing.
    pub fn release(&mut self, page: PageId) -> Result<Vec<Action>, ProtocolError> {
        self.home_of(page)?;
        let mut ctx = Ctx::default();
        let mut c = self.cache_get(page);
        if !c.held {
            return Ok(ctx.out);
        }
        c.held = false;
        let order = c.deferred.take();
        self.cache_put(page, c);
        if let Some(order) = order {
            self.cache_execute(page, order, &mut ctx);
        }
        self.run_inbox(&mut ctx)?;
        Ok(ctx.out)
    }

    /// [`Engine::receive`] for a frame that did (`page_data`) or did not carry 4 KiB of
    /// page contents: refuses a frame whose payload does not match the message.
    pub fn receive_frame(
        &mut self,
        from: NodeId,
        msg: Msg,
        page_data: bool,
    ) -> Result<Vec<Action>, ProtocolError> {
        if page_data != msg.carries_page() {
            return Err(unexpected(
                from,
                &msg,
                "page contents missing or unexpected",
            ));
        }
        self.receive(from, msg)
    }

    // ----------------------------------------------------------------- plumbing

    fn check_page(&self, page: PageId) -> Result<(), ProtocolError> {
        if page >= self.pages {
            return Err(ProtocolError::PageOutOfRange {
                page,
                pages: self.pages,
            });
        }
        Ok(())
    }

    /// Only called with pages already validated by `home_of`.
    fn home(&self, page: PageId) -> NodeId {
        self.homes.home(page)
    }

    fn cache_default(&self, page: PageId) -> CachePage {
        let access = if self.home(page) == self.me {
            LocalAccess::Write
        } else {
            LocalAccess::None
        };
        CachePage {
            access,
            mapped: false,
            pending: None,
            upgrade_after: false,
            held: false,
            deferred: None,
        }
    }

    fn cache_get(&self, page: PageId) -> CachePage {
        match self.cache.get(&page) {
            Some(c) => *c,
            None => self.cache_default(page),
        }
    }

    /// Store a cache entry; entries equal to the initial state are not stored, so equal
    /// protocol states have equal representations (and untouched pages cost nothing).
    fn cache_put(&mut self, page: PageId, c: CachePage) {
        if c == self.cache_default(page) {
            self.cache.remove(&page);
        } else {
            self.cache.insert(page, c);
        }
    }

    fn dir_default(&self) -> DirPage {
        DirPage {
            state: DirState::Exclusive(self.me),
            busy: None,
            queue: VecDeque::new(),
        }
    }

    fn dir_get(&self, page: PageId) -> DirPage {
        match self.dir.get(&page) {
            Some(d) => d.clone(),
            None => self.dir_default(),
        }
    }

    fn dir_put(&mut self, page: PageId, d: DirPage) {
        if d == self.dir_default() {
            self.dir.remove(&page);
        } else {
            self.dir.insert(page, d);
        }
    }

    fn send(&mut self, ctx: &mut Ctx, to: NodeId, msg: Msg, with_page: Option<PageId>) {
        if to == self.me {
            // Only the cache side talks to its own directory this way; no contents.
            ctx.inbox.push_back(msg);
        } else {
            self.stats.messages_sent += 1;
            ctx.out.push(Action::Send { to, msg, with_page });
        }
    }

    fn run_inbox(&mut self, ctx: &mut Ctx) -> Result<(), ProtocolError> {
        while let Some(msg) = ctx.inbox.pop_front() {
            self.dispatch(self.me, msg, ctx)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, from: NodeId, msg: Msg, ctx: &mut Ctx) -> Result<(), ProtocolError> {
        let page = msg.page();
        let home = self.home(page);
        let to_dir = matches!(
            msg,
            Msg::Request { .. } | Msg::InvalidateAck { .. } | Msg::Done { .. }
        );
        if to_dir && home != self.me {
            return Err(unexpected(
                from,
                &msg,
                "this node is not the home of the page",
            ));
        }
        if !to_dir
            && matches!(
                msg,
                Msg::Forward { .. } | Msg::Grant { .. } | Msg::Invalidate { .. }
            )
            && from != home
        {
            return Err(unexpected(from, &msg, "only the home sends this"));
        }
        match msg {
            Msg::Request { access, .. } => self.dir_request(from, page, access, &msg, ctx),
            Msg::InvalidateAck { .. } => self.dir_inv_ack(from, page, &msg, ctx),
            Msg::Done { .. } => self.dir_done(from, page, &msg, ctx),
            Msg::Forward {
                access, requester, ..
            } => {
                let c = self.cache_get(page);
                if requester >= self.nodes || requester == self.me {
                    return Err(unexpected(from, &msg, "bad requester"));
                }
                if c.access == LocalAccess::None {
                    return Err(unexpected(from, &msg, "no copy to forward"));
                }
                if c.deferred.is_some() {
                    return Err(unexpected(from, &msg, "an order is already deferred"));
                }
                self.cache_order(page, Deferred::Forward { access, requester }, ctx);
                Ok(())
            }
            Msg::Data { access, zero, .. } => {
                let c = self.cache_get(page);
                if c.pending != Some(access) || c.access != LocalAccess::None {
                    return Err(unexpected(from, &msg, "no matching request outstanding"));
                }
                self.cache_data(from, page, access, zero, ctx);
                Ok(())
            }
            Msg::Grant { .. } => {
                let c = self.cache_get(page);
                if c.pending != Some(Access::Write) || c.access != LocalAccess::Read {
                    return Err(unexpected(from, &msg, "no read copy with write request"));
                }
                self.cache_grant(page, ctx);
                Ok(())
            }
            Msg::Invalidate { .. } => {
                let c = self.cache_get(page);
                if c.access != LocalAccess::Read {
                    return Err(unexpected(from, &msg, "no read copy to invalidate"));
                }
                if c.deferred.is_some() {
                    return Err(unexpected(from, &msg, "an order is already deferred"));
                }
                self.cache_order(page, Deferred::Invalidate, ctx);
                Ok(())
            }
        }
    }

    // ----------------------------------------------------------------- cache side

    /// Wake the faulting threads and hold the copy until `release`.
    fn wake(c: &mut CachePage, page: PageId, ctx: &mut Ctx) {
        c.held = true;
        ctx.out.push(Action::Wake { page });
    }

    /// Carry out a home order now, or defer it if the copy is held.
    fn cache_order(&mut self, page: PageId, order: Deferred, ctx: &mut Ctx) {
        let mut c = self.cache_get(page);
        if c.held {
            c.deferred = Some(order);
            self.cache_put(page, c);
            return;
        }
        self.cache_execute(page, order, ctx);
    }

    fn cache_execute(&mut self, page: PageId, order: Deferred, ctx: &mut Ctx) {
        let home = self.home(page);
        match order {
            Deferred::Forward { access, requester } => {
                self.cache_supply(page, requester, access, ctx);
                if home == self.me {
                    // The directory waited for our own held copy.
                    let mut d = self.dir_get(page);
                    if let Some(Busy::AwaitRelease { next, .. }) = d.busy.take() {
                        d.state = next;
                        self.dir_put(page, d);
                        self.pump(page, ctx);
                    }
                }
            }
            Deferred::Invalidate => {
                if home != self.me {
                    self.stats.invalidations_received += 1;
                }
                self.cache_drop(page, ctx);
                self.send(ctx, home, Msg::InvalidateAck { page }, None);
            }
        }
    }

    /// Send our copy to `requester` (we are the supplier chosen by the home); keep a read
    /// copy (`access == Read`) or drop ours (`Write`). The copy is write-protected before
    /// it is taken.
    fn cache_supply(&mut self, page: PageId, requester: NodeId, access: Access, ctx: &mut Ctx) {
        let mut c = self.cache_get(page);
        let keep_write = self.bug == Some(Bug::KeepWriteOnForwardRead) && access == Access::Read;
        if c.mapped {
            if c.access == LocalAccess::Write {
                ctx.out.push(Action::SetAccess {
                    page,
                    access: LocalAccess::Read,
                });
            }
            self.stats.pages_sent += 1;
            let msg = Msg::Data {
                page,
                access,
                zero: false,
            };
            self.send(ctx, requester, msg, Some(page));
        } else {
            self.stats.zero_pages_sent += 1;
            let msg = Msg::Data {
                page,
                access,
                zero: true,
            };
            self.send(ctx, requester, msg, None);
        }
        match access {
            Access::Read if keep_write && c.access == LocalAccess::Write => {
                // The bug: re-enable writing after the copy was taken.
                if c.mapped {
                    ctx.out.push(Action::SetAccess {
                        page,
                        access: LocalAccess::Write,
                    });
                }
            }
            Access::Read => c.access = LocalAccess::Read,
            Access::Write => {
                if c.mapped {
                    ctx.out.push(Action::SetAccess {
                        page,
                        access: LocalAccess::None,
                    });
                }
                c.access = LocalAccess::None;
                c.mapped = false;
            }
        }
        self.cache_put(page, c);
    }

    /// Drop a read copy.
    fn cache_drop(&mut self, page: PageId, ctx: &mut Ctx) {
        let mut c = self.cache_get(page);
        if c.mapped {
            ctx.out.push(Action::SetAccess {
                page,
                access: LocalAccess::None,
            });
        }
        c.access = LocalAccess::None;
        c.mapped = false;
        self.cache_put(page, c);
    }

    /// Our read copy becomes writable (all other copies are gone).
    fn cache_grant(&mut self, page: PageId, ctx: &mut Ctx) {
        let mut c = self.cache_get(page);
        if c.mapped {
            ctx.out.push(Action::SetAccess {
                page,
                access: LocalAccess::Write,
            });
        } else {
            // Home's implicit zero page.
            self.stats.zero_fills += 1;
            ctx.out.push(Action::Install {
                page,
                access: LocalAccess::Write,
                zero: true,
            });
        }
        c.access = LocalAccess::Write;
        c.mapped = true;
        c.pending = None;
        c.upgrade_after = false;
        Self::wake(&mut c, page, ctx);
        self.cache_put(page, c);
    }

    fn cache_data(
        &mut self,
        from: NodeId,
        page: PageId,
        access: Access,
        zero: bool,
        ctx: &mut Ctx,
    ) {
        let home = self.home(page);
        let mut c = self.cache_get(page);
        ctx.out.push(Action::Install {
            page,
            access: access.into(),
            zero,
        });
        c.access = access.into();
        c.mapped = true;
        c.pending = None;
        if from != home {
            self.send(ctx, home, Msg::Done { page }, None);
        }
        Self::wake(&mut c, page, ctx);
        if c.upgrade_after {
            c.upgrade_after = false;
            if access == Access::Read {
                c.pending = Some(Access::Write);
                let msg = Msg::Request {
                    page,
                    access: Access::Write,
                };
                self.send(ctx, home, msg, None);
            }
        }
        self.cache_put(page, c);
    }

    // ----------------------------------------------------------------- directory side

    fn dir_request(
        &mut self,
        from: NodeId,
        page: PageId,
        access: Access,
        msg: &Msg,
        ctx: &mut Ctx,
    ) -> Result<(), ProtocolError> {
        let mut d = self.dir_get(page);
        let current = match &d.busy {
            Some(
                Busy::Invalidating { requester, .. }
                | Busy::AwaitDone { requester, .. }
                | Busy::AwaitRelease { requester, .. },
            ) => Some(*requester),
            None => None,
        };
        if current == Some(from) || d.queue.iter().any(|(n, _)| *n == from) {
            return Err(unexpected(from, msg, "request already outstanding"));
        }
        // While busy the recorded state is about to change; queued requests are checked
        // again when served (`pump`).
        if d.busy.is_none() && !Self::request_fits(&d.state, from, access) {
            return Err(unexpected(from, msg, "requester already has that access"));
        }
        self.stats.requests_served += 1;
        if d.busy.is_some() {
            self.stats.requests_queued += 1;
            d.queue.push_back((from, access));
            self.dir_put(page, d);
            return Ok(());
        }
        self.serve(page, d, from, access, ctx);
        self.pump(page, ctx);
        Ok(())
    }

    fn request_fits(state: &DirState, from: NodeId, access: Access) -> bool {
        match (state, access) {
            (DirState::Exclusive(o), _) => *o != from,
            (DirState::Shared(c), Access::Read) => !c.contains(&from),
            (DirState::Shared(_), Access::Write) => true,
        }
    }

    /// Serve one request on a non-busy directory entry `d` (which is stored back).
    fn serve(&mut self, page: PageId, mut d: DirPage, r: NodeId, access: Access, ctx: &mut Ctx) {
        let me = self.me;
        match (access, d.state.clone()) {
            (Access::Read, DirState::Exclusive(o)) => {
                let next = DirState::Shared([o, r].into_iter().collect());
                self.supply_via(page, d, o, r, Access::Read, next, ctx);
            }
            (Access::Read, DirState::Shared(c)) => {
                let s = Self::pick_supplier(&c, me);
                let mut next = c;
                next.insert(r);
                self.supply_via(page, d, s, r, Access::Read, DirState::Shared(next), ctx);
            }
            (Access::Write, DirState::Exclusive(o)) => {
                self.supply_via(page, d, o, r, Access::Write, DirState::Exclusive(r), ctx);
            }
            (Access::Write, DirState::Shared(c)) => {
                let supplier = if c.contains(&r) {
                    None
                } else {
                    Some(Self::pick_supplier(&c, me))
                };
                let mut awaiting = c;
                awaiting.remove(&r);
                if let Some(s) = supplier {
                    awaiting.remove(&s);
                }
                if awaiting.contains(&me) && !self.cache_get(page).held {
                    // Our own read copy: drop it right here.
                    awaiting.remove(&me);
                    self.stats.invalidations_sent += 1;
                    self.cache_drop(page, ctx);
                }
                if self.bug == Some(Bug::SkipInvalidation) {
                    if let Some(&victim) = awaiting.iter().next() {
                        awaiting.remove(&victim);
                    }
                }
                if awaiting.is_empty() {
                    self.finish_write(page, d, r, supplier, ctx);
                } else {
                    d.busy = Some(Busy::Invalidating {
                        requester: r,
                        awaiting: awaiting.clone(),
                        supplier,
                    });
                    self.dir_put(page, d);
                    for &n in &awaiting {
                        self.stats.invalidations_sent += 1;
                        if n == me {
                            // Our own copy is held: drop it on release, ack to ourselves.
                            self.cache_order(page, Deferred::Invalidate, ctx);
                        } else {
                            self.send(ctx, n, Msg::Invalidate { page }, None);
                        }
                    }
                }
            }
        }
    }

    /// The copy holder that sends data: the home itself if it has a copy (no `Forward`,
    /// no `Done`), else the lowest numbered holder.
    fn pick_supplier(c: &BTreeSet<NodeId>, me: NodeId) -> NodeId {
        if c.contains(&me) {
            me
        } else {
            c.iter().next().copied().unwrap_or(me)
        }
    }

    /// All other copies are gone: give `r` write access.
    fn finish_write(
        &mut self,
        page: PageId,
        mut d: DirPage,
        r: NodeId,
        supplier: Option<NodeId>,
        ctx: &mut Ctx,
    ) {
        d.busy = None;
        match supplier {
            None => {
                d.state = DirState::Exclusive(r);
                self.dir_put(page, d);
                if r == self.me {
                    self.cache_grant(page, ctx);
                } else {
                    self.send(ctx, r, Msg::Grant { page }, None);
                }
            }
            Some(s) => self.supply_via(page, d, s, r, Access::Write, DirState::Exclusive(r), ctx),
        }
    }

    /// Have `s` send the page to `r`; the directory becomes `next` (now if the home
    /// supplies, after `Done` otherwise).
    #[allow(clippy::too_many_arguments)]
    fn supply_via(
        &mut self,
        page: PageId,
        mut d: DirPage,
        s: NodeId,
        r: NodeId,
        access: Access,
        next: DirState,
        ctx: &mut Ctx,
    ) {
        if s == self.me {
            let order = Deferred::Forward {
                access,
                requester: r,
            };
            if self.cache_get(page).held {
                d.busy = Some(Busy::AwaitRelease { requester: r, next });
                self.dir_put(page, d);
                self.cache_order(page, order, ctx);
            } else {
                d.state = next;
                self.dir_put(page, d);
                self.cache_supply(page, r, access, ctx);
            }
        } else {
            self.stats.forwards_sent += 1;
            if self.bug == Some(Bug::NoDoneWait) {
                d.state = next;
            } else {
                d.busy = Some(Busy::AwaitDone { requester: r, next });
            }
            self.dir_put(page, d);
            let msg = Msg::Forward {
                page,
                access,
                requester: r,
            };
            self.send(ctx, s, msg, None);
        }
    }

    /// Serve queued requests while the entry is not busy.
    fn pump(&mut self, page: PageId, ctx: &mut Ctx) {
        loop {
            let mut d = self.dir_get(page);
            if d.busy.is_some() {
                return;
            }
            let Some((r, access)) = d.queue.pop_front() else {
                return;
            };
            if Self::request_fits(&d.state, r, access) {
                self.serve(page, d, r, access, ctx);
            } else {
                self.stats.dropped_requests += 1;
                self.dir_put(page, d);
            }
        }
    }

    fn dir_inv_ack(
        &mut self,
        from: NodeId,
        page: PageId,
        msg: &Msg,
        ctx: &mut Ctx,
    ) -> Result<(), ProtocolError> {
        let mut d = self.dir_get(page);
        let Some(Busy::Invalidating {
            requester,
            awaiting,
            supplier,
        }) = &mut d.busy
        else {
            return Err(unexpected(from, msg, "no invalidation in progress"));
        };
        if !awaiting.remove(&from) {
            return Err(unexpected(from, msg, "not awaiting an ack from this node"));
        }
        if awaiting.is_empty() {
            let (r, s) = (*requester, *supplier);
            self.finish_write(page, d, r, s, ctx);
            self.pump(page, ctx);
        } else {
            self.dir_put(page, d);
        }
        Ok(())
    }

    fn dir_done(
        &mut self,
        from: NodeId,
        page: PageId,
        msg: &Msg,
        ctx: &mut Ctx,
    ) -> Result<(), ProtocolError> {
        let mut d = self.dir_get(page);
        match d.busy.take() {
            Some(Busy::AwaitDone { requester, next }) if requester == from => {
                d.state = next;
                self.dir_put(page, d);
                self.pump(page, ctx);
                Ok(())
            }
            None if self.bug == Some(Bug::NoDoneWait) => Ok(()),
            _ => Err(unexpected(
                from,
                msg,
                "no transfer to this node in progress",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllOnNode, Interleaved};

    fn sends(a: &[Action]) -> Vec<(NodeId, Msg, Option<PageId>)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Send { to, msg, with_page } => Some((*to, msg.clone(), *with_page)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn home_first_touch_is_local() {
        let mut e = Engine::new(0, 2, 4, Box::new(AllOnNode(0)));
        assert_eq!(e.local_access(3), LocalAccess::Write);
        assert!(!e.is_materialized(3));
        let a = e.fault(3, Access::Read).unwrap();
        assert_eq!(
            a,
            [
                Action::Install {
                    page: 3,
                    access: LocalAccess::Write,
                    zero: true
                },
                Action::Wake { page: 3 }
            ]
        );
        assert!(e.is_materialized(3));
        assert_eq!(
            e.fault(3, Access::Write).unwrap(),
            [Action::Wake { page: 3 }]
        );
        assert_eq!(e.stats().spurious_faults, 1);
    }

    #[test]
    fn read_from_home_is_two_messages() {
        let mut h = Engine::new(0, 2, 4, Box::new(AllOnNode(0)));
        let mut r = Engine::new(1, 2, 4, Box::new(AllOnNode(0)));
        h.fault(0, Access::Write).unwrap(); // materialise at home
        assert!(h.is_held(0));
        assert!(h.release(0).unwrap().is_empty());
        let a = r.fault(0, Access::Read).unwrap();
        let [(0, req, None)] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        let a = h.receive(1, req.clone()).unwrap();
        // write-protect before copying, then send with contents
        assert_eq!(
            a[0],
            Action::SetAccess {
                page: 0,
                access: LocalAccess::Read
            }
        );
        let [(1, data, Some(0))] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        let a = r.receive(0, data.clone()).unwrap();
        assert!(sends(&a).is_empty(), "no Done for data from home");
        assert_eq!(r.local_access(0), LocalAccess::Read);
        r.release(0).unwrap();
        assert!(r.is_quiescent() && h.is_quiescent());
    }

    #[test]
    fn merged_faults() {
        let mut r = Engine::new(1, 2, 4, Box::new(AllOnNode(0)));
        let a = r.fault(0, Access::Read).unwrap();
        assert_eq!(sends(&a).len(), 1);
        assert!(r.fault(0, Access::Read).unwrap().is_empty());
        assert!(r.fault(0, Access::Write).unwrap().is_empty());
        assert_eq!(r.stats().merged_faults, 2);
        // Read data arrives: install, wake, and immediately ask for write.
        let a = r
            .receive(
                0,
                Msg::Data {
                    page: 0,
                    access: Access::Read,
                    zero: true,
                },
            )
            .unwrap();
        assert_eq!(
            sends(&a),
            [(
                0,
                Msg::Request {
                    page: 0,
                    access: Access::Write
                },
                None
            )]
        );
        assert!(a.contains(&Action::Wake { page: 0 }));
    }

    #[test]
    fn unexpected_messages_are_errors_not_panics() {
        let mut e = Engine::new(1, 3, 4, Box::new(Interleaved::new(3)));
        let bad = [
            (0, Msg::Grant { page: 0 }),
            (
                0,
                Msg::Data {
                    page: 0,
                    access: Access::Read,
                    zero: false,
                },
            ),
            (0, Msg::Invalidate { page: 0 }),
            (2, Msg::InvalidateAck { page: 1 }),
            (2, Msg::Done { page: 1 }),
            (0, Msg::Done { page: 0 }),
            (
                2,
                Msg::Forward {
                    page: 0,
                    access: Access::Read,
                    requester: 0,
                },
            ),
            (0, Msg::Invalidate { page: 99 }),
            (7, Msg::Done { page: 1 }),
            (1, Msg::Done { page: 1 }),
        ];
        for (from, m) in bad {
            let before = e.clone();
            assert!(e.receive(from, m.clone()).is_err(), "{m:?}");
            assert_eq!(before, e);
        }
        assert!(e.fault(4, Access::Read).is_err());
        let data = Msg::Data {
            page: 0,
            access: Access::Read,
            zero: false,
        };
        assert!(e.receive_frame(0, data, false).is_err());
        // A duplicate request is refused too.
        let req = Msg::Request {
            page: 1,
            access: Access::Read,
        };
        e.receive(2, req.clone()).unwrap();
        assert!(e.receive(2, req).is_err());
    }

    #[test]
    fn msg_serde_roundtrip() {
        let m = Msg::Forward {
            page: 262143,
            access: Access::Write,
            requester: 5,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Msg>(&s).unwrap(), m);
    }
}
