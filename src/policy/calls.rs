//! The hook call path: the thread-local cache of Lua states, one call with its budget, the
//! conversion of the result and the accounting of the outcome.
//!
//! Owns: which state a thread uses for a set (taken from the set's pool on first use, the two
//! most recently used kept) and the rule "a failed call is counted, logged and answered with
//! [`HookOutcome::Failed`]". Must not touch: how a state is built (`sandbox`), where ready
//! states come from (`pool`) or how values look to Lua (`convert`).

use std::cell::RefCell;

use mlua::{Function, Lua, Value};

use super::pool::Taken;
use super::sandbox::ThreadState;
use super::{bounded, Hook, HookError, HookOutcome, PolicySet};

/// States kept per thread: the current set and the previous one (in-flight requests during a
/// reload).
const STATES_PER_THREAD: usize = 2;

thread_local! {
    static STATES: RefCell<Vec<ThreadState>> = const { RefCell::new(Vec::new()) };
}

impl PolicySet {
    /// The common call path: thread-local state, meter started, call, conversion, globals
    /// cleared, accounting. `shown` turns a runtime error's message into the text kept and
    /// logged (it removes request data).
    pub(super) fn call<T>(
        &self,
        hook: Hook,
        invoke: impl FnOnce(&Lua, &Function) -> mlua::Result<Value>,
        convert: impl FnOnce(Value) -> Result<T, Value>,
        expected: &'static str,
        shown: &dyn Fn(String) -> String,
    ) -> HookOutcome<T> {
        if !self.has_hook(hook) {
            return HookOutcome::Absent;
        }
        self.stats.record_call(hook);
        let result = STATES.with(|states| {
            let mut states = states.borrow_mut();
            let state = self.thread_state(&mut states, hook)?;
            let Some(f) = &state.hooks[hook.index()] else {
                return Ok(None);
            };
            state.meter.start(self.limits.allowance(hook));
            let ran = invoke(&state.lua, f);
            let outcome = match ran {
                // A call that ran out of budget or time fails even when it returned: a policy
                // can swallow the error (e.g. in `load`'s reader) and go on for a few steps.
                _ if state.meter.stopped().is_some() => Err(state.classify_stopped()),
                Ok(Value::Nil) => Ok(None),
                Ok(v) => match convert(v) {
                    Ok(t) => Ok(Some(t)),
                    Err(v) => Err(HookError::WrongType {
                        hook: hook.name(),
                        expected,
                        got: v.type_name().to_string(),
                    }),
                },
                Err(e) => Err(state.classify(&e, shown)),
            };
            let keep = state.end_call();
            if !keep || matches!(outcome, Err(HookError::MemoryExceeded { .. })) {
                // Its heap is near the cap, or its global table grew large: start afresh.
                states.remove(0);
            }
            outcome
        });
        match result {
            Ok(Some(v)) => HookOutcome::Value(v),
            Ok(None) => HookOutcome::Absent,
            Err(e) => {
                self.stats.record_failure(hook, self.generation, &e);
                HookOutcome::Failed(e)
            }
        }
    }

    /// This thread's state for this set, taken from the pool if needed and moved to the front.
    fn thread_state<'s>(
        &self,
        states: &'s mut Vec<ThreadState>,
        hook: Hook,
    ) -> Result<&'s ThreadState, HookError> {
        match states.iter().position(|s| s.set_id == self.id) {
            Some(0) => {}
            Some(pos) => {
                let state = states.remove(pos);
                states.insert(0, state);
            }
            None => {
                let state = match self.pool.take(self.limits.allowance(hook)) {
                    Taken::Ready(state) => state,
                    Taken::NotReady => return Err(HookError::NotReady),
                    Taken::Broken(e) => {
                        return Err(HookError::Runtime(bounded(format!(
                            "cannot build the Lua state: {e}"
                        ))))
                    }
                };
                self.stats.record_state_build();
                states.insert(0, state);
                states.truncate(STATES_PER_THREAD);
            }
        }
        states
            .first()
            .ok_or_else(|| HookError::Runtime("thread state vanished".to_string()))
    }
}
