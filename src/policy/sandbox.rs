//! The sandboxed Lua state: which libraries are open, the trusted prelude that tightens them,
//! the memory cap and the instruction budget, loading the policy files into a fresh state,
//! and turning Lua errors into [`PolicyError`] / [`HookError`].
//!
//! Owns: [`ThreadState`] (one Lua state with the set's files loaded and its hook functions
//! looked up) and [`Budget`]. Must not touch: the thread-local cache, statistics or the
//! conversion of hook arguments and results.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use mlua::{ChunkMode, Function, HookTriggers, Lua, LuaOptions, StdLib, Value, VmState};

use super::{Hook, HookError, PolicyError, PolicyFile, PolicyLimits};

/// Instruction budget accounting for one Lua state. The count hook fires every `step`
/// instructions and adds a tick; past `max_ticks` it raises an error, and keeps raising one at
/// every later tick until the next reset, so `pcall` loops cannot outlive the budget.
#[derive(Debug)]
pub(super) struct Budget {
    ticks: AtomicU32,
    max_ticks: u32,
    spent: AtomicBool,
}

impl Budget {
    /// Largest count-hook period: a finer step costs more per instruction.
    const MAX_STEP: u32 = 1_000;

    fn new(budget: u32) -> (Budget, u32) {
        let step = budget.clamp(1, Self::MAX_STEP);
        let max_ticks = budget.div_ceil(step).max(1);
        let b = Budget {
            ticks: AtomicU32::new(0),
            max_ticks,
            spent: AtomicBool::new(false),
        };
        (b, step)
    }

    pub(super) fn reset(&self) {
        self.ticks.store(0, Ordering::Relaxed);
        self.spent.store(false, Ordering::Relaxed);
    }

    fn tick(&self) -> mlua::Result<VmState> {
        let t = self.ticks.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if t > self.max_ticks {
            self.spent.store(true, Ordering::Relaxed);
            return Err(mlua::Error::runtime(BUDGET_MESSAGE));
        }
        Ok(VmState::Continue)
    }

    fn is_spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }
}

const BUDGET_MESSAGE: &str = "instruction budget exceeded";

/// Trusted setup code run in every fresh state before the policy files. `...` is the Rust
/// "budget spent?" function and the Rust debug logger.
const SANDBOX_PRELUDE: &str = r#"
local spent, log = ...
local raw_pcall, raw_xpcall, raw_load, raw_collect = pcall, xpcall, load, collectgarbage
local error, select, tostring, concat, pack = error, select, tostring, table.concat, table.pack

-- A spent budget is not catchable: re-raise it past pcall/xpcall.
local function pass(ok, ...)
  if not ok and spent() then error((...), 0) end
  return ok, ...
end
pcall = function(f, ...) return pass(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...) return pass(raw_xpcall(f, handler, ...)) end

-- Text chunks only, never bytecode.
load = function(chunk, name, _mode, ...)
  if select('#', ...) > 0 then return raw_load(chunk, name, 't', ...) end
  return raw_load(chunk, name, 't')
end

collectgarbage = function(opt)
  if opt == 'count' then return raw_collect('count') end
  error("collectgarbage: only collectgarbage('count') is available to policies", 2)
end

print = function(...)
  local t = pack(...)
  for k = 1, t.n do t[k] = tostring(t[k]) end
  log(concat(t, '\t', 1, t.n))
end

dofile, loadfile, warn = nil, nil, nil
string.dump = nil
"#;

/// One thread's Lua state for one policy set.
pub(super) struct ThreadState {
    pub(super) set_id: u64,
    pub(super) lua: Lua,
    pub(super) budget: Arc<Budget>,
    limits: PolicyLimits,
    pub(super) hooks: [Option<Function>; 4],
}

impl ThreadState {
    /// A fresh sandboxed state with `files` loaded in order.
    pub(super) fn build(
        files: &[PolicyFile],
        limits: PolicyLimits,
        set_id: u64,
        generation: u64,
    ) -> Result<ThreadState, PolicyError> {
        let sandbox = |e: mlua::Error| PolicyError::Sandbox(e.to_string());
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(sandbox)?;

        let (budget, step) = Budget::new(limits.instruction_budget);
        let budget = Arc::new(budget);
        let hook_budget = Arc::clone(&budget);
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(step),
            move |_, _| hook_budget.tick(),
        );

        let spent_budget = Arc::clone(&budget);
        let spent = lua
            .create_function(move |_, ()| Ok(spent_budget.is_spent()))
            .map_err(sandbox)?;
        let log = lua
            .create_function(move |_, line: mlua::String| {
                tracing::debug!(target: "ringgate::policy::lua", generation, "{}", line.to_string_lossy());
                Ok(())
            })
            .map_err(sandbox)?;
        budget.reset();
        lua.load(SANDBOX_PRELUDE)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call::<()>((spent, log))
            .map_err(sandbox)?;
        lua.set_memory_limit(limits.memory_limit).map_err(sandbox)?;

        let globals = lua.globals();
        for file in files {
            budget.reset();
            let chunk = lua
                .load(file.source.as_str())
                .set_name(format!("={}", file.name))
                .set_mode(ChunkMode::Text);
            if let Err(e) = chunk.exec() {
                return Err(load_error(&file.name, &e, &budget, limits));
            }
            for hook in Hook::ALL {
                let v: Value = globals
                    .raw_get(hook.name())
                    .map_err(|e| load_error(&file.name, &e, &budget, limits))?;
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
        Ok(ThreadState {
            set_id,
            lua,
            budget,
            limits,
            hooks,
        })
    }

    pub(super) fn classify(&self, e: &mlua::Error) -> HookError {
        if self.budget.is_spent() {
            HookError::BudgetExceeded {
                budget: self.limits.instruction_budget,
            }
        } else if is_memory_error(e) {
            HookError::MemoryExceeded {
                limit: self.limits.memory_limit,
            }
        } else {
            HookError::Runtime(error_message(e))
        }
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
fn error_message(e: &mlua::Error) -> String {
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

/// The line of a Lua message of the form `name:LINE: ...`.
fn line_in(message: &str, file: &str) -> Option<u32> {
    let rest = message.strip_prefix(file)?.strip_prefix(':')?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok()
}

fn load_error(file: &str, e: &mlua::Error, budget: &Budget, limits: PolicyLimits) -> PolicyError {
    let file = file.to_string();
    if budget.is_spent() {
        return PolicyError::BudgetExceeded {
            file,
            budget: limits.instruction_budget,
        };
    }
    if is_memory_error(e) {
        return PolicyError::MemoryExceeded {
            file,
            limit: limits.memory_limit,
        };
    }
    let message = error_message(e);
    let line = line_in(&message, &file);
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
