//! Health evidence: check results (with the Lua `health` verdict) and passive failures from the
//! request path, turned into rise/fall transitions and what they mean for the ring.
//!
//! Owns: [`verdict`] (pure: the probe result, unless a `health` hook answers) and the
//! controller's reaction to each [`Transition`]: an `/add` may commit, a dead replica is
//! replaced, the ring is republished.
//! Must not touch: how replicas are started or stopped (`lifecycle`) or checked (`health`).

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::membership::Phase;
use super::Controller;
use crate::health::probe::ProbeReport;
use crate::health::probe_period;
use crate::health::{HealthState, ProbeOutcome, Transition};
use crate::policy::{Hook, HookOutcome, PolicySet, ProbeView};
use crate::ring::ServerId;

/// Whether a check passed: the Lua `health(server, probe)` hook where it answers, else the
/// check's own result (200 within the timeout).
pub fn verdict(policy: &PolicySet, server: &str, outcome: &ProbeOutcome) -> bool {
    if policy.has_hook(Hook::Health) {
        let view = ProbeView {
            status: outcome.status,
            latency_ms: outcome.latency_ms,
            error: outcome.error.as_deref(),
        };
        if let HookOutcome::Value(ok) = policy.health(server, &view) {
            return ok;
        }
    }
    outcome.ok
}

/// Whether a passive ejection may take one more of `members` out when `out` already are:
/// at most `percent` of them at once (Envoy's `max_ejection_percent`), but always at least one.
/// Past the cap the replica stays in the ring; its active checks still decide.
pub fn may_eject(members: usize, out: usize, percent: u32) -> bool {
    let cap = (members * percent as usize / 100).max(1);
    out < cap
}

impl Controller {
    /// Members out of the ring now (down, or not running).
    pub(super) fn members_out(&self) -> usize {
        self.membership
            .members()
            .filter(|(id, _)| {
                !self
                    .replicas
                    .get(id)
                    .is_some_and(|r| r.tracker.state.routable() && r.instance.is_some())
            })
            .count()
    }

    pub(super) fn on_probe(&mut self, report: ProbeReport) {
        if self.on_successor_probe(&report) {
            return;
        }
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let (interval, timeout) = (self.config.health.interval, self.config.health.timeout);
        let id = report.id;
        let Some(phase) = self.membership.phase(id) else {
            return;
        };
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        if r.incarnation != report.incarnation || phase == Phase::Leaving {
            return;
        }
        if report.outcome.inconclusive {
            // The gateway could not check (out of descriptors…): no evidence either way.
            tracing::debug!(replica = %name, error = ?report.outcome.error, "check inconclusive");
            r.last_probe = Some(report.outcome);
            return;
        }
        let ok = verdict(&self.policy, &name, &report.outcome);
        if !ok && r.tracker.state != HealthState::Starting {
            tracing::debug!(replica = %name, error = ?report.outcome.error, "check failed");
        }
        r.last_probe = Some(report.outcome);
        let was = r.tracker.state;
        let mut transition = r.tracker.on_probe(ok, rise, fall);
        if was == HealthState::Ejected && ok && self.maybe_readmit(id) {
            transition = Transition::Up;
        }
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        if let Some(p) = &r.probe {
            p.set_period(probe_period(r.tracker.state, interval), timeout);
        }
        match transition {
            Transition::None | Transition::Down => {}
            Transition::Up => {
                r.up_since = Some(Instant::now());
                r.next_restart = None;
                // Whatever made it fail before is gone now.
                r.last_exit = None;
                if was == HealthState::Down {
                    tracing::info!(replica = %name, id = %id, "replica recovered");
                } else if was != HealthState::Ejected {
                    tracing::info!(replica = %name, id = %id, "replica up");
                }
                self.start_ramp(id);
                match phase {
                    Phase::Joining(op) => self.maybe_commit_add(op),
                    _ => self.publish(),
                }
            }
            Transition::Suspect => {
                tracing::info!(replica = %name, id = %id, "replica suspect: a check failed");
            }
            Transition::Dead => {
                tracing::warn!(replica = %name, id = %id, failures = fall, "replica down: checks failed");
                self.metrics
                    .ejections
                    .fetch_add(u64::from(was.routable()), Ordering::Relaxed);
                self.replace(id);
                self.publish();
            }
        }
    }

    /// A connect to the replica failed on the request path: out of the ring at once, checked
    /// at once.
    pub(super) fn on_passive_failure(&mut self, id: ServerId, incarnation: u64, detail: String) {
        let fall = self.config.health.fall;
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        let (members, out) = (self.membership.desired(), self.members_out());
        let percent = self.config.health.max_ejection_percent;
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        if r.incarnation != incarnation || !r.tracker.state.routable() {
            return;
        }
        if !may_eject(members, out, percent) {
            self.metrics
                .ejections_capped
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(replica = %name, out, members, "not ejected: health.max_ejection_percent of the members are out already");
            // Let the checks decide, at their pace: once the first one has failed it is
            // suspect and checked every second; more failed requests do not hurry it.
            if r.tracker.state == HealthState::Up {
                if let Some(p) = &r.probe {
                    p.probe_now();
                }
            }
            return;
        }
        let transition = r.tracker.on_passive_failure(fall);
        if transition == Transition::None {
            return;
        }
        tracing::warn!(replica = %name, id = %id, error = %detail, "replica ejected: a request could not connect");
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &r.probe {
            p.probe_now();
        }
        if transition == Transition::Dead {
            self.replace(id);
        }
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyLimits;

    fn outcome(ok: bool, latency_ms: f64) -> ProbeOutcome {
        ProbeOutcome {
            ok,
            inconclusive: false,
            status: ok.then_some(200),
            latency_ms,
            error: (!ok).then(|| "connection refused".into()),
            at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn passive_ejection_is_capped_but_one_may_always_go() {
        assert!(may_eject(3, 0, 50));
        assert!(!may_eject(3, 1, 50), "a second of three would be 67%");
        assert!(may_eject(4, 1, 50));
        assert!(!may_eject(4, 2, 50));
        assert!(may_eject(1, 0, 50), "at least one");
        assert!(may_eject(2, 0, 0), "at least one, even at 0%");
        assert!(!may_eject(2, 1, 0));
        assert!(may_eject(10, 9, 100));
    }

    #[test]
    fn the_check_decides_without_a_hook() {
        let p = PolicySet::empty();
        assert!(verdict(&p, "s1", &outcome(true, 1.0)));
        assert!(!verdict(&p, "s1", &outcome(false, 1.0)));
    }

    #[test]
    fn a_health_hook_overrides_and_a_failing_one_falls_back() {
        let p = PolicySet::from_sources(
            vec![(
                "h.lua".into(),
                "function health(s, probe)\n\
                   if s == 'broken' then error('boom') end\n\
                   if s == 'defer' then return nil end\n\
                   return probe.latency_ms < 100\n\
                 end"
                .into(),
            )],
            PolicyLimits::default(),
            1,
        )
        .expect("policy loads");
        assert!(
            !verdict(&p, "s1", &outcome(true, 500.0)),
            "slow is unhealthy"
        );
        assert!(
            verdict(&p, "s1", &outcome(false, 5.0)),
            "the hook may overrule"
        );
        assert!(
            verdict(&p, "broken", &outcome(true, 500.0)),
            "error: the check decides"
        );
        assert!(
            !verdict(&p, "defer", &outcome(false, 5.0)),
            "nil: the check decides"
        );
    }
}
