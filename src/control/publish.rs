//! Publishing: assembling the immutable snapshot the data plane reads, and readiness.
//!
//! Owns: which replicas are routable (members that are up or suspect and have an instance), the
//! owner table built over them, the upstream list (and the TLS client they are reached with,
//! carried over as the controller holds it), and swapping the result in with one atomic
//! store; answering `wait_ready` once the members have settled.
//! Must not touch: decisions. It renders the controller's state as it is.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Controller;
use crate::ring::{Ring, ServerId};
use crate::snapshot::{Ramp, Snapshot, Upstream};

/// `127.0.0.1` and `::1`: the address the `process` provider's replicas share with the operator
/// on this host, so they cannot be told apart by address (other loopback addresses, such as
/// `127.0.0.3`, are distinct hosts as far as the admin guard is concerned).
fn is_operator_loopback(ip: std::net::IpAddr) -> bool {
    ip == std::net::Ipv4Addr::LOCALHOST || ip == std::net::Ipv6Addr::LOCALHOST
}

impl Controller {
    /// Whether the ring should route to replica `id` now.
    fn routable(&self, id: ServerId) -> bool {
        let retiring = |r: &super::lifecycle::Replica| r.retire_since.is_some();
        self.replicas.get(&id).is_some_and(|r| {
            (self.membership.is_member(id) || retiring(r))
                && r.tracker.state.routable()
                && r.instance.is_some()
        })
    }

    /// Replica `id` just joined the ring: it ramps up if `health.slow_start` is on and another
    /// member serves meanwhile (when all start together there is nobody to hand keys over from).
    pub(super) fn start_ramp(&mut self, id: ServerId) {
        let window = self.config.health.slow_start;
        let now = tokio::time::Instant::now();
        let others_serve = self.ramps_enabled
            && !window.is_zero()
            && self.membership.members().any(|(other, _)| {
                other != id
                    && self.routable(other)
                    && self
                        .replicas
                        .get(&other)
                        .is_some_and(|r| self.ramp_of(r, now).is_none())
            });
        if let Some(r) = self.replicas.get_mut(&id) {
            r.ramp_since = others_serve.then_some(now);
        }
    }

    /// Its ramp, while `health.slow_start` is on and it has not passed; a retiring replica's
    /// until it is taken off the ring.
    fn ramp_of(&self, r: &super::lifecycle::Replica, now: tokio::time::Instant) -> Option<Ramp> {
        let window = self.config.health.slow_start;
        if let Some(since) = r.retire_since {
            return Some(Ramp {
                since,
                window,
                down: true,
            });
        }
        let since = r.ramp_since?;
        (!window.is_zero() && now < since + window).then_some(Ramp {
            since,
            window,
            down: false,
        })
    }

    pub(super) fn publish(&mut self) {
        let now = tokio::time::Instant::now();
        let mut ramps_until: Option<tokio::time::Instant> = None;
        let ring = Ring::build(&self.placement, |id| self.routable(id));
        let max_id = self
            .replicas
            .keys()
            .next_back()
            .map(|id| id.get() as usize)
            .unwrap_or(0);
        let mut upstreams: Vec<Option<Arc<Upstream>>> = vec![None; max_id + 1];
        for (&id, r) in self.replicas.iter() {
            if !self.routable(id) {
                continue;
            }
            let (Some(inst), Some(name)) = (&r.instance, self.membership.name(id)) else {
                continue;
            };
            let Ok(authority) = http::uri::Authority::try_from(inst.addr.to_string()) else {
                continue;
            };
            let ramp = self.ramp_of(r, now);
            if let Some(rp) = ramp {
                // A retiring replica leaves the ring at the first tick after its window: the
                // data plane keeps checking its ramp until then.
                let margin = if rp.down {
                    super::TICK * 2
                } else {
                    Duration::ZERO
                };
                let end = rp.since + rp.window + margin;
                ramps_until = Some(ramps_until.map_or(end, |u| u.max(end)));
            }
            upstreams[id.get() as usize] = Some(Arc::new(Upstream {
                ramp,
                id,
                name: name.to_owned(),
                addr: inst.addr,
                authority,
                incarnation: r.incarnation,
                stats: r.stats.clone(),
            }));
        }
        let mut replica_ips: Vec<std::net::IpAddr> = self
            .replicas
            .values()
            .filter_map(|r| r.instance.as_ref())
            .map(|i| i.addr.ip().to_canonical())
            .filter(|ip| !is_operator_loopback(*ip))
            .collect();
        replica_ips.sort_unstable();
        replica_ips.dedup();
        self.generation += 1;
        // Asleep until a replica serves again (a wake-up's replica is starting meanwhile).
        // With `[autoscale]` turned off and no replica coming, a request gets the 503 at once.
        let none_coming = !self.config.autoscale.enabled && self.membership.desired() == 0;
        if ring.servers() > 0 || none_coming {
            self.zeroed = false;
        }
        let asleep = self.zeroed;
        let m = &self.metrics;
        m.replicas_up
            .store(ring.servers() as u64, Ordering::Relaxed);
        m.replicas_desired
            .store(self.membership.desired() as u64, Ordering::Relaxed);
        m.ring_rebuilds.fetch_add(1, Ordering::Relaxed);
        self.shared.store(Arc::new(Snapshot {
            generation: self.generation,
            config: self.config.clone(),
            ring,
            upstreams,
            members: self.membership.member_names(),
            policy: self.policy.clone(),
            ramps_until,
            replica_ips,
            upstream_tls: self.upstream.tls.clone(),
            asleep,
            holds: self.holds.clone(),
        }));
        // Held requests look at the new snapshot.
        self.holds.published.notify_waiters();
        self.notify_ready();
    }

    /// Ready when every member answers or has already failed to start (it is being retried with
    /// back-off; waiting for it would only delay the others), and no grow through the shared
    /// ring record is pending.
    pub(super) fn notify_ready(&mut self) {
        if self.authority.growing() || (self.ready_waiters.is_empty() && self.ramps_enabled) {
            return;
        }
        let settled = self.membership.members().all(|(id, _)| {
            self.replicas
                .get(&id)
                .is_some_and(|r| r.tracker.state.routable() || r.crash_streak > 0)
        });
        if settled {
            self.ramps_enabled = true;
            for w in self.ready_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}
