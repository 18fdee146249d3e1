//! Run-time counters of a [`Dsm`](crate::Dsm).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::hist::Histogram;

/// Kind of a fault, for the latency histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// Read fault on a page without a local copy.
    Read,
    /// Write fault on a page without a local copy.
    Write,
    /// Write fault on a read-only copy.
    Upgrade,
}

/// A snapshot of a node's DSM counters ([`Dsm::stats`](crate::Dsm::stats)).
///
/// Fault counters count fault *events* handed to the protocol engine (a thread that
/// faults, is woken and faults again counts twice). Latencies are from reading the fault
/// event off the userfaultfd to waking the faulting threads, for faults that had to wait
/// for a message (local zero fills and spurious faults are counted, not timed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DsmStats {
    /// This node.
    pub node: u16,
    /// Read faults.
    pub read_faults: u64,
    /// Write faults on pages without a local copy.
    pub write_faults: u64,
    /// Write faults on read-only copies.
    pub upgrade_faults: u64,
    /// Faults merged into an outstanding request for the same page.
    pub merged_faults: u64,
    /// Faults that found the access already present (answered with a wake only).
    pub spurious_faults: u64,
    /// First touches of never-written pages at their home (zero fill, no message).
    pub zero_fills: u64,
    /// DSM messages sent.
    pub messages_sent: u64,
    /// DSM messages received (valid frames only).
    pub messages_received: u64,
    /// Bytes of DSM frames sent (message headers + page payloads, without the
    /// transport's 16-byte frame header).
    pub bytes_out: u64,
    /// Bytes of DSM frames received (as `bytes_out`).
    pub bytes_in: u64,
    /// Pages (4 KiB payloads) sent.
    pub pages_sent: u64,
    /// Pages received.
    pub pages_received: u64,
    /// `Data` messages for never-written pages (no payload) sent.
    pub zero_pages_sent: u64,
    /// Invalidations sent by this node's directory (remote sharers plus own copy).
    pub invalidations_sent: u64,
    /// Invalidations received (copies dropped for a remote home).
    pub invalidations_received: u64,
    /// 3-hop forwards sent by this node's directory.
    pub forwards_sent: u64,
    /// Requests served by this node's directory.
    pub requests_served: u64,
    /// Requests that waited in the directory queue.
    pub requests_queued: u64,
    /// Frames on the DSM channel that did not decode (logged and ignored).
    pub bad_frames: u64,
    /// Messages the protocol engine refused (logged and ignored).
    pub protocol_errors: u64,
    /// Pages requested by read-ahead (also counted in `read_faults`).
    pub prefetches: u64,
    /// Pages whose ownership write-ahead requested (also counted in `write_faults`).
    #[serde(default)]
    pub write_prefetches: u64,
    /// Fault-to-wake latency of read faults.
    pub read_latency: Histogram,
    /// Fault-to-wake latency of write faults.
    pub write_latency: Histogram,
    /// Fault-to-wake latency of upgrade faults.
    pub upgrade_latency: Histogram,
    /// The pages with the most fault events (page number, events), most first: where
    /// the workload bounces pages between nodes.
    #[serde(default)]
    pub hot_pages: Vec<(u64, u64)>,
}

impl std::fmt::Display for DsmStats {
    /// One line: the counters that matter to an operator, latencies as p50/p99 in µs,
    /// and the hottest pages as guest-physical addresses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "faults read={} write={} upgrade={} merged={} zero_fill={} \
             msgs out={} in={} bytes out={} in={} pages out={} in={} inval out={} in={} \
             fwd={} queued={} bad_frames={} errors={}",
            self.read_faults,
            self.write_faults,
            self.upgrade_faults,
            self.merged_faults,
            self.zero_fills,
            self.messages_sent,
            self.messages_received,
            self.bytes_out,
            self.bytes_in,
            self.pages_sent,
            self.pages_received,
            self.invalidations_sent,
            self.invalidations_received,
            self.forwards_sent,
            self.requests_queued,
            self.bad_frames,
            self.protocol_errors,
        )?;
        for (name, h) in [
            ("read", &self.read_latency),
            ("write", &self.write_latency),
            ("upgrade", &self.upgrade_latency),
        ] {
            if h.count() > 0 {
                write!(f, " {name}_us p50={:.0} p99={:.0}", h.p50_us(), h.p99_us())?;
            }
        }
        if !self.hot_pages.is_empty() {
            write!(f, " hot")?;
            for (page, n) in &self.hot_pages {
                write!(f, " {:#x}:{n}", page * 4096)?;
            }
        }
        Ok(())
    }
}

impl DsmStats {
    /// The latency histogram of `kind`.
    pub fn latency(&self, kind: FaultKind) -> &Histogram {
        match kind {
            FaultKind::Read => &self.read_latency,
            FaultKind::Write => &self.write_latency,
            FaultKind::Upgrade => &self.upgrade_latency,
        }
    }

    /// Median fault-to-wake latency of `kind`, in µs.
    pub fn p50_us(&self, kind: FaultKind) -> f64 {
        self.latency(kind).p50_us()
    }

    /// 99th percentile fault-to-wake latency of `kind`, in µs.
    pub fn p99_us(&self, kind: FaultKind) -> f64 {
        self.latency(kind).p99_us()
    }
}

/// Counters kept by the runtime itself (the engine keeps the protocol ones).
#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub pages_received: AtomicU64,
    pub bad_frames: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub prefetches: AtomicU64,
    pub write_prefetches: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
