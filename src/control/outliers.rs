//! Outlier ejection: replicas taken out of the ring for what they answer, not for being dead.
//!
//! Owns: the rules (pure, tested below: [`breaches`], [`ejection_time`]) and the controller's
//! side of them: `health.eject_after_5xx` answers in a row (counted on the request path, which
//! sends one message when the count reaches it), or `health.eject_failure_percent` of 5xx
//! answers over `health.eject_window` with at least `health.eject_min_requests` answers. An
//! ejected replica is not replaced: it stays out for `eject_time` × its ejections in a row
//! (capped by `max_backoff`), and returns once that has passed and a check passes. Ejections
//! share `health.max_ejection_percent` with passive ejection, so they cannot empty the ring.
//! Must not touch: how replicas start or die (`lifecycle`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::probes::may_eject;
use super::Controller;
use crate::health::probe_period;
use crate::health::HealthState;
use crate::ring::ServerId;

/// Why a replica is ejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outlier {
    Consecutive5xx(u64),
    FailurePercent { percent: u64, answers: u64 },
}

impl std::fmt::Display for Outlier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outlier::Consecutive5xx(n) => write!(f, "{n} 5xx answers in a row"),
            Outlier::FailurePercent { percent, answers } => {
                write!(f, "{percent}% 5xx of {answers} answers in the last window")
            }
        }
    }
}

/// Whether a window of `answers` with `errors` 5xx among them breaches `percent` (0: off).
pub fn breaches(answers: u64, errors: u64, percent: u32, min_answers: u32) -> Option<u64> {
    if percent == 0 || answers == 0 || answers < u64::from(min_answers) {
        return None;
    }
    let share = errors * 100 / answers;
    (share >= u64::from(percent)).then_some(share)
}

/// How long the `n`-th ejection in a row lasts: `base · n`, capped.
pub fn ejection_time(base: Duration, n: u32, cap: Duration) -> Duration {
    base.saturating_mul(n.max(1)).min(cap)
}

/// The outlier windows' clock: the state this module owns besides each replica's counts.
pub(super) struct Outliers {
    /// When the last failure-percentage window was evaluated.
    last_window: Instant,
}

impl Outliers {
    pub fn new(now: Instant) -> Outliers {
        Outliers { last_window: now }
    }

    /// Whether a window of `window` has passed since the last one (and starts the next).
    fn window_due(&mut self, now: Instant, window: Duration) -> bool {
        if now < self.last_window + window {
            return false;
        }
        self.last_window = now;
        true
    }
}

impl Controller {
    /// Time-driven outlier work: the failure-percentage window, when one has passed.
    pub(super) fn outliers_tick(&mut self, now: Instant) {
        let h = &self.config.health;
        if h.eject_failure_percent > 0 && self.outliers.window_due(now, h.eject_window) {
            self.outlier_window();
        }
    }

    /// The request path saw `consecutive` 5xx answers in a row from replica `id`.
    pub(super) fn on_outlier(&mut self, id: ServerId, incarnation: u64, consecutive: u64) {
        if self
            .replicas
            .get(&id)
            .is_some_and(|r| r.incarnation == incarnation)
        {
            self.eject(id, Outlier::Consecutive5xx(consecutive));
        }
    }

    /// Takes replica `id` out for `why`, within the ejection cap.
    fn eject(&mut self, id: ServerId, why: Outlier) {
        let h = &self.config.health;
        let (base, cap, percent) = (h.eject_time, h.max_backoff, h.max_ejection_percent);
        let interval = h.interval;
        let (members, out) = (self.membership.desired(), self.members_out());
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        if !self.membership.is_member(id) {
            return;
        }
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        if !r.tracker.state.routable() {
            return;
        }
        if !may_eject(members, out, percent) {
            self.metrics
                .ejections_capped
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(replica = %name, reason = %why, out, members, "not ejected: health.max_ejection_percent of the members are out already");
            return;
        }
        r.tracker.eject();
        r.ejections = r.ejections.saturating_add(1);
        let time = ejection_time(base, r.ejections, cap);
        r.ejected_until = Some(Instant::now() + time);
        if let Some(p) = &r.probe {
            p.set_period(probe_period(HealthState::Ejected, interval), h.timeout);
        }
        tracing::warn!(replica = %name, id = %id, reason = %why, for_ms = time.as_millis() as u64, ejections = r.ejections, "replica ejected (outlier): out of the ring, not replaced; back when its time is up and a check passes");
        self.metrics
            .outlier_ejections
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }

    /// An ejected replica passed a check: back in the ring if its time is up.
    pub(super) fn maybe_readmit(&mut self, id: ServerId) -> bool {
        let now = Instant::now();
        let name = self.membership.name(id).unwrap_or_default().to_owned();
        let Some(r) = self.replicas.get_mut(&id) else {
            return false;
        };
        if r.tracker.state != HealthState::Ejected || r.ejected_until.is_some_and(|t| now < t) {
            return false;
        }
        r.tracker.readmit();
        r.ejected_until = None;
        r.stats.consecutive_5xx.store(0, Ordering::Relaxed);
        let (answers, errors) = counts(r);
        r.window_base = (answers, errors);
        tracing::info!(replica = %name, id = %id, "replica back after ejection: its check passed");
        true
    }

    /// Once per `health.eject_window`: ejects replicas over the failure percentage, and lets a
    /// clean window count down the ejections in a row.
    fn outlier_window(&mut self) {
        let h = &self.config.health;
        let (percent, min) = (h.eject_failure_percent, h.eject_min_requests);
        let mut breached = Vec::new();
        for (&id, r) in self.replicas.iter_mut() {
            let (answers, errors) = counts(r);
            let (a0, e0) = r.window_base;
            r.window_base = (answers, errors);
            if !r.tracker.state.routable() {
                continue;
            }
            let window = (answers.saturating_sub(a0), errors.saturating_sub(e0));
            match breaches(window.0, window.1, percent, min) {
                Some(share) => breached.push((
                    id,
                    Outlier::FailurePercent {
                        percent: share,
                        answers: window.0,
                    },
                )),
                None if window.0 > 0 => r.ejections = r.ejections.saturating_sub(1),
                None => {}
            }
        }
        for (id, why) in breached {
            self.eject(id, why);
        }
    }
}

/// Answers and 5xx answers a replica has given so far.
fn counts(r: &super::lifecycle::Replica) -> (u64, u64) {
    let answers = r.stats.answers();
    (answers.iter().sum(), answers[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_percentage_needs_enough_answers() {
        assert_eq!(breaches(100, 60, 50, 20), Some(60));
        assert_eq!(breaches(100, 40, 50, 20), None);
        assert_eq!(breaches(10, 10, 50, 20), None, "too few answers to judge");
        assert_eq!(breaches(100, 100, 0, 20), None, "off");
        assert_eq!(breaches(0, 0, 50, 0), None);
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_cap() {
        let (base, cap) = (Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(ejection_time(base, 1, cap), Duration::from_secs(30));
        assert_eq!(ejection_time(base, 2, cap), Duration::from_secs(60));
        assert_eq!(ejection_time(base, 9, cap), Duration::from_secs(60));
        assert_eq!(ejection_time(base, 0, cap), Duration::from_secs(30));
    }
}
