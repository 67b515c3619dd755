//! Latency histograms: the gateway-wide and per-replica upstream latency.
//!
//! Owns: [`LatencyHistogram`] (fixed buckets kept per serving thread, two relaxed atomic adds per
//! observation on the observing thread's own cache lines, no lock),
//! its quantiles (what the status page shows as p50/p99) and the coarse buckets `/lb/metrics`
//! exports ([`LatencyHistogram::exported`]; [`crate::exposition`] encodes them). The buckets
//! are finer than Prometheus needs so quantiles are worth reading; every bound of the coarse
//! [`PROMETHEUS_BOUNDS_US`] is also a fine bound, so the exported buckets are exact sums.
//! Must not touch: decisions. Nothing reads a latency to route a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::per_thread::PerThread;

/// Upper bounds of the fine buckets, in microseconds; one more bucket holds everything above.
pub const BOUNDS_US: [u64; 25] = [
    50, 100, 250, 500, 750, 1_000, 1_500, 2_500, 4_000, 5_000, 7_500, 10_000, 15_000, 25_000,
    40_000, 50_000, 75_000, 100_000, 150_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// The bounds `/lb/metrics` exports (a subset of [`BOUNDS_US`]), in microseconds.
pub const PROMETHEUS_BOUNDS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

const BUCKETS: usize = BOUNDS_US.len() + 1;

/// Counts of observations per fine bucket, and their sum, kept per serving thread
/// ([`PerThread`]: an observation touches only its thread's cache lines). The count is the sum
/// of the buckets, so an observation costs two relaxed adds.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    per_thread: PerThread<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    counts: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Buckets {
    #[inline]
    fn add(&self, bucket: usize, us: u64) {
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(us, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The bucket `us` falls in: the first whose bound is at least `us`.
#[inline]
fn bucket_of(us: u64) -> usize {
    BOUNDS_US.partition_point(|&b| b < us)
}

impl LatencyHistogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let us = micros(d);
        self.per_thread.local().add(bucket_of(us), us);
    }

    /// Observes `d` here and in `also` (the gateway-wide histogram), finding the bucket once.
    #[inline]
    pub fn observe_with(&self, also: &LatencyHistogram, d: Duration) {
        let us = micros(d);
        let i = bucket_of(us);
        self.per_thread.local().add(i, us);
        also.per_thread.local().add(i, us);
    }

    /// The bucket counts now (not cumulative), fine buckets then the overflow bucket.
    pub fn counts(&self) -> Vec<u64> {
        crate::per_thread::sum_each(self.per_thread.iter().map(|b| &b.counts)).to_vec()
    }

    /// Adds `counts` (as [`counts`](Self::counts) gives them) and `sum` to this thread's copy:
    /// a roll carries the histogram of a replica's old run over to its new one.
    pub fn add(&self, counts: &[u64], sum: Duration) {
        let local = self.per_thread.local();
        for (bucket, n) in local.counts.iter().zip(counts) {
            bucket.fetch_add(*n, Ordering::Relaxed);
        }
        local.sum_micros.fetch_add(micros(sum), Ordering::Relaxed);
    }

    pub fn sum(&self) -> Duration {
        let micros = self
            .per_thread
            .iter()
            .map(|b| b.sum_micros.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        Duration::from_micros(micros)
    }

    /// This histogram in the buckets `/lb/metrics` exports ([`PROMETHEUS_BOUNDS_US`], in
    /// seconds), each count that bucket's own (not cumulative: the encoder adds them up).
    pub fn exported(&self) -> Exported {
        let counts = self.counts();
        let mut fine = BOUNDS_US.iter().zip(&counts).peekable();
        let buckets = PROMETHEUS_BOUNDS_US
            .iter()
            .map(|&bound| {
                let mut n = 0;
                while let Some((_, c)) = fine.next_if(|(b, _)| **b <= bound) {
                    n += c;
                }
                (bound as f64 / 1e6, n)
            })
            .collect();
        Exported {
            buckets,
            count: counts.iter().sum(),
            sum_seconds: self.sum().as_secs_f64(),
        }
    }
}

/// A histogram as `/lb/metrics` exports it: `(upper bound in seconds, count)` per bucket (the
/// `+Inf` bucket is `count`), the number of observations and their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// The `q` quantile (0..=1) of bucket `counts` (as [`LatencyHistogram::counts`] gives them, or
/// the difference of two such readings), in microseconds, interpolated linearly inside the
/// bucket as Prometheus' `histogram_quantile` does; `None` without observations. The overflow
/// bucket answers with the largest bound.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let Some(&upper) = BOUNDS_US.get(i) else {
                return BOUNDS_US.last().map(|&b| b as f64);
            };
            let lower = if i == 0 { 0 } else { BOUNDS_US[i - 1] };
            let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lower as f64 + (upper - lower) as f64 * within);
        }
        below += c;
    }
    BOUNDS_US.last().map(|&b| b as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exported_bound_is_a_fine_bound() {
        for b in PROMETHEUS_BOUNDS_US {
            assert!(BOUNDS_US.contains(&b), "{b}");
        }
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn buckets_are_upper_inclusive() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(50), 0);
        assert_eq!(bucket_of(51), 1);
        assert_eq!(bucket_of(10_000_000), BOUNDS_US.len() - 1);
        assert_eq!(bucket_of(u64::MAX), BOUNDS_US.len());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(quantile(&h.counts(), 0.5), None);
        for _ in 0..99 {
            h.observe(Duration::from_micros(80)); // (50, 100]
        }
        h.observe(Duration::from_millis(30)); // (25 ms, 40 ms]
        let c = h.counts();
        let p50 = quantile(&c, 0.5).expect("observations");
        assert!((50.0..=100.0).contains(&p50), "{p50}");
        let p99 = quantile(&c, 0.99).expect("observations");
        assert!(p99 <= 100.0, "99 of 100 are under 100 µs: {p99}");
        let p100 = quantile(&c, 1.0).expect("observations");
        assert!((25_000.0..=40_000.0).contains(&p100), "{p100}");
        let slow = LatencyHistogram::default();
        slow.observe(Duration::from_secs(60));
        assert_eq!(quantile(&slow.counts(), 0.5), Some(10_000_000.0));
    }

    #[test]
    fn both_histograms_see_an_observation_and_export_the_coarse_buckets() {
        let (replica, all) = (LatencyHistogram::default(), LatencyHistogram::default());
        replica.observe_with(&all, Duration::from_micros(700));
        replica.observe_with(&all, Duration::from_millis(3));
        assert_eq!(replica.counts(), all.counts());
        let e = replica.exported();
        assert_eq!(e.buckets.len(), PROMETHEUS_BOUNDS_US.len());
        // 700 µs in (0.5 ms, 1 ms], 3 ms in (2.5 ms, 5 ms]; each bucket counts its own.
        assert_eq!(
            &e.buckets[..4],
            &[(0.0005, 0), (0.001, 1), (0.0025, 0), (0.005, 1)]
        );
        assert!(e.buckets[4..].iter().all(|&(_, n)| n == 0), "{e:?}");
        assert_eq!((e.count, e.sum_seconds), (2, 0.0037));
        // The text lines these become are tested in `crate::exposition`.
    }
}
