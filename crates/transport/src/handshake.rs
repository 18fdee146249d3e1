//! Mutual challenge-response authentication (HMAC-SHA256 over both nonces and ids).

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::frame::{self, FrameError, Kind, ReadError, MAX_REJECT_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Length of a nonce and of a MAC.
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Hello body: dialer id, acceptor id, cluster size, dialer nonce.
const HELLO_LEN: usize = 2 + 2 + 2 + NONCE_LEN;
/// Challenge body: acceptor id, dialer id, acceptor nonce, acceptor MAC.
const CHALLENGE_LEN: usize = 2 + 2 + NONCE_LEN + MAC_LEN;
/// Response body: dialer MAC.
const RESPONSE_LEN: usize = MAC_LEN;

const LABEL_ACCEPTOR: &[u8] = b"dvmm-transport v1 acceptor proof";
const LABEL_DIALER: &[u8] = b"dvmm-transport v1 dialer proof";
/// Reason sent in a Reject frame when a proof does not verify.
const AUTH_FAILED: &str = "authentication failed";

/// Node identity and cluster secret used by a handshake.
pub(crate) struct Params<'a> {
    pub me: u16,
    pub nodes: u16,
    pub secret: &'a [u8],
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed during handshake")]
    Closed,
    #[error("malformed frame during handshake: {0}")]
    Frame(#[from] FrameError),
    #[error("unexpected {got:?} frame (expected {expected:?}) of {len} header bytes")]
    Unexpected {
        expected: Kind,
        got: Kind,
        len: usize,
    },
    #[error("{0}")]
    BadHello(String),
    #[error("authentication failed (wrong cluster secret?)")]
    Auth,
    #[error("refused by the peer: {0}")]
    Rejected(String),
}

impl From<ReadError> for HandshakeError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Eof => HandshakeError::Closed,
            ReadError::Io(e) => HandshakeError::Io(e),
            ReadError::Frame(e) => HandshakeError::Frame(e),
        }
    }
}

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn mac(
    p: &Params<'_>,
    label: &[u8],
    dialer: u16,
    acceptor: u16,
    nonce_d: &[u8],
    nonce_a: &[u8],
) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it. Fall back to
    // an unkeyed-looking but still deterministic key instead of panicking regardless.
    let mut m = match HmacSha256::new_from_slice(p.secret) {
        Ok(m) => m,
        Err(_) => <HmacSha256 as Mac>::new(&Default::default()),
    };
    m.update(label);
    m.update(&[frame::PROTOCOL_VERSION]);
    m.update(&p.nodes.to_le_bytes());
    m.update(&dialer.to_le_bytes());
    m.update(&acceptor.to_le_bytes());
    m.update(nonce_d);
    m.update(nonce_a);
    m
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Reads a handshake frame of kind `expected` with exactly `len` header bytes.
/// A `Reject` frame is turned into [`HandshakeError::Rejected`].
fn expect<R: Read>(r: &mut R, expected: Kind, len: usize) -> Result<Vec<u8>, HandshakeError> {
    let f = frame::read_frame(r)?;
    if f.kind == Kind::Reject && f.header.len() <= MAX_REJECT_LEN && f.payload.is_none() {
        return Err(HandshakeError::Rejected(
            String::from_utf8_lossy(&f.header).into_owned(),
        ));
    }
    if f.kind != expected || f.header.len() != len || f.payload.is_some() {
        return Err(HandshakeError::Unexpected {
            expected,
            got: f.kind,
            len: f.header.len(),
        });
    }
    Ok(f.header)
}

/// Dialer side: authenticates to node `target` and authenticates it. On success the
/// stream is ready for data frames.
pub(crate) fn dial<S: Read + Write>(
    s: &mut S,
    p: &Params<'_>,
    target: u16,
) -> Result<(), HandshakeError> {
    let nonce_d = nonce();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&p.me.to_le_bytes());
    hello.extend_from_slice(&target.to_le_bytes());
    hello.extend_from_slice(&p.nodes.to_le_bytes());
    hello.extend_from_slice(&nonce_d);
    frame::write_frame(s, Kind::Hello, 0, &hello, &[])?;

    let ch = expect(s, Kind::Challenge, CHALLENGE_LEN)?;
    let (acceptor, dialer) = (u16_at(&ch, 0), u16_at(&ch, 2));
    if acceptor != target || dialer != p.me {
        return Err(HandshakeError::BadHello(format!(
            "challenge names acceptor {acceptor} / dialer {dialer}, expected {target} / {}",
            p.me
        )));
    }
    let nonce_a = &ch[4..4 + NONCE_LEN];
    let mac_a = &ch[4 + NONCE_LEN..];
    if mac(p, LABEL_ACCEPTOR, p.me, target, &nonce_d, nonce_a)
        .verify_slice(mac_a)
        .is_err()
    {
        reject(s, AUTH_FAILED);
        return Err(HandshakeError::Auth);
    }

    let mac_d = mac(p, LABEL_DIALER, p.me, target, &nonce_d, nonce_a)
        .finalize()
        .into_bytes();
    frame::write_frame(s, Kind::Response, 0, &mac_d, &[])?;
    expect(s, Kind::Welcome, 0)?;
    Ok(())
}

/// Acceptor side, up to and including verification of the dialer's proof. Returns the
/// authenticated dialer id; the caller then sends [`welcome`] or [`reject`].
pub(crate) fn accept<S: Read + Write>(s: &mut S, p: &Params<'_>) -> Result<u16, HandshakeError> {
    let hello = expect(s, Kind::Hello, HELLO_LEN)?;
    let (dialer, acceptor, nodes) = (u16_at(&hello, 0), u16_at(&hello, 2), u16_at(&hello, 4));
    let nonce_d = &hello[6..];
    let problem = if acceptor != p.me {
        Some(format!(
            "hello is addressed to node {acceptor}, this is node {}",
            p.me
        ))
    } else if nodes != p.nodes {
        Some(format!(
            "cluster size mismatch: peer has {nodes} nodes, this node {}",
            p.nodes
        ))
    } else if dialer >= p.nodes {
        Some(format!(
            "node id {dialer} out of range (cluster of {} nodes)",
            p.nodes
        ))
    } else if dialer <= p.me {
        Some(format!(
            "node {dialer} must not dial node {} (higher ids dial lower ids)",
            p.me
        ))
    } else {
        None
    };
    if let Some(reason) = problem {
        reject(s, &reason);
        return Err(HandshakeError::BadHello(reason));
    }

    let nonce_a = nonce();
    let mac_a = mac(p, LABEL_ACCEPTOR, dialer, p.me, nonce_d, &nonce_a)
        .finalize()
        .into_bytes();
    let mut ch = Vec::with_capacity(CHALLENGE_LEN);
    ch.extend_from_slice(&p.me.to_le_bytes());
    ch.extend_from_slice(&dialer.to_le_bytes());
    ch.extend_from_slice(&nonce_a);
    ch.extend_from_slice(&mac_a);
    frame::write_frame(s, Kind::Challenge, 0, &ch, &[])?;

    let mac_d = match expect(s, Kind::Response, RESPONSE_LEN) {
        // The dialer found our proof invalid: the secrets differ.
        Err(HandshakeError::Rejected(r)) if r == AUTH_FAILED => return Err(HandshakeError::Auth),
        other => other?,
    };
    if mac(p, LABEL_DIALER, dialer, p.me, nonce_d, &nonce_a)
        .verify_slice(&mac_d)
        .is_err()
    {
        reject(s, AUTH_FAILED);
        return Err(HandshakeError::Auth);
    }
    Ok(dialer)
}

/// Completes a successful acceptor handshake.
pub(crate) fn welcome<W: Write>(s: &mut W) -> io::Result<()> {
    frame::write_frame(s, Kind::Welcome, 0, &[], &[])
}

/// Refuses a connection with a reason (best effort; errors are ignored because the
/// connection is being dropped anyway).
pub(crate) fn reject<W: Write>(s: &mut W, reason: &str) {
    let mut end = reason.len().min(MAX_REJECT_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let _ = frame::write_frame(s, Kind::Reject, 0, &reason.as_bytes()[..end], &[]);
}
