//! The limits of one Lua call: its instruction budget and its wall-clock deadline.
//!
//! Owns: [`Meter`], the rule "the VM's count hook fires every [`Meter::step`] instructions and
//! spends one tick; past the budget, or at the second tick past the deadline, the call is
//! stopped, and stays stopped (every later tick raises again) until the next call starts",
//! and the same accounting for work done inside Rust library functions (pattern matching,
//! `string.rep`), which spend ticks through [`Meter::spend`]. Must not touch: Lua values,
//! statistics, the thread cache.
//!
//! Why the second tick: the deadline is wall-clock time, and the OS may deschedule a thread
//! in the middle of a call for longer than the whole allowance. A call that is merely late
//! when it ticks is most likely such a call, about to finish (a tick comes every 256
//! instructions; most hooks run fewer); a call that ticks late twice is doing the work
//! itself. The cost is one more tick, microseconds, before a runaway call is stopped.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Why a call was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The instruction budget is spent.
    Budget,
    /// The wall-clock deadline has passed.
    Deadline,
}

impl Stop {
    /// The error text Lua code sees (and `pcall` cannot keep).
    pub(super) fn message(self) -> &'static str {
        match self {
            Stop::Budget => "instruction budget exceeded",
            Stop::Deadline => "deadline exceeded",
        }
    }

    fn code(self) -> u8 {
        match self {
            Stop::Budget => 1,
            Stop::Deadline => 2,
        }
    }
}

const NOT_STOPPED: u8 = 0;

/// Budget and deadline accounting for one Lua state (one call at a time). Shared between the
/// call path, the count hook and the Rust library functions through an `Arc`; the atomics are
/// only touched by the state's own thread.
#[derive(Debug)]
pub(super) struct Meter {
    /// Base of `deadline` (nanoseconds since this instant).
    epoch: Instant,
    step: u32,
    max_ticks: u32,
    ticks: AtomicU32,
    /// Steps spent by Rust functions that did not yet make a whole tick.
    partial: AtomicU32,
    deadline: AtomicU64,
    allowance: AtomicU64,
    /// False while trusted code runs without limits.
    limited: AtomicBool,
    /// A tick of this call already found the deadline passed.
    late: AtomicBool,
    stop: AtomicU8,
}

impl Meter {
    /// Instructions per tick: the deadline is checked this often. Small enough that a tick of
    /// ordinary instructions takes microseconds, large enough that the hook costs little.
    pub(super) const STEP: u32 = 256;

    /// A meter for `budget` instructions per call, counted in ticks of at most
    /// [`Meter::STEP`] instructions (so the effective budget is exact to within one tick).
    pub(super) fn new(budget: u32) -> Meter {
        let step = budget.clamp(1, Self::STEP);
        Meter {
            epoch: Instant::now(),
            step,
            max_ticks: budget.div_ceil(step).max(1),
            ticks: AtomicU32::new(0),
            partial: AtomicU32::new(0),
            deadline: AtomicU64::new(0),
            allowance: AtomicU64::new(0),
            limited: AtomicBool::new(true),
            late: AtomicBool::new(false),
            stop: AtomicU8::new(NOT_STOPPED),
        }
    }

    /// Instructions (or Rust steps) per tick.
    pub(super) fn step(&self) -> u32 {
        self.step
    }

    /// Starts a call: a fresh budget and a deadline `allowance` from now.
    pub(super) fn start(&self, allowance: Duration) {
        let now = self.now();
        let allowance_ns = u64::try_from(allowance.as_nanos()).unwrap_or(u64::MAX);
        self.ticks.store(0, Ordering::Relaxed);
        self.partial.store(0, Ordering::Relaxed);
        self.allowance.store(allowance_ns, Ordering::Relaxed);
        self.deadline
            .store(now.saturating_add(allowance_ns), Ordering::Relaxed);
        self.limited.store(true, Ordering::Relaxed);
        self.late.store(false, Ordering::Relaxed);
        self.stop.store(NOT_STOPPED, Ordering::Relaxed);
    }

    /// Lifts both limits, for trusted code (sealing the state after load): its work is
    /// bounded by the size of the state.
    pub(super) fn unlimited(&self) {
        self.ticks.store(0, Ordering::Relaxed);
        self.partial.store(0, Ordering::Relaxed);
        self.allowance.store(0, Ordering::Relaxed);
        self.limited.store(false, Ordering::Relaxed);
        self.stop.store(NOT_STOPPED, Ordering::Relaxed);
    }

    /// The allowance the current call started with.
    pub(super) fn allowance(&self) -> Duration {
        Duration::from_nanos(self.allowance.load(Ordering::Relaxed))
    }

    /// One tick of `step` instructions: fails once the budget is spent or on the second tick
    /// past the deadline, and on every tick after that until the next [`start`](Self::start).
    pub(super) fn tick(&self) -> Result<(), Stop> {
        if let Some(stop) = self.stopped() {
            return Err(stop);
        }
        if !self.limited.load(Ordering::Relaxed) {
            return Ok(());
        }
        let ticks = self.ticks.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let stop = if ticks > self.max_ticks {
            Stop::Budget
        } else if self.now() > self.deadline.load(Ordering::Relaxed)
            && self.late.swap(true, Ordering::Relaxed)
        {
            Stop::Deadline
        } else {
            return Ok(());
        };
        self.stop.store(stop.code(), Ordering::Relaxed);
        Err(stop)
    }

    /// Spends `steps` steps of work done outside the VM, a tick per [`step`](Self::step)
    /// steps (remainders carry over to the next call of this function in the same call).
    pub(super) fn spend(&self, steps: u32) -> Result<(), Stop> {
        let mut partial = self.partial.load(Ordering::Relaxed).saturating_add(steps);
        while partial >= self.step {
            partial -= self.step;
            if let Err(stop) = self.tick() {
                self.partial.store(partial, Ordering::Relaxed);
                return Err(stop);
            }
        }
        self.partial.store(partial, Ordering::Relaxed);
        self.stopped().map_or(Ok(()), Err)
    }

    /// Why the current call was stopped, if it was.
    pub(super) fn stopped(&self) -> Option<Stop> {
        match self.stop.load(Ordering::Relaxed) {
            1 => Some(Stop::Budget),
            2 => Some(Stop::Deadline),
            _ => None,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
