//! Test integrity (issue 23, item 12): a test that needs a Docker engine, a swarm or Chromium
//! skips loudly where that is missing, and fails with the reason under
//! `RINGGATE_REQUIRE_ENGINES=1`, which `.ci/run` exports (CI always has them, so a broken set-up
//! must not pass).
//!
//! Owns: checking that decision, on its own and through the real helpers: this test runs its
//! own binary again as a child, with the engine made absent (`DOCKER_HOST` at a socket that does
//! not exist, `RINGGATE_CHROMIUM` at a file that does not exist), once without the variable
//! and once with it. Nothing here reaches a real engine, so it passes the same where one runs.
//! Must not touch: the Docker, Swarm and browser tests themselves.

// docker.rs and chromium.rs each bring `engines.rs` along (a test binary includes the support
// modules it needs, and most need one of the two); this one needs both, so it holds two
// copies, which is harmless.
#![allow(clippy::duplicate_mod)]

#[macro_use]
#[path = "support/docker.rs"]
mod docker_support;
#[macro_use]
#[path = "support/swarm.rs"]
mod swarm_support;
#[path = "support/chromium.rs"]
mod chromium;
mod support;

use std::process::Command;

use docker_support::engines::{decide, required_by, Missing, REQUIRE_ENGINES};

/// Set in the child's environment: the engine was made absent on purpose.
const CHILD: &str = "RINGGATE_ENGINES_CHILD";

#[test]
fn the_decision_is_a_loud_skip_or_a_failure_naming_the_reason() {
    assert_eq!(
        decide("t", "no Docker engine", "cannot connect", false),
        Missing::Skip("t: skipped: no Docker engine (cannot connect)".into())
    );
    let Missing::Fail(message) = decide("t", "no Chromium", "not on PATH", true) else {
        panic!("required engines fail the test");
    };
    assert!(
        message.starts_with("t: no Chromium (not on PATH)") && message.contains(REQUIRE_ENGINES),
        "{message}"
    );
    assert!(required_by(Some("1".as_ref())) && required_by(Some("yes".as_ref())));
    for off in [None, Some(""), Some("0")] {
        assert!(!required_by(off.map(AsRef::as_ref)), "{off:?}");
    }
}

/// What the child run of `test` printed, and whether it passed. `absent` are the variables that
/// make the engine absent; `require` sets `RINGGATE_REQUIRE_ENGINES=1`, else it is removed.
fn child(test: &str, absent: &[(&str, &str)], require: bool) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    command
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        // A context would override DOCKER_HOST.
        .env_remove("DOCKER_CONTEXT")
        .envs(absent.iter().copied());
    if require {
        command.env(REQUIRE_ENGINES, "1");
    } else {
        command.env_remove(REQUIRE_ENGINES);
    }
    let out = command.output().expect("run the test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `test` as a child with the engine `absent`: without the variable it passes and prints
/// the skip with `what`; with it, it fails naming `what` and the variable.
fn skips_loudly_or_fails(test: &str, what: &str, absent: &[(&str, &str)]) {
    let (passed, text) = child(test, absent, false);
    assert!(passed, "without {REQUIRE_ENGINES} the test skips:\n{text}");
    assert!(
        text.contains(&format!("{test}: skipped: {what} (")),
        "the skip is said:\n{text}"
    );
    let (passed, text) = child(test, absent, true);
    assert!(!passed, "with {REQUIRE_ENGINES}=1 the test fails:\n{text}");
    assert!(
        text.contains(&format!("{test}: {what} (")) && text.contains(REQUIRE_ENGINES),
        "the failure says why:\n{text}"
    );
    assert!(!text.contains("skipped:"), "{text}");
}

#[test]
fn a_missing_docker_engine_or_swarm_skips_loudly_or_fails_under_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = format!(
        "unix://{}",
        dir.path().join("no-such-docker.sock").display()
    );
    let absent = [("DOCKER_HOST", host.as_str())];
    skips_loudly_or_fails("child_needs_docker", "no Docker engine", &absent);
    // A swarm test asks for the engine first.
    skips_loudly_or_fails("child_needs_a_swarm", "no Docker engine", &absent);
}

#[test]
fn missing_chromium_skips_loudly_or_fails_under_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chromium = dir.path().join("no-such-chromium");
    let chromium = chromium.to_str().expect("a UTF-8 temp path");
    let (_, text) = child(
        "child_needs_chromium",
        &[("RINGGATE_CHROMIUM", chromium)],
        true,
    );
    assert!(
        text.contains("bench/deps.sh chromium"),
        "the command to run: {text}"
    );
    skips_loudly_or_fails(
        "child_needs_chromium",
        "no Chromium",
        &[("RINGGATE_CHROMIUM", chromium)],
    );
}

// The children: ignored in a normal run; run by the tests above with the engine made absent.

/// Fails if an engine answered while the parent made it absent (run by hand, it just passes).
fn assert_not_a_child() {
    assert!(
        std::env::var_os(CHILD).is_none(),
        "the engine was made absent, yet it answered"
    );
}

#[test]
#[ignore = "a child of a_missing_docker_engine_or_swarm_skips_loudly_or_fails_under_the_flag"]
fn child_needs_docker() {
    require_docker!();
    assert_not_a_child();
}

#[test]
#[ignore = "a child of a_missing_docker_engine_or_swarm_skips_loudly_or_fails_under_the_flag"]
fn child_needs_a_swarm() {
    let _swarm = require_swarm!();
    assert_not_a_child();
}

#[test]
#[ignore = "a child of missing_chromium_skips_loudly_or_fails_under_the_flag"]
fn child_needs_chromium() {
    let Some(_) = chromium::require() else {
        return;
    };
    assert_not_a_child();
}
