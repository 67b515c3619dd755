//! Gateway-wide counters and the Prometheus text rendering of `/lb/metrics`.
//!
//! Owns: counters that are not per replica (retries, ejections, respawns, ring rebuilds, policy
//! errors) and the upstream latency histogram. All are atomics: the request path updates them
//! without a lock, which is why this is not a registry crate with label maps behind a lock.
//! Must not touch: decisions. Nothing reads a metric to decide anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::snapshot::Snapshot;

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Client responses the gateway produced itself (no replica answered): 502, 503, 504, 413…
    pub local_errors: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    pub respawns: AtomicU64,
    pub ring_rebuilds: AtomicU64,
    pub replicas_up: AtomicU64,
    pub replicas_desired: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
    pub policy_reloads: AtomicU64,
    pub policy_reload_errors: AtomicU64,
    pub upstream_latency: Histogram,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Metrics {
    /// Renders every metric in the Prometheus text format (version 0.0.4).
    pub fn render(
        &self,
        snap: &Snapshot,
        replicas: &[(String, std::sync::Arc<crate::snapshot::ReplicaStats>)],
    ) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "ringgate_retries_total",
            "Requests retried on the next server clockwise.",
            get(&self.retries),
        );
        counter(
            "ringgate_ejections_total",
            "Replicas taken out of the ring (failed checks, failed connects, exits).",
            get(&self.ejections),
        );
        counter(
            "ringgate_respawns_total",
            "Replacement replicas started.",
            get(&self.respawns),
        );
        counter(
            "ringgate_ring_rebuilds_total",
            "Owner tables built and published.",
            get(&self.ring_rebuilds),
        );
        counter("ringgate_local_errors_total", "Responses the gateway produced itself because no replica could answer (502, 503, 504, 413).", get(&self.local_errors));
        counter(
            "ringgate_config_reloads_total",
            "Config edits applied.",
            get(&self.config_reloads),
        );
        counter(
            "ringgate_config_reload_errors_total",
            "Config edits rejected.",
            get(&self.config_reload_errors),
        );
        counter(
            "ringgate_policy_reloads_total",
            "Policy sets loaded after an edit.",
            get(&self.policy_reloads),
        );
        counter(
            "ringgate_policy_reload_errors_total",
            "Policy edits rejected (the last good set stays).",
            get(&self.policy_reload_errors),
        );
        let stats = snap.policy.stats();
        let _ = writeln!(out, "# HELP ringgate_policy_hook_calls_total Lua hook calls.\n# TYPE ringgate_policy_hook_calls_total counter");
        for h in crate::policy::Hook::ALL {
            let _ = writeln!(
                out,
                "ringgate_policy_hook_calls_total{{hook=\"{}\"}} {}",
                h.name(),
                stats.calls(h)
            );
        }
        let _ = writeln!(out, "# HELP ringgate_policy_hook_errors_total Lua hook calls that failed and fell back to the default.\n# TYPE ringgate_policy_hook_errors_total counter");
        for h in crate::policy::Hook::ALL {
            let _ = writeln!(
                out,
                "ringgate_policy_hook_errors_total{{hook=\"{}\"}} {}",
                h.name(),
                stats.errors(h)
            );
        }
        let _ = writeln!(out, "# HELP ringgate_replicas_up Replicas in the ring.\n# TYPE ringgate_replicas_up gauge\nringgate_replicas_up {}", get(&self.replicas_up));
        let _ = writeln!(out, "# HELP ringgate_replicas_desired Replicas the gateway keeps (N).\n# TYPE ringgate_replicas_desired gauge\nringgate_replicas_desired {}", get(&self.replicas_desired));
        let _ = writeln!(out, "# HELP ringgate_ring_generation Generation of the published snapshot.\n# TYPE ringgate_ring_generation gauge\nringgate_ring_generation {}", snap.generation);

        let _ = writeln!(out, "# HELP ringgate_requests_total Responses from replicas, by replica and status class.\n# TYPE ringgate_requests_total counter");
        for (name, s) in replicas {
            for (i, c) in s.by_class.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "ringgate_requests_total{{replica=\"{name}\",class=\"{}xx\"}} {}",
                    i + 1,
                    get(c)
                );
            }
        }
        let _ = writeln!(out, "# HELP ringgate_upstream_failures_total Failed attempts to a replica (connect errors, resets, timeouts).\n# TYPE ringgate_upstream_failures_total counter");
        for (name, s) in replicas {
            let _ = writeln!(
                out,
                "ringgate_upstream_failures_total{{replica=\"{name}\"}} {}",
                get(&s.failures)
            );
        }
        let _ = writeln!(out, "# HELP ringgate_in_flight Requests in progress per replica.\n# TYPE ringgate_in_flight gauge");
        for (name, s) in replicas {
            let _ = writeln!(
                out,
                "ringgate_in_flight{{replica=\"{name}\"}} {}",
                s.in_flight.load(Ordering::Relaxed)
            );
        }

        let h = &self.upstream_latency;
        let _ = writeln!(out, "# HELP ringgate_upstream_latency_seconds Time from sending a request to a replica to its response headers.\n# TYPE ringgate_upstream_latency_seconds histogram");
        let mut cumulative = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            cumulative += get(c);
            let _ = writeln!(
                out,
                "ringgate_upstream_latency_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = get(&h.count);
        let _ = writeln!(
            out,
            "ringgate_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "ringgate_upstream_latency_seconds_sum {}",
            get(&h.sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "ringgate_upstream_latency_seconds_count {count}");
        out
    }
}
