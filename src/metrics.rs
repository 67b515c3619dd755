//! Gateway-wide counters.
//!
//! Owns: counters that are not per replica (requests, retries, ejections, respawns, ring
//! rebuilds, policy errors, access log lines, TLS handshakes…), the few gauges kept as counts
//! (connections and requests open now, replicas up and desired) and the gateway-wide upstream
//! latency histogram (its buckets are [`crate::latency`]'s). All are atomics or per-thread
//! counters: the request path updates them without a lock.
//! Must not touch: state other parts publish (the TLS report is [`crate::tls::Tls`]'s, the
//! serving threads' load and watchdog are [`crate::spread`]'s and [`crate::watchdog`]'s), how
//! the counters are shown ([`crate::exposition`] renders `/lb/metrics`) or decisions: nothing
//! reads a metric to decide anything. It imports only the counter types, so every module can
//! import it without closing a circle.

use std::sync::atomic::AtomicU64;

use crate::latency::LatencyHistogram;
use crate::per_thread::Counter;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests the gateway answered (proxied and its own endpoints).
    pub requests: Counter,
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
    pub upstream_latency: LatencyHistogram,
    /// Client connections open now.
    pub connections_open: AtomicU64,
    /// New connections closed at once because `proxy.max_connections` were open.
    pub connections_refused_max: AtomicU64,
    /// New connections closed at once because their address had `max_connections_per_ip`.
    pub connections_refused_per_ip: AtomicU64,
    /// Proxied requests in flight now (from admission to the response's last byte).
    pub requests_in_flight: AtomicU64,
    /// Requests refused because `proxy.max_requests` were in flight.
    pub requests_refused_max: AtomicU64,
    /// Requests refused because their address had `proxy.max_requests_per_ip` in flight.
    pub requests_refused_per_ip: AtomicU64,
    /// Requests refused because their replica had `proxy.max_requests_per_replica` in flight
    /// and no place came free within `proxy.queue_timeout` (or its queue was full).
    pub requests_refused_replica: AtomicU64,
    /// Connect timeouts while the gateway was short of descriptors: not counted against the
    /// replica (the gateway may be the cause).
    pub connect_timeouts_inconclusive: AtomicU64,
    /// Connections closed because they sent no complete first request in time.
    pub first_bytes_timeouts: AtomicU64,
    /// HTTP/2 connections closed for having no stream for `proxy.idle_timeout`.
    pub idle_closes: AtomicU64,
    /// HTTP/1 connections closed for no whole request head within `proxy.header_read_timeout`
    /// after the first request (idle keep-alive, or a slow head).
    pub header_timeouts: AtomicU64,
    /// Client connections closed because the client took no bytes for `proxy.send_timeout`.
    pub send_timeouts: AtomicU64,
    /// HTTP/1 request heads refused before any replica saw them, by reason.
    pub heads_refused_too_large: AtomicU64,
    pub heads_refused_malformed: AtomicU64,
    pub heads_refused_framing: AtomicU64,
    /// Accepts that failed (out of file descriptors and the like).
    pub accept_errors: AtomicU64,
    /// Connections a serving thread accepted and handed to a less busy one ([`crate::spread`]).
    pub connections_handed_over: AtomicU64,
    /// Idle HTTP/1 connections held without a task of their own now ([`crate::parking`]).
    pub connections_held_idle: AtomicU64,
    /// Requests answered 503 because the gateway itself ran out of a resource (EMFILE…).
    pub local_resource_errors: AtomicU64,
    /// Request bodies that broke on the client's side (answered 400, never blamed on a replica).
    pub client_body_errors: AtomicU64,
    /// Retries not made because the retry budget was spent.
    pub retries_over_budget: AtomicU64,
    /// Passive ejections not made because `health.max_ejection_percent` were out.
    pub ejections_capped: AtomicU64,
    /// Requests sent past their key's owner because it was at the load bound.
    pub diverted_load: AtomicU64,
    /// Requests sent past their key's owner because it is ramping up (slow start).
    pub diverted_slow_start: AtomicU64,
    /// Replicas taken out for their answers (outlier ejection).
    pub outlier_ejections: AtomicU64,
    /// Access log lines written.
    pub access_log_records: AtomicU64,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
    /// Access log lines lost to write errors.
    pub access_log_errors: AtomicU64,
    /// TLS handshakes completed.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that did not complete within `proxy.header_read_timeout`.
    pub tls_handshake_timeouts: AtomicU64,
    /// Plain-HTTP requests on the TLS port (answered 400).
    pub tls_plain_http: AtomicU64,
    /// TLS handshakes that failed (a protocol error, no common version or cipher, a reset).
    pub tls_handshake_errors: AtomicU64,
    /// Certificate sets applied after an edit of their files.
    pub tls_reloads: AtomicU64,
    /// Certificate edits rejected (the current certificates kept serving).
    pub tls_reload_errors: AtomicU64,
    /// N the autoscaler asks for (0 while `[autoscale]` is off).
    pub autoscale_desired: AtomicU64,
    /// Autoscaler decisions that moved N up or down.
    pub autoscale_up: AtomicU64,
    pub autoscale_down: AtomicU64,
    /// Requests held while N was 0 (scale to zero), and those refused: past `hold_max` at
    /// once, or past `hold_timeout` still without a replica.
    pub autoscale_held: AtomicU64,
    pub autoscale_hold_full: AtomicU64,
    pub autoscale_hold_timeouts: AtomicU64,
    /// How long held requests waited (answered or not).
    pub autoscale_hold_wait: crate::latency::LatencyHistogram,
    /// Idle trims of the heap after a burst ([`crate::memory`]).
    pub memory_trims: AtomicU64,
    /// Resident bytes those trims gave back to the OS.
    pub memory_trimmed_bytes: AtomicU64,
}
