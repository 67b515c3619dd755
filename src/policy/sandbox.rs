//! The sandboxed Lua state: which libraries are open, the trusted prelude that tightens them,
//! the memory cap, the per-call [`Meter`] (instruction budget and deadline), loading the
//! policy files into a fresh state, sealing it, and turning Lua errors into [`PolicyError`] /
//! [`HookError`].
//!
//! Owns: [`ThreadState`] (one Lua state with the set's files loaded, sealed, and its hook
//! functions looked up) and what happens around one call in it: the meter started, the
//! per-call globals cleared afterwards. Must not touch: the thread-local cache, statistics or
//! the conversion of hook arguments and results.
//!
//! # State rules
//!
//! Once the files have run, the prelude's `seal` moves the globals into a hidden base table
//! that the (now empty) global table reads through, freezes every table reachable from it
//! (the standard libraries too), and `bytecode` checks that no reachable function assigns to
//! an upvalue. A call may still write globals: they land in the global table itself, and
//! [`ThreadState::end_call`] clears it. So nothing one call writes is visible to the next.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mlua::{ChunkMode, Function, HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};

use super::bytecode::{persistent_upvalue_write, to_be_closed};
use super::meter::{Meter, Stop};
use super::{
    bounded, strlib, Hook, HookError, PolicyError, PolicyFile, PolicyLimits, MAX_ERROR_TEXT,
};

/// Deadline of each file's top level at load (it runs again on every thread that builds a
/// state, so it should take far less).
pub(super) const TOP_LEVEL_TIMEOUT: Duration = Duration::from_secs(1);

/// A call that wrote more globals than this drops its state (rebuilt on the next call): the
/// cleared global table would otherwise keep the capacity they took.
const MAX_CALL_GLOBALS: u32 = 256;

const PRELUDE: &str = include_str!("prelude.lua");

/// Longest line `print` writes to the debug log: the log is written on the serving thread.
const MAX_LOG_LINE: usize = 1024;

/// One thread's Lua state for one policy set.
pub(super) struct ThreadState {
    pub(super) set_id: u64,
    pub(super) lua: Lua,
    pub(super) meter: Arc<Meter>,
    limits: PolicyLimits,
    pub(super) hooks: [Option<Function>; 4],
    /// Globals written by the current call (counted by the global table's `__newindex`).
    globals_written: Arc<AtomicU32>,
    /// The current call drew from `math.random` (set by the prelude's wrapper).
    random_used: Arc<AtomicBool>,
    /// The prelude's `reseed(a, b)`: a fresh generator state for the next call.
    reseed: Function,
}

impl std::fmt::Debug for ThreadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadState")
            .field("set_id", &self.set_id)
            .finish_non_exhaustive()
    }
}

impl ThreadState {
    /// A fresh sandboxed state with `files` loaded in order, then sealed.
    pub(super) fn build(
        files: &[PolicyFile],
        limits: PolicyLimits,
        set_id: u64,
        generation: u64,
    ) -> Result<ThreadState, PolicyError> {
        let sandbox = |e: mlua::Error| PolicyError::Sandbox(e.to_string());
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8;
        #[allow(unsafe_code)]
        // SAFETY: the `debug` library can break mlua's invariants only when Lua code calls it
        // on mlua's own values (its callbacks' upvalues, the registry). Here only the trusted
        // prelude sees it: the prelude keeps `getupvalue`, `getinfo`, `getmetatable` and
        // `setmetatable` in locals of `seal`, which Rust calls once and then drops, and which
        // applies them to Lua functions (C functions are skipped) and tables only; it removes
        // `debug` from the globals before any policy code runs, and no policy code can reach
        // the prelude's locals. `Lua::new_with` differs only by refusing `debug`.
        let lua = unsafe { Lua::unsafe_new_with(libs | StdLib::DEBUG, LuaOptions::default()) };

        let meter = Arc::new(Meter::new(limits.instruction_budget));
        let hook_meter = Arc::clone(&meter);
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(meter.step()),
            move |_, _| match hook_meter.tick() {
                Ok(()) => Ok(VmState::Continue),
                Err(stop) => Err(mlua::Error::runtime(stop.message())),
            },
        );
        strlib::install(&lua, &meter, limits.memory_limit).map_err(sandbox)?;

        let stopped = Arc::clone(&meter);
        let interrupted = lua
            .create_function(move |_, ()| Ok(stopped.stopped().is_some()))
            .map_err(sandbox)?;
        let log = lua
            .create_function(move |_, line: mlua::String| {
                let bytes = line.as_bytes();
                let shown = &bytes[..bytes.len().min(MAX_LOG_LINE)];
                tracing::debug!(target: "ringgate::policy::lua", generation, "{}", String::from_utf8_lossy(shown));
                Ok(())
            })
            .map_err(sandbox)?;
        let globals_written = Arc::new(AtomicU32::new(0));
        let written = Arc::clone(&globals_written);
        let note_global_write = lua
            .create_function(move |_, ()| {
                written.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .map_err(sandbox)?;
        let charged = Arc::clone(&meter);
        let charge = lua
            .create_function(move |_, steps: f64| {
                // The prelude passes at most its per-call cap; the cast saturates anyway.
                charged
                    .spend(steps.max(0.0).min(f64::from(u32::MAX)) as u32)
                    .map_err(|stop| mlua::Error::runtime(stop.message()))
            })
            .map_err(sandbox)?;
        let closable = lua
            .create_function(
                |_, chunk: mlua::String| match to_be_closed(&chunk.as_bytes()) {
                    Ok(found) => Ok(found.map(|c| c.line)),
                    Err(e) => Err(mlua::Error::runtime(e.to_string())),
                },
            )
            .map_err(sandbox)?;
        let random_used = Arc::new(AtomicBool::new(false));
        let drew = Arc::clone(&random_used);
        let note_random = lua
            .create_function(move |_, ()| {
                drew.store(true, Ordering::Relaxed);
                Ok(())
            })
            .map_err(sandbox)?;
        meter.unlimited();
        let (seal, reseed): (Function, Function) = lua
            .load(PRELUDE)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call((
                interrupted,
                log,
                note_global_write,
                charge,
                closable,
                note_random,
            ))
            .map_err(sandbox)?;
        reseed
            .call::<()>((fastrand::i64(..), fastrand::i64(..)))
            .map_err(sandbox)?;
        lua.set_memory_limit(limits.memory_limit).map_err(sandbox)?;

        let globals = lua.globals();
        for file in files {
            let chunk = lua
                .load(file.source.as_str())
                .set_name(format!("={}", file.name))
                .set_mode(ChunkMode::Text)
                .into_function()
                .map_err(|e| load_error(&file.name, &e, limits))?;
            refuse_to_be_closed(&file.name, &chunk)?;
            meter.start(TOP_LEVEL_TIMEOUT);
            let ran = chunk.call::<()>(());
            if let Some(stop) = meter.stopped() {
                return Err(stopped_at_load(&file.name, stop, limits));
            }
            if let Err(e) = ran {
                return Err(load_error(&file.name, &e, limits));
            }
            for hook in Hook::ALL {
                let v: Value = globals
                    .raw_get(hook.name())
                    .map_err(|e| load_error(&file.name, &e, limits))?;
                if !matches!(v, Value::Nil | Value::Function(_)) {
                    return Err(PolicyError::HookNotFunction {
                        file: file.name.clone(),
                        hook: hook.name(),
                        found: v.type_name().to_string(),
                    });
                }
            }
        }
        let mut hooks: [Option<Function>; 4] = Default::default();
        for hook in Hook::ALL {
            hooks[hook.index()] = globals
                .raw_get::<Option<Function>>(hook.name())
                .map_err(sandbox)?;
        }
        seal_state(&lua, &meter, &seal, files, limits)?;
        Ok(ThreadState {
            set_id,
            lua,
            meter,
            limits,
            hooks,
            globals_written,
            random_used,
            reseed,
        })
    }

    /// The failure of a call that raised `e`; a runtime error's message goes through `shown`
    /// (cut first to what can be shown, so its work is bounded) before it is bounded.
    pub(super) fn classify(&self, e: &mlua::Error, shown: &dyn Fn(String) -> String) -> HookError {
        if let Some(stop) = self.meter.stopped() {
            self.stop_error(stop)
        } else if is_memory_error(e) {
            HookError::MemoryExceeded {
                limit: self.limits.memory_limit,
            }
        } else {
            HookError::Runtime(bounded(shown(shown_part(error_message(e)))))
        }
    }

    /// The failure of a call its meter stopped (call only when it did).
    pub(super) fn classify_stopped(&self) -> HookError {
        self.stop_error(self.meter.stopped().unwrap_or(Stop::Budget))
    }

    fn stop_error(&self, stop: Stop) -> HookError {
        match stop {
            Stop::Budget => HookError::BudgetExceeded {
                budget: self.limits.instruction_budget,
            },
            Stop::Deadline => HookError::Timeout {
                after: self.meter.allowance(),
            },
        }
    }

    /// Ends a call: clears the globals it wrote and, if it drew random numbers, reseeds the
    /// generator. False when the state should be dropped (rebuilt on the next call) instead
    /// of kept.
    pub(super) fn end_call(&self) -> bool {
        if self.random_used.swap(false, Ordering::Relaxed) {
            // Trusted code: a stopped meter would stop it at its next tick.
            self.meter.unlimited();
            let reseeded = self
                .reseed
                .call::<()>((fastrand::i64(..), fastrand::i64(..)));
            if reseeded.is_err() {
                return false;
            }
        }
        let written = self.globals_written.swap(0, Ordering::Relaxed);
        if written == 0 {
            return true;
        }
        self.lua.globals().clear().is_ok() && written <= MAX_CALL_GLOBALS
    }
}

/// Refuses a compiled file that declares a to-be-closed variable in any of its functions.
fn refuse_to_be_closed(file: &str, chunk: &Function) -> Result<(), PolicyError> {
    match to_be_closed(&chunk.dump(false)) {
        Ok(None) => Ok(()),
        Ok(Some(found)) => Err(PolicyError::ToBeClosed {
            file: file.to_string(),
            line: found.line,
        }),
        Err(e) => Err(PolicyError::Sandbox(format!(
            "reading {file}'s bytecode: {e}"
        ))),
    }
}

/// Runs the prelude's `seal` (without limits: it is trusted, and its work is bounded by the
/// size of the state) and reports a function that assigns to an upvalue.
fn seal_state(
    lua: &Lua,
    meter: &Meter,
    seal: &Function,
    files: &[PolicyFile],
    limits: PolicyLimits,
) -> Result<(), PolicyError> {
    let scan = lua
        .create_function(|_, chunk: mlua::String| {
            match persistent_upvalue_write(&chunk.as_bytes()) {
                Ok(Some(w)) => Ok((Some(w.source), Some(w.line), Some(w.name))),
                Ok(None) => Ok((None, None, None)),
                Err(e) => Err(mlua::Error::runtime(e.to_string())),
            }
        })
        .map_err(|e| PolicyError::Sandbox(e.to_string()))?;
    meter.unlimited();
    let sealed = seal.call::<(Option<String>, Option<u32>, Option<String>)>(scan);
    match sealed {
        Ok((Some(source), line, name)) => Err(PolicyError::ModuleStateWrite {
            file: chunk_file(&source),
            line: line.unwrap_or(0),
            name: name.unwrap_or_default(),
        }),
        Ok(_) => Ok(()),
        Err(e) if is_memory_error(&e) => Err(PolicyError::MemoryExceeded {
            file: files.last().map(|f| f.name.clone()).unwrap_or_default(),
            limit: limits.memory_limit,
        }),
        Err(e) => Err(PolicyError::Sandbox(format!(
            "sealing the loaded state: {}",
            bounded(error_message(&e))
        ))),
    }
}

/// The file a chunk name stands for: `=a.lua` is a policy file; a chunk built by `load`
/// is shown as Lua shows it, shortened.
fn chunk_file(source: &str) -> String {
    match source
        .strip_prefix('=')
        .or_else(|| source.strip_prefix('@'))
    {
        Some(name) => name.to_string(),
        None => {
            let first = source.lines().next().unwrap_or_default();
            let short: String = first.chars().take(40).collect();
            format!("[string \"{short}\"]")
        }
    }
}

fn stopped_at_load(file: &str, stop: Stop, limits: PolicyLimits) -> PolicyError {
    let file = file.to_string();
    match stop {
        Stop::Budget => PolicyError::BudgetExceeded {
            file,
            budget: limits.instruction_budget,
        },
        Stop::Deadline => PolicyError::Timeout {
            file,
            after: TOP_LEVEL_TIMEOUT,
        },
    }
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            is_memory_error(cause)
        }
        _ => false,
    }
}

/// The message of a Lua error without mlua's prefix and traceback.
pub(super) fn error_message(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::RuntimeError(m) | mlua::Error::SyntaxError { message: m, .. } => m.clone(),
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            return error_message(cause)
        }
        other => other.to_string(),
    };
    match text.find("\nstack traceback:") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

/// The part of a message that can end up shown: [`MAX_ERROR_TEXT`] bytes and the few after
/// them that [`bounded`] looks at (a masking rule then sees every byte that is shown).
fn shown_part(mut message: String) -> String {
    let mut cut = (MAX_ERROR_TEXT + 8).min(message.len());
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message
}

/// The line of a Lua message of the form `name:LINE: ...`.
fn line_in(message: &str, file: &str) -> Option<u32> {
    let rest = message.strip_prefix(file)?.strip_prefix(':')?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

fn load_error(file: &str, e: &mlua::Error, limits: PolicyLimits) -> PolicyError {
    let file = file.to_string();
    if is_memory_error(e) {
        return PolicyError::MemoryExceeded {
            file,
            limit: limits.memory_limit,
        };
    }
    let message = error_message(e);
    let line = line_in(&message, &file);
    let message = bounded(message);
    match e {
        mlua::Error::SyntaxError { .. } => PolicyError::Syntax {
            line: line.unwrap_or(0),
            file,
            message,
        },
        _ => PolicyError::Runtime {
            file,
            line,
            message,
        },
    }
}
