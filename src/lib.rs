//! ringgate: a load-balancing HTTP gateway with a consistent-hash ring, managed replicas and
//! Lua policies.
//!
//! # Layout
//!
//! Entry point:
//! - [`gateway`]: run a gateway on listeners and a shutdown future you give it
//!   ([`gateway::Gateway::start`], [`gateway::Gateway::serve`], [`gateway::run`]).
//!
//! Data plane (the request path: reads one immutable [`snapshot::Snapshot`], takes no lock):
//! - [`worker`]: a serving thread's own state (snapshot cache, upstream pools, retry budget,
//!   access-log lines, spare buffers), passed down to every connection and request it serves.
//! - [`listener`]: accepting connections, first-bytes deadline, TLS handshakes, telling HTTP/1
//!   from HTTP/2 (served by hyper), idle timeouts, graceful drain.
//! - [`parking`]: idle keep-alive connections held without a task (a socket and a small record
//!   in a per-listener table, watched by an epoll set of its own) until their next request.
//! - [`wire`]: HTTP/1.1 on the wire, both legs: our server for clients (strict request heads,
//!   bodies read by whoever forwards them, response framing, keep-alive, pipelining) and our
//!   client to the replicas (the forwarded head, the replica's response head and body), one set
//!   of framing rules, one body decoder and chunk encoder, and the body types of the request path;
//!   and the replica's side of HTTP/2 (a request as a stream, its response and trailers).
//! - [`upstream`]: the connector to the replicas (plain or TLS connections, the per-thread idle
//!   pool of a serving thread, HTTP/2 connections multiplexed per replica and serving thread).
//! - [`http2`]: what the gateway watches on an HTTP/2 connection hyper serves: open streams
//!   (idle timeout) and responses held back by the client's window (send timeout).
//! - [`stall`]: bounded waits on peers that stop moving bytes: a client that stops taking its
//!   response (`proxy.send_timeout`), a replica that stops sending a body (`proxy.read_timeout`).
//! - [`tls`]: TLS termination: certificates (validated, chosen by SNI, swapped live), ALPN,
//!   the plain-HTTP redirect.
//! - [`admission`]: the connection caps and request budgets (global, derived from the fd
//!   limit; per client IP; per replica).
//! - [`service`]: one request, to the admin API or to the proxy.
//! - [`admin`]: the replica API (`/rep`, `/add`, `/rm`) and `/lb/*`: parse, guard, ask the
//!   controller.
//! - [`ui`]: the operator page `/lb/` (HTML, CSS, JS and SVG compiled in).
//! - [`exposition`]: `/lb/metrics`: the counters, the snapshot and what other parts publish,
//!   encoded in the Prometheus text format by `prometheus-client` at scrape time.
//! - [`guard`]: who may call the admin endpoints (loopback by default; no replica, no
//!   cross-site request, no foreign `Host`; the bearer token).
//! - [`access_log`]: `[log] access`: one line per request, buffered per serving thread and
//!   written by a writer thread; reopened on SIGHUP.
//! - [`proxy`]: one request to one replica: routed, sent through the connector, retried on
//!   the next server clockwise, and, for an upgrade the replica accepts, made a tunnel; held
//!   first while the autoscaler has scaled N to zero.
//! - [`tunnel`]: upgraded connections (WebSockets): the registry of open tunnels with their
//!   keys, the splice, and the re-homing of exactly the tunnels whose key moved.
//! - [`grpc`]: what the gateway knows of gRPC: which requests are calls, `grpc-timeout`, the
//!   statuses it answers with (trailers-only), the health check's messages (pure).
//! - [`routing`]: key → slot and virtual node → slot ("Lua hook, else the built-in"), shared by
//!   the request path, the controller and the offline tools.
//! - [`balance`]: bounded loads and slow start on top of the ring (pure decisions).
//! - [`hashing`]: request keys and the built-in hash functions `H`, `Φ` and `mix64`.
//! - [`ring`]: virtual-node placement and the owner table (pure, no I/O).
//!
//! Control plane (one owner task publishes new snapshots):
//! - [`control`]: the controller and its parts (membership model, lifecycle, probes, reload,
//!   publishing, status).
//! - [`health`]: the rise/fall state machine and the active checks.
//! - [`provider`]: where replicas run: `process`, `static`, `docker`, `swarm` (whose shared
//!   ring record several gateways serialise their changes through).
//! - [`watcher`]: live reload of `conf/lb.toml`, `policies/` and the TLS certificate files,
//!   validated before it is applied.
//! - [`policy`]: the sandboxed Lua hooks (`request_key`, `request_hash`, `vnode_hash`, `health`).
//!
//! Shared:
//! - [`config`]: `conf/lb.toml`: shape, defaults, validation.
//! - [`snapshot`]: what one request sees: config, ring, replicas, policy.
//! - [`spread`]: client connections kept even over the serving threads (a thread that serves
//!   more than another hands a new connection to the least busy one).
//! - [`metrics`]: lock-free counters (only counters: nothing published, nothing rendered).
//! - [`per_thread`]: counts every request adds to, one copy per serving thread, summed when read.
//! - [`watchdog`]: serving threads that stopped serving, noticed from their runtimes' beats
//!   (a backstop that does not depend on the Lua hook), for `/lb/status` and `/lb/metrics`.
//! - [`memory`]: the heap given back to the OS once a burst is over (the idle trim).
//! - [`latency`]: the latency histograms (per replica and gateway-wide) and their quantiles.
//! - [`rfc3339`]: the one way the crate writes a timestamp (the `time` crate, UTC).
//! - [`error`]: the one place internal errors become HTTP responses.
//! - [`listening`]: the `listening on http://ADDR` line processes print once they serve.
//! - [`sync`]: the one way this crate takes a mutex.
//! - [`descriptors`]: the replica connections open in the process and when descriptors are
//!   short.
//! - [`tools`]: `ringgate check`, `ring` and `simulate`.
//! - [`whatif`]: `POST /lb/simulate`: what a change would do to the ring, changing nothing.
//!
//! The load generator, the analysis experiments and the benchmarks live in the lab package
//! (`bench/lab`, binary `ringgate-lab`), outside this library and the gateway binary.
//!
//! Public are only the modules the binaries, the lab, the tests and the benchmarks use (the
//! gateway, its config, the tools, the ring and hashing, the providers, the policy set, the
//! wire codec the allocation tests drive, and small helpers); the rest is `pub(crate)`.

pub mod access_log;
pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod answer;
pub(crate) mod balance;
pub mod config;
pub(crate) mod control;
pub(crate) mod descriptors;
pub(crate) mod error;
pub(crate) mod exposition;
pub mod gateway;
pub mod grpc;
pub(crate) mod guard;
pub mod hashing;
pub(crate) mod health;
pub(crate) mod http2;
pub(crate) mod in_task;
pub(crate) mod latency;
pub(crate) mod listener;
pub mod listening;
pub mod memory;
pub(crate) mod metrics;
pub(crate) mod parking;
pub(crate) mod per_thread;
pub mod policy;
pub mod provider;
pub(crate) mod proxy;
pub(crate) mod rescue;
pub mod rfc3339;
pub mod ring;
pub(crate) mod routing;
pub(crate) mod service;
pub(crate) mod snapshot;
pub(crate) mod spread;
pub(crate) mod stall;
pub(crate) mod sync;
pub(crate) mod tls;
pub mod tools;
pub(crate) mod tunnel;
pub(crate) mod ui;
pub(crate) mod upstream;
pub(crate) mod watchdog;
pub(crate) mod watcher;
pub(crate) mod whatif;
pub mod wire;
pub(crate) mod worker;
