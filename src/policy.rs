//! Lua policies: loading, sandboxing and calling the policy hooks.
//!
//! This module owns everything Lua. It reads the `*.lua` files directly in the policy
//! directory (once, at load), compiles and runs them in a sandboxed Lua 5.4 state, and calls
//! the four optional hooks of DESIGN.md ("Lua hooks"): `request_key`, `request_hash`,
//! `vnode_hash` and `health`. It is the only module that imports `mlua`.
//!
//! It must not touch anything else: no I/O besides reading the policy files in
//! [`PolicySet::load_dir`], no knowledge of the ring, the proxy or the replicas. Callers get
//! a [`HookOutcome`] and apply the built-in default themselves when it is not a value.
//!
//! # Execution model
//!
//! A [`PolicySet`] is immutable and holds only the sources. Hooks run in a Lua state per
//! thread (`thread_local!`), built from the set's sources the first time a thread calls a
//! hook of that set, and kept for later calls. Each thread keeps the states of the two sets it
//! used most recently, so in-flight requests finishing on the previous set during a reload do
//! not make a worker rebuild on every request. There is no lock on the call path: a call is a
//! thread-local lookup, an atomic counter increment and the Lua call itself.
//!
//! # Sandbox and limits
//!
//! Only the `base`, `string`, `table`, `math` and `utf8` libraries are opened; `dofile`,
//! `loadfile`, `print` (redirected to the debug log), `warn`, `collectgarbage` (reduced to
//! `"count"`) and `string.dump` are removed or replaced; `load` only accepts text chunks. Each
//! call (and each file's top level at load) gets [`PolicyLimits::instruction_budget`] VM
//! instructions, counted by a Lua count hook; once spent, the call fails with
//! [`HookError::BudgetExceeded`] and `pcall`/`xpcall` inside the policy cannot catch it. The
//! state's memory is capped at [`PolicyLimits::memory_limit`].

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mlua::{ChunkMode, Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

/// Limits applied to every Lua state of a policy set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Memory cap of one Lua state, in bytes (default 16 MiB).
    pub memory_limit: usize,
    /// VM instructions allowed per hook call, and per file's top level at load
    /// (default 1,000,000). Counted in steps of at most 1,000 instructions.
    pub instruction_budget: u32,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            memory_limit: 16 * 1024 * 1024,
            instruction_budget: 1_000_000,
        }
    }
}

/// One of the four policy hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `request_key(req)`: the routing key of a request.
    RequestKey,
    /// `request_hash(i, slots)`: the ring slot of a request key.
    RequestHash,
    /// `vnode_hash(i, j, slots)`: the ring slot of virtual node `j` of server `i`.
    VnodeHash,
    /// `health(server, probe)`: the health verdict after a probe.
    Health,
}

impl Hook {
    /// Every hook, in a fixed order.
    pub const ALL: [Hook; 4] = [
        Hook::RequestKey,
        Hook::RequestHash,
        Hook::VnodeHash,
        Hook::Health,
    ];

    /// The Lua global that defines this hook.
    pub fn name(self) -> &'static str {
        match self {
            Hook::RequestKey => "request_key",
            Hook::RequestHash => "request_hash",
            Hook::VnodeHash => "vnode_hash",
            Hook::Health => "health",
        }
    }

    fn index(self) -> usize {
        match self {
            Hook::RequestKey => 0,
            Hook::RequestHash => 1,
            Hook::VnodeHash => 2,
            Hook::Health => 3,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a hook call gave.
#[derive(Debug, Clone, PartialEq)]
pub enum HookOutcome<T> {
    /// The hook is not defined, or it returned `nil` to defer: use the built-in default.
    /// Not an error and not counted as one.
    Absent,
    /// The hook's answer.
    Value(T),
    /// The hook failed (already counted in [`PolicyStats`] and logged): use the built-in
    /// default for this call.
    Failed(HookError),
}

impl<T> HookOutcome<T> {
    /// The value, or `None` for both `Absent` and `Failed` (the caller uses its default).
    pub fn value(self) -> Option<T> {
        match self {
            HookOutcome::Value(v) => Some(v),
            HookOutcome::Absent | HookOutcome::Failed(_) => None,
        }
    }
}

/// A request key as returned by `request_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LuaKey {
    /// An integer key: used as `i` directly.
    Int(i64),
    /// A string key: goes through the gateway's string hash (a decimal string is its own value).
    Str(String),
}

/// The request as `request_key` sees it (the `req` table).
#[derive(Debug, Clone, Copy)]
pub struct KeyRequest<'a> {
    /// `req.method`, e.g. `"GET"`.
    pub method: &'a str,
    /// `req.path`, without the query, e.g. `"/home"`.
    pub path: &'a str,
    /// `req.query`, the raw query string without `?` (empty when there is none).
    pub query: &'a str,
    /// Header name and raw value pairs. In `req.headers` names are lower-cased, and repeated
    /// names are joined with `", "` (`"; "` for `cookie`). Values are bytes, as on the wire.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// `req.client_ip`, e.g. `"127.0.0.1"`.
    pub client_ip: &'a str,
}

/// A health probe result as `health` sees it (the `probe` table).
#[derive(Debug, Clone, Copy)]
pub struct ProbeView<'a> {
    /// `probe.status`: the HTTP status, `nil` when no response came.
    pub status: Option<u16>,
    /// `probe.latency_ms`: time to the response (or to the failure), in milliseconds.
    pub latency_ms: f64,
    /// `probe.error`: why the probe failed, `nil` when a response came.
    pub error: Option<&'a str>,
}

/// Why a policy set was rejected. Every variant names the file; the whole set is rejected and
/// the caller keeps the last good one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy directory exists but could not be listed.
    #[error("cannot list policy directory {}: {source}; check that it is a readable directory", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A policy file could not be read.
    #[error("cannot read policy file {}: {source}; check its permissions", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file name that is not UTF-8.
    #[error("policy file name {} is not UTF-8; rename it", path.display())]
    FileName { path: PathBuf },
    /// A policy file that is not UTF-8 text (for example a precompiled chunk).
    #[error("policy file {file} is not UTF-8 text; policies are loaded from Lua source only (no bytecode)")]
    NotText { file: String },
    /// A syntax error.
    #[error("policy file {file} line {line}: syntax error: {message}; fix the file, the last good policy set stays active")]
    Syntax {
        file: String,
        line: u32,
        message: String,
    },
    /// The top level of a file raised an error.
    #[error("policy file {file}{}: error while running its top level: {message}; fix the file, the last good policy set stays active", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Runtime {
        file: String,
        line: Option<u32>,
        message: String,
    },
    /// The top level of a file ran past the instruction budget.
    #[error("policy file {file}: its top level ran past the instruction budget of {budget} instructions (an endless loop?); move the work into a hook or raise policy.instruction_budget")]
    BudgetExceeded { file: String, budget: u32 },
    /// Loading a file ran past the memory limit.
    #[error("policy file {file}: loading it ran past the memory limit of {limit} bytes; shrink its tables or raise policy.memory_limit")]
    MemoryExceeded { file: String, limit: usize },
    /// A hook global that is not a function.
    #[error("policy file {file}: the hook `{hook}` is a {found}, not a function; define it as `function {hook}(...) ... end`")]
    HookNotFunction {
        file: String,
        hook: &'static str,
        found: String,
    },
    /// The Lua state itself could not be set up.
    #[error("cannot set up the Lua sandbox: {0}")]
    Sandbox(String),
}

/// Why one hook call failed. The caller uses the built-in default for that call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// The hook raised an error (`error()`, a nil index, a sandboxed-away function, ...).
    #[error("runtime error: {0}")]
    Runtime(String),
    /// The hook returned a value of the wrong type.
    #[error("returned a {got}, expected {expected}")]
    WrongType {
        hook: &'static str,
        expected: &'static str,
        got: String,
    },
    /// The hook ran past its instruction budget.
    #[error("ran past the instruction budget of {budget} instructions (an endless loop?); simplify the hook or raise policy.instruction_budget")]
    BudgetExceeded { budget: u32 },
    /// The hook ran past the state's memory limit.
    #[error("ran past the memory limit of {limit} bytes; the thread's Lua state is rebuilt; stop accumulating data or raise policy.memory_limit")]
    MemoryExceeded { limit: usize },
}

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
    log_gate: Mutex<[LogGate; 4]>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LogGate {
    last: Option<Instant>,
    suppressed: u64,
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

    fn record_failure(&self, hook: Hook, generation: u64, err: &HookError) {
        self.errors[hook.index()].fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(LastHookError {
            hook,
            message: err.to_string(),
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

/// Locks a mutex that only guards plain data: a poisoned lock still holds usable data.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone)]
struct PolicyFile {
    name: String,
    source: String,
}

/// A loaded, validated set of policy files. Immutable, `Send + Sync`; share it through an
/// `Arc` (typically inside the gateway's snapshot).
#[derive(Debug)]
pub struct PolicySet {
    /// Process-unique identity: thread-local states are keyed by it, so two sets that share a
    /// generation number never share a state.
    id: u64,
    generation: u64,
    files: Vec<PolicyFile>,
    hooks: [bool; 4],
    limits: PolicyLimits,
    stats: Arc<PolicyStats>,
}

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

impl PolicySet {
    /// The set with no files: generation 0, every call returns [`HookOutcome::Absent`].
    pub fn empty() -> PolicySet {
        PolicySet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            generation: 0,
            files: Vec::new(),
            hooks: [false; 4],
            limits: PolicyLimits::default(),
            stats: Arc::new(PolicyStats::default()),
        }
    }

    /// Loads every `*.lua` file directly in `dir` (not in subdirectories; names starting with
    /// `.` are skipped, symlinks are followed), in file-name order, into one fresh sandboxed
    /// state, runs each file's top level and checks that each defined hook is a function.
    /// A missing `dir` gives a set without files. Any failure rejects the whole set.
    pub fn load_dir(
        dir: &Path,
        limits: PolicyLimits,
        generation: u64,
    ) -> Result<PolicySet, PolicyError> {
        let files = read_policy_files(dir)?;
        Self::from_sources(files, limits, generation)
    }

    /// Builds a set from `(file name, source)` pairs, loaded in the given order. For tools
    /// (`ringgate check`, `simulate --policy FILE`) and tests; `load_dir` is the normal way.
    pub fn from_sources(
        files: Vec<(String, String)>,
        limits: PolicyLimits,
        generation: u64,
    ) -> Result<PolicySet, PolicyError> {
        let files: Vec<PolicyFile> = files
            .into_iter()
            .map(|(name, source)| PolicyFile { name, source })
            .collect();
        let mut hooks = [false; 4];
        if !files.is_empty() {
            // Validate in a state of its own, dropped afterwards; threads build their own.
            let state = ThreadState::build(&files, limits, 0, generation)?;
            for hook in Hook::ALL {
                hooks[hook.index()] = state.hooks[hook.index()].is_some();
            }
        }
        Ok(PolicySet {
            id: NEXT_SET_ID.fetch_add(1, Ordering::Relaxed),
            generation,
            files,
            hooks,
            limits,
            stats: Arc::new(PolicyStats::default()),
        })
    }

    /// Replaces this set's counters with `stats`, e.g. to keep `/lb/metrics` counters
    /// monotonic across reloads. Call before sharing the set.
    pub fn with_stats(mut self, stats: Arc<PolicyStats>) -> PolicySet {
        self.stats = stats;
        self
    }

    /// The generation number given at load (0 for [`PolicySet::empty`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The loaded file names, in load order.
    pub fn files(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    /// The names of the defined hooks, in [`Hook::ALL`] order.
    pub fn hooks(&self) -> Vec<&'static str> {
        Hook::ALL
            .iter()
            .filter(|h| self.has_hook(**h))
            .map(|h| h.name())
            .collect()
    }

    /// Whether `hook` is defined. Check this before building a [`KeyRequest`].
    pub fn has_hook(&self, hook: Hook) -> bool {
        self.hooks[hook.index()]
    }

    /// The limits this set was loaded with.
    pub fn limits(&self) -> PolicyLimits {
        self.limits
    }

    /// This set's counters.
    pub fn stats(&self) -> &Arc<PolicyStats> {
        &self.stats
    }

    /// Calls `request_key(req)`. A string or an integer (or a float with an integral value) is
    /// a key; `nil` defers to the configured key source ([`HookOutcome::Absent`]).
    pub fn request_key(&self, req: &KeyRequest<'_>) -> HookOutcome<LuaKey> {
        self.call(
            Hook::RequestKey,
            |lua, f| {
                let t =
                    without_memory_limit(lua, self.limits.memory_limit, || key_table(lua, req))?;
                f.call::<Value>(t)
            },
            |v| match v {
                Value::String(s) => Ok(LuaKey::Str(s.to_string_lossy())),
                Value::Integer(n) => Ok(LuaKey::Int(n)),
                Value::Number(x) => float_to_int(x).map(LuaKey::Int).ok_or(Value::Number(x)),
                other => Err(other),
            },
            "a string or an integer",
        )
    }

    /// Calls `request_hash(i, slots)`: `i` is passed as a Lua integer (`i as i64`, so keys
    /// above `i64::MAX` arrive negative, wrapped); the result is taken `rem_euclid(slots)`.
    pub fn request_hash(&self, i: u64, slots: u32) -> HookOutcome<u32> {
        self.call(
            Hook::RequestHash,
            |_, f| f.call::<Value>((i as i64, slots)),
            |v| slot_of(v, slots),
            "an integer slot",
        )
    }

    /// Calls `vnode_hash(i, j, slots)` (`i` wrapped to `i64` as in
    /// [`request_hash`](Self::request_hash)); the result is taken `rem_euclid(slots)`.
    pub fn vnode_hash(&self, i: u64, j: u32, slots: u32) -> HookOutcome<u32> {
        self.call(
            Hook::VnodeHash,
            |_, f| f.call::<Value>((i as i64, j, slots)),
            |v| slot_of(v, slots),
            "an integer slot",
        )
    }

    /// Calls `health(server, probe)`: a boolean verdict; `nil` defers to the built-in one.
    pub fn health(&self, server: &str, probe: &ProbeView<'_>) -> HookOutcome<bool> {
        self.call(
            Hook::Health,
            |lua, f| {
                let t = without_memory_limit(lua, self.limits.memory_limit, || {
                    let t = lua.create_table_with_capacity(0, 3)?;
                    t.raw_set("status", probe.status)?;
                    t.raw_set("latency_ms", probe.latency_ms)?;
                    t.raw_set("error", probe.error)?;
                    Ok(t)
                })?;
                f.call::<Value>((server, t))
            },
            |v| match v {
                Value::Boolean(b) => Ok(b),
                other => Err(other),
            },
            "a boolean",
        )
    }

    /// The common call path: thread-local state, budget reset, call, conversion, accounting.
    fn call<T>(
        &self,
        hook: Hook,
        invoke: impl FnOnce(&Lua, &Function) -> mlua::Result<Value>,
        convert: impl FnOnce(Value) -> Result<T, Value>,
        expected: &'static str,
    ) -> HookOutcome<T> {
        if !self.has_hook(hook) {
            return HookOutcome::Absent;
        }
        self.stats.calls[hook.index()].fetch_add(1, Ordering::Relaxed);
        let result = STATES.with(|states| {
            let mut states = states.borrow_mut();
            let state = match self.thread_state(&mut states) {
                Ok(state) => state,
                Err(e) => {
                    return Err(HookError::Runtime(format!(
                        "cannot build the Lua state: {e}"
                    )))
                }
            };
            let Some(f) = &state.hooks[hook.index()] else {
                return Ok(None);
            };
            state.budget.reset();
            let outcome = match invoke(&state.lua, f) {
                Ok(Value::Nil) => Ok(None),
                Ok(v) => match convert(v) {
                    Ok(t) => Ok(Some(t)),
                    Err(v) => Err(HookError::WrongType {
                        hook: hook.name(),
                        expected,
                        got: v.type_name().to_string(),
                    }),
                },
                Err(e) => Err(state.classify(&e)),
            };
            if let Err(HookError::MemoryExceeded { .. }) = outcome {
                // The state's heap is near its cap and may be held by globals: start afresh.
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

    /// This thread's state for this set, built if needed and moved to the front.
    fn thread_state<'s>(
        &self,
        states: &'s mut Vec<ThreadState>,
    ) -> Result<&'s ThreadState, PolicyError> {
        match states.iter().position(|s| s.set_id == self.id) {
            Some(0) => {}
            Some(pos) => {
                let state = states.remove(pos);
                states.insert(0, state);
            }
            None => {
                let state = ThreadState::build(&self.files, self.limits, self.id, self.generation)?;
                self.stats.state_builds.fetch_add(1, Ordering::Relaxed);
                states.insert(0, state);
                states.truncate(STATES_PER_THREAD);
            }
        }
        states
            .first()
            .ok_or_else(|| PolicyError::Sandbox("thread state vanished".to_string()))
    }
}

/// States kept per thread: the current set and the previous one (in-flight requests during a
/// reload).
const STATES_PER_THREAD: usize = 2;

thread_local! {
    static STATES: RefCell<Vec<ThreadState>> = const { RefCell::new(Vec::new()) };
}

/// Instruction budget accounting for one Lua state. The count hook fires every `step`
/// instructions and adds a tick; past `max_ticks` it raises an error, and keeps raising one at
/// every later tick until the next reset, so `pcall` loops cannot outlive the budget.
#[derive(Debug)]
struct Budget {
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

    fn reset(&self) {
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
struct ThreadState {
    set_id: u64,
    lua: Lua,
    budget: Arc<Budget>,
    limits: PolicyLimits,
    hooks: [Option<Function>; 4],
}

impl ThreadState {
    /// A fresh sandboxed state with `files` loaded in order.
    fn build(
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

    fn classify(&self, e: &mlua::Error) -> HookError {
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

/// Runs `build` with the state's memory limit lifted, then restores it.
///
/// While a limit is set, mlua wraps every string push and table write in a protected call
/// (about 0.2 µs each), which made building `req` cost microseconds. The tables built here
/// are bounded by the request (its headers are already in memory), so they are built
/// unprotected; the allocation still counts, and the hook itself runs under the limit.
fn without_memory_limit<R>(
    lua: &Lua,
    limit: usize,
    build: impl FnOnce() -> mlua::Result<R>,
) -> mlua::Result<R> {
    lua.set_memory_limit(0)?;
    let built = build();
    lua.set_memory_limit(limit)?;
    built
}

/// The `req` table for `request_key`.
fn key_table(lua: &Lua, req: &KeyRequest<'_>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("method", req.method)?;
    t.raw_set("path", req.path)?;
    t.raw_set("query", req.query)?;
    t.raw_set("client_ip", req.client_ip)?;
    t.raw_set("headers", header_table(lua, req.headers)?)?;
    Ok(t)
}

/// `req.headers`: lower-cased names; repeated names joined in order with `", "` (`"; "` for
/// `cookie`, as RFC 6265 wants).
fn header_table(lua: &Lua, headers: &[(&str, &[u8])]) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, headers.len())?;
    let mut named: Vec<(std::borrow::Cow<'_, str>, &[u8])> = headers
        .iter()
        .map(|(name, value)| {
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(name.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(*name)
            };
            (name, *value)
        })
        .collect();
    // Stable: repeated headers keep their order.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rest = named.as_slice();
    while let Some(((name, value), tail)) = rest.split_first() {
        let same = tail.iter().take_while(|(n, _)| n == name).count();
        if same == 0 {
            table.raw_set(name.as_ref(), lua.create_string(value)?)?;
        } else {
            let sep: &[u8] = if name == "cookie" { b"; " } else { b", " };
            let mut joined = value.to_vec();
            for (_, more) in &tail[..same] {
                joined.extend_from_slice(sep);
                joined.extend_from_slice(more);
            }
            table.raw_set(name.as_ref(), lua.create_string(&joined)?)?;
        }
        rest = &tail[same..];
    }
    Ok(table)
}

/// A float with an exact integral value in `i64` range, like Lua's `math.tointeger`.
fn float_to_int(x: f64) -> Option<i64> {
    // 2^63 as f64 is exact; the half-open range excludes it, and NaN fails `contains`.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if x.fract() == 0.0 && (-TWO_63..TWO_63).contains(&x) {
        Some(x as i64)
    } else {
        None
    }
}

fn slot_of(v: Value, slots: u32) -> Result<u32, Value> {
    let n = match v {
        Value::Integer(n) => n,
        Value::Number(x) => float_to_int(x).ok_or(Value::Number(x))?,
        other => return Err(other),
    };
    let slots = i64::from(slots.max(1));
    // rem_euclid of a positive u32 modulus is in 0..slots, so it fits in u32.
    Ok(u32::try_from(n.rem_euclid(slots)).unwrap_or(0))
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

/// Policy files as `(file name, source)` pairs, in load order.
pub type PolicyFiles = Vec<(String, String)>;

/// The `*.lua` files directly in `dir`, sorted by name. A missing `dir` has none.
pub fn read_policy_files(dir: &Path) -> Result<PolicyFiles, PolicyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PolicyError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            if path.extension().is_some_and(|ext| ext == "lua") {
                return Err(PolicyError::FileName { path });
            }
            continue;
        };
        // Hidden files are editor artefacts (e.g. Emacs `.#x.lua` locks), not policies.
        if !name.ends_with(".lua") || name.starts_with('.') {
            continue;
        }
        // Follows symlinks (ConfigMap-style mounts); subdirectories are skipped.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => paths.push((name, path)),
            Ok(_) => {}
            Err(source) => return Err(PolicyError::ReadFile { path, source }),
        }
    }
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut files = Vec::with_capacity(paths.len());
    for (name, path) in paths {
        let bytes = std::fs::read(&path).map_err(|source| PolicyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let source =
            String::from_utf8(bytes).map_err(|_| PolicyError::NotText { file: name.clone() })?;
        files.push((name, source));
    }
    Ok(files)
}

#[cfg(test)]
mod tests;
