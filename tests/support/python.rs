//! The Python interpreter of the third-party clients (Python `websockets`, `grpcio`) that the
//! tunnel and gRPC tests talk through.
//!
//! Owns: finding `target/pyclients/bin/python3`, the virtualenv `bench/deps.sh python` builds from
//! `tests/support/requirements.txt` (`make test` runs it first). Missing, a test skips loudly or,
//! under `RINGGATE_REQUIRE_ENGINES=1`, fails with how to get it.
//! Must not touch: installing anything (deps.sh does, outside the test run).
#![allow(dead_code)]

#[path = "engines.rs"]
mod engines;

use std::path::PathBuf;
use std::process::Command;

/// The virtualenv's interpreter, with the clients importable; `None` (after the skip line) when
/// it is missing.
pub fn require(modules: &[&str]) -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyclients/bin/python3");
    if !python.exists() {
        engines::missing(
            "no Python test clients",
            &format!(
                "{} is missing; run `bench/deps.sh python` (make test does)",
                python.display()
            ),
        );
        return None;
    }
    let imports = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ok = Command::new(&python)
        .args(["-c", &imports])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !ok {
        engines::missing(
            "Python test clients incomplete",
            &format!(
                "`{imports}` fails in {}; run `bench/deps.sh python`",
                python.display()
            ),
        );
        return None;
    }
    Some(python)
}
