//! Hook statistics of one policy set: calls and failures per hook, state builds, the last
//! failure (for `/lb/status`) and the rate-limited warning log.
//!
//! Owns: [`PolicyStats`] and [`LastHookError`], and the rule "at most one warning per hook per
//! [`LOG_PERIOD`]". Must not touch: Lua. It only counts what the call path reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{bounded, Hook, HookError};

/// The last hook failure, for `/lb/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastHookError {
    /// The hook that failed.
    pub hook: Hook,
    /// What went wrong.
    pub message: String,
    /// When.
    pub at: SystemTime,
}

/// Counters of one policy set (shared with every thread's state through an `Arc`).
#[derive(Debug, Default)]
pub struct PolicyStats {
    calls: [AtomicU64; 4],
    errors: [AtomicU64; 4],
    state_builds: AtomicU64,
    last_error: Mutex<Option<LastHookError>>,
    pub(super) log_gate: Mutex<[LogGate; 4]>,
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LogGate {
    pub(super) last: Option<Instant>,
    pub(super) suppressed: u64,
}

/// At most one warning per hook in this period; the others are counted and reported with the
/// next one.
const LOG_PERIOD: Duration = Duration::from_secs(10);

impl PolicyStats {
    /// Calls of `hook` (successful or not).
    pub fn calls(&self, hook: Hook) -> u64 {
        self.calls[hook.index()].load(Ordering::Relaxed)
    }

    /// Failed calls of `hook`.
    pub fn errors(&self, hook: Hook) -> u64 {
        self.errors[hook.index()].load(Ordering::Relaxed)
    }

    /// Calls of all hooks.
    pub fn total_calls(&self) -> u64 {
        Hook::ALL.iter().map(|&h| self.calls(h)).sum()
    }

    /// Failed calls of all hooks.
    pub fn total_errors(&self) -> u64 {
        Hook::ALL.iter().map(|&h| self.errors(h)).sum()
    }

    /// Lua states built from this set (one per thread that called a hook, plus rebuilds after
    /// a memory failure).
    pub fn state_builds(&self) -> u64 {
        self.state_builds.load(Ordering::Relaxed)
    }

    /// The last hook failure, if any.
    pub fn last_error(&self) -> Option<LastHookError> {
        lock(&self.last_error).clone()
    }

    pub(super) fn record_call(&self, hook: Hook) {
        self.calls[hook.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_state_build(&self) {
        self.state_builds.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_failure(&self, hook: Hook, generation: u64, err: &HookError) {
        self.errors[hook.index()].fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(LastHookError {
            hook,
            message: bounded(err.to_string()),
            at: SystemTime::now(),
        });
        let now = Instant::now();
        let suppressed = {
            let mut gates = lock(&self.log_gate);
            let gate = &mut gates[hook.index()];
            match gate.last {
                Some(last) if now.duration_since(last) < LOG_PERIOD => {
                    gate.suppressed += 1;
                    return;
                }
                _ => {
                    let suppressed = gate.suppressed;
                    *gate = LogGate {
                        last: Some(now),
                        suppressed: 0,
                    };
                    suppressed
                }
            }
        };
        tracing::warn!(
            hook = hook.name(),
            generation,
            error = %err,
            suppressed_since_last_log = suppressed,
            "policy hook failed; using the built-in default for this call"
        );
    }
}

pub(super) use crate::sync::lock;
