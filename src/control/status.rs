//! Status rendering: `/lb/status` (JSON), what `/lb/metrics` reads ([`MetricsSources`]) and the
//! copy of the state a what-if simulation starts from.
//!
//! Owns: the shape of `/lb/status` ([`Status`] and the structs under it, serialised as they
//! are), collecting the per-replica counters for the metrics renderer, and [`Published`]: the
//! handles to state other parts own that both pages show.
//! Must not touch: state, or the metrics' text format ([`crate::exposition`], at the edge,
//! renders [`MetricsSources`]; the controller never formats a metric). It reads the controller,
//! the published snapshot and [`Published`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use super::membership::Phase;
use super::Controller;
use crate::health::ProbeOutcome;
use crate::metrics::Metrics;
use crate::policy::{Hook, PolicySet};
use crate::snapshot::{ReplicaStats, Snapshot};
use crate::spread::ThreadLoad;
use crate::tls::Tls;
use crate::watchdog::Watchdog;

/// State other parts own and publish, which `/lb/status` and `/lb/metrics` show: the TLS
/// certificates ([`Tls::report`]), each serving thread's open connections and the watchdog's
/// view of the serving threads. The gateway hands it over at start; each is absent where there
/// is none (TLS off; a controller without serving threads, as in tests).
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub tls: Option<Arc<Tls>>,
    pub thread_load: Option<Arc<ThreadLoad>>,
    pub watchdog: Option<Arc<Watchdog>>,
    /// The open tunnels and their counters.
    pub tunnels: Option<Arc<crate::tunnel::Tunnels>>,
}

/// What one scrape of `/lb/metrics` reads, taken together on the controller (which alone knows
/// every member, up or not) and rendered by [`crate::exposition`] on the serving thread, off
/// the controller's loop.
#[derive(Debug)]
pub struct MetricsSources {
    pub metrics: Arc<Metrics>,
    pub snapshot: Arc<Snapshot>,
    /// Every member's name and counters, in membership order.
    pub replicas: Vec<(String, Arc<ReplicaStats>)>,
    /// This gateway's name (the ring fingerprint's `gateway` label).
    pub gateway: String,
    /// Whether the engine holding the shared ring record answers; None without a shared ring.
    pub engine_reachable: Option<bool>,
    pub published: Published,
}

#[derive(Serialize)]
struct Status<'a> {
    version: &'static str,
    generation: u64,
    provider: &'static str,
    desired: usize,
    up: usize,
    ring: RingStatus,
    health: HealthStatus<'a>,
    replicas: Vec<ReplicaStatus<'a>>,
    /// What replicas run: the spec's generation (bumped by each spec edit and `POST /lb/roll`)
    /// and fingerprint.
    spec: SpecStatus,
    /// The last roll, while it runs and after (null before the first).
    roll: Option<super::roll::RollStatus<'a>>,
    config: ConfigStatus<'a>,
    policy: serde_json::Value,
    /// The engine that holds the shared ring record (`swarm`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<EngineStatus<'a>>,
    /// The autoscaler: its knobs, the N it asks for, its last decision and a history of N
    /// and in flight for the operator page's chart.
    autoscale: AutoscaleStatus<'a>,
    gateway: GatewayStatus<'a>,
    /// Upper bounds (µs) of the buckets in each replica's `latency.buckets` (one more bucket
    /// counts everything above the last).
    latency_bounds_us: &'static [u64],
    /// The TLS certificates and the last rejected certificate edit; null while TLS is off.
    tls: Option<serde_json::Value>,
    /// Each serving thread as the watchdog sees it (`serving` or `stalled`); null before the
    /// gateway serves.
    serving_threads: Option<serde_json::Value>,
    /// Open tunnels, and those closed by re-homing (by reason).
    tunnels: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct EngineStatus<'a> {
    reachable: bool,
    /// Since when (ms since the epoch) it is reachable or not.
    since_ms: Option<u64>,
    /// Why it is not, when it is not.
    detail: &'a str,
    /// Routing goes on with the last ring record seen while the engine does not answer.
    routing_on_last_known_ring: bool,
    /// The version of the ring record applied last.
    record_version: Option<u64>,
    /// A record entry this gateway could not place, if any.
    record_error: Option<&'a str>,
}

#[derive(Serialize)]
struct AutoscaleStatus<'a> {
    enabled: bool,
    min: u32,
    max: u32,
    target_in_flight: f64,
    stable_window_ms: u64,
    panic_window_ms: u64,
    scale_down_delay_ms: u64,
    max_step: u32,
    /// Scale to zero: the idle window (0: off) and the hold's bounds.
    idle_to_zero_ms: u64,
    hold_max: u32,
    hold_timeout_ms: u64,
    /// N was taken to zero and no replica serves yet: requests are held.
    scaled_to_zero: bool,
    /// Requests held now, held so far, and refused (past hold_max, past hold_timeout).
    held_now: u32,
    held_total: u64,
    hold_refused_full: u64,
    hold_refused_timeout: u64,
    /// How long held requests waited, in all (ms).
    hold_wait_ms_total: f64,
    /// N the autoscaler asks for (0 while it is off).
    desired: u64,
    /// The last decision that moved N, with the figures it was made from.
    last_decision: Option<&'a super::autoscale::Decision>,
    /// One point every [`HISTORY_STEP`] ticks over the last ten minutes, oldest first.
    history: Vec<HistoryPoint>,
    /// Shared ring (swarm) only: every gateway's proposal in the ring record, and the N the
    /// live ones agree on (the largest); absent under the local authority.
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<AgreementStatus>,
}

#[derive(Serialize)]
struct AgreementStatus {
    /// This gateway's name in the ring record.
    gateway: String,
    /// The largest live proposal (null when none is live).
    agreed: Option<u32>,
    /// How long a proposal counts after it was written.
    proposal_ttl_ms: u64,
    proposals: Vec<ProposalStatus>,
}

#[derive(Serialize)]
struct ProposalStatus {
    gateway: String,
    n: u32,
    age_ms: u64,
    /// Written within the TTL: it counts.
    live: bool,
    /// This gateway's own.
    mine: bool,
}

#[derive(Serialize)]
struct HistoryPoint {
    /// Seconds before now.
    ago_s: u64,
    n: u32,
    in_flight: u64,
}

/// Ticks between two points of the autoscaler's history in `/lb/status`.
const HISTORY_STEP: usize = 5;

/// The gateway's own counters (cumulative: a reader takes rates from two readings).
#[derive(Serialize)]
struct GatewayStatus<'a> {
    /// This gateway's name (as in its `Via` headers).
    name: &'a str,
    requests: u64,
    local_errors: u64,
    retries: u64,
    retries_over_budget: u64,
    connections_open: u64,
    ejections: u64,
    respawns: u64,
    config_reloads: u64,
    policy_reloads: u64,
    latency: LatencyStatus,
}

/// A latency histogram: the count, quantiles since start, and the bucket counts (not
/// cumulative; bounds in `latency_bounds_us`), so a reader can take quantiles of a window.
#[derive(Serialize)]
struct LatencyStatus {
    count: u64,
    sum_ms: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    buckets: Vec<u64>,
}

fn latency(h: &crate::latency::LatencyHistogram) -> LatencyStatus {
    let buckets = h.counts();
    let ms = |q| crate::latency::quantile(&buckets, q).map(|us| us / 1000.0);
    LatencyStatus {
        count: buckets.iter().sum(),
        sum_ms: h.sum().as_secs_f64() * 1000.0,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        buckets,
    }
}

#[derive(Serialize)]
struct RingStatus {
    /// FNV-1a over the owner table (hex): gateways that route every key alike show the same.
    fingerprint: String,
    slots: u32,
    vnodes: u32,
    request_hash: crate::hashing::HashFunction,
    vnode_hash: crate::hashing::HashFunction,
    key: String,
    capacity: usize,
    balance_factor: f64,
    /// The id of the replica each slot routes to now (`null`: no replica), slot by slot.
    owners: Vec<Option<u32>>,
}

#[derive(Serialize)]
struct HealthStatus<'a> {
    interval_ms: u64,
    timeout_ms: u64,
    rise: u32,
    fall: u32,
    recovery_delay_ms: u64,
    path: &'a str,
    expect_status: String,
    /// `http` or `grpc`.
    protocol: crate::config::HealthProtocol,
    grpc_service: &'a str,
    max_ejection_percent: u32,
    slow_start_ms: u64,
    eject_after_5xx: u32,
    eject_failure_percent: u32,
    eject_window_ms: u64,
    eject_time_ms: u64,
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
    /// starting, up, suspect, down or draining (readers should show any other state as it is).
    state: &'static str,
    in_ring: bool,
    requests: u64,
    responses: Responses,
    failures: u64,
    in_flight: i64,
    peak_in_flight: i64,
    /// Tunnels open to it (counted in `in_flight` too).
    tunnels: i64,
    consecutive_5xx: u64,
    consecutive_failures: u32,
    restarts: u32,
    crash_streak: u32,
    next_restart_in_ms: Option<u64>,
    last_exit: Option<&'a str>,
    last_probe: Option<&'a ProbeOutcome>,
    slots: Vec<u32>,
    /// Slow start: how far it has taken its keys over (0 to 1), while it ramps up.
    ramp_progress: Option<f64>,
    /// Outlier ejections in a row, and how long the current one still lasts.
    ejections: u32,
    ejected_for_ms: Option<u64>,
    /// Time to response headers of its requests.
    latency: LatencyStatus,
    /// The spec generation its instance runs (behind `spec.generation`: a roll will replace
    /// it).
    spec_generation: u64,
    /// Its replacement, while a roll replaces it.
    successor: Option<SuccessorStatus<'a>>,
}

#[derive(Serialize)]
struct SpecStatus {
    generation: u64,
    fingerprint: String,
}

/// A replica's replacement while a roll replaces it.
#[derive(Serialize)]
struct SuccessorStatus<'a> {
    address: Option<String>,
    instance: Option<&'a str>,
    /// starting (not yet `rise` good checks), then it takes the replica's place.
    state: &'static str,
    generation: u64,
    last_probe: Option<&'a ProbeOutcome>,
    started_ms_ago: u64,
}

#[derive(Serialize)]
struct ConfigStatus<'a> {
    /// Config edits applied since start (0: the config the gateway started with).
    generation: u64,
    last_error: Option<&'a str>,
    restart_needed: &'a [&'static str],
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Controller {
    fn autoscale_status(&self, now: Instant) -> AutoscaleStatus<'_> {
        let a = &self.config.autoscale;
        let m = &self.metrics;
        let points: Vec<_> = self.autoscaler.history().collect();
        // Sampled from the newest back, so the newest point is always shown.
        let mut history: Vec<HistoryPoint> = points
            .iter()
            .rev()
            .step_by(HISTORY_STEP)
            .map(|p| HistoryPoint {
                ago_s: now.saturating_duration_since(p.at).as_secs(),
                n: p.n,
                in_flight: p.in_flight,
            })
            .collect();
        history.reverse();
        AutoscaleStatus {
            enabled: a.enabled,
            min: a.min,
            max: a.max,
            target_in_flight: a.target_in_flight,
            stable_window_ms: millis(a.stable_window),
            panic_window_ms: millis(a.panic_window),
            scale_down_delay_ms: millis(a.scale_down_delay),
            max_step: a.max_step,
            idle_to_zero_ms: millis(a.idle_to_zero),
            hold_max: a.hold_max,
            hold_timeout_ms: millis(a.hold_timeout),
            scaled_to_zero: self.zeroed,
            held_now: self.holds.now(),
            held_total: m.autoscale_held.load(Ordering::Relaxed),
            hold_refused_full: m.autoscale_hold_full.load(Ordering::Relaxed),
            hold_refused_timeout: m.autoscale_hold_timeouts.load(Ordering::Relaxed),
            hold_wait_ms_total: m.autoscale_hold_wait.sum().as_secs_f64() * 1000.0,
            desired: self.metrics.autoscale_desired.load(Ordering::Relaxed),
            last_decision: self.autoscaler.last(),
            history,
            agreement: self.authority.shared().map(|s| {
                use super::agree;
                let now_ms = super::shared::unix_now_ms();
                let ttl = agree::PROPOSAL_TTL;
                AgreementStatus {
                    gateway: s.me.clone(),
                    agreed: agree::agreed(&s.proposals, now_ms, ttl),
                    proposal_ttl_ms: millis(ttl),
                    proposals: s
                        .proposals
                        .values()
                        .map(|p| ProposalStatus {
                            gateway: p.gateway.clone(),
                            n: p.n,
                            age_ms: now_ms.saturating_sub(p.at_ms),
                            live: agree::is_live(p, now_ms, ttl),
                            mine: p.gateway == s.me,
                        })
                        .collect(),
                }
            }),
        }
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let snap = self.shared.load();
        let now = Instant::now();
        let replicas = self
            .membership
            .all()
            .filter_map(|(id, entry)| {
                let r = self.replicas.get(&id)?;
                let s = &r.stats;
                let answers = s.answers();
                let class = |i: usize| answers[i];
                let state = match entry.phase {
                    Phase::Joining(_) => "starting",
                    Phase::Reserved => "reserved",
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
                    requests: answers.iter().sum(),
                    responses: Responses {
                        c1: class(0),
                        c2: class(1),
                        c3: class(2),
                        c4: class(3),
                        c5: class(4),
                    },
                    failures: s.failures.load(Ordering::Relaxed),
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    peak_in_flight: s.peak_in_flight.load(Ordering::Relaxed),
                    tunnels: s.tunnels.load(Ordering::Relaxed),
                    consecutive_5xx: s.consecutive_5xx.load(Ordering::Relaxed),
                    consecutive_failures: r.tracker.consecutive_failures,
                    restarts: r.restarts,
                    crash_streak: r.crash_streak,
                    next_restart_in_ms: r
                        .next_restart
                        .map(|t| millis(t.saturating_duration_since(now))),
                    last_exit: r.last_exit.as_deref(),
                    last_probe: r.last_probe.as_ref(),
                    slots: self.placement.positions(id),
                    ramp_progress: snap
                        .upstream(id)
                        .and_then(|u| u.ramp)
                        .map(|rp| rp.progress(now))
                        .filter(|p| *p < 1.0),
                    ejections: r.ejections,
                    ejected_for_ms: r
                        .ejected_until
                        .filter(|_| r.tracker.state == crate::health::HealthState::Ejected)
                        .map(|t| millis(t.saturating_duration_since(now))),
                    latency: latency(&s.latency),
                    spec_generation: r.spec_generation,
                    successor: r.successor.as_ref().map(|s| SuccessorStatus {
                        address: s.instance.as_ref().map(|i| i.addr.to_string()),
                        instance: s.instance.as_ref().map(|i| i.instance_id.as_str()),
                        state: s.tracker.state.name(),
                        generation: s.generation,
                        last_probe: s.last_probe.as_ref(),
                        started_ms_ago: millis(s.started.elapsed()),
                    }),
                })
            })
            .collect();
        let c = &self.config;
        let m = &self.metrics;
        let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let status = Status {
            version: env!("CARGO_PKG_VERSION"),
            generation: snap.generation,
            provider: self.provider.kind(),
            desired: self.membership.desired(),
            up: snap.ring.servers(),
            ring: RingStatus {
                fingerprint: format!("{:016x}", snap.ring.fingerprint()),
                slots: c.ring.slots,
                vnodes: c.ring.vnodes,
                request_hash: c.ring.request_hash,
                vnode_hash: c.ring.vnode_hash,
                key: c.hashing.key.to_string(),
                capacity: self.placement.capacity(),
                balance_factor: c.ring.balance_factor,
                owners: (0..snap.ring.slots())
                    .map(|slot| snap.ring.owner(slot).map(|id| id.get()))
                    .collect(),
            },
            health: HealthStatus {
                interval_ms: millis(c.health.interval),
                timeout_ms: millis(c.health.timeout),
                rise: c.health.rise,
                fall: c.health.fall,
                recovery_delay_ms: millis(c.health.recovery_delay),
                path: &c.health.path,
                expect_status: c.health.expect_status.to_string(),
                protocol: c.health.protocol,
                grpc_service: &c.health.grpc_service,
                max_ejection_percent: c.health.max_ejection_percent,
                slow_start_ms: millis(c.health.slow_start),
                eject_after_5xx: c.health.eject_after_5xx,
                eject_failure_percent: c.health.eject_failure_percent,
                eject_window_ms: millis(c.health.eject_window),
                eject_time_ms: millis(c.health.eject_time),
            },
            replicas,
            spec: SpecStatus {
                generation: self.spec_generation,
                fingerprint: self.app.fingerprint(),
            },
            roll: self.roll_status(),
            config: ConfigStatus {
                generation: count(&m.config_reloads),
                last_error: self.errors.config.as_deref(),
                restart_needed: &self.errors.restart_needed,
            },
            policy: policy_status(&self.policy, self.errors.policy.as_deref()),
            autoscale: self.autoscale_status(now),
            engine: self.authority.shared().map(|s| EngineStatus {
                reachable: s.engine.reachable,
                since_ms: s
                    .engine
                    .since
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok().map(millis)),
                detail: &s.engine.detail,
                routing_on_last_known_ring: !s.engine.reachable,
                record_version: s.version,
                record_error: self.errors.ring.as_deref(),
            }),
            gateway: GatewayStatus {
                name: &self.name,
                requests: m.requests.get(),
                local_errors: count(&m.local_errors),
                retries: count(&m.retries),
                retries_over_budget: count(&m.retries_over_budget),
                connections_open: count(&m.connections_open),
                ejections: count(&m.ejections),
                respawns: count(&m.respawns),
                config_reloads: count(&m.config_reloads),
                policy_reloads: count(&m.policy_reloads),
                latency: latency(&m.upstream_latency),
            },
            latency_bounds_us: &crate::latency::BOUNDS_US,
            tls: self
                .published
                .tls
                .as_ref()
                .map(|t| t.report().status(std::time::SystemTime::now())),
            serving_threads: self.published.watchdog.as_ref().map(|w| w.status()),
            tunnels: self.published.tunnels.as_ref().map(|t| t.status()),
        };
        serde_json::to_value(status)
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Clones of what a what-if simulation needs; the simulation runs elsewhere.
    pub(super) fn whatif_base(&self) -> crate::whatif::Base {
        let snap = self.shared.load();
        crate::whatif::Base {
            config: self.config.clone(),
            policy: self.policy.clone(),
            membership: self.membership.clone(),
            placement: self.placement.clone(),
            routable: self
                .placement
                .members()
                .iter()
                .copied()
                .filter(|&id| snap.upstream(id).is_some())
                .collect(),
            cannot_start: (!self.mode.starts_replicas()).then(|| self.provider.kind()),
            tunnels: self
                .published
                .tunnels
                .as_ref()
                .map(|t| t.placed())
                .unwrap_or_default(),
        }
    }

    /// What `/lb/metrics` reads, now: every member's counters (up or not: only the controller
    /// knows them all) beside the counters, the snapshot and what others publish.
    pub(super) fn metrics_sources(&self) -> MetricsSources {
        MetricsSources {
            metrics: self.metrics.clone(),
            snapshot: self.shared.load_full(),
            replicas: self
                .membership
                .all()
                .filter_map(|(id, e)| Some((e.name.clone(), self.replicas.get(&id)?.stats.clone())))
                .collect(),
            gateway: self.name.clone(),
            engine_reachable: self.authority.shared().map(|s| s.engine.reachable),
            published: self.published.clone(),
        }
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
