//! Framed, versioned, authenticated full-mesh TCP transport between dvmm nodes.
//!
//! Every pair of the `N` nodes (ids `0..N`) shares exactly one TCP connection
//! (`TCP_NODELAY`). Node `i` listens on `addrs[i]`, **dials every lower id** (retrying
//! with backoff until `connect_timeout`) and **accepts every higher id**, so nodes may
//! start in any order and no pair ends up with two connections. The listener keeps
//! running for the lifetime of the [`Mesh`] and refuses (and logs) every late or
//! bogus connection.
//!
//! # Frame layout
//!
//! Every message on the wire is one frame: a fixed 16-byte little-endian header, the
//! message header (opaque bytes, typically postcard-encoded by the caller) and an
//! optional payload of exactly one 4 KiB page.
//!
//! ```text
//! offset size  field
//!      0    4  magic        b"DVMT" (u32 LE 0x544D5644)
//!      4    1  version      PROTOCOL_VERSION (1); must match exactly
//!      5    1  kind         0 data, 1 heartbeat, 2 goodbye,
//!                           16 hello, 17 challenge, 18 response, 19 welcome, 20 reject
//!      6    1  channel      caller's channel byte (data frames), else 0
//!      7    1  reserved     0
//!      8    4  header_len   u32 LE, <= MAX_HEADER_LEN (64 KiB)
//!     12    4  payload_len  u32 LE, 0 or PAGE_SIZE (4096)
//!     16    header_len bytes of message header
//!      …    payload_len bytes of page payload
//! ```
//!
//! A send writes the three parts with one vectored write (`writev`) straight from the
//! caller's buffers; [`Sender::send_batch`] writes many frames with one `writev` (up to
//! 256 frames per call), so a burst of requests or a run of pages costs a few system
//! calls. A reader thread reads its socket through a 256 KiB buffer (a burst arrives in
//! a few `recv`s), the page of each frame landing in a 4096-aligned [`PageBuf`] (usable
//! as the source of `UFFDIO_COPY`); `Event::Frame::more` tells the handler that the
//! peer's next frame on the same channel is received already. Any malformed frame (bad
//! magic, version, kind, reserved byte or length) closes that connection with a
//! `tracing::warn!` and an [`Event::PeerLost`]; nothing a peer sends can panic the node.
//!
//! # Handshake
//!
//! Handshake messages are frames too (channel 0, no payload). With `D` the dialer
//! (higher id), `A` the acceptor, `N` the cluster size, `nD`/`nA` fresh 32-byte random
//! nonces and `S` the shared cluster secret:
//!
//! ```text
//! D -> A  hello      D:u16 A:u16 N:u16 nD[32]
//! A -> D  challenge  A:u16 D:u16 nA[32] HMAC-SHA256(S, "…acceptor proof" ‖ ver ‖ N ‖ D ‖ A ‖ nD ‖ nA)
//! D -> A  response   HMAC-SHA256(S, "…dialer proof"   ‖ ver ‖ N ‖ D ‖ A ‖ nD ‖ nA)
//! A -> D  welcome    (empty)            — or reject "reason" at any step
//! ```
//!
//! Each side proves knowledge of the secret over both nonces and both ids, so neither
//! proof can be replayed or reflected. The acceptor refuses (logging the remote address
//! and the reason with `tracing::warn!`) wrong magic/version, garbage, a hello not
//! addressed to it, a cluster-size mismatch, an id out of range or not higher than its
//! own, a failed proof, and an id that is already connected. Handshakes of incoming
//! connections run on their own threads with a 5 s timeout, so a silent client cannot
//! stall the listener.
//!
//! # Liveness
//!
//! One reader thread per peer delivers events (through a channel, [`Mesh::events`], or
//! by calling a handler directly, [`MeshBuilder::handler`]). EOF or a reset is reported
//! at once as [`Event::PeerLost`]. One heartbeat thread per peer sends an empty
//! heartbeat frame when nothing was sent for `min(500 ms, peer_timeout / 4)`; a peer
//! from which no frame arrived for `peer_timeout` (default 3 s) is declared lost. After
//! loss (there is no reconnection), sends to it fail with
//! [`TransportError::PeerLost`].
//!
//! # Example
//!
//! ```
//! use std::net::TcpListener;
//! use transport::{Event, Mesh, MeshConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Two nodes in one process, on free loopback ports.
//! let l0 = TcpListener::bind("127.0.0.1:0")?;
//! let l1 = TcpListener::bind("127.0.0.1:0")?;
//! let addrs = vec![l0.local_addr()?, l1.local_addr()?];
//! let cfg1 = MeshConfig::new(1, addrs.clone(), b"secret".to_vec());
//! let t = std::thread::spawn(move || Mesh::builder(cfg1).listener(l1).establish());
//! let m0 = Mesh::builder(MeshConfig::new(0, addrs, b"secret".to_vec()))
//!     .listener(l0)
//!     .establish()?;
//! let m1 = t.join().expect("thread")?;
//!
//! let page = vec![7u8; transport::PAGE_SIZE];
//! m0.sender().send(1, 3, b"hdr", Some(&page))?;
//! match m1.events().recv()? {
//!     Event::Frame { from, channel, header, payload, .. } => {
//!         assert_eq!((from, channel, &header[..]), (0, 3, &b"hdr"[..]));
//!         assert!(payload.is_some_and(|p| p[..] == page[..]));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

/// The registry of transport channel numbers: every user of a [`Mesh`] picks its channel
/// byte here, so that no two protocols ever share a number by accident.
///
/// Channel 0 is the transport's own (handshake, heartbeat, goodbye).
pub mod channel {
    /// DSM coherence frames (`dsm`).
    pub const DSM: u8 = 1;
    /// Control messages between the nodes of a guest (`cluster::msg`).
    pub const CTRL: u8 = 2;
    /// Bench floor of the DSM test node (`testlab`): 4 KiB request/response.
    pub const LAB_FLOOR: u8 = 3;
    /// Barriers of the DSM test node (`testlab`).
    pub const LAB_CTL: u8 = 4;
}

mod error;
mod frame;
mod handshake;
mod mesh;
mod page;

pub use error::{LostReason, TransportError};
pub use frame::{FRAME_HEADER_LEN, MAGIC, MAX_HEADER_LEN, PAGE_SIZE, PROTOCOL_VERSION};
pub use mesh::{
    Event, Mesh, MeshBuilder, MeshConfig, Sender, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PEER_TIMEOUT,
    HEARTBEAT_INTERVAL,
};
pub use page::PageBuf;

#[cfg(test)]
mod tests;
