//! Reading the policy directory: which files are policies, in which order, as text.
//!
//! Owns: the rule "every `*.lua` directly in the directory, by file name, hidden files
//! skipped, symlinks followed, subdirectories ignored, regular files of at most
//! `MAX_POLICY_FILE` bytes (anything else is an error), UTF-8 text only".
//! Must not touch: Lua. This is the only I/O of the policy module.

use std::path::Path;

use super::PolicyError;
use crate::config::source_file::read_source_file;

/// Largest policy file read: a policy is code plus perhaps a table; four times this is the
/// default memory cap of a whole policy set (`policy.memory_limit`).
const MAX_POLICY_FILE: u64 = 4 << 20;

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
        // Follows symlinks (ConfigMap-style mounts); subdirectories are skipped. Anything else
        // that is not a regular file (a FIFO, a socket, a device) fails the read below: skipped,
        // it would silently load the set without that file's hooks.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => paths.push((name, path)),
            Err(source) => return Err(PolicyError::ReadFile { path, source }),
        }
    }
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut files = Vec::with_capacity(paths.len());
    for (name, path) in paths {
        // Opened without blocking and capped: a FIFO named `*.lua` must not stall the reader.
        let bytes =
            read_source_file(&path, MAX_POLICY_FILE).map_err(|e| PolicyError::ReadFile {
                path: path.clone(),
                source: e.into_io(),
            })?;
        let source =
            String::from_utf8(bytes).map_err(|_| PolicyError::NotText { file: name.clone() })?;
        files.push((name, source));
    }
    Ok(files)
}
