//! Status rendering: `/lb/status` (JSON) and `/lb/metrics` (Prometheus text).
//!
//! Owns: the shape of `/lb/status` ([`Status`] and the structs under it, serialised as they
//! are) and collecting the per-replica counters for the metrics renderer.
//! Must not touch: state. It reads the controller and the published snapshot.

use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::time::Instant;

use super::membership::Phase;
use super::Controller;
use crate::health::ProbeOutcome;
use crate::policy::{Hook, PolicySet};

#[derive(Serialize)]
struct Status<'a> {
    generation: u64,
    provider: &'static str,
    desired: usize,
    up: usize,
    ring: RingStatus,
    health: HealthStatus,
    replicas: Vec<ReplicaStatus<'a>>,
    config: ConfigStatus<'a>,
    policy: serde_json::Value,
    /// The TLS certificates and the last rejected certificate edit; null while TLS is off.
    tls: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct RingStatus {
    slots: u32,
    vnodes: u32,
    request_hash: crate::hashing::HashFunction,
    vnode_hash: crate::hashing::HashFunction,
    key: String,
    capacity: usize,
}

#[derive(Serialize)]
struct HealthStatus {
    interval_ms: u64,
    timeout_ms: u64,
    rise: u32,
    fall: u32,
    recovery_delay_ms: u64,
}

#[derive(Serialize)]
struct Responses {
    #[serde(rename = "1xx")]
    c1: u64,
    #[serde(rename = "2xx")]
    c2: u64,
    #[serde(rename = "3xx")]
    c3: u64,
    #[serde(rename = "4xx")]
    c4: u64,
    #[serde(rename = "5xx")]
    c5: u64,
}

#[derive(Serialize)]
struct ReplicaStatus<'a> {
    id: u32,
    name: &'a str,
    address: Option<String>,
    instance: Option<&'a str>,
    /// starting, up, suspect, down or draining.
    state: &'static str,
    in_ring: bool,
    requests: u64,
    responses: Responses,
    failures: u64,
    in_flight: i64,
    consecutive_failures: u32,
    restarts: u32,
    crash_streak: u32,
    next_restart_in_ms: Option<u64>,
    last_exit: Option<&'a str>,
    last_probe: Option<&'a ProbeOutcome>,
    slots: Vec<u32>,
}

#[derive(Serialize)]
struct ConfigStatus<'a> {
    last_error: Option<&'a str>,
    restart_needed: &'a [&'static str],
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Controller {
    pub(super) fn status(&self) -> serde_json::Value {
        let snap = self.shared.load();
        let now = Instant::now();
        let replicas = self
            .membership
            .all()
            .filter_map(|(id, entry)| {
                let r = self.replicas.get(&id)?;
                let s = &r.stats;
                let class = |i: usize| s.by_class[i].load(Ordering::Relaxed);
                let state = match entry.phase {
                    Phase::Joining(_) => "starting",
                    Phase::Leaving => "draining",
                    Phase::Member => r.tracker.state.name(),
                };
                Some(ReplicaStatus {
                    id: id.get(),
                    name: &entry.name,
                    address: r.instance.as_ref().map(|i| i.addr.to_string()),
                    instance: r.instance.as_ref().map(|i| i.instance_id.as_str()),
                    state,
                    in_ring: snap.upstream(id).is_some(),
                    requests: s.requests.load(Ordering::Relaxed),
                    responses: Responses {
                        c1: class(0),
                        c2: class(1),
                        c3: class(2),
                        c4: class(3),
                        c5: class(4),
                    },
                    failures: s.failures.load(Ordering::Relaxed),
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    consecutive_failures: r.tracker.consecutive_failures,
                    restarts: r.restarts,
                    crash_streak: r.crash_streak,
                    next_restart_in_ms: r
                        .next_restart
                        .map(|t| millis(t.saturating_duration_since(now))),
                    last_exit: r.last_exit.as_deref(),
                    last_probe: r.last_probe.as_ref(),
                    slots: self.placement.positions(id),
                })
            })
            .collect();
        let c = &self.config;
        let status = Status {
            generation: snap.generation,
            provider: self.provider.kind(),
            desired: self.membership.desired(),
            up: snap.ring.servers(),
            ring: RingStatus {
                slots: c.ring.slots,
                vnodes: c.ring.vnodes,
                request_hash: c.ring.request_hash,
                vnode_hash: c.ring.vnode_hash,
                key: c.hashing.key.to_string(),
                capacity: self.placement.capacity(),
            },
            health: HealthStatus {
                interval_ms: millis(c.health.interval),
                timeout_ms: millis(c.health.timeout),
                rise: c.health.rise,
                fall: c.health.fall,
                recovery_delay_ms: millis(c.health.recovery_delay),
            },
            replicas,
            config: ConfigStatus {
                last_error: self.errors.config.as_deref(),
                restart_needed: &self.errors.restart_needed,
            },
            policy: policy_status(&self.policy, self.errors.policy.as_deref()),
            tls: self
                .metrics
                .tls
                .load_full()
                .map(|r| r.status(std::time::SystemTime::now())),
        };
        serde_json::to_value(status)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    pub(super) fn render_metrics(&self) -> String {
        let stats: Vec<_> = self
            .membership
            .all()
            .filter_map(|(id, e)| Some((e.name.clone(), self.replicas.get(&id)?.stats.clone())))
            .collect();
        self.metrics.render(&self.shared.load(), &stats)
    }
}

fn policy_status(p: &PolicySet, load_error: Option<&str>) -> serde_json::Value {
    let stats = p.stats();
    let hooks: serde_json::Map<String, serde_json::Value> = Hook::ALL
        .iter()
        .map(|&h| {
            (
                h.name().to_owned(),
                serde_json::json!({"defined": p.has_hook(h), "calls": stats.calls(h), "errors": stats.errors(h)}),
            )
        })
        .collect();
    serde_json::json!({
        "generation": p.generation(),
        "files": p.files(),
        "hooks": hooks,
        "last_load_error": load_error,
        "last_hook_error": stats.last_error().map(|e| serde_json::json!({
            "hook": e.hook.name(),
            "message": e.message,
            "at": e.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        })),
    })
}
