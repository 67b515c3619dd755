//! The replica spec: what one replica runs, the same for every provider that starts replicas.
//!
//! Owns: [`AppSpec`], read from `[provider]` (the program, its arguments and environment with
//! the placeholders filled per replica, the working directory, the port mode, the image,
//! mounts, labels, user, read-only root and limits), the keys whose edit rolls the replicas
//! ([`AppSpec::changed_keys`]), and its fingerprint, recorded with a container so that a
//! restarted gateway knows whether an adopted replica runs the spec it has now.
//! Must not touch: processes or engines (the providers start what this describes): pure.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::replica::{expand, Vars};
use crate::config::{Mount, PortMode, ProviderConfig};

/// The `[provider]` limits of one replica container; 0 turns one off.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    pub cpus: f64,
    pub log_max_size: u64,
    pub log_max_files: u32,
}

impl Limits {
    pub fn from_config(c: &ProviderConfig) -> Limits {
        Limits {
            memory_bytes: c.memory_limit,
            pids: c.pids_limit,
            cpus: c.cpus,
            log_max_size: c.log_max_size,
            log_max_files: c.log_max_files,
        }
    }
}

/// What a replica runs. Two replicas started from equal specs run the same thing; an edit
/// that changes the spec rolls the replicas.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppSpec {
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub port: PortMode,
    /// Process replicas without a `command`: the `ringgate-server` to run (unset: the one
    /// beside the gateway's binary).
    pub server_binary: Option<PathBuf>,
    pub image: String,
    pub mounts: Vec<Mount>,
    pub labels: BTreeMap<String, String>,
    pub user: Option<String>,
    pub read_only_root: bool,
    pub limits: Limits,
}

impl AppSpec {
    pub fn from_config(c: &ProviderConfig) -> AppSpec {
        AppSpec {
            command: c.command.clone(),
            args: c.args.clone(),
            env: c.env.clone(),
            workdir: c.workdir.clone(),
            port: c.port,
            server_binary: c.server_binary.clone(),
            image: c.image.clone(),
            mounts: c.mounts.clone(),
            labels: c.labels.clone(),
            user: c.user.clone(),
            read_only_root: c.read_only_root,
            limits: Limits::from_config(c),
        }
    }

    /// The `[provider]` keys in which `other` differs from this spec, for the log and
    /// `/lb/status` ("rolling for provider.env, provider.image").
    pub fn changed_keys(&self, other: &AppSpec) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut differs = |key: &'static str, changed: bool| {
            if changed {
                out.push(key);
            }
        };
        differs("provider.image", self.image != other.image);
        differs("provider.command", self.command != other.command);
        differs("provider.args", self.args != other.args);
        differs("provider.env", self.env != other.env);
        differs("provider.workdir", self.workdir != other.workdir);
        differs("provider.port", self.port != other.port);
        differs(
            "provider.server_binary",
            self.server_binary != other.server_binary,
        );
        differs("provider.mounts", self.mounts != other.mounts);
        differs("provider.labels", self.labels != other.labels);
        differs("provider.user", self.user != other.user);
        differs(
            "provider.read_only_root",
            self.read_only_root != other.read_only_root,
        );
        differs("provider limits", self.limits != other.limits);
        out
    }

    /// A short stable digest of the spec (FNV-1a over its JSON form), recorded as a container
    /// label: the same spec gives the same digest in every run and on every gateway.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{:016x}", crate::hashing::fnv1a64(&json))
    }

    /// Whether this runs the built-in `ringgate-server` (no `command`): processes then keep
    /// its own conventions (`BIND`, exit on stdin EOF, the `listening on` line).
    pub fn is_builtin_server(&self) -> bool {
        self.command.is_empty()
    }

    /// How a process replica's port is decided, `auto` resolved.
    pub fn process_port(&self) -> PortMode {
        match self.port {
            PortMode::Auto if self.is_builtin_server() => PortMode::Announce,
            PortMode::Auto => PortMode::Pick,
            other => other,
        }
    }

    /// A process replica's arguments after its program: `command[1..]` then `args`, filled in.
    pub fn process_args(&self, vars: Vars<'_>) -> Vec<String> {
        self.command
            .iter()
            .skip(1)
            .chain(&self.args)
            .map(|a| expand(a, vars))
            .collect()
    }

    /// A container's entrypoint: `command`, filled in; `None` keeps the image's.
    pub fn entrypoint(&self, vars: Vars<'_>) -> Option<Vec<String>> {
        (!self.command.is_empty()).then(|| self.command.iter().map(|a| expand(a, vars)).collect())
    }

    /// A container's command (the image's CMD): `args`, filled in; `None` keeps the image's
    /// (the engine drops it anyway when the entrypoint is replaced).
    pub fn cmd(&self, vars: Vars<'_>) -> Option<Vec<String>> {
        (!self.args.is_empty()).then(|| self.args.iter().map(|a| expand(a, vars)).collect())
    }

    /// The environment of the user's own: `env`, filled in, in name order.
    pub fn env(&self, vars: Vars<'_>) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(k, v)| (k.clone(), expand(v, vars)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml: &str) -> AppSpec {
        let c = crate::config::Config::parse(toml, std::path::Path::new("lb.toml"))
            .expect("valid config");
        AppSpec::from_config(&c.provider)
    }

    fn vars() -> Vars<'static> {
        Vars {
            port: 8001,
            hostname: "S5",
            id: 4,
        }
    }

    #[test]
    fn a_process_gets_its_arguments_and_environment_filled_in() {
        let s = spec("[provider]\ncommand = [\"python3\", \"app.py\", \"--port\", \"{port}\"]\nargs = [\"--name={hostname}\"]\nenv = { URL = \"http://{hostname}:{port}/{id}\", B = \"plain\" }\n");
        assert_eq!(
            s.process_args(vars()),
            ["app.py", "--port", "8001", "--name=S5"]
        );
        assert_eq!(
            s.env(vars()),
            [
                ("B".to_owned(), "plain".to_owned()),
                ("URL".to_owned(), "http://S5:8001/4".to_owned())
            ]
        );
        assert_eq!(s.process_port(), PortMode::Pick, "a command gets a port");
        assert!(!s.is_builtin_server());
        let builtin = spec("[provider]\nkind = \"process\"\n");
        assert_eq!(builtin.process_port(), PortMode::Announce);
        assert!(builtin.process_args(vars()).is_empty());
        let announced = spec("[provider]\ncommand = [\"app\"]\nport = \"announce\"\n");
        assert_eq!(announced.process_port(), PortMode::Announce);
    }

    #[test]
    fn a_container_keeps_the_images_entrypoint_and_cmd_unless_told() {
        let s = spec("[provider]\nkind = \"docker\"\n");
        assert_eq!((s.entrypoint(vars()), s.cmd(vars())), (None, None));
        let s = spec("[provider]\nkind = \"docker\"\nargs = [\"-p\", \"{port}\"]\n");
        assert_eq!(s.entrypoint(vars()), None);
        assert_eq!(s.cmd(vars()), Some(vec!["-p".into(), "8001".into()]));
        let s = spec(
            "[provider]\nkind = \"docker\"\ncommand = [\"/bin/busybox\", \"httpd\", \"-f\"]\n",
        );
        assert_eq!(
            s.entrypoint(vars()),
            Some(vec!["/bin/busybox".into(), "httpd".into(), "-f".into()])
        );
    }

    #[test]
    fn the_fingerprint_and_the_changed_keys_follow_the_spec() {
        let a = spec("[provider]\nenv = { A = \"1\" }\n");
        let b = spec("[provider]\nenv = { A = \"2\" }\nimage = \"app:2\"\n");
        assert_eq!(a.fingerprint(), a.clone().fingerprint(), "stable");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 16);
        assert_eq!(a.changed_keys(&b), ["provider.image", "provider.env"]);
        assert!(a.changed_keys(&a).is_empty());
        let limits = spec("[provider]\nenv = { A = \"1\" }\ncpus = 0.5\n");
        assert_eq!(a.changed_keys(&limits), ["provider limits"]);
    }
}
