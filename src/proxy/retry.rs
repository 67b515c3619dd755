//! Retries: whether a failed attempt may be tried on the next server clockwise, and the budget
//! that keeps retries from multiplying load (a request that kills its replica, a brown-out).
//!
//! Owns: [`may_retry`] (pure: what failed, the method, whether the body was sent, and
//! `proxy.retry_on`), and the retry budget (Envoy's: retries in progress may be at most
//! `proxy.retry_budget_percent` of the requests in progress, or `proxy.retry_budget_min`,
//! whichever is more). A retry after a refused connection is outside the budget
//! ([`needs_budget`]): when one of N replicas dies, about 1/N of the requests in progress fail
//! to connect at the same moment, more than a 20 % budget holds for N ≤ 5, and those retries
//! add no load (nothing reached the dead replica; the next server owns those keys once it is
//! out of the ring anyway). The counts are per serving thread (each thread is its own runtime and
//! every request stays on its thread), so the request path touches no shared cache line.
//! Must not touch: the ring or the connection.

use std::cell::Cell;

use http::Method;

use crate::config::RetryOn;

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused: nothing listens at the replica's address.
    Refused,
    /// No connection was made otherwise (a timeout, an unreachable host): nothing reached the
    /// replica, but the attempt may have taken up to `proxy.connect_timeout`.
    Connect,
    /// The connection broke before a response.
    Reset,
}

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the attempt may be retried (the budget aside).
pub fn may_retry(
    failure: Failure,
    method: &Method,
    body_unsent: bool,
    retry_on: &[RetryOn],
) -> bool {
    match failure {
        Failure::Refused | Failure::Connect => {
            retry_on.contains(&RetryOn::ConnectFailure) && body_unsent
        }
        Failure::Reset => {
            retry_on.contains(&RetryOn::Reset) && is_idempotent(method) && body_unsent
        }
    }
}

/// Whether a retry after `failure` takes a place in the budget. A refused connection's retry
/// does not: it is as cheap as the request's own attempt, and a budget spent on a dead replica's
/// refusals would turn its death into 502s. Slow failures (timeouts, resets) multiply work, and
/// stay budgeted.
pub fn needs_budget(failure: Failure) -> bool {
    failure != Failure::Refused
}

/// Whether one more retry fits: retries in progress stay under `percent` of the requests in
/// progress, or `min`, whichever is more.
pub fn within_budget(active: u32, retrying: u32, percent: u32, min: u32) -> bool {
    let allowed = (u64::from(active) * u64::from(percent) / 100).max(u64::from(min));
    u64::from(retrying) < allowed
}

thread_local! {
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
    static RETRYING: Cell<u32> = const { Cell::new(0) };
}

fn bump(cell: &'static std::thread::LocalKey<Cell<u32>>, up: bool) {
    cell.with(|c| {
        c.set(if up {
            c.get().saturating_add(1)
        } else {
            c.get().saturating_sub(1)
        })
    });
}

/// A request in progress on this thread, until dropped.
pub struct Active(());

impl Active {
    pub fn enter() -> Active {
        bump(&ACTIVE, true);
        Active(())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        bump(&ACTIVE, false);
    }
}

/// A request being retried on this thread, until dropped.
pub struct Retrying(());

impl Retrying {
    /// Takes a place in this thread's budget, or `None` when it is spent.
    pub fn try_start(percent: u32, min: u32) -> Option<Retrying> {
        let (active, retrying) = (ACTIVE.with(Cell::get), RETRYING.with(Cell::get));
        within_budget(active, retrying, percent, min).then(|| {
            bump(&RETRYING, true);
            Retrying(())
        })
    }
}

impl Drop for Retrying {
    fn drop(&mut self) {
        bump(&RETRYING, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &[RetryOn] = &[RetryOn::ConnectFailure];
    const BOTH: &[RetryOn] = &[RetryOn::ConnectFailure, RetryOn::Reset];

    #[test]
    fn by_default_only_failed_connects_are_retried() {
        assert!(may_retry(Failure::Connect, &Method::POST, true, DEFAULT));
        assert!(
            !may_retry(Failure::Reset, &Method::GET, true, DEFAULT),
            "a query of death stays on one replica"
        );
        assert!(
            !may_retry(Failure::Connect, &Method::GET, false, DEFAULT),
            "the body is gone"
        );
        assert!(!may_retry(Failure::Connect, &Method::GET, true, &[]));
    }

    #[test]
    fn resets_are_retried_on_request_for_idempotent_methods_only() {
        assert!(may_retry(Failure::Reset, &Method::GET, true, BOTH));
        assert!(may_retry(Failure::Reset, &Method::PUT, true, BOTH));
        assert!(!may_retry(Failure::Reset, &Method::POST, true, BOTH));
        assert!(!may_retry(Failure::Reset, &Method::GET, false, BOTH));
    }

    #[test]
    fn a_refused_connection_is_retried_outside_the_budget() {
        assert!(may_retry(Failure::Refused, &Method::POST, true, DEFAULT));
        assert!(!may_retry(Failure::Refused, &Method::GET, false, DEFAULT));
        assert!(!may_retry(Failure::Refused, &Method::GET, true, &[]));
        assert!(!needs_budget(Failure::Refused));
        assert!(needs_budget(Failure::Connect), "a timeout held the request");
        assert!(needs_budget(Failure::Reset), "a query of death");
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
    fn guards_count_per_thread() {
        let a = Active::enter();
        let r1 = Retrying::try_start(0, 2).expect("first");
        let r2 = Retrying::try_start(0, 2).expect("second");
        assert!(Retrying::try_start(0, 2).is_none(), "spent");
        drop(r1);
        assert!(Retrying::try_start(0, 2).is_some(), "freed");
        drop((r2, a));
        assert_eq!(ACTIVE.with(Cell::get), 0);
        assert_eq!(RETRYING.with(Cell::get), 0);
    }
}
