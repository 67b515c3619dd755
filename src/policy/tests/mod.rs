//! Unit tests of the policy module, one file per responsibility; the helpers they share.

mod bytecode;
mod calls;
mod convert;
mod escape;
mod examples;
mod files;
mod limits;
mod meter;
mod pattern;
mod sandbox;
mod state;
mod stats;
mod strlib;

pub(super) use super::*;
pub(super) use std::fs;
pub(super) use std::time::{Duration, Instant};

pub(super) fn set(files: &[(&str, &str)]) -> PolicySet {
    try_set(files, PolicyLimits::default()).expect("policy set loads")
}

pub(super) fn try_set(
    files: &[(&str, &str)],
    limits: PolicyLimits,
) -> Result<PolicySet, PolicyError> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, src) in files {
        fs::write(dir.path().join(name), src).expect("write policy");
    }
    PolicySet::load_dir(dir.path(), limits, 1)
}

/// A small budget, and a deadline far enough away that only the budget can stop a call.
pub(super) fn small_limits() -> PolicyLimits {
    PolicyLimits {
        memory_limit: 4 * 1024 * 1024,
        instruction_budget: 100_000,
        hook_timeout: Duration::from_secs(10),
    }
}

pub(super) const NO_HEADERS: &[(&str, &[u8])] = &[];

pub(super) fn req<'a>(query: &'a str, headers: &'a [(&'a str, &'a [u8])]) -> KeyRequest<'a> {
    KeyRequest {
        method: "GET",
        path: "/home",
        query,
        headers,
        client_ip: "10.0.0.7",
    }
}

pub(super) fn probe(status: Option<u16>, latency_ms: f64) -> ProbeView<'static> {
    ProbeView {
        status,
        latency_ms,
        error: None,
    }
}

pub(super) fn failed<T: fmt::Debug>(o: HookOutcome<T>) -> HookError {
    match o {
        HookOutcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}
