//! Statistics and the rate-limited failure log.

use super::*;
use crate::policy::stats::lock;

#[test]
fn failures_are_logged_at_most_once_per_period() {
    let s = set(&[("e.lua", "function request_hash() error('x') end")]);
    for _ in 0..5 {
        failed(s.request_hash(1, 8));
    }
    let gates = lock(&s.stats().log_gate);
    assert_eq!(gates[Hook::RequestHash.index()].suppressed, 4);
    assert!(gates[Hook::RequestHash.index()].last.is_some());
}
