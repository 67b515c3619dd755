//! Autoscaling, the decision: how many replicas the load asks for.
//!
//! Owns: the [`Autoscaler`]: the gateway-wide requests in flight sampled once a tick over the
//! last `stable_window`, the panic state, the N asked for over the last `scale_down_delay`, the
//! last decision and a short history of N and in flight (for `/lb/status` and the operator
//! page); and [`Autoscaler::decide`], Knative's shape: N = ⌈average in flight / target⌉ over the
//! stable window; when the panic window's average is over 2× the target per replica, N goes up
//! at once and never down for one stable window; N only falls to the highest N asked for over
//! `scale_down_delay`, so load that comes and goes cannot make it oscillate; steps are at most
//! `max_step`, N stays within `min..max`. Scale to zero (`min = 0` with `idle_to_zero`): after
//! `idle_to_zero` without a request N goes to 0 at once, and otherwise never below 1; a request
//! held at zero ([`Autoscaler::wake`]) brings it back to at least 1.
//! Must not touch: I/O, the provider, membership, the clock. Time and figures come in as
//! arguments, so every rule is tested below on paused time; the controller samples, asks, and
//! carries the decision out (`scaling`).

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::AutoscaleConfig;

/// Which way a decision moves N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
    Hold,
}

/// One decision with the figures it was made from (logged once, shown in `/lb/status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub direction: Direction,
    /// N when it was made.
    pub from: u32,
    /// N it asks for.
    pub to: u32,
    /// Average requests in flight (all replicas) over the stable window.
    pub stable_in_flight: f64,
    /// The same over the panic window.
    pub panic_in_flight: f64,
    /// N the stable (or, panicking, the panic) average asks for, before the scale-down delay,
    /// the step and the bounds.
    pub wanted: u32,
    /// Whether the panic window decided (N may not fall while it does).
    pub panicking: bool,
}

/// One point of the history the operator page draws.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// When it was taken (the page shows points relative to the newest).
    #[serde(skip)]
    pub at: Instant,
    pub n: u32,
    pub in_flight: u64,
}

/// How long the history for the operator page reaches back.
pub const HISTORY: Duration = Duration::from_secs(600);

/// The autoscaler's memory: what a decision needs of the past.
#[derive(Debug, Default)]
pub struct Autoscaler {
    /// Requests in flight, once a tick, over the last stable window.
    samples: VecDeque<(Instant, u64)>,
    /// Panicking until then (a breach of the panic threshold extends it).
    panic_until: Option<Instant>,
    /// N asked for, once a decision, over the last `scale_down_delay`.
    asked: VecDeque<(Instant, u32)>,
    /// The last decision that moved N.
    last: Option<Decision>,
    /// N and in flight over the last [`HISTORY`], one point a tick.
    history: VecDeque<Point>,
    /// The last moment a request was seen (in flight, answered or held): the idle window of
    /// scale to zero counts from it.
    last_request: Option<Instant>,
    /// Requests answered, as last observed (a rise means requests came).
    answered: u64,
    /// A request is held at N = 0: the next decision brings N back to at least 1.
    woken: bool,
}

/// ⌈in_flight / target⌉, saturating (a target is validated positive).
fn replicas_for(in_flight: f64, target: f64) -> u32 {
    if in_flight.is_nan() || target.is_nan() || in_flight <= 0.0 || target <= 0.0 {
        return 0;
    }
    let n = (in_flight / target).ceil();
    if n >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    }
}

impl Autoscaler {
    /// Records the requests in flight now (all replicas), the requests answered so far (all
    /// replicas; a fall, when a replica leaves, is no request) and N, and forgets what no
    /// window reaches any more.
    pub fn observe(
        &mut self,
        now: Instant,
        in_flight: u64,
        answered: u64,
        n: u32,
        cfg: &AutoscaleConfig,
    ) {
        if in_flight > 0 || answered > self.answered || self.last_request.is_none() {
            self.last_request = Some(now);
        }
        self.answered = answered;
        self.samples.push_back((now, in_flight));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) >= cfg.stable_window)
        {
            self.samples.pop_front();
        }
        self.history.push_back(Point {
            at: now,
            n,
            in_flight,
        });
        while self
            .history
            .front()
            .is_some_and(|p| now.duration_since(p.at) >= HISTORY)
        {
            self.history.pop_front();
        }
    }

    /// The average of the samples taken less than `window` ago (0 without any).
    fn average(&self, now: Instant, window: Duration) -> f64 {
        let (sum, count) = self
            .samples
            .iter()
            .rev()
            .take_while(|&&(t, _)| now.duration_since(t) < window)
            .fold((0u64, 0u32), |(s, c), &(_, v)| (s.saturating_add(v), c + 1));
        if count == 0 {
            0.0
        } else {
            sum as f64 / f64::from(count)
        }
    }

    /// An operator (or a config edit) set N: the scale-down delay counts from now, so the
    /// autoscaler goes on from that N rather than undoing it at once.
    pub fn set_by_operator(&mut self, now: Instant, n: u32) {
        self.asked.push_back((now, n));
    }

    /// A request is held because N is 0: the next decision brings N back to at least 1 (and
    /// the idle window starts again).
    pub fn wake(&mut self, now: Instant) {
        self.woken = true;
        self.last_request = Some(now);
    }

    /// Whether scale to zero is on: `min = 0` and `idle_to_zero` set.
    fn scales_to_zero(&self, cfg: &AutoscaleConfig) -> bool {
        cfg.min == 0 && !cfg.idle_to_zero.is_zero()
    }

    /// Whether no request came for `idle_to_zero` (scale to zero on) and none is held.
    fn idle(&self, now: Instant, cfg: &AutoscaleConfig) -> bool {
        self.scales_to_zero(cfg)
            && !self.woken
            && self
                .last_request
                .is_some_and(|t| now.duration_since(t) >= cfg.idle_to_zero)
    }

    /// The decision for now, with N = `n` replicas. It remembers what the next one needs
    /// (the panic state, what was asked for); call it once a tick, after [`Self::observe`].
    pub fn decide(&mut self, now: Instant, n: u32, cfg: &AutoscaleConfig) -> Decision {
        let stable = self.average(now, cfg.stable_window);
        let panic = self.average(now, cfg.panic_window);
        // At zero, only a wake-up or load seen in the windows (held requests count) brings a
        // replica back; a gateway that starts at zero stays there until then.
        let asleep = n == 0 && self.scales_to_zero(cfg) && !self.woken && panic <= 0.0;
        if asleep || self.idle(now, cfg) {
            // No request for the whole idle window: to zero at once, and whatever was asked
            // before is forgotten (a wake-up starts from 1, not from the old peak).
            self.asked.clear();
            self.panic_until = None;
            let decision = Decision {
                direction: if n > 0 {
                    Direction::Down
                } else {
                    Direction::Hold
                },
                from: n,
                to: 0,
                stable_in_flight: stable,
                panic_in_flight: panic,
                wanted: 0,
                panicking: false,
            };
            if n > 0 {
                self.last = Some(decision.clone());
            }
            return decision;
        }
        self.woken = false;
        let (by_stable, by_panic) = (
            replicas_for(stable, cfg.target_in_flight),
            replicas_for(panic, cfg.target_in_flight),
        );
        // Over 2x the target per replica in the short window: panic (Knative's rule).
        if panic > 2.0 * cfg.target_in_flight * f64::from(n) {
            self.panic_until = Some(now + cfg.stable_window);
        }
        let panicking = self.panic_until.is_some_and(|until| now < until);
        if !panicking {
            self.panic_until = None;
        }
        let wanted = if panicking {
            // Never down while panicking; up to what the short window asks.
            by_panic.max(by_stable).max(n)
        } else {
            by_stable
        };
        // The scale-down delay: N falls only to the most asked for over the delay. The first
        // decision counts the N it starts from as asked, so a gateway that starts with more
        // replicas than the load needs keeps them for one delay.
        if self.asked.is_empty() {
            self.asked.push_back((now, n));
        }
        self.asked.push_back((now, wanted));
        while self
            .asked
            .front()
            .is_some_and(|&(t, _)| now.duration_since(t) > cfg.scale_down_delay)
        {
            self.asked.pop_front();
        }
        let held = self.asked.iter().map(|&(_, w)| w).max().unwrap_or(wanted);
        let step = cfg.max_step.max(1);
        let to = if held > n {
            held.min(n.saturating_add(step))
        } else {
            held.max(n.saturating_sub(step))
        }
        // Below 1 only through the idle window above.
        .clamp(cfg.min.max(1), cfg.max.max(cfg.min).max(1));
        let direction = match to.cmp(&n) {
            std::cmp::Ordering::Greater => Direction::Up,
            std::cmp::Ordering::Less => Direction::Down,
            std::cmp::Ordering::Equal => Direction::Hold,
        };
        let decision = Decision {
            direction,
            from: n,
            to,
            stable_in_flight: stable,
            panic_in_flight: panic,
            wanted,
            panicking,
        };
        if direction != Direction::Hold {
            self.last = Some(decision.clone());
        }
        decision
    }

    /// The last decision that moved N.
    pub fn last(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// N and in flight over the last [`HISTORY`], oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Point> {
        self.history.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig {
            enabled: true,
            min: 1,
            max: 10,
            target_in_flight: 10.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            scale_down_delay: Duration::from_secs(300),
            max_step: 4,
            ..Default::default()
        }
    }

    /// Runs the autoscaler for `secs` seconds of paused time, one tick a second, with the load
    /// `load(second)` (requests in flight, all replicas) and N following every decision at
    /// once. Returns N after each second and the decisions that moved it.
    async fn run(
        a: &mut Autoscaler,
        cfg: &AutoscaleConfig,
        n: &mut u32,
        secs: u64,
        load: impl Fn(u64) -> u64,
    ) -> (Vec<u32>, Vec<Decision>) {
        let (mut ns, mut moves) = (Vec::new(), Vec::new());
        for s in 0..secs {
            tokio::time::advance(Duration::from_secs(1)).await;
            let now = Instant::now();
            // Each request in flight is answered within the second.
            let answered = a.answered + load(s);
            a.observe(now, load(s), answered, *n, cfg);
            let d = a.decide(now, *n, cfg);
            assert!(d.to >= cfg.min && d.to <= cfg.max, "{d:?} out of bounds");
            assert!(
                d.to.abs_diff(*n) <= cfg.max_step || d.to == 0,
                "{d:?} steps too far"
            );
            if d.direction != Direction::Hold {
                moves.push(d.clone());
            }
            *n = d.to;
            ns.push(*n);
        }
        (ns, moves)
    }

    #[tokio::test(start_paused = true)]
    async fn steady_load_holds_n() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 3);
        let (ns, moves) = run(&mut a, &c, &mut n, 900, |_| 30).await;
        assert!(moves.is_empty(), "{moves:?}");
        assert!(ns.iter().all(|&k| k == 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ramp_raises_n_step_by_step_and_never_lowers_it() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 1);
        // From 10 to 90 in flight over five minutes.
        let (ns, moves) = run(&mut a, &c, &mut n, 300, |s| 10 + s * 80 / 300).await;
        assert!(
            moves.iter().all(|d| d.direction == Direction::Up),
            "{moves:?}"
        );
        assert!(ns.windows(2).all(|w| w[0] <= w[1]));
        assert!((8..=9).contains(&n), "ends near 90 / 10: {n}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spike_scales_up_within_the_panic_window() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 2);
        run(&mut a, &c, &mut n, 120, |_| 15).await;
        assert_eq!(n, 2);
        // 8x the load at once: the stable average would take most of a minute to see it.
        let (ns, moves) = run(&mut a, &c, &mut n, 6, |_| 120).await;
        assert!(moves[0].panicking, "{moves:?}");
        assert_eq!(
            ns.last(),
            Some(&10),
            "at max within the panic window: {ns:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn panic_never_scales_down_and_ends_after_a_stable_window() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 2);
        run(&mut a, &c, &mut n, 60, |_| 15).await;
        run(&mut a, &c, &mut n, 5, |_| 100).await;
        let high = n;
        assert!(high > 2);
        // Load gone at once: nothing goes down while panicking, nor within the delay.
        let (_, moves) = run(&mut a, &c, &mut n, 299, |_| 0).await;
        assert!(
            moves.iter().all(|d| d.direction != Direction::Down),
            "{moves:?}"
        );
        assert_eq!(n, high);
        let (_, moves) = run(&mut a, &c, &mut n, 120, |_| 0).await;
        assert!(moves
            .iter()
            .all(|d| !d.panicking && d.direction == Direction::Down));
        assert_eq!(n, 1, "down to min, max_step at a time: {moves:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn lower_load_must_hold_for_the_scale_down_delay() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 8);
        run(&mut a, &c, &mut n, 400, |_| 80).await;
        assert_eq!(n, 8);
        let (ns, moves) = run(&mut a, &c, &mut n, 420, |_| 20).await;
        let first_down = ns.iter().position(|&k| k < 8).expect("it goes down");
        assert!(
            first_down as u64 + 1 >= c.scale_down_delay.as_secs(),
            "down after {first_down}s, before the delay"
        );
        assert_eq!(n, 2);
        assert!(moves.iter().all(|d| d.direction == Direction::Down));
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_load_does_not_make_n_oscillate() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 3);
        // 60 in flight for 40 s, 10 for 40 s, for half an hour.
        let (ns, moves) = run(&mut a, &c, &mut n, 1800, |s| {
            if (s / 40) % 2 == 0 {
                60
            } else {
                10
            }
        })
        .await;
        // The first seconds see only the high phase (a short window), so N may overshoot once
        // and come back after the delay; it never turns round again.
        let turns = moves
            .windows(2)
            .filter(|w| w[0].direction != w[1].direction)
            .count();
        assert!(turns <= 1, "N oscillates: {moves:?}");
        let settled = &ns[600..];
        assert!(
            settled.iter().all(|&k| k == settled[0]),
            "N moved after settling: {moves:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_with_more_replicas_than_needed_keeps_them_for_the_delay() {
        let (c, mut a, mut n) = (cfg(), Autoscaler::default(), 5);
        let (ns, _) = run(&mut a, &c, &mut n, 299, |_| 0).await;
        assert!(ns.iter().all(|&k| k == 5), "{ns:?}");
        run(&mut a, &c, &mut n, 60, |_| 0).await;
        assert_eq!(n, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_change_restarts_the_delay_and_bounds_hold() {
        let (mut c, mut a, mut n) = (cfg(), Autoscaler::default(), 2);
        run(&mut a, &c, &mut n, 400, |_| 20).await;
        assert_eq!(n, 2);
        // /add of 3: kept for one delay, then back to what the load asks.
        n = 5;
        a.set_by_operator(Instant::now(), n);
        let (ns, _) = run(&mut a, &c, &mut n, 299, |_| 20).await;
        assert!(ns.iter().all(|&k| k == 5));
        run(&mut a, &c, &mut n, 10, |_| 20).await;
        assert_eq!(n, 2);
        // An edit of the bounds applies at the next decision, whatever the load.
        c.min = 3;
        run(&mut a, &c, &mut n, 1, |_| 20).await;
        assert_eq!(n, 3);
        c.max = 3;
        run(&mut a, &c, &mut n, 60, |_| 500).await;
        assert_eq!(n, 3);
    }

    fn to_zero() -> AutoscaleConfig {
        AutoscaleConfig {
            min: 0,
            idle_to_zero: Duration::from_secs(30),
            ..cfg()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_for_the_window_scales_to_zero_and_a_held_request_wakes_it() {
        let (c, mut a, mut n) = (to_zero(), Autoscaler::default(), 3);
        run(&mut a, &c, &mut n, 120, |_| 20).await;
        assert_eq!(n, 3, "busy: the scale-down delay holds");
        // The load stops: to zero once idle_to_zero has passed, at once (not max_step at a
        // time, not after scale_down_delay).
        let (ns, moves) = run(&mut a, &c, &mut n, 40, |_| 0).await;
        let zero_at = ns.iter().position(|&k| k == 0).expect("it reaches zero");
        assert!(
            (29..=30).contains(&zero_at),
            "zero after the idle window: {ns:?}"
        );
        assert!(ns[..zero_at].iter().all(|&k| k == 3), "{ns:?}");
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].from, moves[0].to), (3, 0));
        // It stays there while nothing comes.
        let (ns, _) = run(&mut a, &c, &mut n, 600, |_| 0).await;
        assert!(ns.iter().all(|&k| k == 0));
        // A held request wakes it: the next decision asks for one replica, not the old peak.
        a.wake(Instant::now());
        let d = a.decide(Instant::now(), n, &c);
        assert_eq!((d.direction, d.from, d.to), (Direction::Up, 0, 1), "{d:?}");
        n = d.to;
        // Its request answered, then idle again: zero again only after a whole window.
        let (ns, _) = run(&mut a, &c, &mut n, 29, |s| u64::from(s == 0)).await;
        assert!(ns.iter().all(|&k| k == 1), "{ns:?}");
        run(&mut a, &c, &mut n, 2, |_| 0).await;
        assert_eq!(n, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_idle_window_n_stays_at_least_one() {
        // min = 0 whose window is cut while at zero (a live edit): back to 1 at the next tick.
        let (mut c, mut a, mut n) = (to_zero(), Autoscaler::default(), 2);
        run(&mut a, &c, &mut n, 400, |_| 0).await;
        assert_eq!(n, 0);
        c.idle_to_zero = Duration::ZERO;
        run(&mut a, &c, &mut n, 1, |_| 0).await;
        assert_eq!(n, 1);
        run(&mut a, &c, &mut n, 900, |_| 0).await;
        assert_eq!(n, 1, "never below 1 without scale to zero");
        // Requests now and then, each within the window: never zero.
        let (c, mut a, mut n) = (to_zero(), Autoscaler::default(), 1);
        let (ns, _) = run(&mut a, &c, &mut n, 600, |s| u64::from(s % 20 == 0)).await;
        assert!(ns.iter().all(|&k| k == 1), "{ns:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_at_zero_stays_there_until_a_wake_up() {
        let (c, mut a, mut n) = (to_zero(), Autoscaler::default(), 0);
        let (ns, moves) = run(&mut a, &c, &mut n, 120, |_| 0).await;
        assert!(ns.iter().all(|&k| k == 0) && moves.is_empty(), "{moves:?}");
        a.wake(Instant::now());
        run(&mut a, &c, &mut n, 1, |_| 1).await;
        assert_eq!(n, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_at_zero_wakes_to_what_it_asks_within_the_step() {
        let (c, mut a, mut n) = (to_zero(), Autoscaler::default(), 1);
        run(&mut a, &c, &mut n, 40, |_| 0).await;
        assert_eq!(n, 0);
        a.wake(Instant::now());
        // The held requests are load too (the controller counts them in flight).
        let (ns, _) = run(&mut a, &c, &mut n, 6, |_| 80).await;
        assert!(ns[0] >= 1 && ns[0] <= c.max_step, "{ns:?}");
        assert_eq!(n, 8, "the panic window sizes N: {ns:?}");
    }

    #[test]
    fn replicas_for_rounds_up_and_saturates() {
        assert_eq!(replicas_for(0.0, 10.0), 0);
        assert_eq!(replicas_for(0.1, 10.0), 1);
        assert_eq!(replicas_for(20.0, 10.0), 2);
        assert_eq!(replicas_for(20.5, 10.0), 3);
        assert_eq!(replicas_for(f64::MAX, 0.001), u32::MAX);
        assert_eq!(replicas_for(f64::NAN, 10.0), 0);
    }
}
