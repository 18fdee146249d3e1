//! Error and loss-reason types.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::frame::{MAX_HEADER_LEN, PAGE_SIZE};

/// Errors of the transport API.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The [`MeshConfig`](crate::MeshConfig) is unusable.
    #[error("invalid mesh configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from `MeshConfig::addrs[me]`.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// Not every node joined before `connect_timeout`.
    #[error("timed out after {waited:?} waiting for {}", NodeList(.missing))]
    Timeout {
        /// The configured connect timeout.
        waited: Duration,
        /// Ids of the nodes without an authenticated connection, ascending.
        missing: Vec<u16>,
    },
    /// The destination is not another node of the mesh (out of range, or ourselves).
    #[error("node {0} is not a peer of this node")]
    NoSuchPeer(u16),
    /// The connection to the destination was lost; nothing more can be sent to it.
    #[error("node {node} is lost: {reason}")]
    PeerLost {
        /// The lost node.
        node: u16,
        /// Why it was declared lost.
        reason: LostReason,
    },
    /// The message header is longer than [`MAX_HEADER_LEN`].
    #[error("message header of {0} bytes exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLong(usize),
    /// A payload must be exactly one page.
    #[error("payload of {0} bytes is invalid (must be exactly {PAGE_SIZE} bytes)")]
    BadPayload(usize),
    /// Writing to the destination failed; the connection is now lost.
    #[error("sending to node {node} failed: {source}")]
    Io {
        /// The destination.
        node: u16,
        /// The underlying error.
        source: io::Error,
    },
    /// The mesh has been shut down.
    #[error("the mesh is shut down")]
    Shutdown,
    /// A transport thread could not be started.
    #[error("cannot spawn transport thread: {0}")]
    Spawn(io::Error),
}

/// Formats `[2, 3]` as `nodes 2, 3` and `[2]` as `node 2`.
struct NodeList<'a>(&'a [u16]);

impl fmt::Display for NodeList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.len() == 1 { "node " } else { "nodes " })?;
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// Why a peer was declared lost (carried by [`Event::PeerLost`](crate::Event::PeerLost)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    /// The peer closed the connection (EOF) without saying goodbye.
    #[error("connection closed by peer")]
    Closed,
    /// The peer shut its mesh down in an orderly way.
    #[error("peer shut down")]
    Goodbye,
    /// No frame (not even a heartbeat) arrived for this long.
    #[error("no frame received for {0:?} (peer silent)")]
    Timeout(Duration),
    /// Reading from the connection failed (e.g. connection reset).
    #[error("receive error: {0}")]
    Io(String),
    /// The peer sent something that is not a valid frame; the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Writing to the connection failed or timed out.
    #[error("send error: {0}")]
    SendFailed(String),
}
