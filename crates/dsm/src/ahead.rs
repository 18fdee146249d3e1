//! Adaptive read-ahead (and write-ahead): which pages to fetch before anyone faults on
//! them.
//!
//! A [`Streams`] table follows up to [`STREAMS`] ascending streams of remote faults of
//! one kind (reads, or writes). A fault that continues a stream (the next page of its
//! stride, or a page already asked for ahead: a thread that caught up with the
//! prefetch faults on a page in flight) doubles the stream's window, up to the
//! maximum, and asks for the pages up to `page + stride * window`. The second fault of
//! a new stream (a small positive stride from a stream's last fault) starts it with
//! [`INITIAL_WINDOW`]. Anything else replaces the least recently used stream: random
//! access fetches nothing ahead and costs a scan of four entries. Descending or
//! widely strided access never starts a stream.
//!
//! The table only chooses pages; the runtime asks the engine for them like faults that
//! no thread waits for (read copies for read streams, ownership for write streams), so
//! coherence is the protocol's as for any fault.

use dsm_proto::PageId;

/// Streams followed at once (e.g. a few threads each walking an array).
pub const STREAMS: usize = 4;
/// Window of a new stream, pages.
pub const INITIAL_WINDOW: u64 = 4;
/// The largest stride that starts a stream, pages.
pub const MAX_STRIDE: u64 = 8;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// Last fault of the stream.
    last: PageId,
    /// Pages between faults; 0 while the stream has seen one fault only.
    stride: u64,
    /// Current window, in strides.
    window: u64,
    /// The next page of the stream not asked for yet.
    ahead: PageId,
    /// When the stream was last used ([`Streams::clock`]); 0: empty slot.
    used: u64,
}

/// Up to [`STREAMS`] streams of remote faults of one kind (see the module docs).
#[derive(Debug)]
pub struct Streams {
    streams: [Stream; STREAMS],
    clock: u64,
    max_window: u64,
}

impl Streams {
    /// Follows streams with windows up to `max_window` pages (0: never fetch ahead).
    pub fn new(max_window: u64) -> Streams {
        Streams {
            streams: [Stream::default(); STREAMS],
            clock: 0,
            max_window,
        }
    }

    /// The largest window, pages (0: off).
    pub fn max_window(&self) -> u64 {
        self.max_window
    }

    /// A fault at `page` that went remote (or found the page in flight). Returns the
    /// pages to fetch ahead (ascending, all below `pages`, none asked for before by
    /// this stream).
    pub fn on_fault(&mut self, page: PageId, pages: PageId) -> Vec<PageId> {
        if self.max_window == 0 {
            return Vec::new();
        }
        self.clock += 1;
        let clock = self.clock;
        let max = self.max_window;
        // 1. A fault that continues a stream.
        if let Some(s) = self.streams.iter_mut().find(|s| {
            s.used != 0
                && s.stride != 0
                && page > s.last
                && page <= s.ahead
                && (page - s.last) % s.stride == 0
        }) {
            s.window = (s.window * 2).clamp(INITIAL_WINDOW.min(max), max);
            s.last = page;
            s.used = clock;
            return Self::extend(s, page, pages);
        }
        // 2. The second fault of a stream.
        if let Some(s) = self
            .streams
            .iter_mut()
            .find(|s| s.used != 0 && s.stride == 0 && page > s.last && page - s.last <= MAX_STRIDE)
        {
            s.stride = page - s.last;
            s.window = INITIAL_WINDOW.min(max);
            s.last = page;
            s.ahead = page + s.stride;
            s.used = clock;
            return Self::extend(s, page, pages);
        }
        // 3. Perhaps the first fault of a stream: replace the least recently used.
        if let Some(s) = self.streams.iter_mut().min_by_key(|s| s.used) {
            *s = Stream {
                last: page,
                stride: 0,
                window: 0,
                ahead: page + 1,
                used: clock,
            };
        }
        Vec::new()
    }

    /// Asks for the pages from `s.ahead` up to `page + stride * window` (below `pages`).
    fn extend(s: &mut Stream, page: PageId, pages: PageId) -> Vec<PageId> {
        let end = page
            .saturating_add(s.stride.saturating_mul(s.window))
            .min(pages.saturating_sub(1));
        let mut out = Vec::new();
        let mut q = s.ahead.max(page + s.stride);
        while q <= end {
            out.push(q);
            q += s.stride;
        }
        s.ahead = q;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_fetches_nothing() {
        let mut s = Streams::new(0);
        for p in 0..100 {
            assert!(s.on_fault(p, 1000).is_empty());
        }
    }

    #[test]
    fn a_sequential_stream_grows_its_window_to_the_maximum() {
        let mut s = Streams::new(64);
        assert!(s.on_fault(10, 1000).is_empty());
        // Second fault: the stream starts with the initial window.
        assert_eq!(s.on_fault(11, 1000), (12..=15).collect::<Vec<_>>());
        // The thread catches up with pages in flight: the window doubles each time.
        assert_eq!(s.on_fault(12, 1000), (16..=20).collect::<Vec<_>>());
        assert_eq!(s.on_fault(16, 1000), (21..=32).collect::<Vec<_>>());
        assert_eq!(s.on_fault(21, 1000), (33..=53).collect::<Vec<_>>());
        assert_eq!(s.on_fault(33, 1000), (54..=97).collect::<Vec<_>>());
        // Capped at 64.
        assert_eq!(s.on_fault(54, 1000), (98..=118).collect::<Vec<_>>());
        // Never past the region.
        let mut t = Streams::new(64);
        t.on_fault(995, 1000);
        assert_eq!(t.on_fault(996, 1000), vec![997, 998, 999]);
        assert!(t.on_fault(997, 1000).is_empty());
    }

    #[test]
    fn strided_streams_fetch_their_stride() {
        let mut s = Streams::new(16);
        s.on_fault(100, 1000);
        assert_eq!(s.on_fault(103, 1000), vec![106, 109, 112, 115]);
        assert_eq!(s.on_fault(106, 1000), vec![118, 121, 124, 127, 130]);
    }

    #[test]
    fn random_and_descending_access_fetch_nothing() {
        let mut s = Streams::new(64);
        let mut x: u64 = 12345;
        let mut fetched = 0;
        for _ in 0..10_000 {
            // xorshift: pages far apart.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            fetched += s.on_fault(x % 1_000_000, 1_000_000).len();
        }
        // A chance pair within 8 pages among 4 streams is rare; each costs <= 4 pages.
        assert!(fetched < 40, "{fetched}");
        let mut d = Streams::new(64);
        for p in (0..500).rev() {
            assert!(d.on_fault(p, 1000).is_empty());
        }
    }

    #[test]
    fn several_streams_at_once_and_the_oldest_is_replaced() {
        let mut s = Streams::new(8);
        for base in [0u64, 1000, 2000, 3000] {
            s.on_fault(base, 10_000);
        }
        for base in [0u64, 1000, 2000, 3000] {
            assert_eq!(s.on_fault(base + 1, 10_000).len(), 4, "{base}");
        }
        // A fifth stream replaces the least recently used one (base 0).
        s.on_fault(5000, 10_000);
        assert_eq!(s.on_fault(5001, 10_000).len(), 4);
        assert!(s.on_fault(2, 10_000).is_empty(), "stream 0 was replaced");
        assert!(
            !s.on_fault(3002, 10_000).is_empty(),
            "stream 3000 is followed"
        );
    }
}
