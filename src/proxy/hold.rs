//! Scale to zero, the request's side: a request that finds N at zero waits for a replica.
//!
//! Owns: [`wait`]. When the published snapshot says the autoscaler scaled N to zero
//! ([`Snapshot::asleep`]; not when replicas are down, which stays a 503), the request takes a
//! place among the held requests (at most `autoscale.hold_max`, counted with one atomic step;
//! past it a 503 with `Retry-After` at once), asks the controller for a replica with a
//! non-blocking hint, and waits for a published snapshot that is awake, up to
//! `autoscale.hold_timeout` (then the same 503). Counted in metrics and reported to the access
//! log as `held_ms`.
//! Must not touch: replicas. A held request has no replica yet, so nothing it meets blames one.

use std::sync::atomic::Ordering;

use crate::access_log::Outcome;
use crate::rescue::GatewayError;
use crate::snapshot::{Current, Snapshot};

use super::Gateway;

/// Holds a request while `snap` is asleep, until a snapshot with a replica is published; returns
/// that snapshot, or why the request is answered 503.
pub async fn wait(
    snap: &Snapshot,
    gateway: &Gateway<'_>,
    outcome: &mut Outcome,
) -> Result<Current, GatewayError> {
    let metrics = gateway.metrics;
    let cfg = &snap.config.autoscale;
    let Some(_place) = snap.holds.enter(cfg.hold_max) else {
        metrics.autoscale_hold_full.fetch_add(1, Ordering::Relaxed);
        return Err(GatewayError::HoldFull {
            limit: cfg.hold_max,
        });
    };
    metrics.autoscale_held.fetch_add(1, Ordering::Relaxed);
    gateway.controller.wake();
    let started = tokio::time::Instant::now();
    let deadline = started + cfg.hold_timeout;
    let woken = loop {
        // Registered before the snapshot is read, so a publish in between is not missed.
        let published = snap.holds.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        let now = gateway.worker.snapshot();
        if !now.asleep {
            break Ok(now);
        }
        if tokio::time::timeout_at(deadline, published).await.is_err() {
            metrics
                .autoscale_hold_timeouts
                .fetch_add(1, Ordering::Relaxed);
            break Err(GatewayError::HoldTimeout {
                timeout: cfg.hold_timeout,
            });
        }
    };
    let waited = started.elapsed();
    metrics.autoscale_hold_wait.observe(waited);
    outcome.held = Some(waited);
    tracing::debug!(
        waited_ms = waited.as_millis() as u64,
        ok = woken.is_ok(),
        "request held at zero replicas"
    );
    woken
}
