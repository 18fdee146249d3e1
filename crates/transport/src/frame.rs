//! Wire framing: the fixed 16-byte frame header, vectored frame writes and frame reads
//! straight into caller-visible buffers.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::page::PageBuf;

/// Frame magic, the bytes `"DVMT"` (little-endian `u32` 0x544D_5644).
pub const MAGIC: u32 = u32::from_le_bytes(*b"DVMT");
/// Version of the wire protocol (frame layout + handshake). Peers must match exactly.
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of the fixed frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest message header (the opaque caller bytes) a frame may carry.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Size of a page payload. A frame carries either no payload or exactly one page.
pub const PAGE_SIZE: usize = 4096;

/// Longest reason text in a handshake `Reject` frame.
pub(crate) const MAX_REJECT_LEN: usize = 256;

/// The kind byte of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Caller data: channel byte, message header, optional page.
    Data = 0,
    /// Keep-alive, sent when a connection has been idle.
    Heartbeat = 1,
    /// Orderly close announced by the sender.
    Goodbye = 2,
    /// Handshake step 1 (dialer -> acceptor).
    Hello = 16,
    /// Handshake step 2 (acceptor -> dialer).
    Challenge = 17,
    /// Handshake step 3 (dialer -> acceptor).
    Response = 18,
    /// Handshake step 4, success (acceptor -> dialer).
    Welcome = 19,
    /// Handshake refused, with a short UTF-8 reason (acceptor -> dialer).
    Reject = 20,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Data,
            1 => Kind::Heartbeat,
            2 => Kind::Goodbye,
            16 => Kind::Hello,
            17 => Kind::Challenge,
            18 => Kind::Response,
            19 => Kind::Welcome,
            20 => Kind::Reject,
            _ => return None,
        })
    }
}

/// A malformed frame header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FrameError {
    #[error("bad magic {0:#010x} (not a dvmm transport peer)")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("reserved header byte is {0:#04x}, expected 0")]
    Reserved(u8),
    #[error("message header length {0} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLong(u32),
    #[error("payload length {0} is invalid (must be 0 or {PAGE_SIZE})")]
    BadPayloadLen(u32),
}

/// The decoded fixed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub kind: Kind,
    pub channel: u8,
    pub header_len: u32,
    pub payload_len: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = PROTOCOL_VERSION;
        b[5] = self.kind as u8;
        b[6] = self.channel;
        b[7] = 0;
        b[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self, FrameError> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = word(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(FrameError::BadKind(b[5]))?;
        if b[7] != 0 {
            return Err(FrameError::Reserved(b[7]));
        }
        let header_len = word(8);
        if header_len as usize > MAX_HEADER_LEN {
            return Err(FrameError::HeaderTooLong(header_len));
        }
        let payload_len = word(12);
        if payload_len != 0 && payload_len as usize != PAGE_SIZE {
            return Err(FrameError::BadPayloadLen(payload_len));
        }
        Ok(FrameHeader {
            kind,
            channel: b[6],
            header_len,
            payload_len,
        })
    }
}

/// Writes one frame with vectored writes (one `writev` in the common case): the
/// 16-byte frame header, `header` and `payload` go straight from their buffers to the
/// socket. The caller has checked `header.len() <= MAX_HEADER_LEN` and
/// `payload.len()` is 0 or [`PAGE_SIZE`].
pub(crate) fn write_frame<W: Write>(
    w: &mut W,
    kind: Kind,
    channel: u8,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    write_frames(w, kind, channel, &[(header, payload)])
}

/// Most frames one `writev` carries (3 slices each, under the kernel's `IOV_MAX` of
/// 1024); longer batches take several calls.
pub(crate) const FRAMES_PER_WRITE: usize = 256;

/// Writes several frames of one kind and channel back to back, with as few vectored
/// writes as the kernel allows (one per [`FRAMES_PER_WRITE`] frames in the common
/// case), every part straight from the caller's buffers. Same preconditions as
/// [`write_frame`] for each `(header, payload)`.
pub(crate) fn write_frames<W: Write>(
    w: &mut W,
    kind: Kind,
    channel: u8,
    frames: &[(&[u8], &[u8])],
) -> io::Result<()> {
    for chunk in frames.chunks(FRAMES_PER_WRITE) {
        let heads: Vec<[u8; FRAME_HEADER_LEN]> = chunk
            .iter()
            .map(|(header, payload)| {
                FrameHeader {
                    kind,
                    channel,
                    // Lengths are bounded by the callers (<= 64 KiB), so they fit in u32.
                    header_len: header.len() as u32,
                    payload_len: payload.len() as u32,
                }
                .encode()
            })
            .collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(3 * chunk.len());
        for (fh, (header, payload)) in heads.iter().zip(chunk) {
            slices.push(IoSlice::new(fh));
            if !header.is_empty() {
                slices.push(IoSlice::new(header));
            }
            if !payload.is_empty() {
                slices.push(IoSlice::new(payload));
            }
        }
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "connection accepted no more bytes",
                    ))
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Whether `buf` (bytes already received, not yet parsed) starts with a whole data
/// frame on `channel`: the reader then knows that frame will be delivered next.
pub(crate) fn next_is_whole_data(buf: &[u8], channel: u8) -> bool {
    let Some(fh) = buf
        .get(..FRAME_HEADER_LEN)
        .and_then(|b| <&[u8; FRAME_HEADER_LEN]>::try_from(b).ok())
    else {
        return false;
    };
    match FrameHeader::decode(fh) {
        Ok(h) => {
            h.kind == Kind::Data
                && h.channel == channel
                && buf.len() - FRAME_HEADER_LEN >= h.header_len as usize + h.payload_len as usize
        }
        Err(_) => false,
    }
}

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    /// I/O error (including a read timeout and EOF in the middle of a frame).
    Io(io::Error),
    /// The bytes are not a valid frame.
    Frame(FrameError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// One received frame.
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub kind: Kind,
    pub channel: u8,
    pub header: Vec<u8>,
    pub payload: Option<PageBuf>,
}

/// Reads exactly `bufs` (vectored), retrying on partial reads.
fn read_exact_vectored<R: Read>(r: &mut R, mut bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame",
                ))
            }
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame: the fixed header, then message header and payload with one
/// vectored read, the payload landing directly in a fresh [`PageBuf`].
pub(crate) fn read_frame<R: Read>(r: &mut R) -> Result<RawFrame, ReadError> {
    let mut fh = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        match r.read(&mut fh[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Eof),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a frame header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let h = FrameHeader::decode(&fh).map_err(ReadError::Frame)?;
    let mut header = vec![0u8; h.header_len as usize];
    let mut payload = (h.payload_len != 0).then(PageBuf::recycled);
    {
        let mut slices = [IoSliceMut::new(&mut header), IoSliceMut::new(&mut [])];
        if let Some(page) = payload.as_mut() {
            slices[1] = IoSliceMut::new(page.as_mut_slice());
        }
        read_exact_vectored(r, &mut slices)?;
    }
    Ok(RawFrame {
        kind: h.kind,
        channel: h.channel,
        header,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(kind: Kind, hl: u32, pl: u32) -> [u8; FRAME_HEADER_LEN] {
        FrameHeader {
            kind,
            channel: 5,
            header_len: hl,
            payload_len: pl,
        }
        .encode()
    }

    #[test]
    fn frame_header_roundtrip_and_malformed_rejected() {
        let b = hdr(Kind::Data, 12, 4096);
        assert_eq!(&b[0..4], b"DVMT");
        let h = FrameHeader::decode(&b);
        assert_eq!(
            h,
            Ok(FrameHeader {
                kind: Kind::Data,
                channel: 5,
                header_len: 12,
                payload_len: 4096
            })
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&bad),
            Err(FrameError::BadMagic(_))
        ));
        let mut bad = b;
        bad[4] = 99;
        assert_eq!(FrameHeader::decode(&bad), Err(FrameError::BadVersion(99)));
        let mut bad = b;
        bad[5] = 200;
        assert_eq!(FrameHeader::decode(&bad), Err(FrameError::BadKind(200)));
        let mut bad = b;
        bad[7] = 1;
        assert_eq!(FrameHeader::decode(&bad), Err(FrameError::Reserved(1)));
        assert_eq!(
            FrameHeader::decode(&hdr(Kind::Data, u32::MAX, 0)),
            Err(FrameError::HeaderTooLong(u32::MAX))
        );
        assert_eq!(
            FrameHeader::decode(&hdr(Kind::Data, 0, 4095)),
            Err(FrameError::BadPayloadLen(4095))
        );
    }

    #[test]
    fn a_batch_reads_back_as_its_frames() {
        let mut wire = Vec::new();
        let pages: Vec<[u8; PAGE_SIZE]> = (0..300u32).map(|i| [i as u8; PAGE_SIZE]).collect();
        let heads: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let frames: Vec<(&[u8], &[u8])> = heads
            .iter()
            .zip(&pages)
            .enumerate()
            .map(|(i, (h, p))| (&h[..], if i % 3 == 0 { &[][..] } else { &p[..] }))
            .collect();
        write_frames(&mut wire, Kind::Data, 7, &frames).unwrap();
        let mut r = std::io::BufReader::with_capacity(1000, &wire[..]);
        for (i, h) in heads.iter().enumerate() {
            let f = read_frame(&mut r).unwrap();
            assert_eq!((f.kind, f.channel, &f.header), (Kind::Data, 7, h));
            match f.payload {
                None => assert_eq!(i % 3, 0),
                Some(p) => assert!(i % 3 != 0 && p.iter().all(|&b| b == i as u8)),
            }
        }
        assert!(matches!(read_frame(&mut r), Err(ReadError::Eof)));
    }

    #[test]
    fn sees_a_whole_next_frame_on_the_same_channel_only() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Data, 1, b"abc", &[0u8; PAGE_SIZE]).unwrap();
        assert!(next_is_whole_data(&wire, 1));
        assert!(!next_is_whole_data(&wire, 2));
        assert!(!next_is_whole_data(&wire[..wire.len() - 1], 1));
        assert!(!next_is_whole_data(&wire[..10], 1));
        assert!(!next_is_whole_data(&[], 1));
        let mut hb = Vec::new();
        write_frame(&mut hb, Kind::Heartbeat, 0, &[], &[]).unwrap();
        assert!(!next_is_whole_data(&hb, 0));
        assert!(!next_is_whole_data(&[0xffu8; 64], 1));
    }

    #[test]
    fn write_then_read_frame() {
        let mut wire = Vec::new();
        let page = [0xabu8; PAGE_SIZE];
        write_frame(&mut wire, Kind::Data, 3, b"hello", &page).unwrap();
        write_frame(&mut wire, Kind::Heartbeat, 0, &[], &[]).unwrap();
        assert_eq!(wire.len(), 2 * FRAME_HEADER_LEN + 5 + PAGE_SIZE);
        let mut r = &wire[..];
        let f = read_frame(&mut r).unwrap();
        assert_eq!(
            (f.kind, f.channel, &f.header[..]),
            (Kind::Data, 3, &b"hello"[..])
        );
        assert!(f.payload.is_some_and(|p| p.iter().all(|&b| b == 0xab)));
        let f = read_frame(&mut r).unwrap();
        assert_eq!(f.kind, Kind::Heartbeat);
        assert!(matches!(read_frame(&mut r), Err(ReadError::Eof)));
        // Truncated frame: EOF in the middle is an I/O error, not a clean EOF.
        let mut r = &wire[..FRAME_HEADER_LEN + 3];
        assert!(matches!(read_frame(&mut r), Err(ReadError::Io(_))));
    }
}
