//! Wire encoding of [`Msg`]: a fixed 12-byte little-endian header.
//!
//! ```text
//! 0  u8   tag       1 Request, 2 Forward, 3 Data, 4 Grant, 5 Invalidate, 6 InvalidateAck, 7 Done
//! 1  u64  page
//! 9  u8   access    0 Read, 1 Write (Request, Forward, Data; else 0)
//! 10 u8   b0        Forward: requester low byte; Data: zero flag (0/1); else 0
//! 11 u8   b1        Forward: requester high byte; else 0
//! ```
//!
//! One more frame kind shares the channel: **abort** (tag `0xFF`, then the culprit node
//! as u16 LE, `0xFFFF` for none, then a UTF-8 reason of at most [`MAX_REASON`] bytes),
//! broadcast by a node whose DSM failed, so that every node names the root cause (the
//! node that was lost first) rather than the node that exited because of it.
//!
//! Hand-rolled (rather than a serde format) because it is tiny, fixed size and strictly
//! validated: any other length, tag, access or flag value is refused.

use dsm_proto::{Access, Msg};

/// Length of an encoded message.
pub const MSG_LEN: usize = 12;

/// Tag of an abort frame.
const ABORT_TAG: u8 = 0xFF;
/// Longest reason carried by an abort frame.
pub const MAX_REASON: usize = 256;

/// A decoded frame of the DSM channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message.
    Msg(Msg),
    /// The sender's DSM failed.
    Abort {
        /// The node the sender blames (the one it lost), if any.
        culprit: Option<u16>,
        /// The sender's description.
        reason: String,
    },
}

/// Encodes an abort frame (the reason is cut to [`MAX_REASON`] bytes).
pub fn encode_abort(culprit: Option<u16>, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut b = vec![ABORT_TAG];
    b.extend_from_slice(&culprit.unwrap_or(u16::MAX).to_le_bytes());
    b.extend_from_slice(&reason.as_bytes()[..cut]);
    b
}

/// Decodes any frame of the DSM channel.
pub fn decode_frame(b: &[u8]) -> Result<Frame, DecodeError> {
    if b.first() == Some(&ABORT_TAG) {
        if b.len() < 3 || b.len() > 3 + MAX_REASON {
            return Err(DecodeError::Length(b.len()));
        }
        let culprit = u16::from_le_bytes([b[1], b[2]]);
        return Ok(Frame::Abort {
            culprit: (culprit != u16::MAX).then_some(culprit),
            reason: String::from_utf8_lossy(&b[3..]).into_owned(),
        });
    }
    decode(b).map(Frame::Msg)
}

/// A header that is not a valid encoded [`Msg`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Wrong length.
    #[error("DSM message of {0} bytes (expected {MSG_LEN})")]
    Length(usize),
    /// Unknown tag.
    #[error("unknown DSM message tag {0}")]
    Tag(u8),
    /// A field holds a value that is not allowed.
    #[error("invalid field in DSM message: {0}")]
    Field(&'static str),
}

fn access_byte(a: Access) -> u8 {
    match a {
        Access::Read => 0,
        Access::Write => 1,
    }
}

/// Encodes `msg`.
pub fn encode(msg: &Msg) -> [u8; MSG_LEN] {
    let mut b = [0u8; MSG_LEN];
    let (tag, page) = match *msg {
        Msg::Request { page, access } => {
            b[9] = access_byte(access);
            (1, page)
        }
        Msg::Forward {
            page,
            access,
            requester,
        } => {
            b[9] = access_byte(access);
            b[10..12].copy_from_slice(&requester.to_le_bytes());
            (2, page)
        }
        Msg::Data { page, access, zero } => {
            b[9] = access_byte(access);
            b[10] = u8::from(zero);
            (3, page)
        }
        Msg::Grant { page } => (4, page),
        Msg::Invalidate { page } => (5, page),
        Msg::InvalidateAck { page } => (6, page),
        Msg::Done { page } => (7, page),
    };
    b[0] = tag;
    b[1..9].copy_from_slice(&page.to_le_bytes());
    b
}

/// Decodes a header produced by [`encode`].
pub fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
    let b: &[u8; MSG_LEN] = b.try_into().map_err(|_| DecodeError::Length(b.len()))?;
    let mut page = [0u8; 8];
    page.copy_from_slice(&b[1..9]);
    let page = u64::from_le_bytes(page);
    let access = || match b[9] {
        0 => Ok(Access::Read),
        1 => Ok(Access::Write),
        _ => Err(DecodeError::Field("access")),
    };
    let none = |from: usize| {
        if b[from..].iter().all(|&x| x == 0) {
            Ok(())
        } else {
            Err(DecodeError::Field("reserved bytes not zero"))
        }
    };
    Ok(match b[0] {
        1 => {
            none(10)?;
            Msg::Request {
                page,
                access: access()?,
            }
        }
        2 => Msg::Forward {
            page,
            access: access()?,
            requester: u16::from_le_bytes([b[10], b[11]]),
        },
        3 => {
            none(11)?;
            let zero = match b[10] {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Field("zero flag")),
            };
            Msg::Data {
                page,
                access: access()?,
                zero,
            }
        }
        4 => {
            none(9)?;
            Msg::Grant { page }
        }
        5 => {
            none(9)?;
            Msg::Invalidate { page }
        }
        6 => {
            none(9)?;
            Msg::InvalidateAck { page }
        }
        7 => {
            none(9)?;
            Msg::Done { page }
        }
        t => return Err(DecodeError::Tag(t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        let mut v = Vec::new();
        for page in [0, 1, 0x1234_5678_9abc, u64::MAX] {
            for access in [Access::Read, Access::Write] {
                v.push(Msg::Request { page, access });
                for requester in [0, 7, 0xfffe] {
                    v.push(Msg::Forward {
                        page,
                        access,
                        requester,
                    });
                }
                for zero in [false, true] {
                    v.push(Msg::Data { page, access, zero });
                }
            }
            v.push(Msg::Grant { page });
            v.push(Msg::Invalidate { page });
            v.push(Msg::InvalidateAck { page });
            v.push(Msg::Done { page });
        }
        v
    }

    #[test]
    fn round_trip() {
        for m in all() {
            let b = encode(&m);
            assert_eq!(decode(&b), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn abort_frames() {
        let b = encode_abort(Some(2), "node 2 lost");
        assert_eq!(
            decode_frame(&b),
            Ok(Frame::Abort {
                culprit: Some(2),
                reason: "node 2 lost".into()
            })
        );
        let long = "é".repeat(400);
        let b = encode_abort(None, &long);
        assert!(b.len() <= 3 + MAX_REASON);
        assert!(matches!(
            decode_frame(&b),
            Ok(Frame::Abort { culprit: None, .. })
        ));
        assert!(decode_frame(&[ABORT_TAG, 1]).is_err());
        let m = Msg::Done { page: 9 };
        assert_eq!(decode_frame(&encode(&m)), Ok(Frame::Msg(m)));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(decode(&[]), Err(DecodeError::Length(0)));
        assert_eq!(decode(&[1; 13]), Err(DecodeError::Length(13)));
        let mut b = encode(&Msg::Grant { page: 3 });
        b[0] = 0;
        assert_eq!(decode(&b), Err(DecodeError::Tag(0)));
        b[0] = 8;
        assert_eq!(decode(&b), Err(DecodeError::Tag(8)));
        let mut b = encode(&Msg::Request {
            page: 3,
            access: Access::Read,
        });
        b[9] = 2;
        assert!(matches!(decode(&b), Err(DecodeError::Field(_))));
        let mut b = encode(&Msg::Data {
            page: 3,
            access: Access::Read,
            zero: true,
        });
        b[10] = 2;
        assert!(matches!(decode(&b), Err(DecodeError::Field(_))));
        let mut b = encode(&Msg::Done { page: 3 });
        b[11] = 1;
        assert!(matches!(decode(&b), Err(DecodeError::Field(_))));
        // Every single-byte corruption either decodes to some valid message or is refused,
        // never panics.
        for m in all() {
            let b = encode(&m);
            for i in 0..MSG_LEN {
                for x in [0u8, 1, 2, 0x80, 0xff] {
                    let mut c = b;
                    c[i] = x;
                    let _ = decode(&c);
                }
            }
        }
    }
}
