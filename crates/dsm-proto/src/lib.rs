//! The dvmm distributed shared memory (DSM) coherence protocol, as a pure state machine.
//!
//! Every `dvmm node` process owns one [`Engine`]: the protocol state of that node for all
//! guest pages. The runtime feeds it local page faults ([`Engine::fault`]) and messages from
//! peers ([`Engine::receive`]) and executes the [`Action`]s it returns, **in order**. The
//! engine does no I/O, has no threads and reads no clock, so the same code is checked
//! exhaustively by the model checker in [`model`] (binary `check-dsm`) and runs in production.
//!
//! # Protocol in short
//!
//! Page granular (4 KiB, [`PageId`]), single writer / multiple readers, sequentially
//! consistent, directory based. Every page has a *home* node (chosen by a [`HomePolicy`])
//! whose directory tracks who holds the page. Initially every page is zero and owned
//! (writable) by its home, but not materialised: the first local touch at the home installs
//! a zero page without any message, and a remote request for a never-touched page is
//! answered with a "zero" data message that carries no contents.
//!
//! Each node plays two roles per page:
//!
//! * **cache** (every node): protocol rights `None | Read | Write`, whether a copy is
//!   mapped, at most one outstanding request to the home (`pending`), and a flag to ask
//!   for write access right after an outstanding read request completes (merged faults).
//! * **directory** (home only): `Exclusive(owner)` or `Shared(copyset)`, a *busy* marker
//!   while a transaction is in progress (`Invalidating{awaiting acks}` or
//!   `AwaitDone{requester}`), and a FIFO queue of requests that arrived while busy.
//!   The directory serves one request per page at a time (a blocking directory), so
//!   racing faults from several nodes are simply serialised at the home.
//!
//! Messages ([`Msg`]), all small, page contents travel after the header of a `Data` frame:
//!
//! | message | direction | meaning |
//! |---|---|---|
//! | `Request{page, access}` | requester -> home | "I need Read/Write access" |
//! | `Forward{page, access, requester}` | home -> holder | "send your copy to requester; keep Read (access=Read) or drop it (access=Write)" |
//! | `Data{page, access, zero}` | holder or home -> requester | the page (contents follow unless `zero`) |
//! | `Grant{page}` | home -> requester | upgrade your Read copy to Write, no data |
//! | `Invalidate{page}` | home -> sharer | drop your Read copy |
//! | `InvalidateAck{page}` | sharer -> home | dropped |
//! | `Done{page}` | requester -> home | installed data that came from a node other than the home |
//!
//! A read of a page held by its home costs exactly `Request` + `Data`. A page held by
//! another node is transferred directly holder -> requester (3 hops:
//! `Request`, `Forward`, `Data`, then a `Done` off the critical path). A write to a shared
//! page first invalidates every other copy (acks collected at the home), then grants.
//!
//! Progress: every `Wake` starts a *hold* on the page; `Forward`/`Invalidate` orders for
//! a held page are deferred until the runtime calls [`Engine::release`] (once the woken
//! threads had a chance to retry), so a page cannot be taken away before the faulting
//! thread used it (no ping-pong livelock).
//!
//! Correctness relies on the transport being **FIFO per ordered pair of nodes** (as TCP
//! is); messages from different senders may interleave arbitrarily. A reply from the home
//! needs no `Done` because anything the home sends later to the same node arrives after
//! it; a reply from a third node does, and the directory stays busy until it arrives.
//! See `PROTOCOL.md` in the crate for diagrams and the checked invariants.
//!
//! # Example
//!
//! ```
//! use dsm_proto::{Access, Action, Engine, Interleaved, LocalAccess, Msg};
//!
//! // Two nodes, page 1 has its home on node 1.
//! let mut n0 = Engine::new(0, 2, 4, Box::new(Interleaved::new(2)));
//! let mut n1 = Engine::new(1, 2, 4, Box::new(Interleaved::new(2)));
//!
//! // Node 0 read-faults on page 1: one request to the home...
//! let a = n0.fault(1, Access::Read).unwrap();
//! let Action::Send { to: 1, msg, with_page: None } = a[0].clone() else { panic!() };
//! // ...which answers with the (never touched, hence zero) page.
//! let a = n1.receive(0, msg).unwrap();
//! let Action::Send { to: 0, msg, .. } = a[0].clone() else { panic!() };
//! let a = n0.receive(1, msg).unwrap();
//! assert!(matches!(a[0], Action::Install { page: 1, access: LocalAccess::Read, zero: true }));
//! assert_eq!(n0.local_access(1), LocalAccess::Read);
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod engine;
mod home;
pub mod model;

pub use engine::{Bug, Engine, Stats};
pub use home::{AllOnNode, Blocked, HomePolicy, Interleaved};

use serde::{Deserialize, Serialize};

/// Index of a node in the cluster, `0..nodes`.
pub type NodeId = u16;
/// Index of a 4 KiB guest page (guest physical address >> 12).
pub type PageId = u64;
/// Size of a page in bytes.
pub const PAGE_SIZE: usize = 4096;

/// The access a faulting thread wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Access {
    /// Read access (shared).
    Read,
    /// Write access (exclusive).
    Write,
}

/// The access a node has to its local copy of a page.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum LocalAccess {
    /// No copy (accesses fault).
    #[default]
    None,
    /// Read-only copy (writes fault).
    Read,
    /// Writable copy.
    Write,
}

impl From<Access> for LocalAccess {
    fn from(a: Access) -> Self {
        match a {
            Access::Read => LocalAccess::Read,
            Access::Write => LocalAccess::Write,
        }
    }
}

impl LocalAccess {
    /// Whether this access level allows `a`.
    pub fn allows(self, a: Access) -> bool {
        self >= LocalAccess::from(a)
    }
}

/// A DSM protocol message. Small and fixed size; page contents never travel inside a `Msg`
/// (they follow the header of a frame whose `Send` action had `with_page`). DSM only: IPIs
/// and I/O forwarding use other message kinds of the runtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Msg {
    /// Requester -> home: please give me `access` to `page`.
    Request {
        /// The page.
        page: PageId,
        /// Wanted access.
        access: Access,
    },
    /// Home -> current holder: send your copy to `requester`. With `access == Read` keep a
    /// read-only copy, with `access == Write` drop it.
    Forward {
        /// The page.
        page: PageId,
        /// Access the requester gets.
        access: Access,
        /// Who gets the data.
        requester: NodeId,
    },
    /// Home or holder -> requester: the page, to be mapped with `access`. Unless `zero`,
    /// the frame carries the 4 KiB contents.
    Data {
        /// The page.
        page: PageId,
        /// Access the requester gets.
        access: Access,
        /// The page was never written: install zeroes; the frame carries no contents.
        zero: bool,
    },
    /// Home -> requester that holds a read copy: all other copies are gone, make it writable.
    Grant {
        /// The page.
        page: PageId,
    },
    /// Home -> sharer: drop your read-only copy and acknowledge.
    Invalidate {
        /// The page.
        page: PageId,
    },
    /// Sharer -> home: copy dropped.
    InvalidateAck {
        /// The page.
        page: PageId,
    },
    /// Requester -> home: data that came from a node other than the home is installed; the
    /// home may serve the next request for this page.
    Done {
        /// The page.
        page: PageId,
    },
}

impl Msg {
    /// The page this message is about.
    pub fn page(&self) -> PageId {
        match *self {
            Msg::Request { page, .. }
            | Msg::Forward { page, .. }
            | Msg::Data { page, .. }
            | Msg::Grant { page }
            | Msg::Invalidate { page }
            | Msg::InvalidateAck { page }
            | Msg::Done { page } => page,
        }
    }

    /// Whether a frame carrying this message must also carry the page contents. The engine
    /// emits `with_page: Some(_)` exactly for these messages.
    pub fn carries_page(&self) -> bool {
        matches!(self, Msg::Data { zero: false, .. })
    }

    /// A short name, for logs and statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Request { .. } => "Request",
            Msg::Forward { .. } => "Forward",
            Msg::Data { .. } => "Data",
            Msg::Grant { .. } => "Grant",
            Msg::Invalidate { .. } => "Invalidate",
            Msg::InvalidateAck { .. } => "InvalidateAck",
            Msg::Done { .. } => "Done",
        }
    }
}

/// What the runtime must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send `msg` to peer `to`. If `with_page` is set, append this node's current copy of
    /// that page (4 KiB) to the frame; the engine has already made the copy read-only by an
    /// earlier `SetAccess`, so the copy is stable while it is taken.
    Send {
        /// Destination node (never this node).
        to: NodeId,
        /// The message.
        msg: Msg,
        /// Page whose contents to append.
        with_page: Option<PageId>,
    },
    /// Install the page contents that came with the message being processed (or zeroes if
    /// `zero`), mapped with `access`.
    Install {
        /// The page.
        page: PageId,
        /// Mapping access (never `None`).
        access: LocalAccess,
        /// Install a zero page instead of frame contents.
        zero: bool,
    },
    /// Change the access of the (existing) local copy: `None` = drop (zap) it,
    /// `Read` = write-protect, `Write` = make writable.
    SetAccess {
        /// The page.
        page: PageId,
        /// New access.
        access: LocalAccess,
    },
    /// Outstanding faults on this page can now be retried by the faulting threads.
    Wake {
        /// The page.
        page: PageId,
    },
}

/// An input the engine refused. The engine state is unchanged when `fault`/`receive`
/// return one of these for the input itself; the runtime should log it (it means a peer
/// misbehaves or a bug) and carry on. The model checker treats any of them as a bug.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Page index beyond the guest memory.
    #[error("page {page} out of range (guest has {pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: PageId,
        /// Number of pages.
        pages: u64,
    },
    /// Node index beyond the cluster, or the message came from this node itself.
    #[error("bad peer node {node} (cluster has {nodes} nodes, this is node {me})")]
    BadNode {
        /// The node.
        node: NodeId,
        /// Number of nodes.
        nodes: u16,
        /// This node.
        me: NodeId,
    },
    /// The home policy named a node outside the cluster.
    #[error("home policy maps page {page} to node {home}, cluster has {nodes} nodes")]
    BadHome {
        /// The page.
        page: PageId,
        /// The home the policy returned.
        home: NodeId,
        /// Number of nodes.
        nodes: u16,
    },
    /// A message that does not fit the current protocol state.
    #[error("unexpected {} from node {from} for page {}: {reason}", msg.kind(), msg.page())]
    Unexpected {
        /// Sender.
        from: NodeId,
        /// The message.
        msg: Msg,
        /// Why it does not fit.
        reason: &'static str,
    },
}
