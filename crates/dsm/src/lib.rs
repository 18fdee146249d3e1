//! The dvmm DSM runtime: guest memory kept coherent across node processes in user space.
//!
//! Each node process maps its guest RAM once ([`Region`]: anonymous, private,
//! `MAP_NORESERVE`) and registers it with userfaultfd for MISSING and write-protect
//! faults. The coherence protocol is the pure state machine of `dsm_proto`; this crate
//! drives it ([`Dsm`]): page faults of local threads (or of KVM on behalf of vCPUs) and
//! frames from peers go into the engine, and its actions are executed on the mapping
//! and on the `transport` mesh:
//!
//! | action | effect on the mapping / wire |
//! |---|---|
//! | `Send{to, msg, with_page}` | one frame on [`DSM_CHANNEL`]: 12-byte header ([`wire`]) + the page read straight from the mapping |
//! | `Install{Write, zero}` | `UFFDIO_ZEROPAGE` |
//! | `Install{Read, zero}` | `UFFDIO_COPY` of a zero buffer with `UFFDIO_COPY_MODE_WP` |
//! | `Install{access, !zero}` | `UFFDIO_COPY` from the received 4 KiB buffer (`MODE_WP` when Read) |
//! | `SetAccess{None}` | `madvise(MADV_DONTNEED)`: the next touch is a MISSING fault |
//! | `SetAccess{Read}` / `{Write}` | `UFFDIO_WRITEPROTECT` on / off |
//! | `Wake` | `UFFDIO_WAKE` (folded into the install when it follows one), then `release` after the hold time |
//!
//! See `README.md` in the crate for threads, the fault path, failure handling and
//! benchmark figures.
//!
//! # Example
//!
//! Two nodes in one process (needs root for userfaultfd, so not run as a doc test):
//!
//! ```no_run
//! use std::net::TcpListener;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use dsm::{connect, DsmOptions, Region};
//! use dsm_proto::AllOnNode;
//! use transport::MeshConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let l0 = TcpListener::bind("127.0.0.1:0")?;
//! let l1 = TcpListener::bind("127.0.0.1:0")?;
//! let addrs = vec![l0.local_addr()?, l1.local_addr()?];
//! let a1 = addrs.clone();
//! let t = std::thread::spawn(move || {
//!     connect(MeshConfig::new(1, a1, b"secret".to_vec()), Some(l1), Region::new(16)?,
//!             Box::new(AllOnNode(0)), DsmOptions::default(), |_| {})
//! });
//! let (_mesh0, dsm0) = connect(MeshConfig::new(0, addrs, b"secret".to_vec()), Some(l0),
//!     Region::new(16)?, Box::new(AllOnNode(0)), DsmOptions::default(), |_| {})?;
//! let (_mesh1, dsm1) = t.join().expect("thread")?;
//! // SAFETY (example): the region is mapped, 8-aligned and outlives the references.
//! let c0 = unsafe { &*(dsm0.region().as_ptr() as *const AtomicU64) };
//! let c1 = unsafe { &*(dsm1.region().as_ptr() as *const AtomicU64) };
//! c0.fetch_add(1, Ordering::SeqCst); // page 0 is materialised at its home, node 0
//! c1.fetch_add(1, Ordering::SeqCst); // node 1 takes ownership over the network
//! assert_eq!(c0.load(Ordering::SeqCst), 2); // and node 0 reads it back
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod ahead;
mod hist;
mod region;
mod runtime;
mod stats;
pub mod uffd;
pub mod wire;

use std::io;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};

use dsm_proto::{HomePolicy, NodeId};
use transport::{Event, LostReason, Mesh, MeshConfig, PageBuf, TransportError};

pub use hist::Histogram;
pub use region::Region;
pub use runtime::{
    Dsm, DsmFailure, DsmOptions, DEFAULT_HOLD, DEFAULT_READAHEAD, DEFAULT_WRITEAHEAD,
};
pub use stats::{DsmStats, FaultKind};

/// The transport channel byte of DSM protocol frames ([`transport::channel::DSM`]).
pub const DSM_CHANNEL: u8 = transport::channel::DSM;

/// Errors of the DSM runtime.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// Bad parameters.
    #[error("invalid DSM configuration: {0}")]
    Config(String),
    /// The guest-RAM mapping could not be created.
    #[error("cannot map the DSM region: {0}")]
    Mmap(io::Error),
    /// userfaultfd is unavailable or an ioctl failed.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    /// A runtime thread could not be started.
    #[error("cannot start a DSM thread: {0}")]
    Spawn(io::Error),
    /// The mesh could not be established.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The DSM failed at run time (peer lost, ...).
    #[error("{0}")]
    Failed(DsmFailure),
}

/// Something that arrived before the [`Dsm`] was attached to its [`DsmSlot`].
enum Early {
    Frame {
        from: NodeId,
        header: Vec<u8>,
        payload: Option<PageBuf>,
    },
    Lost {
        node: NodeId,
        reason: LostReason,
    },
}

/// Late binding of a [`Dsm`] inside a transport handler.
///
/// The mesh handler must exist before the mesh is established, but the `Dsm` needs the
/// mesh's `Sender`, and peers may send DSM frames as soon as their own mesh is up. A
/// slot queues DSM events until [`DsmSlot::attach`] and then delivers them in order.
/// In a handler: `if let Some(ev) = slot.route(ev) { /* other channels */ }`.
#[derive(Default)]
pub struct DsmSlot {
    dsm: OnceLock<Arc<Dsm>>,
    early: Mutex<Vec<Early>>,
}

impl DsmSlot {
    /// An empty slot.
    pub fn new() -> Arc<DsmSlot> {
        Arc::new(DsmSlot::default())
    }

    /// The attached DSM, if any.
    pub fn get(&self) -> Option<&Arc<Dsm>> {
        self.dsm.get()
    }

    /// Attaches `dsm` and delivers what was queued, in arrival order.
    pub fn attach(&self, dsm: Arc<Dsm>) {
        let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
        for ev in early.drain(..) {
            match ev {
                Early::Frame {
                    from,
                    header,
                    payload,
                } => dsm.on_frame_in_burst(from, header, payload, false),
                Early::Lost { node, reason } => dsm.on_peer_lost(node, &reason),
            }
        }
        let _ = self.dsm.set(dsm);
    }

    fn deliver(&self, ev: Early) {
        let run = |d: &Arc<Dsm>, ev: Early| match ev {
            Early::Frame {
                from,
                header,
                payload,
            } => d.on_frame_in_burst(from, header, payload, false),
            Early::Lost { node, reason } => d.on_peer_lost(node, &reason),
        };
        if let Some(d) = self.dsm.get() {
            return run(d, ev);
        }
        let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
        match self.dsm.get() {
            Some(d) => {
                drop(early);
                run(d, ev)
            }
            None => early.push(ev),
        }
    }

    /// Routes a transport event: frames on [`DSM_CHANNEL`] go to the DSM (and are
    /// consumed); `PeerLost` goes to the DSM *and* is returned; anything else is returned
    /// for the caller's own channels.
    pub fn route(&self, ev: Event) -> Option<Event> {
        match ev {
            Event::Frame {
                from,
                channel: DSM_CHANNEL,
                header,
                payload,
                more,
            } => {
                if let Some(d) = self.dsm.get() {
                    d.on_frame_in_burst(from, header, payload, more);
                } else {
                    self.deliver(Early::Frame {
                        from,
                        header,
                        payload,
                    });
                }
                None
            }
            Event::PeerLost { node, reason } => {
                self.deliver(Early::Lost {
                    node,
                    reason: reason.clone(),
                });
                Some(Event::PeerLost { node, reason })
            }
            other => Some(other),
        }
    }
}

/// Establishes the mesh (`cfg`, optionally on a pre-bound `listener`) with a handler
/// that routes [`DSM_CHANNEL`] to a new [`Dsm`] over `region`, and every other event
/// (other channels, and `PeerLost` after the DSM has seen it) to `other`.
pub fn connect(
    cfg: MeshConfig,
    listener: Option<TcpListener>,
    region: Region,
    homes: Box<dyn HomePolicy + Send>,
    opts: DsmOptions,
    other: impl Fn(Event) + Send + Sync + 'static,
) -> Result<(Mesh, Arc<Dsm>), DsmError> {
    let me = cfg.me;
    let nodes = u16::try_from(cfg.addrs.len())
        .map_err(|_| DsmError::Config(format!("{} nodes", cfg.addrs.len())))?;
    let slot = DsmSlot::new();
    let s = slot.clone();
    let mut b = Mesh::builder(cfg).handler(move |ev| {
        if let Some(ev) = s.route(ev) {
            other(ev);
        }
    });
    if let Some(l) = listener {
        b = b.listener(l);
    }
    let mesh = b.establish()?;
    let dsm = Dsm::with_options(me, nodes, region, homes, mesh.sender(), opts)?;
    slot.attach(dsm.clone());
    Ok((mesh, dsm))
}
