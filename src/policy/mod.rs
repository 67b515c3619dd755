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
//! # Layout
//!
//! - this file: the public API ([`PolicySet`], [`Hook`], [`HookOutcome`], [`LuaKey`],
//!   [`KeyRequest`], [`ProbeView`], [`PolicyLimits`], the errors);
//! - `files`: reading the policy directory;
//! - `sandbox`: building a sandboxed state (libraries, prelude, limits) and loading the files
//!   into it, then sealing it; `prelude.lua` is its trusted Lua side;
//! - `meter`: the instruction budget and the wall-clock deadline of one call;
//! - `strlib` and `pattern`: `string.rep` and the pattern functions in Rust, counted on the
//!   meter (Lua's C versions can run unbounded inside one call);
//! - `bytecode`: finding functions that assign to upvalues, from `string.dump` output;
//! - `pool`: states built ahead, off the serving threads (the pool of a set and the builder
//!   thread);
//! - `calls`: the call path (thread-local states, one call, accounting);
//! - `redact`: request header values masked in `request_key` error texts;
//! - `convert`: Lua values to and from Rust (`req`, `probe`, slots and keys);
//! - `stats`: [`PolicyStats`], the last error and the rate-limited log.
//!
//! # Execution model
//!
//! A [`PolicySet`] is immutable and holds the sources and a pool of ready states. Hooks run in
//! a Lua state per thread (`thread_local!`), taken from the pool the first time a thread calls
//! a hook of that set, and kept for later calls. A serving thread ([`enter_serving_thread`])
//! never builds a state itself, since building runs every file's top level: the pool is filled
//! when the set loads and topped up by a builder thread (see `pool`). Each thread keeps the states of the two sets it
//! used most recently, so in-flight requests finishing on the previous set during a reload do
//! not make a worker rebuild on every request. There is no lock on the call path: a call is a
//! thread-local lookup, an atomic counter increment and the Lua call itself.
//!
//! # Sandbox and limits
//!
//! Only the `base`, `string`, `table`, `math` and `utf8` libraries are opened; `dofile`,
//! `loadfile`, `print` (redirected to the debug log), `warn`, `collectgarbage` (reduced to
//! `"count"`), `math.randomseed` and `string.dump` are removed or replaced; `load` only
//! accepts text chunks without to-be-closed variables. Each call (and each file's top level
//! at load) gets [`PolicyLimits::instruction_budget`] VM instructions and a wall-clock
//! deadline ([`PolicyLimits::allowance`]); both are checked every 256 instructions by a Lua
//! count hook, by the Rust string functions as they work, and by the C functions whose work
//! grows with their input, which charge it before they run (and refuse too large an input).
//! Once either runs out, the call fails with [`HookError::BudgetExceeded`] or
//! [`HookError::Timeout`], and `pcall`/`xpcall` inside the policy cannot catch it; no policy
//! code runs where the hook cannot fire (message handlers once a call is stopped, `__close`,
//! `__gc`). The state's memory is capped at [`PolicyLimits::memory_limit`], and `string.rep`
//! and `gsub` refuse results above it before building them. `docs/policies.md` ("Why a hook
//! cannot outrun its deadline") has the argument and the inventory of every function.
//!
//! # State
//!
//! What a call writes is gone for the next call: the globals it writes are cleared after
//! it, every table defined at load time is read-only (writing one is a hook error), and a
//! set whose functions assign to locals of a file's top level is rejected at load. What
//! persists is what the files defined when they loaded, read-only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mlua::Value;

mod bytecode;
mod calls;
mod convert;
mod files;
mod meter;
mod pattern;
mod pool;
mod redact;
mod sandbox;
mod stats;
mod strlib;

pub use files::{read_policy_files, PolicyFiles};
pub use pool::{enter_serving_thread, set_ready_states};
pub use stats::{LastHookError, PolicyStats};

use convert::{float_to_int, key_table, probe_table, slot_of, without_memory_limit};
use pool::StatePool;
use sandbox::ThreadState;

/// Limits applied to every Lua state of a policy set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Memory cap of one Lua state, in bytes (default 16 MiB).
    pub memory_limit: usize,
    /// VM instructions allowed per hook call, and per file's top level at load
    /// (default 1,000,000). Counted in steps of at most 256 instructions.
    pub instruction_budget: u32,
    /// Wall-clock deadline of one `request_key` or `request_hash` call (default 5 ms); the
    /// hooks off the request path get more, see [`PolicyLimits::allowance`].
    pub hook_timeout: Duration,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            memory_limit: 16 * 1024 * 1024,
            instruction_budget: 1_000_000,
            hook_timeout: Duration::from_millis(5),
        }
    }
}

impl PolicyLimits {
    /// How much longer than [`PolicyLimits::hook_timeout`] `vnode_hash` and `health` may run:
    /// they run off the request path (once per virtual node at a ring rebuild, once per probe),
    /// so a slow call delays a rebuild or a verdict, not a client.
    pub const OFF_PATH_FACTOR: u32 = 10;

    /// The wall-clock deadline of one call of `hook`: `hook_timeout` for the per-request hooks,
    /// [`OFF_PATH_FACTOR`](Self::OFF_PATH_FACTOR) times it for `vnode_hash` and `health`.
    pub fn allowance(&self, hook: Hook) -> Duration {
        match hook {
            Hook::RequestKey | Hook::RequestHash => self.hook_timeout,
            Hook::VnodeHash | Hook::Health => self.hook_timeout * Self::OFF_PATH_FACTOR,
        }
    }
}

/// Longest error text kept from a policy (in [`HookError`], [`PolicyError`] and
/// [`LastHookError`]): a message built from request data shows at most this much of it.
pub const MAX_ERROR_TEXT: usize = 200;

/// `text` cut to at most [`MAX_ERROR_TEXT`] bytes, on a character boundary, marked with `…`.
pub(crate) fn bounded(mut text: String) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text;
    }
    let mut cut = MAX_ERROR_TEXT - '…'.len_utf8();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push('…');
    text
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

    pub(super) fn index(self) -> usize {
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
    /// The top level of a file ran past its deadline.
    #[error("policy file {file}: its top level ran past its deadline of {after:?} (a slow pattern or a huge string?); move the work into a hook or simplify it")]
    Timeout { file: String, after: Duration },
    /// A function that stays reachable after load assigns to a local of the enclosing code.
    #[error("policy file {file} line {line}: assigns to `{name}`, a local of the code around the function, so one request would leave its value for the next; module-level values are read-only once the policy has loaded: compute it at the top level, or keep per-request data in locals of the hook")]
    ModuleStateWrite {
        file: String,
        line: u32,
        name: String,
    },
    /// A file declares a to-be-closed variable (`local x <close>`).
    #[error("policy file {file} line {line}: declares a to-be-closed variable (`<close>`), which policies may not use: Lua runs `__close` while it unwinds a stopped call, out of reach of the instruction budget; release resources explicitly instead")]
    ToBeClosed { file: String, line: u32 },
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
    /// The hook ran past its wall-clock deadline.
    #[error("ran past its deadline of {after:?} (a slow pattern or a huge string?); simplify the hook or raise policy.hook_timeout")]
    Timeout { after: Duration },
    /// The hook ran past the state's memory limit.
    #[error("ran past the memory limit of {limit} bytes; the thread's Lua state is rebuilt; stop accumulating data or raise policy.memory_limit")]
    MemoryExceeded { limit: usize },
    /// A serving thread found no Lua state of this set ready within the hook's deadline (they
    /// are built off the serving threads; this happens only right after a load, or when the
    /// builder falls behind rebuilds).
    #[error("no Lua state of this policy was ready for this serving thread yet (states are built off the serving threads); the built-in default answered this call")]
    NotReady,
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
    files: Arc<[PolicyFile]>,
    hooks: [bool; 4],
    limits: PolicyLimits,
    stats: Arc<PolicyStats>,
    /// Ready states of this set, for threads that have none yet.
    pool: Arc<StatePool>,
}

static NEXT_SET_ID: AtomicU64 = AtomicU64::new(1);

impl PolicySet {
    /// The set with no files: generation 0, every call returns [`HookOutcome::Absent`].
    pub fn empty() -> PolicySet {
        let id = NEXT_SET_ID.fetch_add(1, Ordering::Relaxed);
        let files: Arc<[PolicyFile]> = Arc::from(Vec::new());
        let limits = PolicyLimits::default();
        PolicySet {
            id,
            generation: 0,
            pool: Arc::new(StatePool::new(files.clone(), limits, id, 0)),
            files,
            hooks: [false; 4],
            limits,
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
        let files: Arc<[PolicyFile]> = files
            .into_iter()
            .map(|(name, source)| PolicyFile { name, source })
            .collect();
        let id = NEXT_SET_ID.fetch_add(1, Ordering::Relaxed);
        let pool = Arc::new(StatePool::new(files.clone(), limits, id, generation));
        let mut hooks = [false; 4];
        if !files.is_empty() {
            // The state that validates the set is the first ready one; the builder thread
            // builds the others now, off whatever thread loads and off the serving threads.
            let state = ThreadState::build(&files, limits, id, generation)?;
            for hook in Hook::ALL {
                hooks[hook.index()] = state.hooks[hook.index()].is_some();
            }
            pool.put(state);
            pool.refill();
        }
        Ok(PolicySet {
            id,
            generation,
            files,
            hooks,
            limits,
            stats: Arc::new(PolicyStats::default()),
            pool,
        })
    }

    /// Replaces this set's counters with `stats`, e.g. to keep `/lb/metrics` counters
    /// monotonic across reloads. Call before sharing the set.
    pub fn with_stats(mut self, stats: Arc<PolicyStats>) -> PolicySet {
        self.stats = stats;
        self
    }

    /// The same files, hooks and limits with counters of its own and Lua states of its own:
    /// for simulations (`POST /lb/simulate`), whose calls must not show in the live set's
    /// figures.
    pub fn detached(&self) -> PolicySet {
        let id = NEXT_SET_ID.fetch_add(1, Ordering::Relaxed);
        PolicySet {
            id,
            generation: self.generation,
            files: self.files.clone(),
            hooks: self.hooks,
            limits: self.limits,
            stats: Arc::new(PolicyStats::default()),
            // Simulations run off the serving threads and build their states inline.
            pool: Arc::new(StatePool::new(
                self.files.clone(),
                self.limits,
                id,
                self.generation,
            )),
        }
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
            &|message| {
                let values: Vec<&[u8]> = req.headers.iter().map(|(_, v)| *v).collect();
                redact::redact(message, &values)
            },
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
            &|message| message,
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
            &|message| message,
        )
    }

    /// Calls `health(server, probe)`: a boolean verdict; `nil` defers to the built-in one.
    pub fn health(&self, server: &str, probe: &ProbeView<'_>) -> HookOutcome<bool> {
        self.call(
            Hook::Health,
            |lua, f| {
                let t = without_memory_limit(lua, self.limits.memory_limit, || {
                    probe_table(lua, probe)
                })?;
                f.call::<Value>((server, t))
            },
            |v| match v {
                Value::Boolean(b) => Ok(b),
                other => Err(other),
            },
            "a boolean",
            &|message| message,
        )
    }
}

#[cfg(test)]
mod tests;
