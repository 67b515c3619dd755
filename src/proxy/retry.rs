//! Retries: whether a failed attempt may be tried on the next server clockwise, and the budget
//! that keeps retries from multiplying load (a request that kills its replica, a brown-out).
//!
//! Owns: [`may_retry`] (pure, on the attempt's [`Failure`]: whose and what it was, whether
//! the body was sent, the method, and `proxy.retry_on`), and the retry budget (Envoy's: retries in progress may be at most
//! `proxy.retry_budget_percent` of the requests in progress, or `proxy.retry_budget_min`,
//! whichever is more). A retry after a refused connection is outside the budget
//! ([`needs_budget`]): when one of N replicas dies, about 1/N of the requests in progress fail
//! to connect at the same moment, more than a 20 % budget holds for N ≤ 5, and those retries
//! add no load (nothing reached the dead replica; the next server owns those keys once it is
//! out of the ring anyway). The counts are per serving thread ([`Budget`], in the thread's worker: each thread is its own
//! runtime and every request stays on its thread), so the request path touches no shared cache
//! line.
//! Must not touch: the ring or the connection.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use http::Method;

use crate::config::RetryOn;
use crate::proxy::failure::{Failure, Kind, Whose};
use crate::ring::ServerId;

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the attempt may be retried on the next server (the budget aside): only the
/// replica's failures, only while the body can be sent again (none of it was sent; or, for a
/// stream the replica did not process, all that was sent is still held), and only the kinds
/// `proxy.retry_on` names: a failed connect (nothing reached the replica), or a connection
/// that broke or answered garbage before a response (idempotent requests only). A request
/// whose deadline passed is not retried: its time is spent.
pub fn may_retry(failure: &Failure, method: &Method, retry_on: &[RetryOn]) -> bool {
    let resendable = !failure.body_sent || (failure.kind == Kind::Unprocessed && failure.body_held);
    if failure.whose != Whose::Replica || !resendable {
        return false;
    }
    match failure.kind {
        Kind::Refused | Kind::ConnectTimeout | Kind::Connect => {
            retry_on.contains(&RetryOn::ConnectFailure)
        }
        // Nothing was processed: as safe as a failed connect, for any method.
        Kind::Unprocessed => retry_on.contains(&RetryOn::ConnectFailure),
        Kind::Broken | Kind::BadHead => retry_on.contains(&RetryOn::Reset) && is_idempotent(method),
        Kind::Timeout
        | Kind::ClientBody
        | Kind::ClientBodyTimeout
        | Kind::TooLarge
        | Kind::LocalResource
        | Kind::Busy
        | Kind::NotHttp2 => false,
    }
}

/// The next server clockwise that was not tried yet (`successors` in ring order from the key's
/// slot).
pub fn next_server(
    mut successors: impl Iterator<Item = ServerId>,
    tried: &[ServerId],
) -> Option<ServerId> {
    successors.find(|s| !tried.contains(s))
}

/// Whether a retry after `failure` takes a place in the budget. A refused connection's retry
/// does not: it is as cheap as the request's own attempt, and a budget spent on a dead replica's
/// refusals would turn its death into 502s. Slow failures (timeouts, resets) multiply work, and
/// stay budgeted.
pub fn needs_budget(failure: &Failure) -> bool {
    !matches!(failure.kind, Kind::Refused | Kind::Unprocessed)
}

/// Whether one more retry fits: retries in progress stay under `percent` of the requests in
/// progress, or `min`, whichever is more.
pub fn within_budget(active: u32, retrying: u32, percent: u32, min: u32) -> bool {
    let allowed = (u64::from(active) * u64::from(percent) / 100).max(u64::from(min));
    u64::from(retrying) < allowed
}

/// A serving thread's retry budget: its requests in progress and those of them retrying. One
/// per thread ([`crate::worker::Worker`]), so the counts never leave the thread's core; atomics
/// only because request futures must be `Send`: their connection's task is spawned on the runtime.
#[derive(Debug, Default)]
pub struct Budget {
    active: AtomicU32,
    retrying: AtomicU32,
}

fn bump(count: &AtomicU32, up: bool) {
    let n = count.load(Ordering::Relaxed);
    count.store(
        if up {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        },
        Ordering::Relaxed,
    );
}

/// A request in progress on this thread, until dropped.
pub struct Active<'a>(&'a Budget);

impl Active<'_> {
    pub fn enter(budget: &Budget) -> Active<'_> {
        bump(&budget.active, true);
        Active(budget)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        bump(&self.0.active, false);
    }
}

/// A request being retried on this thread, until dropped.
pub struct Retrying(Arc<Budget>);

impl Retrying {
    /// Takes a place in `budget`, or `None` when it is spent.
    pub fn try_start(budget: &Arc<Budget>, percent: u32, min: u32) -> Option<Retrying> {
        let active = budget.active.load(Ordering::Relaxed);
        let retrying = budget.retrying.load(Ordering::Relaxed);
        within_budget(active, retrying, percent, min).then(|| {
            bump(&budget.retrying, true);
            Retrying(Arc::clone(budget))
        })
    }
}

impl Drop for Retrying {
    fn drop(&mut self) {
        bump(&self.0.retrying, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &[RetryOn] = &[RetryOn::ConnectFailure];
    const BOTH: &[RetryOn] = &[RetryOn::ConnectFailure, RetryOn::Reset];

    fn failed(kind: Kind, body_sent: bool) -> Failure {
        Failure {
            whose: Whose::Replica,
            kind,
            body_sent,
            body_held: !body_sent,
            detail: String::new(),
        }
    }

    #[test]
    fn by_default_only_failed_connects_are_retried() {
        assert!(may_retry(
            &failed(Kind::Connect, false),
            &Method::POST,
            DEFAULT
        ));
        assert!(may_retry(
            &failed(Kind::ConnectTimeout, false),
            &Method::POST,
            DEFAULT
        ));
        assert!(
            !may_retry(&failed(Kind::Broken, false), &Method::GET, DEFAULT),
            "a query of death stays on one replica"
        );
        assert!(
            !may_retry(&failed(Kind::Connect, true), &Method::GET, DEFAULT),
            "the body is gone"
        );
        assert!(!may_retry(&failed(Kind::Connect, false), &Method::GET, &[]));
        assert!(
            !may_retry(&failed(Kind::Timeout, false), &Method::GET, BOTH),
            "the request's time is spent"
        );
    }

    #[test]
    fn resets_are_retried_on_request_for_idempotent_methods_only() {
        for kind in [Kind::Broken, Kind::BadHead] {
            assert!(may_retry(&failed(kind, false), &Method::GET, BOTH));
            assert!(may_retry(&failed(kind, false), &Method::PUT, BOTH));
            assert!(!may_retry(&failed(kind, false), &Method::POST, BOTH));
            assert!(!may_retry(&failed(kind, true), &Method::GET, BOTH));
        }
    }

    #[test]
    fn only_the_replicas_failures_are_retried() {
        for (whose, kind) in [
            (Whose::Client, Kind::ClientBody),
            (Whose::Client, Kind::ClientBodyTimeout),
            (Whose::Client, Kind::TooLarge),
            (Whose::Gateway, Kind::LocalResource),
        ] {
            let f = Failure {
                whose,
                kind,
                body_sent: false,
                body_held: true,
                detail: String::new(),
            };
            assert!(!may_retry(&f, &Method::GET, BOTH), "{kind:?}");
        }
    }

    #[test]
    fn a_refused_connection_is_retried_outside_the_budget() {
        assert!(may_retry(
            &failed(Kind::Refused, false),
            &Method::POST,
            DEFAULT
        ));
        assert!(!may_retry(
            &failed(Kind::Refused, true),
            &Method::GET,
            DEFAULT
        ));
        assert!(!may_retry(&failed(Kind::Refused, false), &Method::GET, &[]));
        assert!(!needs_budget(&failed(Kind::Refused, false)));
        assert!(
            needs_budget(&failed(Kind::ConnectTimeout, false)),
            "a timeout held the request"
        );
        assert!(
            needs_budget(&failed(Kind::Broken, false)),
            "a query of death"
        );
    }

    #[test]
    fn a_stream_the_replica_did_not_process_is_retried_for_any_method_outside_the_budget() {
        let unprocessed = failed(Kind::Unprocessed, false);
        assert!(may_retry(&unprocessed, &Method::POST, DEFAULT));
        assert!(!may_retry(&unprocessed, &Method::POST, &[]));
        assert!(!needs_budget(&unprocessed));
        assert!(
            !may_retry(&failed(Kind::Unprocessed, true), &Method::POST, DEFAULT),
            "a body partly read and not held cannot be sent again"
        );
        let held = Failure {
            body_held: true,
            ..failed(Kind::Unprocessed, true)
        };
        assert!(
            may_retry(&held, &Method::POST, DEFAULT),
            "a body partly read and held whole is sent again"
        );
        for kind in [Kind::Broken, Kind::Connect, Kind::Timeout] {
            let held = Failure {
                body_held: true,
                ..failed(kind, true)
            };
            assert!(
                !may_retry(&held, &Method::GET, BOTH),
                "{kind:?}: the replica may have acted on it"
            );
        }
        assert!(!may_retry(
            &failed(Kind::NotHttp2, false),
            &Method::POST,
            BOTH
        ));
    }

    #[test]
    fn the_next_server_is_the_next_untried_one_clockwise() {
        let id = |n| ServerId::new(n).expect("non-zero");
        let (a, b, c) = (id(1), id(2), id(3));
        assert_eq!(next_server([a, b, c].into_iter(), &[a]), Some(b));
        assert_eq!(next_server([a, b, c].into_iter(), &[a, b]), Some(c));
        assert_eq!(
            next_server([a, b].into_iter(), &[a, b]),
            None,
            "every server was tried"
        );
    }

    #[test]
    fn the_budget_is_a_share_of_active_requests_with_a_floor() {
        assert!(within_budget(1, 0, 20, 3));
        assert!(within_budget(1, 2, 20, 3));
        assert!(!within_budget(1, 3, 20, 3), "the floor");
        assert!(within_budget(100, 19, 20, 3));
        assert!(!within_budget(100, 20, 20, 3), "20% of 100");
        assert!(!within_budget(100, 0, 0, 0), "no budget, no retry");
    }

    #[test]
    fn guards_count_in_their_budget() {
        let budget = Arc::new(Budget::default());
        let a = Active::enter(&budget);
        let r1 = Retrying::try_start(&budget, 0, 2).expect("first");
        let r2 = Retrying::try_start(&budget, 0, 2).expect("second");
        assert!(Retrying::try_start(&budget, 0, 2).is_none(), "spent");
        drop(r1);
        assert!(Retrying::try_start(&budget, 0, 2).is_some(), "freed");
        drop((r2, a));
        assert_eq!(budget.active.load(Ordering::Relaxed), 0);
        assert_eq!(budget.retrying.load(Ordering::Relaxed), 0);
        let other = Budget::default();
        let _busy = Active::enter(&other);
        assert_eq!(
            budget.active.load(Ordering::Relaxed),
            0,
            "another thread's budget"
        );
    }
}
