//! `/lb/metrics`: every counter, gauge and histogram of the gateway in the Prometheus text
//! format (version 0.0.4), encoded by `prometheus-client` at scrape time.
//!
//! Owns: the names, help texts, types and labels of the exported families, and reading the
//! sources once per scrape: the counters ([`crate::metrics`], per-thread ones summed here), the
//! published snapshot (ring, policy statistics), what the controller alone knows (every
//! member's counters, the engine's reachability) and the state other parts publish (TLS
//! certificates, serving threads), all handed over in a [`MetricsSources`].
//! Must not touch: any state. It sits at the edge beside [`crate::admin`] and imports what it
//! reads; nothing below it imports it (so counters never know how they are shown).
//!
//! Why a collector rather than the crate's own metric types: the request path keeps its
//! relaxed atomics and per-thread counters (no lock, no label map), and each scrape turns their
//! values into `ConstCounter`s, `ConstGauge`s and histogram buckets.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::{MetricsSources, Published};
use crate::latency::LatencyHistogram;
use crate::metrics::Metrics;
use crate::policy::{Hook, PolicyStats};
use crate::snapshot::Snapshot;
use crate::tls::certs::CertInfo;

/// The `Content-Type` of what [`render`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every family from `sources`.
pub fn render(sources: MetricsSources) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(sources)));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail, and no encoder here returns an error of its own.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot encode /lb/metrics");
    }
    out
}

/// One scrape's sources as a collector (the registry asks for `'static` collectors, so it
/// owns them).
struct Scrape(MetricsSources);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let (e, s) = (&mut e, &self.0);
        encode_families(e, &s.metrics, GATEWAY)?;
        serving_threads(e, &s.published)?;
        tls(e, s)?;
        policy(e, &s.snapshot)?;
        replicas(e, s)?;
        tunnels(e, &s.published)?;
        latency(e, s)?;
        ring_identity(e, s)
    }
}

/// A sample without labels.
const NO_LABELS: [(&str, &str); 0] = [];

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A counter family without labels. Names are written whole, as Prometheus shows them (the
/// encoder adds `_total` to a counter's name itself, so it is taken off here).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    counters(e, name, help, [(NO_LABELS, value)])
}

/// A counter family with one sample per label set.
fn counters<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    debug_assert!(
        name.ends_with("_total"),
        "{name}: a counter's name ends in _total"
    );
    let base = name.strip_suffix("_total").unwrap_or(name);
    let mut family = e.encode_descriptor(base, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family without labels.
fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    gauges(e, name, help, [(NO_LABELS, value)])
}

/// A gauge family with one sample per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram family with one histogram per label set, in [`crate::latency`]'s exported
/// buckets (summed over the serving threads now).
fn histograms<'h, L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'h LatencyHistogram)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, histogram) in samples {
        let h = histogram.exported();
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
    }
    Ok(())
}

/// A family read from [`Metrics`] alone.
struct Family {
    /// As Prometheus shows it (a counter's with its `_total`).
    name: &'static str,
    help: &'static str,
    read: Read,
}

/// Reads one sample from the counters.
type Reading = fn(&Metrics) -> u64;

/// How a [`Family`] reads its samples.
enum Read {
    Counter(Reading),
    /// A count of what is open now.
    Gauge(Reading),
    /// One counter per value of a label.
    Counters(&'static str, &'static [(&'static str, Reading)]),
}

/// The gateway's own families, in the order `/lb/metrics` lists them.
const GATEWAY: &[Family] = &[
    Family {
        name: "ringgate_http_requests_total",
        help: "Requests the gateway answered: proxied ones and its own endpoints.",
        read: Read::Counter(|m| m.requests.get()),
    },
    Family {
        name: "ringgate_retries_total",
        help: "Requests retried on the next server clockwise.",
        read: Read::Counter(|m| get(&m.retries)),
    },
    Family {
        name: "ringgate_retries_over_budget_total",
        help: "Retries not made because the retry budget was spent.",
        read: Read::Counter(|m| get(&m.retries_over_budget)),
    },
    Family {
        name: "ringgate_ejections_total",
        help: "Replicas taken out of the ring (failed checks, failed connects, exits).",
        read: Read::Counter(|m| get(&m.ejections)),
    },
    Family {
        name: "ringgate_ejections_capped_total",
        help: "Passive ejections not made because health.max_ejection_percent of the members \
               were out.",
        read: Read::Counter(|m| get(&m.ejections_capped)),
    },
    Family {
        name: "ringgate_diverted_total",
        help: "Requests sent past their key's owner: at the load bound (ring.balance_factor), \
               or the owner ramping up (health.slow_start).",
        read: Read::Counters(
            "reason",
            &[
                ("load", |m| get(&m.diverted_load)),
                ("slow_start", |m| get(&m.diverted_slow_start)),
            ],
        ),
    },
    Family {
        name: "ringgate_outlier_ejections_total",
        help: "Replicas ejected for their answers (consecutive 5xx or a failure percentage); \
               not replaced.",
        read: Read::Counter(|m| get(&m.outlier_ejections)),
    },
    Family {
        name: "ringgate_respawns_total",
        help: "Replacement replicas started.",
        read: Read::Counter(|m| get(&m.respawns)),
    },
    Family {
        name: "ringgate_ring_rebuilds_total",
        help: "Owner tables built and published.",
        read: Read::Counter(|m| get(&m.ring_rebuilds)),
    },
    Family {
        name: "ringgate_local_errors_total",
        help: "Responses the gateway produced itself because no replica could answer (502, \
               503, 504, 413).",
        read: Read::Counter(|m| get(&m.local_errors)),
    },
    Family {
        name: "ringgate_local_resource_errors_total",
        help: "Requests answered 503 because the gateway ran out of a local resource (EMFILE, \
               ENFILE, ENOMEM, EADDRNOTAVAIL); never counted against a replica.",
        read: Read::Counter(|m| get(&m.local_resource_errors)),
    },
    Family {
        name: "ringgate_client_body_errors_total",
        help: "Request bodies that broke on the client's side (answered 400) or stopped \
               arriving within proxy.request_timeout (answered 408); never counted against a \
               replica.",
        read: Read::Counter(|m| get(&m.client_body_errors)),
    },
    Family {
        name: "ringgate_config_reloads_total",
        help: "Config edits applied.",
        read: Read::Counter(|m| get(&m.config_reloads)),
    },
    Family {
        name: "ringgate_config_reload_errors_total",
        help: "Config edits rejected.",
        read: Read::Counter(|m| get(&m.config_reload_errors)),
    },
    Family {
        name: "ringgate_policy_reloads_total",
        help: "Policy sets loaded after an edit.",
        read: Read::Counter(|m| get(&m.policy_reloads)),
    },
    Family {
        name: "ringgate_policy_reload_errors_total",
        help: "Policy edits rejected (the last good set stays).",
        read: Read::Counter(|m| get(&m.policy_reload_errors)),
    },
    Family {
        name: "ringgate_connections_open",
        help: "Client connections open now.",
        read: Read::Gauge(|m| get(&m.connections_open)),
    },
    Family {
        name: "ringgate_connections_refused_total",
        help: "New client connections closed at once because a cap was reached.",
        read: Read::Counters(
            "reason",
            &[
                ("max_connections", |m| get(&m.connections_refused_max)),
                ("per_ip", |m| get(&m.connections_refused_per_ip)),
            ],
        ),
    },
    Family {
        name: "ringgate_requests_in_flight",
        help: "Proxied requests in flight now (admitted, response not finished).",
        read: Read::Gauge(|m| get(&m.requests_in_flight)),
    },
    Family {
        name: "ringgate_requests_refused_total",
        help: "Requests refused before they held anything because a budget was spent (HTTP/2: \
               REFUSED_STREAM; HTTP/1: 503 with Retry-After): max_requests, per_ip \
               (proxy.max_requests_per_ip), replica (proxy.max_requests_per_replica and its \
               queue).",
        read: Read::Counters(
            "reason",
            &[
                ("max_requests", |m| get(&m.requests_refused_max)),
                ("per_ip", |m| get(&m.requests_refused_per_ip)),
                ("replica", |m| get(&m.requests_refused_replica)),
            ],
        ),
    },
    Family {
        name: "ringgate_upstream_connections_open",
        help: "Connections to replicas open now (carrying a request or idle in a pool).",
        // Counted by the descriptors module for the whole process, not in `Metrics`.
        read: Read::Gauge(|_| crate::descriptors::replica_connections()),
    },
    Family {
        name: "ringgate_connect_timeouts_inconclusive_total",
        help: "Replica connects that timed out while the gateway itself was short of file \
               descriptors: answered 503, not counted against the replica.",
        read: Read::Counter(|m| get(&m.connect_timeouts_inconclusive)),
    },
    Family {
        name: "ringgate_connections_held_idle",
        help: "Client connections idle between requests for a second or more, held without a \
               task until their next request (cleartext HTTP/1.1; counted in \
               ringgate_connections_open too).",
        read: Read::Gauge(|m| get(&m.connections_held_idle)),
    },
    Family {
        name: "ringgate_connections_handed_over_total",
        help: "Connections a serving thread accepted while it served more than another, handed \
               to the least busy one.",
        read: Read::Counter(|m| get(&m.connections_handed_over)),
    },
    Family {
        name: "ringgate_connections_timed_out_total",
        help: "Client connections closed for sending no complete first request in time \
               (first_bytes), no whole later request head within proxy.header_read_timeout on \
               HTTP/1 (header: an idle keep-alive connection or a slow head), an HTTP/2 \
               connection without a stream for proxy.idle_timeout (idle), or a client that took \
               none of the response's bytes for proxy.send_timeout (send: it stopped reading).",
        read: Read::Counters(
            "phase",
            &[
                ("first_bytes", |m| get(&m.first_bytes_timeouts)),
                ("header", |m| get(&m.header_timeouts)),
                ("idle", |m| get(&m.idle_closes)),
                ("send", |m| get(&m.send_timeouts)),
            ],
        ),
    },
    Family {
        name: "ringgate_request_heads_refused_total",
        help: "HTTP/1 request heads answered with an error and closed before any replica saw \
               them: too_large (431: past 64 KiB or 100 header fields), malformed (400: not \
               HTTP/1.1), framing (400: an ambiguous body length, RFC 9112 section 6.3).",
        read: Read::Counters(
            "reason",
            &[
                ("too_large", |m| get(&m.heads_refused_too_large)),
                ("malformed", |m| get(&m.heads_refused_malformed)),
                ("framing", |m| get(&m.heads_refused_framing)),
            ],
        ),
    },
    Family {
        name: "ringgate_access_log_lines_total",
        help: "Access log lines by outcome: written, dropped (the writer fell behind; the \
               serving threads never wait) or error (the write failed).",
        read: Read::Counters(
            "outcome",
            &[
                ("written", |m| get(&m.access_log_records)),
                ("dropped", |m| get(&m.access_log_dropped)),
                ("error", |m| get(&m.access_log_errors)),
            ],
        ),
    },
    Family {
        name: "ringgate_accept_errors_total",
        help: "Accepts that failed (out of file descriptors and the like).",
        read: Read::Counter(|m| get(&m.accept_errors)),
    },
    Family {
        name: "ringgate_memory_trims_total",
        help: "Times the heap's free pages were given back to the OS once traffic was quiet \
               after a burst.",
        read: Read::Counter(|m| get(&m.memory_trims)),
    },
    Family {
        name: "ringgate_memory_trimmed_bytes_total",
        help: "Resident bytes those trims gave back.",
        read: Read::Counter(|m| get(&m.memory_trimmed_bytes)),
    },
    Family {
        name: "ringgate_replicas_up",
        help: "Replicas in the ring.",
        read: Read::Gauge(|m| get(&m.replicas_up)),
    },
    Family {
        name: "ringgate_replicas_desired",
        help: "Replicas the gateway keeps (N).",
        read: Read::Gauge(|m| get(&m.replicas_desired)),
    },
    Family {
        name: "ringgate_autoscale_desired",
        help: "Replicas the autoscaler asks for (0 while [autoscale] is off).",
        read: Read::Gauge(|m| get(&m.autoscale_desired)),
    },
    Family {
        name: "ringgate_autoscale_decisions_total",
        help: "Autoscaler decisions that moved N, by direction.",
        read: Read::Counters(
            "direction",
            &[
                ("up", |m| get(&m.autoscale_up)),
                ("down", |m| get(&m.autoscale_down)),
            ],
        ),
    },
    Family {
        name: "ringgate_autoscale_held_total",
        help: "Requests held while N was 0 (scale to zero) for a replica to start.",
        read: Read::Counter(|m| get(&m.autoscale_held)),
    },
    Family {
        name: "ringgate_autoscale_hold_refused_total",
        help: "Requests answered 503 at N = 0: past autoscale.hold_max (full) or past autoscale.hold_timeout (timeout).",
        read: Read::Counters(
            "reason",
            &[
                ("full", |m| get(&m.autoscale_hold_full)),
                ("timeout", |m| get(&m.autoscale_hold_timeouts)),
            ],
        ),
    },
];

/// The TLS counters, while TLS is on.
const TLS: &[Family] = &[
    Family {
        name: "ringgate_tls_handshakes_total",
        help: "TLS handshakes completed.",
        read: Read::Counter(|m| get(&m.tls_handshakes)),
    },
    Family {
        name: "ringgate_tls_handshake_failures_total",
        help: "TLS connections that did not complete a handshake: no handshake within \
               proxy.header_read_timeout (timeout), plain HTTP on the TLS port (plain_http, \
               answered 400), or a failed handshake (error).",
        read: Read::Counters(
            "reason",
            &[
                ("timeout", |m| get(&m.tls_handshake_timeouts)),
                ("plain_http", |m| get(&m.tls_plain_http)),
                ("error", |m| get(&m.tls_handshake_errors)),
            ],
        ),
    },
    Family {
        name: "ringgate_tls_certificate_reloads_total",
        help: "Certificate sets applied after an edit of their files.",
        read: Read::Counter(|m| get(&m.tls_reloads)),
    },
    Family {
        name: "ringgate_tls_certificate_reload_errors_total",
        help: "Certificate edits rejected (the current certificates kept serving; see \
               /lb/status).",
        read: Read::Counter(|m| get(&m.tls_reload_errors)),
    },
];

/// `families` as they read now from `m`.
fn encode_families(e: &mut DescriptorEncoder, m: &Metrics, families: &[Family]) -> fmt::Result {
    for f in families {
        match &f.read {
            Read::Counter(read) => counter(e, f.name, f.help, read(m))?,
            Read::Gauge(read) => gauge(e, f.name, f.help, read(m))?,
            Read::Counters(label, values) => counters(
                e,
                f.name,
                f.help,
                values.iter().map(|(v, read)| ([(*label, *v)], read(m))),
            )?,
        }
    }
    Ok(())
}

/// Open connections per serving thread, and the watchdog's view of each.
fn serving_threads(e: &mut DescriptorEncoder, p: &Published) -> fmt::Result {
    let open = p.thread_load.as_ref().map(|l| l.open()).unwrap_or_default();
    gauges(
        e,
        "ringgate_serving_thread_connections",
        "Client connections open now on each serving thread (kept even: see \
         ringgate_connections_handed_over_total).",
        open.into_iter()
            .enumerate()
            .map(|(i, n)| ([("thread", i)], n)),
    )?;
    let Some(watchdog) = &p.watchdog else {
        return Ok(());
    };
    let threads: Vec<(bool, u64)> = watchdog.readings().collect();
    gauges(
        e,
        "ringgate_serving_thread_stalled",
        "Whether a serving thread has stopped serving (its runtime has not run for 1.5 s; see \
         /lb/status serving_threads).",
        threads
            .iter()
            .enumerate()
            .map(|(i, &(stalled, _))| ([("thread", i)], u64::from(stalled))),
    )?;
    counters(
        e,
        "ringgate_serving_thread_stalls_total",
        "Times a serving thread was found stalled.",
        threads
            .iter()
            .enumerate()
            .map(|(i, &(_, stalls))| ([("thread", i)], stalls)),
    )
}

/// While TLS is on: its counters and each serving certificate's expiry.
fn tls(e: &mut DescriptorEncoder, s: &MetricsSources) -> fmt::Result {
    let Some(tls) = &s.published.tls else {
        return Ok(());
    };
    encode_families(e, &s.metrics, TLS)?;
    let report = tls.report();
    let now = crate::rfc3339::unix_seconds(std::time::SystemTime::now());
    let names: Vec<String> = report
        .certificates
        .iter()
        .map(|c| c.dns_names.join(","))
        .collect();
    let certs = || report.certificates.iter().zip(&names);
    gauges(
        e,
        "ringgate_tls_certificate_expiry_seconds",
        "Seconds until the serving certificate expires (negative once it has).",
        certs().map(|(c, n)| (cert_labels(c, n), c.not_after - now)),
    )?;
    gauges(
        e,
        "ringgate_tls_certificate_not_after_timestamp_seconds",
        "When the serving certificate expires, in seconds since the Unix epoch.",
        certs().map(|(c, n)| (cert_labels(c, n), c.not_after)),
    )?;
    gauge(
        e,
        "ringgate_tls_certificate_edit_rejected",
        "1 while the last edit of a certificate or key file is rejected (its error is in \
         /lb/status), else 0.",
        u64::from(report.last_error.is_some()),
    )
}

/// A certificate's labels: its file, subject and DNS names (`names`, comma-separated).
fn cert_labels<'a>(c: &'a CertInfo, names: &'a str) -> [(&'static str, &'a str); 3] {
    [
        ("cert", c.cert_file.as_str()),
        ("subject", c.subject.as_str()),
        ("names", names),
    ]
}

/// The policy's hook counters and the snapshot's generation.
fn policy(e: &mut DescriptorEncoder, snap: &Snapshot) -> fmt::Result {
    let stats = snap.policy.stats();
    let per_hook = |read: fn(&PolicyStats, Hook) -> u64| {
        Hook::ALL
            .iter()
            .map(move |&h| ([("hook", h.name())], read(stats, h)))
    };
    counters(
        e,
        "ringgate_policy_hook_calls_total",
        "Lua hook calls.",
        per_hook(PolicyStats::calls),
    )?;
    counters(
        e,
        "ringgate_policy_hook_errors_total",
        "Lua hook calls that failed and fell back to the default.",
        per_hook(PolicyStats::errors),
    )?;
    gauge(
        e,
        "ringgate_ring_generation",
        "Generation of the published snapshot.",
        snap.generation,
    )
}

/// Per replica (every member, up or not): answers by status class, failures, body timeouts,
/// requests in flight; then the ring slots each owns.
fn replicas(e: &mut DescriptorEncoder, s: &MetricsSources) -> fmt::Result {
    const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let each = || s.replicas.iter().map(|(name, st)| (name.as_str(), &**st));
    counters(
        e,
        "ringgate_requests_total",
        "Responses from replicas, by replica and status class.",
        each().flat_map(|(name, st)| {
            CLASSES
                .into_iter()
                .zip(st.answers())
                .map(move |(class, n)| ([("replica", name), ("class", class)], n))
        }),
    )?;
    counters(
        e,
        "ringgate_upstream_failures_total",
        "Failed attempts to a replica (connect errors, resets, timeouts).",
        each().map(|(name, st)| ([("replica", name)], get(&st.failures))),
    )?;
    counters(
        e,
        "ringgate_upstream_body_timeouts_total",
        "Responses cut short because their replica sent no byte of the body for \
         proxy.read_timeout.",
        each().map(|(name, st)| ([("replica", name)], get(&st.body_timeouts))),
    )?;
    gauges(
        e,
        "ringgate_in_flight",
        "Requests in progress per replica (open tunnels included).",
        each().map(|(name, st)| ([("replica", name)], st.in_flight.load(Ordering::Relaxed))),
    )?;
    gauges(
        e,
        "ringgate_tunnels_open",
        "Tunnels (upgraded connections) open per replica.",
        each().map(|(name, st)| ([("replica", name)], st.tunnels.load(Ordering::Relaxed))),
    )?;
    // Every member shows, owning nothing when it is out of the ring; by name.
    let snap = &s.snapshot;
    let mut owned: BTreeMap<&str, u64> = each().map(|(name, _)| (name, 0)).collect();
    for slot in 0..snap.ring.slots() {
        if let Some(u) = snap.ring.owner(slot).and_then(|id| snap.upstream(id)) {
            *owned.entry(u.name.as_str()).or_default() += 1;
        }
    }
    gauges(
        e,
        "ringgate_ring_slots",
        "Ring slots each replica owns now (its share of the ring is this over \
         ringgate_ring_slots_total).",
        owned.into_iter().map(|(name, n)| ([("replica", name)], n)),
    )?;
    gauge(
        e,
        "ringgate_ring_slots_total",
        "Slots on the ring (ring.slots).",
        u64::from(snap.ring.slots()),
    )
}

/// The tunnels' counters (absent where no gateway publishes them, as in unit tests).
fn tunnels(e: &mut DescriptorEncoder, p: &Published) -> fmt::Result {
    let Some(t) = &p.tunnels else {
        return Ok(());
    };
    let c = &t.counters;
    counter(
        e,
        "ringgate_tunnels_opened_total",
        "Tunnels opened (a replica answered 101 to an upgrade).",
        get(&c.opened),
    )?;
    counter(
        e,
        "ringgate_tunnels_refused_total",
        "Upgrades answered 503 because [tunnels] max tunnels were open.",
        get(&c.refused),
    )?;
    counters(
        e,
        "ringgate_tunnels_rehomed_total",
        "Tunnels closed because their key's home moved (key_moved) or their replica left the \
         ring (replica_gone).",
        [
            ([("reason", "key_moved")], get(&c.rehomed_key_moved)),
            ([("reason", "replica_gone")], get(&c.rehomed_replica_gone)),
        ],
    )?;
    counters(
        e,
        "ringgate_streams_rehomed_total",
        "gRPC calls ended with UNAVAILABLE because their key's home moved (key_moved) or their \
         replica left the ring (replica_gone).",
        [
            ([("reason", "key_moved")], get(&c.streams_rehomed_key_moved)),
            (
                [("reason", "replica_gone")],
                get(&c.streams_rehomed_replica_gone),
            ),
        ],
    )?;
    gauge(
        e,
        "ringgate_tunnels_resting",
        "Open tunnels that carried nothing for [tunnels] rest_after, resting without a task \
         until either side sends (counted in ringgate_tunnels_open too).",
        get(&c.resting),
    )?;
    counter(
        e,
        "ringgate_tunnels_idle_timeouts_total",
        "Tunnels closed after [tunnels] idle_timeout without a byte either way.",
        get(&c.idle_timeouts),
    )?;
    counters(
        e,
        "ringgate_tunnel_bytes_total",
        "Bytes carried by tunnels that ended: client to replica (up) and back (down).",
        [
            ([("direction", "up")], get(&c.bytes_up)),
            ([("direction", "down")], get(&c.bytes_down)),
        ],
    )
}

/// The upstream latency: gateway-wide, then per replica.
fn latency(e: &mut DescriptorEncoder, s: &MetricsSources) -> fmt::Result {
    histograms(
        e,
        "ringgate_upstream_latency_seconds",
        "Time from sending a request to a replica to its response headers.",
        [(NO_LABELS, &s.metrics.upstream_latency)],
    )?;
    histograms(
        e,
        "ringgate_autoscale_hold_wait_seconds",
        "How long requests held at N = 0 (scale to zero) waited for a replica.",
        [(NO_LABELS, &s.metrics.autoscale_hold_wait)],
    )?;
    histograms(
        e,
        "ringgate_replica_latency_seconds",
        "Time from sending a request to a replica to its response headers, by replica.",
        s.replicas
            .iter()
            .map(|(name, st)| ([("replica", name.as_str())], &st.latency)),
    )
}

/// The ring's fingerprint as an info-style gauge (the fingerprint is a label, the value 1, so
/// `count by (fingerprint)` shows how many gateways agree), and the engine's reachability when
/// the ring is shared.
fn ring_identity(e: &mut DescriptorEncoder, s: &MetricsSources) -> fmt::Result {
    let fingerprint = format!("{:016x}", s.snapshot.ring.fingerprint());
    gauges(
        e,
        "ringgate_ring_fingerprint",
        "The owner table's fingerprint (FNV-1a, hex) as a label; gateways that route alike \
         show the same.",
        [(
            [
                ("gateway", s.gateway.as_str()),
                ("fingerprint", &fingerprint),
            ],
            1u64,
        )],
    )?;
    match s.engine_reachable {
        Some(up) => gauge(
            e,
            "ringgate_engine_reachable",
            "Whether the engine holding the shared ring record answers (0: routing on the last \
             ring seen).",
            u64::from(up),
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::config::Config;
    use crate::snapshot::ReplicaStats;
    use crate::spread::ThreadLoad;
    use crate::watchdog::Watchdog;

    /// What a collector made of `f` writes.
    fn encoded(
        f: impl Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
    ) -> String {
        struct With<F>(F);
        impl<F> fmt::Debug for With<F> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("With")
            }
        }
        impl<F> Collector for With<F>
        where
            F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
        {
            fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
                (self.0)(&mut e)
            }
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(With(f)));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("encoded");
        out
    }

    fn sources(replicas: Vec<(String, Arc<ReplicaStats>)>, published: Published) -> MetricsSources {
        MetricsSources {
            metrics: Arc::new(Metrics::default()),
            snapshot: Arc::new(Snapshot::initial(Arc::new(Config::default()))),
            replicas,
            gateway: "gw-1".into(),
            engine_reachable: None,
            published,
        }
    }

    #[test]
    fn histograms_render_cumulatively_with_their_labels() {
        let (replica, all) = (
            Arc::new(LatencyHistogram::default()),
            Arc::new(LatencyHistogram::default()),
        );
        replica.observe_with(&all, Duration::from_micros(700));
        replica.observe_with(&all, Duration::from_millis(3));
        let out = encoded(move |e| {
            histograms(e, "x_seconds", "x.", [([("replica", "a")], &*replica)])?;
            histograms(e, "y", "y.", [(NO_LABELS, &*all)])
        });
        for line in [
            "# TYPE x_seconds histogram\n",
            "x_seconds_bucket{replica=\"a\",le=\"0.0005\"} 0\n",
            "x_seconds_bucket{replica=\"a\",le=\"0.001\"} 1\n",
            "x_seconds_bucket{replica=\"a\",le=\"0.005\"} 2\n",
            "x_seconds_bucket{replica=\"a\",le=\"1\"} 2\n",
            "x_seconds_bucket{replica=\"a\",le=\"+Inf\"} 2\n",
            "x_seconds_count{replica=\"a\"} 2\n",
            "y_bucket{le=\"+Inf\"} 2\n",
            "y_sum 0.0037\n",
        ] {
            assert!(out.contains(line), "{line}in\n{out}");
        }
    }

    #[test]
    fn the_watchdog_shows_every_thread() {
        let watchdog = Watchdog::new(2);
        let load = Arc::new(ThreadLoad::new(2));
        let published = Published {
            thread_load: Some(load),
            watchdog: Some(watchdog.clone()),
            tls: None,
            tunnels: None,
        };
        let out = encoded(move |e| serving_threads(e, &published));
        for line in [
            "ringgate_serving_thread_connections{thread=\"1\"} 0\n",
            "ringgate_serving_thread_stalled{thread=\"0\"} 0\n",
            "ringgate_serving_thread_stalled{thread=\"1\"} 0\n",
            "# TYPE ringgate_serving_thread_stalls_total counter\n",
            "ringgate_serving_thread_stalls_total{thread=\"1\"} 0\n",
        ] {
            assert!(out.contains(line), "{line}in\n{out}");
        }
    }

    #[test]
    fn a_scrape_keeps_the_names_samples_and_text_format_it_always_had() {
        let b1 = Arc::new(ReplicaStats::default());
        b1.record_response(200);
        b1.record_response(503);
        b1.failures.fetch_add(2, Ordering::Relaxed);
        b1.latency.observe(Duration::from_millis(2));
        let s = sources(vec![("b1".into(), b1)], Published::default());
        s.metrics.requests.add(7);
        s.metrics.diverted_load.fetch_add(3, Ordering::Relaxed);
        s.metrics.replicas_desired.store(3, Ordering::Relaxed);
        s.metrics.autoscale_desired.store(4, Ordering::Relaxed);
        s.metrics.autoscale_up.fetch_add(2, Ordering::Relaxed);
        let out = render(s);
        for line in [
            "ringgate_autoscale_desired 4\n",
            "ringgate_autoscale_decisions_total{direction=\"up\"} 2\n",
            "ringgate_autoscale_decisions_total{direction=\"down\"} 0\n",
            "# HELP ringgate_http_requests_total Requests the gateway answered: proxied ones and \
             its own endpoints.\n",
            "# TYPE ringgate_http_requests_total counter\nringgate_http_requests_total 7\n",
            "ringgate_diverted_total{reason=\"load\"} 3\n",
            "ringgate_diverted_total{reason=\"slow_start\"} 0\n",
            "# TYPE ringgate_connections_open gauge\nringgate_connections_open 0\n",
            "ringgate_replicas_desired 3\n",
            "ringgate_requests_total{replica=\"b1\",class=\"2xx\"} 1\n",
            "ringgate_requests_total{replica=\"b1\",class=\"5xx\"} 1\n",
            "ringgate_upstream_failures_total{replica=\"b1\"} 2\n",
            "ringgate_in_flight{replica=\"b1\"} 0\n",
            "ringgate_ring_slots{replica=\"b1\"} 0\n",
            "# TYPE ringgate_ring_slots_total gauge\nringgate_ring_slots_total 512\n",
            "ringgate_replica_latency_seconds_bucket{replica=\"b1\",le=\"0.0025\"} 1\n",
            "ringgate_upstream_latency_seconds_count 0\n",
            "ringgate_policy_hook_calls_total{hook=\"request_key\"} 0\n",
            "ringgate_ring_fingerprint{gateway=\"gw-1\",fingerprint=\"",
        ] {
            assert!(out.contains(line), "{line}in\n{out}");
        }
        // Prometheus' text format 0.0.4 (not OpenMetrics): no `# EOF`, a counter's family is
        // named with its `_total`, and every family is described once.
        assert!(
            !out.contains("# EOF") && !out.contains("_total_total"),
            "{out}"
        );
        let helps = out.lines().filter(|l| l.starts_with("# HELP ")).count();
        let types = out.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(helps, types);
        // Without TLS or a shared ring, their families are absent.
        assert!(!out.contains("ringgate_tls_") && !out.contains("ringgate_engine_reachable"));
    }

    #[test]
    fn label_values_are_escaped() {
        let out = encoded(|e| gauges(e, "z", "z.", [([("cert", "a\"b\\c\nd")], 1u64)]));
        assert!(out.contains("z{cert=\"a\\\"b\\\\c\\nd\"} 1\n"), "{out}");
    }
}
