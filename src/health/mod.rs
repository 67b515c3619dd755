//! Health: the rise/fall state machine and what one check found.
//!
//! Owns: [`HealthState`], [`Tracker`] (the pure state machine that turns check results and
//! passive failures into [`Transition`]s) and [`ProbeOutcome`]; the checks themselves live in
//! [`probe`].
//! Must not touch: the ring, the snapshot or the provider. It reports; the controller decides.
//!
//! States: `starting` (spawned, not yet ready) → `up` after `rise` consecutive good checks
//! (readiness: the check is how an app says it is ready);
//! `up` → `suspect` on a failed check (still routed) → `down` after `fall` consecutive failures
//! (out of the ring, replaced when the provider manages replicas); `down` → `up` after `rise`
//! consecutive good checks. A failed connect on the request path takes an up replica `down` at
//! once and probes it immediately. Replicas being removed are no longer checked.

pub mod probe;

use std::time::{Duration, SystemTime};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Starting,
    Up,
    Suspect,
    Down,
    /// Taken out for its answers (outlier ejection): not replaced; back once its ejection time
    /// has passed and its checks pass.
    Ejected,
}

impl HealthState {
    pub fn name(self) -> &'static str {
        match self {
            HealthState::Starting => "starting",
            HealthState::Up => "up",
            HealthState::Suspect => "suspect",
            HealthState::Down => "down",
            HealthState::Ejected => "ejected",
        }
    }

    /// Whether the ring routes to a replica in this state.
    pub fn routable(self) -> bool {
        matches!(self, HealthState::Up | HealthState::Suspect)
    }
}

/// What a state change means for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Answered for the first time (starting → up), or came back (down → up).
    Up,
    /// A check failed; still routed.
    Suspect,
    /// Out of the ring.
    Down,
    /// Down and `fall` consecutive failures: dead for sure, replace it.
    Dead,
}

/// The rise/fall counters of one replica.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub state: HealthState,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

impl Tracker {
    pub fn starting() -> Tracker {
        Tracker {
            state: HealthState::Starting,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }

    #[cfg(test)]
    pub fn up() -> Tracker {
        Tracker {
            state: HealthState::Up,
            ..Tracker::starting()
        }
    }

    /// Feeds one check result.
    pub fn on_probe(&mut self, ok: bool, rise: u32, fall: u32) -> Transition {
        if ok {
            self.consecutive_failures = 0;
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
        } else {
            self.consecutive_successes = 0;
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        }
        let failed_enough = self.consecutive_failures >= fall;
        match (self.state, ok) {
            // Readiness: a new replica joins after `rise` good checks in a row, as a
            // recovering one does.
            (HealthState::Starting, true) if self.consecutive_successes >= rise => {
                self.set(HealthState::Up, Transition::Up)
            }
            (HealthState::Starting, _) => Transition::None,
            (HealthState::Up | HealthState::Suspect, true) => {
                self.set(HealthState::Up, Transition::None)
            }
            (HealthState::Up | HealthState::Suspect, false) if failed_enough => {
                self.state = HealthState::Down;
                Transition::Dead
            }
            (HealthState::Up, false) => self.set(HealthState::Suspect, Transition::Suspect),
            (HealthState::Suspect, false) => Transition::None,
            (HealthState::Down, true) if self.consecutive_successes >= rise => {
                self.set(HealthState::Up, Transition::Up)
            }
            (HealthState::Down, true) => Transition::None,
            // Only the failure that reaches `fall` confirms death; later ones change nothing.
            (HealthState::Down, false) if self.consecutive_failures == fall => Transition::Dead,
            (HealthState::Down, false) => Transition::None,
            // Ejected: its checks still run; the controller brings it back once its time is up.
            // Failing them `fall` times means it is not just misbehaving but dead.
            (HealthState::Ejected, true) => Transition::None,
            (HealthState::Ejected, false) if failed_enough => {
                self.state = HealthState::Down;
                Transition::Dead
            }
            (HealthState::Ejected, false) => Transition::None,
        }
    }

    /// Outlier ejection: out of the ring (if it was in), not counted as a failed check.
    pub fn eject(&mut self) -> bool {
        if !self.state.routable() {
            return false;
        }
        self.state = HealthState::Ejected;
        self.consecutive_failures = 0;
        self.consecutive_successes = 0;
        true
    }

    /// An ejected replica whose time is up and whose check passed: back in the ring.
    pub fn readmit(&mut self) -> Transition {
        if self.state != HealthState::Ejected {
            return Transition::None;
        }
        self.set(HealthState::Up, Transition::Up)
    }

    /// A failed connect on the request path: out of the ring at once, counted as one failure.
    pub fn on_passive_failure(&mut self, fall: u32) -> Transition {
        if !self.state.routable() {
            return Transition::None;
        }
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.state = HealthState::Down;
        if self.consecutive_failures >= fall {
            Transition::Dead
        } else {
            Transition::Down
        }
    }

    fn set(&mut self, state: HealthState, t: Transition) -> Transition {
        if state == HealthState::Up {
            self.consecutive_failures = 0;
        }
        self.state = state;
        t
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    pub ok: bool,
    /// The check could not be made for the gateway's own reasons (out of file descriptors…):
    /// it says nothing about the replica and is not counted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconclusive: bool,
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub error: Option<String>,
    #[serde(with = "unix_ms")]
    pub at: SystemTime,
}

mod unix_ms {
    use std::time::SystemTime;
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.serialize_u64(ms)
    }
}

/// How often a starting replica is checked.
pub const START_PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Upper bound on the check period of a replica that is not up.
pub const FAST_PROBE_PERIOD: Duration = Duration::from_secs(1);

/// How often a replica in `state` is checked.
pub fn probe_period(state: HealthState, interval: Duration) -> Duration {
    match state {
        HealthState::Starting => START_PROBE_PERIOD,
        HealthState::Up => interval,
        HealthState::Suspect | HealthState::Down | HealthState::Ejected => {
            interval.min(FAST_PROBE_PERIOD)
        }
    }
}

/// A check's result in a sentence: `answered 503 after 2.1 ms`, `connection refused`.
pub fn describe_probe(p: &ProbeOutcome) -> String {
    match (p.status, &p.error) {
        (Some(status), _) => format!("answered {status} after {:.1} ms", p.latency_ms),
        (None, Some(e)) => e.clone(),
        (None, None) => "no answer".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_joins_after_rise_successes_in_a_row() {
        let mut t = Tracker::starting();
        assert_eq!(t.on_probe(false, 2, 2), Transition::None);
        assert_eq!(t.state, HealthState::Starting);
        assert_eq!(t.on_probe(true, 2, 2), Transition::None, "one is not rise");
        assert_eq!(
            t.on_probe(false, 2, 2),
            Transition::None,
            "the streak broke"
        );
        assert_eq!(
            t.state,
            HealthState::Starting,
            "failures never take a start down"
        );
        assert_eq!(t.on_probe(true, 2, 2), Transition::None);
        assert_eq!(t.on_probe(true, 2, 2), Transition::Up);
        assert_eq!(t.state, HealthState::Up);
        let mut t = Tracker::starting();
        assert_eq!(
            t.on_probe(true, 1, 2),
            Transition::Up,
            "rise = 1: the first"
        );
    }

    #[test]
    fn fall_consecutive_failures_take_it_down() {
        let mut t = Tracker::up();
        assert_eq!(t.on_probe(false, 2, 3), Transition::Suspect);
        assert!(t.state.routable());
        assert_eq!(t.on_probe(false, 2, 3), Transition::None);
        assert_eq!(t.on_probe(false, 2, 3), Transition::Dead);
        assert_eq!(t.state, HealthState::Down);
        assert!(!t.state.routable());
        // Further failures do not re-announce death.
        assert_eq!(t.on_probe(false, 2, 3), Transition::None);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = Tracker::up();
        t.on_probe(false, 2, 2);
        assert_eq!(t.on_probe(true, 2, 2), Transition::None);
        assert_eq!(t.state, HealthState::Up);
        assert_eq!(t.on_probe(false, 2, 2), Transition::Suspect);
    }

    #[test]
    fn rise_consecutive_successes_bring_it_back() {
        let mut t = Tracker::up();
        t.on_probe(false, 3, 1);
        assert_eq!(t.state, HealthState::Down);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        t.on_probe(false, 3, 1);
        assert_eq!(t.state, HealthState::Down, "the streak broke");
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::None);
        assert_eq!(t.on_probe(true, 3, 1), Transition::Up);
    }

    #[test]
    fn passive_failure_ejects_at_once_and_a_failed_probe_confirms() {
        let mut t = Tracker::up();
        assert_eq!(t.on_passive_failure(2), Transition::Down);
        assert!(!t.state.routable());
        assert_eq!(t.on_passive_failure(2), Transition::None, "already out");
        assert_eq!(t.on_probe(false, 2, 2), Transition::Dead);
        let mut t = Tracker::up();
        t.on_passive_failure(2);
        t.on_probe(true, 2, 2);
        assert_eq!(
            t.on_probe(true, 2, 2),
            Transition::Up,
            "a false alarm recovers after rise"
        );
        let mut t = Tracker::up();
        assert_eq!(t.on_passive_failure(1), Transition::Dead);
    }

    #[test]
    fn replicas_that_are_not_up_are_checked_faster() {
        let interval = Duration::from_secs(10);
        assert_eq!(
            probe_period(HealthState::Starting, interval),
            START_PROBE_PERIOD
        );
        assert_eq!(probe_period(HealthState::Up, interval), interval);
        assert_eq!(probe_period(HealthState::Down, interval), FAST_PROBE_PERIOD);
        let short = Duration::from_millis(200);
        assert_eq!(probe_period(HealthState::Suspect, short), short);
    }
}
