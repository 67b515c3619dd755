//! The serving threads' watchdog: a backstop that does not depend on the Lua hook (or on any
//! other code a serving thread runs) to notice that a thread has stopped serving.
//!
//! Each serving thread's runtime runs [`Watchdog::heartbeat`], which bumps that thread's beat
//! counter every [`BEAT_EVERY`]; it can only run while the thread gets back to its scheduler,
//! so a thread held by anything (a hook past its deadline, a C call, a bug) stops beating. A
//! task on the main runtime, [`Watchdog::watch`], reads the counters every [`BEAT_EVERY`] and
//! calls a thread stalled once its counter has not moved for [`STALL_AFTER`]; the verdict is
//! shown in `/lb/status` (`serving_threads`) and `/lb/metrics`
//! (`ringgate_serving_thread_stalled`, `ringgate_serving_thread_stalls_total`), and logged once
//! per change. Shutdown does not wait for a stalled thread past `proxy.drain_timeout` (see
//! [`crate::gateway`]).
//!
//! Owns: the beat counters, the decision "no beat for [`STALL_AFTER`] is a stall"
//! ([`Tracker`], pure) and its reporting (the readings; [`crate::exposition`] writes the
//! metrics). Must not touch: the serving threads themselves (a thread cannot be stopped from
//! outside; this only reports), or any routing decision.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often a serving thread beats, and how often the watchdog looks.
pub const BEAT_EVERY: Duration = Duration::from_millis(250);
/// No beat for this long is a stall: six beats missed, far more than a busy but healthy thread
/// ever goes without getting back to its scheduler (a hook call is cut at its deadline, 1 s at
/// most), short enough to tell an operator within two seconds.
pub const STALL_AFTER: Duration = Duration::from_millis(1500);

/// What the watchdog says of one serving thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It beats.
    Serving,
    /// It has not beaten for [`STALL_AFTER`].
    Stalled,
}

/// The decision for one thread, from the readings of its beat counter.
#[derive(Debug, Clone)]
pub struct Tracker {
    beats: u64,
    moved_at: Instant,
    verdict: Verdict,
    stall_after: Duration,
}

impl Tracker {
    /// A tracker that starts from `beats` read at `now`, the thread serving.
    pub fn new(beats: u64, now: Instant, stall_after: Duration) -> Tracker {
        Tracker {
            beats,
            moved_at: now,
            verdict: Verdict::Serving,
            stall_after,
        }
    }

    /// Takes a reading; returns the new verdict when it changed.
    pub fn observe(&mut self, beats: u64, now: Instant) -> Option<Verdict> {
        if beats != self.beats {
            self.beats = beats;
            self.moved_at = now;
        }
        let verdict = if now.saturating_duration_since(self.moved_at) >= self.stall_after {
            Verdict::Stalled
        } else {
            Verdict::Serving
        };
        (verdict != self.verdict).then(|| {
            self.verdict = verdict;
            verdict
        })
    }

    /// Since when the counter has not moved.
    pub fn still_since(&self) -> Instant {
        self.moved_at
    }
}

#[derive(Debug, Default)]
struct ThreadWatch {
    beats: AtomicU64,
    stalled: AtomicBool,
    /// Times this thread was found stalled.
    stalls: AtomicU64,
    /// When its last beat came (ms since the epoch), as the watchdog saw it.
    last_beat_ms: AtomicU64,
}

/// The beat counters of the serving threads and what the watchdog made of them.
#[derive(Debug)]
pub struct Watchdog {
    threads: Box<[ThreadWatch]>,
}

impl Watchdog {
    /// A watchdog for `n` serving threads.
    pub fn new(n: usize) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            threads: (0..n).map(|_| ThreadWatch::default()).collect(),
        })
    }

    /// Serving thread `thread`'s beat: runs on its runtime as long as that runtime runs.
    pub async fn heartbeat(self: Arc<Self>, thread: usize) {
        let mut tick = tokio::time::interval(BEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(t) = self.threads.get(thread) {
                t.beats.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads the counters every [`BEAT_EVERY`] (on the main runtime, never on a serving
    /// thread) and reports every change of verdict.
    pub async fn watch(self: Arc<Self>) {
        let now = Instant::now();
        let mut trackers: Vec<Tracker> = self
            .threads
            .iter()
            .map(|t| Tracker::new(t.beats.load(Ordering::Relaxed), now, STALL_AFTER))
            .collect();
        let mut tick = tokio::time::interval(BEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for (n, (t, tracker)) in self.threads.iter().zip(&mut trackers).enumerate() {
                let change = tracker.observe(t.beats.load(Ordering::Relaxed), now);
                let since = now.saturating_duration_since(tracker.still_since());
                t.last_beat_ms.store(
                    epoch_ms(SystemTime::now()).saturating_sub(millis(since)),
                    Ordering::Relaxed,
                );
                match change {
                    Some(Verdict::Stalled) => {
                        t.stalled.store(true, Ordering::Relaxed);
                        t.stalls.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(thread = n, silent_for = ?since, "serving thread stopped serving: its runtime has not run for this long (a hook or a library call holding it?); its connections wait, the other threads serve");
                    }
                    Some(Verdict::Serving) => {
                        t.stalled.store(false, Ordering::Relaxed);
                        tracing::warn!(thread = n, "serving thread serves again");
                    }
                    None => {}
                }
            }
        }
    }

    /// Whether serving thread `thread` is stalled now.
    pub fn stalled(&self, thread: usize) -> bool {
        self.threads
            .get(thread)
            .is_some_and(|t| t.stalled.load(Ordering::Relaxed))
    }

    /// `/lb/status`'s `serving_threads`: per thread, its state, when it last beat (ms since the
    /// epoch) and how many stalls it had.
    pub fn status(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.threads
                .iter()
                .enumerate()
                .map(|(n, t)| {
                    let stalled = t.stalled.load(Ordering::Relaxed);
                    serde_json::json!({
                        "thread": n,
                        "state": if stalled { "stalled" } else { "serving" },
                        "last_beat_ms": t.last_beat_ms.load(Ordering::Relaxed),
                        "stalls": t.stalls.load(Ordering::Relaxed),
                    })
                })
                .collect(),
        )
    }

    /// Per serving thread: whether it is stalled now, and how many stalls it had (what
    /// `/lb/metrics` shows).
    pub fn readings(&self) -> impl Iterator<Item = (bool, u64)> + '_ {
        self.threads.iter().map(|t| {
            (
                t.stalled.load(Ordering::Relaxed),
                t.stalls.load(Ordering::Relaxed),
            )
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_millis(1500);

    #[test]
    fn a_counter_that_moves_is_serving() {
        let t0 = Instant::now();
        let mut t = Tracker::new(0, t0, AFTER);
        for k in 1..20u32 {
            assert_eq!(t.observe(u64::from(k), t0 + BEAT_EVERY * k), None);
        }
    }

    #[test]
    fn a_counter_still_for_the_threshold_is_a_stall_reported_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new(5, t0, AFTER);
        assert_eq!(t.observe(5, t0 + Duration::from_millis(1499)), None);
        assert_eq!(
            t.observe(5, t0 + Duration::from_millis(1500)),
            Some(Verdict::Stalled)
        );
        assert_eq!(t.observe(5, t0 + Duration::from_secs(30)), None);
    }

    #[test]
    fn a_stalled_thread_that_beats_again_serves_again_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new(0, t0, AFTER);
        assert_eq!(t.observe(0, t0 + AFTER), Some(Verdict::Stalled));
        let back = t0 + Duration::from_secs(10);
        assert_eq!(t.observe(1, back), Some(Verdict::Serving));
        assert_eq!(t.observe(2, back + BEAT_EVERY), None);
        // Silent again from the last beat on, not from the first stall.
        assert_eq!(
            t.observe(2, back + BEAT_EVERY + AFTER),
            Some(Verdict::Stalled)
        );
    }

    #[test]
    fn the_status_and_the_metrics_show_every_thread() {
        let w = Watchdog::new(2);
        w.threads[1].stalled.store(true, Ordering::Relaxed);
        w.threads[1].stalls.store(3, Ordering::Relaxed);
        let s = w.status();
        assert_eq!(s[0]["state"], "serving");
        assert_eq!(s[1]["state"], "stalled");
        assert_eq!(s[1]["stalls"], 3);
        assert_eq!(w.readings().collect::<Vec<_>>(), [(false, 0), (true, 3)]);
        // The lines `/lb/metrics` makes of them are tested in `crate::exposition`.
        assert!(w.stalled(1) && !w.stalled(0) && !w.stalled(7));
    }
}
