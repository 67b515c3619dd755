//! What a replica container is: the engine's create request for one replica.
//!
//! Owns: the replica spec turned into a container (image, entrypoint and command, environment
//! with `SERVER_ID` and `PORT`, working directory, user, mounts read-only unless `:rw`,
//! labels ours and the user's, network), and the limits and hardening every replica runs with:
//! memory (swap included), pids and CPU limits from `[provider]`, a size-capped json-file log,
//! all capabilities dropped, `no-new-privileges`, a read-only root file system unless
//! `read_only_root = false`, and no restart policy (the controller replaces dead replicas
//! itself). Pure: it builds the request and calls nothing.
//! Must not touch: the engine (the containers module sends the request).

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody as ContainerConfig, EndpointSettings, HostConfig, HostConfigLogConfig,
    Mount as EngineMount, MountTypeEnum, NetworkingConfig,
};

use crate::config::replica::Vars;
use crate::config::MountSource;
use crate::provider::app::{AppSpec, Limits};

/// The replica-specific part of a create request.
pub(super) struct Replica<'a> {
    pub(super) app: &'a AppSpec,
    pub(super) network: &'a str,
    pub(super) port: u16,
    pub(super) hostname: &'a str,
    pub(super) id: u32,
    /// Ours (`ringgate.*`); the user's from the spec are added under them.
    pub(super) labels: HashMap<String, String>,
}

/// The spec's mounts as the engine's: a bind mount of a host path or a named volume,
/// read-only unless `:rw`. (The engine refuses a bind source that does not exist, naming it,
/// rather than creating an empty directory as the older `Binds` form would.)
pub(crate) fn mounts(app: &AppSpec) -> Vec<EngineMount> {
    app.mounts
        .iter()
        .map(|m| {
            let (typ, source) = match &m.source {
                MountSource::Bind(p) => (MountTypeEnum::BIND, p.to_string_lossy().into_owned()),
                MountSource::Volume(v) => (MountTypeEnum::VOLUME, v.clone()),
            };
            EngineMount {
                target: Some(m.target.clone()),
                source: Some(source),
                typ: Some(typ),
                read_only: Some(!m.writable),
                ..Default::default()
            }
        })
        .collect()
}

/// `KEY=value` lines: the spec's environment, then `SERVER_ID` and `PORT` (which the
/// validator keeps out of the spec's).
pub(crate) fn environment(app: &AppSpec, vars: Vars<'_>) -> Vec<String> {
    app.env(vars)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain([
            format!("SERVER_ID={}", vars.hostname),
            format!("PORT={}", vars.port),
        ])
        .collect()
}

/// Our labels over the user's: a user label can never pass for one of ours.
pub(crate) fn labels(app: &AppSpec, ours: HashMap<String, String>) -> HashMap<String, String> {
    let mut all: HashMap<String, String> = app
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all.extend(ours);
    all
}

/// The create request for one replica container.
pub(super) fn container_config(replica: Replica<'_>) -> ContainerConfig {
    let port = replica.port;
    let app = replica.app;
    let vars = Vars {
        port,
        hostname: replica.hostname,
        id: replica.id,
    };
    ContainerConfig {
        image: Some(app.image.clone()),
        entrypoint: app.entrypoint(vars),
        cmd: app.cmd(vars),
        env: Some(environment(app, vars)),
        working_dir: app
            .workdir
            .as_ref()
            .map(|w| w.to_string_lossy().into_owned()),
        user: app.user.clone(),
        labels: Some(labels(app, replica.labels)),
        exposed_ports: Some(HashMap::from([(format!("{port}/tcp"), HashMap::new())])),
        host_config: Some(host_config(replica.network, app)),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                replica.network.to_owned(),
                EndpointSettings::default(),
            )])),
        }),
        ..Default::default()
    }
}

fn host_config(network: &str, app: &AppSpec) -> HostConfig {
    let limits: &Limits = &app.limits;
    let positive = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    let memory = positive(limits.memory_bytes);
    let mounts = mounts(app);
    HostConfig {
        network_mode: Some(network.to_owned()),
        // No restart policy: the controller replaces dead replicas itself.
        memory,
        // Equal to the memory limit: no swap on top of it.
        memory_swap: memory,
        pids_limit: positive(u64::from(limits.pids)),
        nano_cpus: (limits.cpus > 0.0).then(|| (limits.cpus * 1e9).round() as i64),
        log_config: (limits.log_max_size > 0).then(|| HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), limits.log_max_size.to_string()),
                ("max-file".to_owned(), limits.log_max_files.to_string()),
            ])),
        }),
        mounts: (!mounts.is_empty()).then_some(mounts),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(app.read_only_root),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProviderConfig;

    fn app(c: &ProviderConfig) -> AppSpec {
        AppSpec::from_config(c)
    }

    fn replica(app: &AppSpec) -> Replica<'_> {
        Replica {
            app,
            network: "net1",
            port: 5000,
            hostname: "server-1",
            id: 1,
            labels: HashMap::from([("ringgate.managed".to_owned(), "true".to_owned())]),
        }
    }

    #[test]
    fn defaults_limit_and_harden_every_replica() {
        let a = app(&ProviderConfig::default());
        let c = container_config(replica(&a));
        assert_eq!(
            c.env,
            Some(vec!["SERVER_ID=server-1".into(), "PORT=5000".into()])
        );
        assert_eq!(
            (c.entrypoint, c.cmd, c.user),
            (None, None, None),
            "the image's own"
        );
        let h = c.host_config.expect("host config");
        assert_eq!(h.memory, Some(128 << 20));
        assert_eq!(h.memory_swap, Some(128 << 20), "no swap beyond the limit");
        assert_eq!(h.pids_limit, Some(64));
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.restart_policy, None);
        assert_eq!(h.mounts, None);
        let log = h.log_config.expect("a log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let opts = log.config.expect("log options");
        assert_eq!(opts["max-size"], (10u64 << 20).to_string());
        assert_eq!(opts["max-file"], "3");
    }

    #[test]
    fn zero_turns_a_limit_off_but_never_the_hardening() {
        let mut p = ProviderConfig {
            memory_limit: 0,
            pids_limit: 0,
            cpus: 0.0,
            log_max_size: 0,
            ..ProviderConfig::default()
        };
        let a = app(&p);
        let h = container_config(replica(&a))
            .host_config
            .expect("host config");
        assert_eq!((h.memory, h.memory_swap, h.pids_limit), (None, None, None));
        assert_eq!(h.nano_cpus, None);
        assert!(h.log_config.is_none(), "the engine's logging defaults");
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        p.cpus = 0.5;
        let a = app(&p);
        let h = container_config(replica(&a))
            .host_config
            .expect("host config");
        assert_eq!(h.nano_cpus, Some(500_000_000));
    }

    #[test]
    fn the_users_spec_reaches_the_container_and_ours_stays_on_top() {
        let c = crate::config::Config::parse(
            "[provider]\nkind = \"docker\"\nimage = \"httpd:1\"\ncommand = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"{port}\"]\nargs = [\"-h\", \"/www\"]\nenv = { GREETING = \"hello {hostname} #{id}\" }\nmounts = [\"/srv/site:/www\", \"cache:/cache:rw\"]\nlabels = { team = \"web\" }\nuser = \"65534:65534\"\nworkdir = \"/www\"\nread_only_root = false\n",
            std::path::Path::new("/etc/lb.toml"),
        )
        .expect("valid");
        let a = app(&c.provider);
        let mut r = replica(&a);
        r.labels.insert("ringgate.instance".into(), "x".into());
        let c = container_config(r);
        assert_eq!(c.image.as_deref(), Some("httpd:1"));
        assert_eq!(
            c.entrypoint,
            Some(vec![
                "/bin/busybox".into(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "5000".into()
            ])
        );
        assert_eq!(c.cmd, Some(vec!["-h".into(), "/www".into()]));
        assert_eq!(
            c.env,
            Some(vec![
                "GREETING=hello server-1 #1".into(),
                "SERVER_ID=server-1".into(),
                "PORT=5000".into()
            ])
        );
        assert_eq!(c.user.as_deref(), Some("65534:65534"));
        assert_eq!(c.working_dir.as_deref(), Some("/www"));
        let labels = c.labels.expect("labels");
        assert_eq!(labels["team"], "web");
        assert_eq!(labels["ringgate.managed"], "true");
        let h = c.host_config.expect("host config");
        assert_eq!(h.readonly_rootfs, Some(false));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]), "still dropped");
        let m = h.mounts.expect("mounts");
        assert_eq!(m[0].typ, Some(MountTypeEnum::BIND));
        assert_eq!(
            (
                m[0].source.as_deref(),
                m[0].target.as_deref(),
                m[0].read_only
            ),
            (Some("/srv/site"), Some("/www"), Some(true)),
            "read-only by default"
        );
        assert_eq!(m[1].typ, Some(MountTypeEnum::VOLUME));
        assert_eq!(
            (m[1].source.as_deref(), m[1].read_only),
            (Some("cache"), Some(false))
        );
    }
}
