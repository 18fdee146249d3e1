//! A small log-linear latency histogram (16 buckets per power of two, ~6 % resolution).

use serde::{Deserialize, Serialize};
use std::time::Duration;

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Number of buckets needed for every `u64` value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A histogram of durations, recorded in nanoseconds.
///
/// Values below 16 ns have their own bucket; above, every power of two is split into
/// 16 equal buckets, so a reported percentile is within ~6 % of the true value.
/// Serialised sparsely (only non-empty buckets) together with count, min, max, mean,
/// p50 and p99 for readability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "HistogramRepr", try_from = "HistogramRepr")]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let m = (v >> (e - SUB_BITS)) & (SUB - 1);
    ((e - SUB_BITS + 1) as usize) * SUB as usize + m as usize
}

/// Lowest and highest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    if i < SUB as usize {
        return (i as u64, i as u64);
    }
    let e = (i / SUB as usize) as u32 + SUB_BITS - 1;
    let m = (i % SUB as usize) as u64;
    let lo = (SUB | m) << (e - SUB_BITS);
    let width = 1u64 << (e - SUB_BITS);
    (lo, lo.saturating_add(width - 1))
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds all values of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1) in nanoseconds: the midpoint of the bucket that
    /// holds it, clamped to the observed min/max. 0 if empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        // Rank of the wanted value, 1-based.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bounds(i);
                return (lo / 2 + hi / 2).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// Median in microseconds.
    pub fn p50_us(&self) -> f64 {
        self.quantile_ns(0.5) as f64 / 1000.0
    }

    /// 99th percentile in microseconds.
    pub fn p99_us(&self) -> f64 {
        self.quantile_ns(0.99) as f64 / 1000.0
    }

    /// Mean in microseconds (0 if empty).
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64 / 1000.0
        }
    }

    /// Smallest value in microseconds (0 if empty).
    pub fn min_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.min_ns as f64 / 1000.0
        }
    }

    /// Largest value in microseconds.
    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }
}

/// Serialised form of [`Histogram`].
#[derive(Serialize, Deserialize)]
struct HistogramRepr {
    count: u64,
    min_ns: u64,
    max_ns: u64,
    sum_ns: u128,
    p50_us: f64,
    p99_us: f64,
    /// `[bucket index, count]` of the non-empty buckets.
    buckets: Vec<(u32, u64)>,
}

impl From<Histogram> for HistogramRepr {
    fn from(h: Histogram) -> Self {
        HistogramRepr {
            count: h.count,
            min_ns: if h.count == 0 { 0 } else { h.min_ns },
            max_ns: h.max_ns,
            sum_ns: h.sum_ns,
            p50_us: h.p50_us(),
            p99_us: h.p99_us(),
            buckets: h
                .counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as u32, c))
                .collect(),
        }
    }
}

/// A serialized histogram that does not fit this build's buckets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("histogram bucket {0} out of range")]
pub struct BucketOutOfRange(pub u32);

impl TryFrom<HistogramRepr> for Histogram {
    type Error = BucketOutOfRange;
    fn try_from(r: HistogramRepr) -> Result<Self, BucketOutOfRange> {
        let mut h = Histogram::new();
        for (i, c) in r.buckets {
            let slot = h.counts.get_mut(i as usize).ok_or(BucketOutOfRange(i))?;
            *slot = c;
        }
        h.count = r.count;
        h.sum_ns = r.sum_ns;
        h.min_ns = if r.count == 0 { u64::MAX } else { r.min_ns };
        h.max_ns = r.max_ns;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last, "index not monotonic at {v}");
            last = i;
            let (lo, hi) = bounds(i);
            assert!(lo <= v && v <= hi, "{v} not in bucket {i} = [{lo}, {hi}]");
        }
        // Bucket widths stay within ~1/16 of the value.
        for v in [100u64, 1_000, 54_321, 10_000_000, 1 << 40] {
            let (lo, hi) = bounds(index(v));
            assert!((hi - lo) as f64 <= v as f64 / 15.0, "{v}: [{lo}, {hi}]");
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile_ns(0.5), 0);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 100);
        let p50 = h.p50_us();
        let p99 = h.p99_us();
        assert!((47.0..=53.0).contains(&p50), "{p50}");
        assert!((93.0..=100.0).contains(&p99), "{p99}");
        assert!((h.mean_us() - 50.5).abs() < 0.01);
        assert_eq!(h.min_us(), 1.0);
        assert_eq!(h.max_us(), 100.0);
        // A single value is reported exactly (clamped to min/max).
        let mut one = Histogram::new();
        one.record_ns(12_345);
        assert_eq!(one.quantile_ns(0.5), 12_345);
        assert_eq!(one.quantile_ns(0.99), 12_345);
    }

    #[test]
    fn merge_and_serde_round_trip() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in [5u64, 500, 5_000, 50_000] {
            a.record_ns(v);
            b.record_ns(v * 3);
        }
        a.merge(&b);
        assert_eq!(a.count(), 8);
        let json = serde_json::to_string(&a).expect("serialize");
        assert!(json.contains("\"p50_us\""));
        let back: Histogram = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, a);
        let empty: Histogram =
            serde_json::from_str(&serde_json::to_string(&Histogram::new()).expect("ser"))
                .expect("de");
        assert_eq!(empty, Histogram::new());
    }
}
