//! Whether a test that needs something outside this build (a Docker engine, a swarm, Chromium)
//! skips or fails when that thing is missing.
//!
//! Owns: the variable [`REQUIRE_ENGINES`] and the decision. Without it a test whose engine is
//! missing skips loudly: it prints `<test>: skipped: <what> (<reason>)` to stderr and returns,
//! so a plain `cargo test` on a laptop without Docker still passes. With
//! `RINGGATE_REQUIRE_ENGINES=1` (`.ci/run` exports it, since CI always has the engines) the test
//! fails with the same reason instead, so a broken engine set-up cannot pass in silence.
//! Must not touch: finding out whether an engine is there (`docker.rs`, `swarm.rs`,
//! `chromium.rs` do, and call [`missing`] with why not).
//!
//! Included with `#[path = "engines.rs"] mod engines;` by those modules.
#![allow(dead_code)]

use std::ffi::OsStr;

/// The variable that turns a missing engine from a skip into a failure.
pub const REQUIRE_ENGINES: &str = "RINGGATE_REQUIRE_ENGINES";

/// What a test does about a missing engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Skip, printing this line to stderr.
    Skip(String),
    /// Fail with this message.
    Fail(String),
}

/// Whether a value of [`REQUIRE_ENGINES`] asks for the engines: set, and neither empty nor `0`.
pub fn required_by(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// The decision for `test`, which needs `what` (e.g. "no Docker engine") that is missing for
/// `reason`.
pub fn decide(test: &str, what: &str, reason: &str, required: bool) -> Missing {
    if required {
        Missing::Fail(format!(
            "{test}: {what} ({reason}); {REQUIRE_ENGINES} is set, so this run needs it: \
             fix the set-up (or unset {REQUIRE_ENGINES} to skip such tests)"
        ))
    } else {
        Missing::Skip(format!("{test}: skipped: {what} ({reason})"))
    }
}

/// Acts on the decision for the running test: panics with the reason when [`REQUIRE_ENGINES`]
/// is set, else prints the skip. The caller returns from the test after it.
pub fn missing(what: &str, reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let required = required_by(std::env::var_os(REQUIRE_ENGINES).as_deref());
    match decide(test, what, reason, required) {
        Missing::Fail(message) => panic!("{message}"),
        Missing::Skip(line) => {
            // Straight to the stderr handle: libtest's capture only hides print!/eprint!, so the
            // skip shows in a plain `cargo test` run.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}
