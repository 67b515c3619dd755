//! ringgate: a load-balancing HTTP gateway with a consistent-hash ring, managed replicas and
//! Lua policies.
//!
//! # Layout
//!
//! Data plane (the request path: reads one immutable [`snapshot::Snapshot`], takes no lock):
//! - [`server`]: the listener and connections (HTTP/1.1 keep-alive and HTTP/2), graceful drain.
//! - [`proxy`]: one request: key → slot → replica, streamed through a pooled client, retries.
//! - [`hashing`]: request keys and the hash functions `H` and `Φ`.
//! - [`ring`]: virtual-node placement and the owner table (pure, no I/O).
//!
//! Control plane (one owner task publishes new snapshots):
//! - [`controller`]: the only code that changes state: admin calls, health results, provider
//!   events, reloads.
//! - [`health`]: active `/heartbeat` probes and the rise/fall state machine's inputs.
//! - [`provider`]: where replicas run: `process`, `static`, `docker`.
//! - [`watcher`]: live reload of `conf/lb.toml` and `policies/`, validated before it is sent.
//! - [`policy`]: the sandboxed Lua hooks (`request_key`, `request_hash`, `vnode_hash`, `health`).
//! - [`admin`]: the replica API (`/rep`, `/add`, `/rm`) and `/lb/*`: parse, validate, ask the
//!   controller.
//!
//! Shared:
//! - [`config`]: `conf/lb.toml`: shape, defaults, validation.
//! - [`snapshot`]: what one request sees: config, ring, replicas.
//! - [`metrics`]: lock-free counters and their Prometheus rendering.
//! - [`error`]: the one place internal errors become HTTP responses.
//! - [`tools`]: `ringgate check`, `ring` and `simulate`.
//! - [`listening`]: the `listening on http://ADDR` line processes print once they serve.
//!
//! The load generator, the analysis experiments and the benchmarks live in the lab package
//! (`bench/lab`, binary `ringgate-lab`), outside this library and the gateway binary.

pub mod admin;
pub mod app;
pub mod config;
pub mod controller;
pub mod error;
pub mod hashing;
pub mod health;
pub mod listening;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod ring;
pub mod server;
pub mod snapshot;
pub mod tools;
pub mod watcher;
