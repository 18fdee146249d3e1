//! A run of guest buffers seen as one byte stream: the readable or the writable part of
//! a descriptor chain, which the driver may split anywhere.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// A run of guest buffers seen as one byte stream (the readable or the writable part of a
/// chain). Every buffer was checked to lie in guest memory.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    bufs: Vec<(GuestAddress, u32)>,
    /// The number of bytes in the stream.
    pub len: u64,
}

impl Stream {
    /// Appends a buffer (one already checked to lie in guest memory).
    pub fn push(&mut self, addr: GuestAddress, len: u32) {
        if len > 0 {
            self.bufs.push((addr, len));
            self.len += u64::from(len);
        }
    }

    /// Calls `f(guest address, start in the caller's buffer, length)` for the pieces of
    /// the stream's bytes `[offset, offset + len)`; false if one call fails or the stream
    /// is shorter.
    fn pieces(
        &self,
        mut offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> bool {
        let mut done = 0usize;
        for &(addr, buf_len) in &self.bufs {
            if done == len {
                break;
            }
            let buf_len = u64::from(buf_len);
            if offset >= buf_len {
                offset -= buf_len;
                continue;
            }
            let avail = buf_len - offset;
            let n = usize::try_from(avail).map_or(len - done, |a| a.min(len - done));
            let Some(at) = addr.checked_add(offset) else {
                return false;
            };
            if !f(at, done, n) {
                return false;
            }
            done += n;
            offset = 0;
        }
        done == len
    }

    /// Copies the stream's bytes from `offset` into `dst`.
    pub fn read(&self, mem: &GuestMemoryMmap, offset: u64, dst: &mut [u8]) -> bool {
        let len = dst.len();
        self.pieces(offset, len, |at, start, n| {
            dst.get_mut(start..start + n)
                .is_some_and(|d| mem.read_slice(d, at).is_ok())
        })
    }

    /// Copies `src` into the stream's bytes from `offset`.
    pub fn write(&self, mem: &GuestMemoryMmap, offset: u64, src: &[u8]) -> bool {
        self.pieces(offset, src.len(), |at, start, n| {
            src.get(start..start + n)
                .is_some_and(|s| mem.write_slice(s, at).is_ok())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_pieces_cross_buffers() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut s = Stream::default();
        s.push(GuestAddress(0x1000), 3);
        s.push(GuestAddress(0x2000), 0);
        s.push(GuestAddress(0x3000), 5);
        assert_eq!(s.len, 8);
        assert!(s.write(&mem, 1, &[1, 2, 3, 4]));
        let mut out = [0u8; 8];
        assert!(s.read(&mem, 0, &mut out));
        assert_eq!(out, [0, 1, 2, 3, 4, 0, 0, 0]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3001)).unwrap(), 4);
        // Past the end of the stream.
        assert!(!s.write(&mem, 6, &[9, 9, 9]));
        let mut big = [0u8; 9];
        assert!(!s.read(&mem, 0, &mut big));
    }
}
