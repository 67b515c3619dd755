//! What can be known about the replica spec before a replica starts: the program exists and
//! may be run, the working directory and the bind-mount sources exist, the image is on the
//! engine. `ringgate check` reports all of it with line numbers; `ringgate serve` refuses to
//! start process replicas whose program is missing (every start would fail).
//!
//! Owns: these checks, each a [`Problem`] naming its key, like the validator's.
//! Must not touch: anything it checks (it reads the file system and asks the engine, and
//! changes nothing), or the validator's pure rules (`config::validate`).

use std::time::Duration;

use crate::config::{Config, MountSource, Problem, ProviderKind};
use crate::provider::AppSpec;

fn problem(key: &str, message: String) -> Problem {
    Problem {
        key: key.to_owned(),
        line: None,
        message,
    }
}

/// Whether replicas are local processes with this config (for `auto`: when it names a
/// `command`, the only way `auto` would run one that can be checked here).
fn runs_processes(c: &Config) -> bool {
    match c.provider.kind {
        ProviderKind::Process => true,
        ProviderKind::Auto => !c.provider.command.is_empty(),
        _ => false,
    }
}

/// The checks of the local file system: the program and `workdir` of process replicas, the
/// bind-mount sources of docker replicas (the gateway's host is the engine's host: the docker
/// provider talks to the local engine). Swarm mounts live on the nodes and are not checked.
pub fn local_problems(c: &Config) -> Vec<Problem> {
    let p = &c.provider;
    let mut out = Vec::new();
    if runs_processes(c) {
        if let Some(dir) = &p.workdir {
            if !dir.is_dir() {
                out.push(problem(
                    "provider.workdir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        let app = AppSpec::from_config(p);
        let workdir_ok = p.workdir.as_ref().is_none_or(|d| d.is_dir());
        if workdir_ok {
            if let Err(e) = crate::provider::process::program(&app) {
                let key = if p.command.is_empty() {
                    "provider.server_binary"
                } else {
                    "provider.command"
                };
                out.push(problem(
                    key,
                    format!("cannot run the replicas' program: {e}"),
                ));
            }
        }
    }
    if matches!(p.kind, ProviderKind::Docker | ProviderKind::Auto) {
        for m in &p.mounts {
            if let MountSource::Bind(src) = &m.source {
                if !src.exists() {
                    out.push(problem(
                        "provider.mounts",
                        format!(
                            "{m}: {} does not exist on this host (create it, or fix the path; relative paths are taken from the config file's directory)",
                            src.display()
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// How long `ringgate check` waits for the engine.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(3);

/// The engine's side (docker and swarm): whether `provider.image` exists on it. `Err` says why
/// it could not be asked (no engine here): not a problem of the config.
pub async fn engine_problems(c: &Config) -> Result<Vec<Problem>, String> {
    if !matches!(c.provider.kind, ProviderKind::Docker | ProviderKind::Swarm) {
        return Ok(Vec::new());
    }
    let image = &c.provider.image;
    match crate::provider::docker::engine::image_exists(image, ENGINE_TIMEOUT).await {
        Ok(true) => Ok(Vec::new()),
        Ok(false) => Ok(vec![problem(
            "provider.image",
            format!(
                "the image {image} does not exist on the Docker engine (nothing is pulled: build it, `docker load` it, or name one that `docker image ls` shows)"
            ),
        )]),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(toml: &str) -> Config {
        Config::parse(toml, Path::new("lb.toml")).expect("valid")
    }

    #[test]
    fn a_missing_program_workdir_or_mount_is_named() {
        let c = config("[provider]\nkind = \"process\"\ncommand = [\"no-such-program-rg27\"]\n");
        let p = local_problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "provider.command");
        assert!(p[0].message.contains("no-such-program-rg27"), "{p:?}");
        let c = config(
            "[provider]\nkind = \"process\"\ncommand = [\"sh\"]\nworkdir = \"/no/such/dir-rg27\"\n",
        );
        let p = local_problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "provider.workdir");
        let c = config("[provider]\nkind = \"docker\"\nmounts = [\"/no/such/dir-rg27:/www\", \"vol:/v\", \"/tmp:/t\"]\n");
        let p = local_problems(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message.contains("/no/such/dir-rg27 does not exist"),
            "{p:?}"
        );
        let c = config("[provider]\nkind = \"process\"\ncommand = [\"sh\", \"-c\", \"true\"]\n");
        assert!(local_problems(&c).is_empty());
        let c = config("[provider]\nkind = \"swarm\"\nmounts = [\"/no/such/dir-rg27:/www\"]\n");
        assert!(
            local_problems(&c).is_empty(),
            "swarm mounts live on the nodes"
        );
    }
}
