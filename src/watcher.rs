//! Live reload: watches the config file and the policy directory and hands validated changes to
//! the controller.
//!
//! Owns: noticing edits (notify events, debounced; plus a once-a-second content check so editors
//! that save by rename, bind mounts and file systems without inotify are covered too), reading
//! and validating the new config, and loading the new policy set. Only this module imports
//! notify.
//! Must not touch: running state. It sends `Reload`, `PolicyLoaded` or `ReloadFailed` to the
//! controller, which applies or records them; an invalid edit therefore changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::control::{Command, ControllerHandle, ReloadKind};
use crate::policy::{read_policy_files, PolicyFiles, PolicyLimits, PolicySet};

/// Quiet time after an event before reading, so a multi-step save is read once, whole.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The safety-net content check.
const POLL: Duration = Duration::from_secs(1);

struct State {
    config_path: Option<PathBuf>,
    policy_dir: PathBuf,
    limits: PolicyLimits,
    loaded_limits: PolicyLimits,
    last_config_text: Option<String>,
    last_files: Option<PolicyFiles>,
    last_read_error: Option<String>,
    generation: u64,
}

/// Starts watching. `initial_files` are the policy files the gateway started with (so they are
/// not loaded twice); `config_text` the config text it started with.
pub fn spawn(
    config_path: Option<PathBuf>,
    config_text: Option<String>,
    config: &Config,
    initial_files: Option<PolicyFiles>,
    controller: ControllerHandle,
) -> tokio::task::JoinHandle<()> {
    let state = State {
        config_path,
        policy_dir: config.policy.dir.clone(),
        limits: config.policy.limits(),
        loaded_limits: config.policy.limits(),
        last_config_text: config_text,
        last_files: initial_files,
        last_read_error: None,
        generation: 1,
    };
    tokio::spawn(run(state, controller))
}

async fn run(mut state: State, controller: ControllerHandle) {
    let (tx, mut events) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file notifications unavailable; checking for edits every second");
            None
        }
    };
    let mut watching_policy_dir = false;
    if let (Some(w), Some(path)) = (watcher.as_mut(), state.config_path.as_ref()) {
        // The directory, not the file: editors that save by writing a new file and renaming it
        // over the old one replace the inode a file watch would be attached to.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory");
        }
    }
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !watching_policy_dir {
            if let Some(w) = watcher.as_mut() {
                watching_policy_dir = w
                    .watch(&state.policy_dir, RecursiveMode::NonRecursive)
                    .is_ok();
            }
        }
        tokio::select! {
            ev = events.recv() => {
                if ev.is_none() {
                    watcher = None;
                    watching_policy_dir = true;
                    continue;
                }
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
            }
            _ = poll.tick() => {}
        }
        if !state.check(&controller).await {
            return;
        }
    }
}

impl State {
    /// Reads both sources and reports what changed. Returns false once the controller is gone.
    async fn check(&mut self, controller: &ControllerHandle) -> bool {
        if let Some(path) = self.config_path.clone() {
            match tokio::fs::read_to_string(&path).await {
                Ok(text) => {
                    self.last_read_error = None;
                    if self.last_config_text.as_ref() != Some(&text) {
                        let cmd = match Config::parse(&text, &path) {
                            Ok(config) => {
                                self.limits = config.policy.limits();
                                Command::Reload {
                                    config: Box::new(config),
                                }
                            }
                            Err(e) => Command::ReloadFailed {
                                what: ReloadKind::Config,
                                error: e.to_string(),
                            },
                        };
                        self.last_config_text = Some(text);
                        if !controller.send(cmd).await {
                            return false;
                        }
                    }
                }
                Err(e) => {
                    let error = format!("cannot read {}: {e}", path.display());
                    if self.last_read_error.as_ref() != Some(&error) {
                        self.last_read_error = Some(error.clone());
                        let cmd = Command::ReloadFailed {
                            what: ReloadKind::Config,
                            error,
                        };
                        if !controller.send(cmd).await {
                            return false;
                        }
                    }
                }
            }
        }

        let dir = self.policy_dir.clone();
        let files = match tokio::task::spawn_blocking(move || read_policy_files(&dir)).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                let cmd = Command::ReloadFailed {
                    what: ReloadKind::Policy,
                    error: e.to_string(),
                };
                return controller.send(cmd).await;
            }
            Err(_) => return true,
        };
        let limits_changed = self.limits.memory_limit != self.loaded_limits.memory_limit
            || self.limits.instruction_budget != self.loaded_limits.instruction_budget;
        if self.last_files.as_ref() == Some(&files) && !limits_changed {
            return true;
        }
        self.last_files = Some(files.clone());
        self.loaded_limits = self.limits;
        self.generation += 1;
        let (limits, generation) = (self.limits, self.generation);
        let loaded =
            tokio::task::spawn_blocking(move || PolicySet::from_sources(files, limits, generation))
                .await;
        let cmd = match loaded {
            Ok(Ok(set)) => Command::PolicyLoaded {
                policy: Box::new(set),
            },
            Ok(Err(e)) => Command::ReloadFailed {
                what: ReloadKind::Policy,
                error: e.to_string(),
            },
            Err(e) => Command::ReloadFailed {
                what: ReloadKind::Policy,
                error: format!("loading the policy panicked: {e}"),
            },
        };
        controller.send(cmd).await
    }
}
