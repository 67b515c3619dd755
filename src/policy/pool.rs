//! Lua states built ahead of use, off the serving threads: the pool of ready states of one
//! policy set, and the one background thread that fills the pools.
//!
//! Building a state runs every policy file's top level, and a top level is policy code: on a
//! serving thread it would hold every connection of that thread for as long as it runs. So a
//! serving thread (one that called [`enter_serving_thread`]) never builds a state: it takes one
//! from its set's pool, which was filled when the set loaded (the state that validated the
//! set) and is topped up by the builder thread each time a state is taken. If none is ready it
//! waits for the builder at most the hook's own deadline, then the call falls back to the
//! built-in default. Any other thread (the controller's `vnode_hash` and `health`, simulations,
//! tools, tests) takes a ready state when there is one and otherwise builds inline.
//!
//! Owns: [`StatePool`], the builder thread and the rule above. Must not touch: how a state is
//! built (`sandbox`), the thread-local caches or the accounting of calls (`calls`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::sandbox::ThreadState;
use super::{PolicyError, PolicyFile, PolicyLimits};

/// States each live set keeps ready (set by the gateway to its number of serving threads plus
/// one, so that every serving thread finds one at once after a reload, with a spare for a
/// rebuild after a memory error); at least one.
static READY_TARGET: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread serves clients: it never builds a state.
    static SERVING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as a serving thread: from now on it takes Lua states from the pools and
/// never runs a policy file's top level itself.
pub fn enter_serving_thread() {
    SERVING.with(|s| s.set(true));
}

/// How many states each policy set keeps ready for the serving threads (the gateway passes its
/// number of serving threads plus one).
pub fn set_ready_states(n: usize) {
    READY_TARGET.store(n.max(1), Ordering::Relaxed);
}

pub(super) fn on_serving_thread() -> bool {
    SERVING.with(Cell::get)
}

/// What the set's state source gave a caller.
pub(super) enum Taken {
    /// A ready state.
    Ready(ThreadState),
    /// None was ready in time on a serving thread.
    NotReady,
    /// The builder could not build one (the reason).
    Broken(String),
}

/// The ready states of one policy set.
#[derive(Debug)]
pub(super) struct StatePool {
    files: Arc<[PolicyFile]>,
    limits: PolicyLimits,
    set_id: u64,
    generation: u64,
    ready: Mutex<Vec<ThreadState>>,
    /// Signalled whenever the builder adds a state (or gives up).
    filled: Condvar,
    /// A fill request is queued or running: one at a time per pool.
    queued: AtomicBool,
    /// Why the builder's last build for this set failed, until one succeeds (every refill
    /// tries again: a top level may fail for a passing reason, such as its deadline on a
    /// starved machine).
    broken: Mutex<Option<String>>,
}

impl StatePool {
    pub(super) fn new(
        files: Arc<[PolicyFile]>,
        limits: PolicyLimits,
        set_id: u64,
        generation: u64,
    ) -> StatePool {
        StatePool {
            files,
            limits,
            set_id,
            generation,
            ready: Mutex::new(Vec::new()),
            filled: Condvar::new(),
            queued: AtomicBool::new(false),
            broken: Mutex::new(None),
        }
    }

    /// Adds a state built elsewhere (the one that validated the set at load).
    pub(super) fn put(&self, state: ThreadState) {
        lock(&self.ready).push(state);
        self.filled.notify_all();
    }

    /// Asks the builder thread to top this pool up to the target.
    pub(super) fn refill(self: &Arc<Self>) {
        if self.files.is_empty() || self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if builder().send(Arc::downgrade(self)).is_err() {
            self.queued.store(false, Ordering::Release);
        }
    }

    /// A state for the calling thread: a ready one (and a refill asked for), else, off the
    /// serving threads, one built inline; on a serving thread, one the builder makes within
    /// `wait`, else [`Taken::NotReady`].
    pub(super) fn take(self: &Arc<Self>, wait: Duration) -> Taken {
        if let Some(state) = lock(&self.ready).pop() {
            self.refill();
            return Taken::Ready(state);
        }
        if !on_serving_thread() {
            return match self.build() {
                Ok(state) => Taken::Ready(state),
                Err(e) => Taken::Broken(e.to_string()),
            };
        }
        self.refill();
        let deadline = Instant::now() + wait;
        let mut ready = lock(&self.ready);
        loop {
            if let Some(state) = ready.pop() {
                drop(ready);
                self.refill();
                return Taken::Ready(state);
            }
            if let Some(reason) = lock(&self.broken).clone() {
                drop(ready);
                self.refill();
                return Taken::Broken(reason);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Taken::NotReady;
            }
            ready = match self.filled.wait_timeout(ready, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn build(&self) -> Result<ThreadState, PolicyError> {
        ThreadState::build(&self.files, self.limits, self.set_id, self.generation)
    }

    /// The builder's side: builds states until the pool holds the target (or the set is gone).
    fn fill(pool: &Weak<StatePool>) {
        loop {
            let Some(pool) = pool.upgrade() else { return };
            if lock(&pool.ready).len() >= READY_TARGET.load(Ordering::Relaxed) {
                pool.queued.store(false, Ordering::Release);
                // A take between the check and the flag's reset asked for nothing: look again.
                if lock(&pool.ready).len() >= READY_TARGET.load(Ordering::Relaxed)
                    || pool.queued.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                continue;
            }
            match pool.build() {
                Ok(state) => {
                    *lock(&pool.broken) = None;
                    pool.put(state);
                }
                Err(e) => {
                    // Logged once until a build succeeds again.
                    if lock(&pool.broken).replace(e.to_string()).is_none() {
                        tracing::warn!(generation = pool.generation, error = %e, "cannot build a Lua state for the policy; calls on threads without one fall back to the built-in defaults");
                    }
                    pool.filled.notify_all();
                    pool.queued.store(false, Ordering::Release);
                    return;
                }
            }
        }
    }
}

/// The builder thread's queue, started on first use. It lives as long as the process; it
/// holds pools weakly, so a set nobody uses any more is not built for.
fn builder() -> &'static Sender<Weak<StatePool>> {
    static BUILDER: OnceLock<Sender<Weak<StatePool>>> = OnceLock::new();
    BUILDER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Weak<StatePool>>();
        let spawned = std::thread::Builder::new()
            .name("ringgate-lua-builder".into())
            .spawn(move || {
                while let Ok(pool) = rx.recv() {
                    StatePool::fill(&pool);
                }
            });
        if let Err(e) = spawned {
            // The receiver is gone with the closure: every send fails, and takers on serving
            // threads answer with the built-in default.
            tracing::error!(error = %e, "cannot start the Lua state builder thread");
        }
        tx
    })
}

use super::stats::lock;
