//! Gateway-wide counters and the Prometheus text rendering of `/lb/metrics`.
//!
//! Owns: counters that are not per replica (requests, retries, ejections, respawns, ring
//! rebuilds, policy errors, access log lines), the gateway-wide upstream latency histogram (its
//! buckets are [`crate::latency`]'s) and the rendering of all of them, the per-replica ones
//! too. All are atomics: the request path updates them without a lock, which is why this is not
//! a registry crate with label maps behind a lock.
//! Must not touch: decisions. Nothing reads a metric to decide anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::latency::LatencyHistogram;
use crate::per_thread::Counter;
use crate::snapshot::Snapshot;

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
    /// Open connections per serving thread (set when the gateway starts serving).
    pub serving_threads: std::sync::OnceLock<std::sync::Arc<crate::spread::ThreadLoad>>,
    /// The serving threads' watchdog (set when the gateway starts serving); renders its own
    /// families.
    pub watchdog: std::sync::OnceLock<std::sync::Arc<crate::watchdog::Watchdog>>,
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
    /// The TLS certificates serving now and the last rejected edit (None while TLS is off).
    pub tls: arc_swap::ArcSwapOption<crate::tls::TlsReport>,
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
    /// Idle trims of the heap after a burst ([`crate::memory`]).
    pub memory_trims: AtomicU64,
    /// Resident bytes those trims gave back to the OS.
    pub memory_trimmed_bytes: AtomicU64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// What a counter family reads: one atomic, or a [`Counter`] kept per serving thread.
trait Count {
    fn count(&self) -> u64;
}

impl Count for AtomicU64 {
    fn count(&self) -> u64 {
        get(self)
    }
}

impl Count for Counter {
    fn count(&self) -> u64 {
        self.get()
    }
}

/// One metric family: its `# HELP` and `# TYPE` lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn one(value: impl ToString) -> Vec<(String, String)> {
    vec![(String::new(), value.to_string())]
}

fn counter(out: &mut String, name: &str, help: &str, value: &impl Count) {
    family(out, name, "counter", help, &one(value.count()));
}

/// A label value with `\\`, `"` and newlines escaped (the text format's rule).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The TLS families: handshakes, certificate reloads, and each certificate's expiry.
    fn render_tls(&self, o: &mut String, tls: &crate::tls::TlsReport) {
        counter(
            o,
            "ringgate_tls_handshakes_total",
            "TLS handshakes completed.",
            &self.tls_handshakes,
        );
        family(o, "ringgate_tls_handshake_failures_total", "counter", "TLS connections that did not complete a handshake: no handshake within proxy.header_read_timeout (timeout), plain HTTP on the TLS port (plain_http, answered 400), or a failed handshake (error).", &[
            ("reason=\"timeout\"".into(), get(&self.tls_handshake_timeouts).to_string()),
            ("reason=\"plain_http\"".into(), get(&self.tls_plain_http).to_string()),
            ("reason=\"error\"".into(), get(&self.tls_handshake_errors).to_string()),
        ]);
        counter(
            o,
            "ringgate_tls_certificate_reloads_total",
            "Certificate sets applied after an edit of their files.",
            &self.tls_reloads,
        );
        counter(
            o,
            "ringgate_tls_certificate_reload_errors_total",
            "Certificate edits rejected (the current certificates kept serving; see /lb/status).",
            &self.tls_reload_errors,
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let labels = |c: &crate::tls::certs::CertInfo| {
            format!(
                "cert=\"{}\",subject=\"{}\",names=\"{}\"",
                label_value(&c.cert_file),
                label_value(&c.subject),
                label_value(&c.dns_names.join(","))
            )
        };
        let expiry: Vec<(String, String)> = tls
            .certificates
            .iter()
            .map(|c| (labels(c), (c.not_after - now).to_string()))
            .collect();
        family(
            o,
            "ringgate_tls_certificate_expiry_seconds",
            "gauge",
            "Seconds until the serving certificate expires (negative once it has).",
            &expiry,
        );
        let not_after: Vec<(String, String)> = tls
            .certificates
            .iter()
            .map(|c| (labels(c), c.not_after.to_string()))
            .collect();
        family(
            o,
            "ringgate_tls_certificate_not_after_timestamp_seconds",
            "gauge",
            "When the serving certificate expires, in seconds since the Unix epoch.",
            &not_after,
        );
        family(o, "ringgate_tls_certificate_edit_rejected", "gauge", "1 while the last edit of a certificate or key file is rejected (its error is in /lb/status), else 0.", &one(u8::from(tls.last_error.is_some())));
    }

    /// Renders every metric in the Prometheus text format (version 0.0.4).
    pub fn render(
        &self,
        snap: &Snapshot,
        replicas: &[(String, std::sync::Arc<crate::snapshot::ReplicaStats>)],
    ) -> String {
        let mut out = String::with_capacity(8192);
        let o = &mut out;
        counter(
            o,
            "ringgate_http_requests_total",
            "Requests the gateway answered: proxied ones and its own endpoints.",
            &self.requests,
        );
        counter(
            o,
            "ringgate_retries_total",
            "Requests retried on the next server clockwise.",
            &self.retries,
        );
        counter(
            o,
            "ringgate_retries_over_budget_total",
            "Retries not made because the retry budget was spent.",
            &self.retries_over_budget,
        );
        counter(
            o,
            "ringgate_ejections_total",
            "Replicas taken out of the ring (failed checks, failed connects, exits).",
            &self.ejections,
        );
        counter(o, "ringgate_ejections_capped_total", "Passive ejections not made because health.max_ejection_percent of the members were out.", &self.ejections_capped);
        family(o, "ringgate_diverted_total", "counter", "Requests sent past their key's owner: at the load bound (ring.balance_factor), or the owner ramping up (health.slow_start).", &[
            ("reason=\"load\"".into(), get(&self.diverted_load).to_string()),
            ("reason=\"slow_start\"".into(), get(&self.diverted_slow_start).to_string()),
        ]);
        counter(o, "ringgate_outlier_ejections_total", "Replicas ejected for their answers (consecutive 5xx or a failure percentage); not replaced.", &self.outlier_ejections);
        counter(
            o,
            "ringgate_respawns_total",
            "Replacement replicas started.",
            &self.respawns,
        );
        counter(
            o,
            "ringgate_ring_rebuilds_total",
            "Owner tables built and published.",
            &self.ring_rebuilds,
        );
        counter(o, "ringgate_local_errors_total", "Responses the gateway produced itself because no replica could answer (502, 503, 504, 413).", &self.local_errors);
        counter(o, "ringgate_local_resource_errors_total", "Requests answered 503 because the gateway ran out of a local resource (EMFILE, ENFILE, ENOMEM, EADDRNOTAVAIL); never counted against a replica.", &self.local_resource_errors);
        counter(o, "ringgate_client_body_errors_total", "Request bodies that broke on the client's side (answered 400) or stopped arriving within proxy.request_timeout (answered 408); never counted against a replica.", &self.client_body_errors);
        counter(
            o,
            "ringgate_config_reloads_total",
            "Config edits applied.",
            &self.config_reloads,
        );
        counter(
            o,
            "ringgate_config_reload_errors_total",
            "Config edits rejected.",
            &self.config_reload_errors,
        );
        counter(
            o,
            "ringgate_policy_reloads_total",
            "Policy sets loaded after an edit.",
            &self.policy_reloads,
        );
        counter(
            o,
            "ringgate_policy_reload_errors_total",
            "Policy edits rejected (the last good set stays).",
            &self.policy_reload_errors,
        );
        family(
            o,
            "ringgate_connections_open",
            "gauge",
            "Client connections open now.",
            &one(get(&self.connections_open)),
        );
        family(
            o,
            "ringgate_connections_refused_total",
            "counter",
            "New client connections closed at once because a cap was reached.",
            &[
                (
                    "reason=\"max_connections\"".into(),
                    get(&self.connections_refused_max).to_string(),
                ),
                (
                    "reason=\"per_ip\"".into(),
                    get(&self.connections_refused_per_ip).to_string(),
                ),
            ],
        );
        family(
            o,
            "ringgate_requests_in_flight",
            "gauge",
            "Proxied requests in flight now (admitted, response not finished).",
            &one(get(&self.requests_in_flight)),
        );
        family(
            o,
            "ringgate_requests_refused_total",
            "counter",
            "Requests refused before they held anything because a budget was spent (HTTP/2: REFUSED_STREAM; HTTP/1: 503 with Retry-After): max_requests, per_ip (proxy.max_requests_per_ip), replica (proxy.max_requests_per_replica and its queue).",
            &[
                (
                    "reason=\"max_requests\"".into(),
                    get(&self.requests_refused_max).to_string(),
                ),
                (
                    "reason=\"per_ip\"".into(),
                    get(&self.requests_refused_per_ip).to_string(),
                ),
                (
                    "reason=\"replica\"".into(),
                    get(&self.requests_refused_replica).to_string(),
                ),
            ],
        );
        family(
            o,
            "ringgate_upstream_connections_open",
            "gauge",
            "Connections to replicas open now (carrying a request or idle in a pool).",
            &one(crate::descriptors::replica_connections()),
        );
        counter(
            o,
            "ringgate_connect_timeouts_inconclusive_total",
            "Replica connects that timed out while the gateway itself was short of file descriptors: answered 503, not counted against the replica.",
            &self.connect_timeouts_inconclusive,
        );
        let per_thread: Vec<(String, String)> = self
            .serving_threads
            .get()
            .map(|load| load.open())
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (format!("thread=\"{i}\""), n.to_string()))
            .collect();
        family(
            o,
            "ringgate_serving_thread_connections",
            "gauge",
            "Client connections open now on each serving thread (kept even: see ringgate_connections_handed_over_total).",
            &per_thread,
        );
        if let Some(w) = self.watchdog.get() {
            w.render(o);
        }
        counter(
            o,
            "ringgate_connections_handed_over_total",
            "Connections a serving thread accepted while it served more than another, handed to the least busy one.",
            &self.connections_handed_over,
        );
        family(o, "ringgate_connections_timed_out_total", "counter", "Client connections closed for sending no complete first request in time (first_bytes), no whole later request head within proxy.header_read_timeout on HTTP/1 (header: an idle keep-alive connection or a slow head), an HTTP/2 connection without a stream for proxy.idle_timeout (idle), or a client that took none of the response's bytes for proxy.send_timeout (send: it stopped reading).", &[
            ("phase=\"first_bytes\"".into(), get(&self.first_bytes_timeouts).to_string()),
            ("phase=\"header\"".into(), get(&self.header_timeouts).to_string()),
            ("phase=\"idle\"".into(), get(&self.idle_closes).to_string()),
            ("phase=\"send\"".into(), get(&self.send_timeouts).to_string()),
        ]);
        family(o, "ringgate_request_heads_refused_total", "counter", "HTTP/1 request heads answered with an error and closed before any replica saw them: too_large (431: past 64 KiB or 100 header fields), malformed (400: not HTTP/1.1), framing (400: an ambiguous body length, RFC 9112 section 6.3).", &[
            ("reason=\"too_large\"".into(), get(&self.heads_refused_too_large).to_string()),
            ("reason=\"malformed\"".into(), get(&self.heads_refused_malformed).to_string()),
            ("reason=\"framing\"".into(), get(&self.heads_refused_framing).to_string()),
        ]);
        family(
            o,
            "ringgate_access_log_lines_total",
            "counter",
            "Access log lines by outcome: written, dropped (the writer fell behind; the serving threads never wait) or error (the write failed).",
            &[
                ("outcome=\"written\"".into(), get(&self.access_log_records).to_string()),
                ("outcome=\"dropped\"".into(), get(&self.access_log_dropped).to_string()),
                ("outcome=\"error\"".into(), get(&self.access_log_errors).to_string()),
            ],
        );
        counter(
            o,
            "ringgate_accept_errors_total",
            "Accepts that failed (out of file descriptors and the like).",
            &self.accept_errors,
        );
        counter(
            o,
            "ringgate_memory_trims_total",
            "Times the heap's free pages were given back to the OS once traffic was quiet after a burst.",
            &self.memory_trims,
        );
        counter(
            o,
            "ringgate_memory_trimmed_bytes_total",
            "Resident bytes those trims gave back.",
            &self.memory_trimmed_bytes,
        );
        if let Some(tls) = self.tls.load_full() {
            self.render_tls(o, &tls);
        }

        let stats = snap.policy.stats();
        let per_hook = |f: &dyn Fn(crate::policy::Hook) -> u64| -> Vec<(String, String)> {
            crate::policy::Hook::ALL
                .iter()
                .map(|&h| (format!("hook=\"{}\"", h.name()), f(h).to_string()))
                .collect()
        };
        family(
            o,
            "ringgate_policy_hook_calls_total",
            "counter",
            "Lua hook calls.",
            &per_hook(&|h| stats.calls(h)),
        );
        family(
            o,
            "ringgate_policy_hook_errors_total",
            "counter",
            "Lua hook calls that failed and fell back to the default.",
            &per_hook(&|h| stats.errors(h)),
        );
        family(
            o,
            "ringgate_replicas_up",
            "gauge",
            "Replicas in the ring.",
            &one(get(&self.replicas_up)),
        );
        family(
            o,
            "ringgate_replicas_desired",
            "gauge",
            "Replicas the gateway keeps (N).",
            &one(get(&self.replicas_desired)),
        );
        family(
            o,
            "ringgate_ring_generation",
            "gauge",
            "Generation of the published snapshot.",
            &one(snap.generation),
        );

        let by_replica =
            |f: &dyn Fn(&crate::snapshot::ReplicaStats) -> String| -> Vec<(String, String)> {
                replicas
                    .iter()
                    .map(|(name, s)| (format!("replica=\"{name}\""), f(s)))
                    .collect()
            };
        let requests: Vec<(String, String)> = replicas
            .iter()
            .flat_map(|(name, s)| {
                s.answers().into_iter().enumerate().map(move |(i, c)| {
                    (
                        format!("replica=\"{name}\",class=\"{}xx\"", i + 1),
                        c.to_string(),
                    )
                })
            })
            .collect();
        family(
            o,
            "ringgate_requests_total",
            "counter",
            "Responses from replicas, by replica and status class.",
            &requests,
        );
        family(
            o,
            "ringgate_upstream_failures_total",
            "counter",
            "Failed attempts to a replica (connect errors, resets, timeouts).",
            &by_replica(&|s| get(&s.failures).to_string()),
        );
        family(
            o,
            "ringgate_upstream_body_timeouts_total",
            "counter",
            "Responses cut short because their replica sent no byte of the body for proxy.read_timeout.",
            &by_replica(&|s| get(&s.body_timeouts).to_string()),
        );
        family(
            o,
            "ringgate_in_flight",
            "gauge",
            "Requests in progress per replica.",
            &by_replica(&|s| s.in_flight.load(Ordering::Relaxed).to_string()),
        );

        let mut owned: std::collections::HashMap<&str, u64> =
            replicas.iter().map(|(n, _)| (n.as_str(), 0)).collect();
        for slot in 0..snap.ring.slots() {
            if let Some(u) = snap.ring.owner(slot).and_then(|id| snap.upstream(id)) {
                *owned.entry(u.name.as_str()).or_default() += 1;
            }
        }
        let mut owned: Vec<(String, String)> = owned
            .into_iter()
            .map(|(n, c)| (format!("replica=\"{n}\""), c.to_string()))
            .collect();
        owned.sort();
        family(
            o,
            "ringgate_ring_slots",
            "gauge",
            "Ring slots each replica owns now (its share of the ring is this over ringgate_ring_slots_total).",
            &owned,
        );
        family(
            o,
            "ringgate_ring_slots_total",
            "gauge",
            "Slots on the ring (ring.slots).",
            &one(snap.ring.slots()),
        );
        let _ = writeln!(o, "# HELP ringgate_upstream_latency_seconds Time from sending a request to a replica to its response headers.\n# TYPE ringgate_upstream_latency_seconds histogram");
        self.upstream_latency
            .render(o, "ringgate_upstream_latency_seconds", "");
        let _ = writeln!(o, "# HELP ringgate_replica_latency_seconds Time from sending a request to a replica to its response headers, by replica.\n# TYPE ringgate_replica_latency_seconds histogram");
        for (name, s) in replicas {
            s.latency.render(
                o,
                "ringgate_replica_latency_seconds",
                &format!("replica=\"{name}\""),
            );
        }
        out
    }
}
