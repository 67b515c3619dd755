//! A serving thread's own state, passed down to everything its requests run.
//!
//! Owns: [`Worker`], made by each serving thread when it starts and dropped when it ends: its
//! snapshot cache (a request's snapshot costs one atomic load while nothing was published, and
//! its reference count stays on this thread's core), its connections to the replicas (idle
//! HTTP/1.1 ones and its HTTP/2 ones), its retry budget, its access-log lines not yet handed to
//! the writer, its spare buffers for response heads, and the door to its table of resting
//! tunnels. The listener gives every connection a
//! handle to it; the service and the proxy pass each part to whoever uses it. Nothing of it is
//! shared with another serving thread: a request never touches another thread's cache lines.
//! Each part sits behind a lock (or an atomic) only because request futures must be `Send` for
//! the runtime's `spawn`; only the owning thread ever takes it, so it is never contended.
//! Must not touch: what the parts mean (each is its module's); state that is the gateway's
//! (the controller's) or every thread's (the published snapshot, the counters).

use std::sync::Arc;

use crate::access_log::{AccessLog, Lines};
use crate::proxy::retry;
use crate::proxy::upgrade::RestingTunnel;
use crate::snapshot::{Cache, Current, Shared};
use crate::tunnel::resting::Door;
use crate::upstream::Pools;
use crate::wire::server::Spare;

pub struct Worker {
    snapshot: Cache,
    /// Its connections to the replicas.
    pub upstream: Pools,
    /// Its requests in progress and those retrying (`proxy.retry_budget_percent`).
    pub retry: Arc<retry::Budget>,
    /// Its access-log lines not yet handed to the writer (written when it is dropped).
    pub lines: Arc<Lines>,
    /// Buffers for the response heads its HTTP/1 connections write.
    pub spare: Spare,
    /// Where its idle tunnels rest without a task (`None`: its table could not be made).
    pub resting_tunnels: Option<Door<RestingTunnel>>,
}

impl Worker {
    /// The state of a serving thread of the gateway that publishes `shared` and logs to `log`.
    pub fn new(
        shared: &Shared,
        log: &Arc<AccessLog>,
        resting_tunnels: Option<Door<RestingTunnel>>,
    ) -> Worker {
        Worker {
            snapshot: Cache::new(shared),
            upstream: Pools::default(),
            retry: Arc::default(),
            lines: Lines::new(log),
            spare: Spare::default(),
            resting_tunnels,
        }
    }

    /// The snapshot published now.
    pub fn snapshot(&self) -> Current {
        self.snapshot.current()
    }
}
