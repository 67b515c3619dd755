//! What a replica container is: the engine's create request for one replica.
//!
//! Owns: image, environment, labels, network, and the limits and hardening every replica runs
//! with: memory (swap included), pids and CPU limits from `[provider]`, a size-capped json-file
//! log, all capabilities dropped, `no-new-privileges`, a read-only root file system, and no
//! restart policy (the controller replaces dead replicas itself). Pure: it builds the request
//! and calls nothing.
//! Must not touch: the engine (the containers module sends the request).

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody as ContainerConfig, EndpointSettings, HostConfig, HostConfigLogConfig,
    NetworkingConfig,
};

use crate::config::ProviderConfig;

/// The `[provider]` limits of one replica container; 0 turns one off.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: u64,
    pub(crate) pids: u32,
    pub(crate) cpus: f64,
    pub(crate) log_max_size: u64,
    pub(crate) log_max_files: u32,
}

impl Limits {
    pub(crate) fn from_config(c: &ProviderConfig) -> Limits {
        Limits {
            memory_bytes: c.memory_limit,
            pids: c.pids_limit,
            cpus: c.cpus,
            log_max_size: c.log_max_size,
            log_max_files: c.log_max_files,
        }
    }
}

/// The replica-specific part of a create request.
pub(super) struct Replica<'a> {
    pub(super) image: &'a str,
    pub(super) network: &'a str,
    pub(super) port: u16,
    pub(super) hostname: &'a str,
    pub(super) labels: HashMap<String, String>,
}

/// The create request for one replica container.
pub(super) fn container_config(replica: Replica<'_>, limits: &Limits) -> ContainerConfig {
    let port = replica.port;
    ContainerConfig {
        image: Some(replica.image.to_owned()),
        env: Some(vec![
            format!("SERVER_ID={}", replica.hostname),
            format!("PORT={port}"),
        ]),
        labels: Some(replica.labels),
        exposed_ports: Some(HashMap::from([(format!("{port}/tcp"), HashMap::new())])),
        host_config: Some(host_config(replica.network, limits)),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                replica.network.to_owned(),
                EndpointSettings::default(),
            )])),
        }),
        ..Default::default()
    }
}

fn host_config(network: &str, limits: &Limits) -> HostConfig {
    let positive = |n: u64| (n > 0).then(|| i64::try_from(n).unwrap_or(i64::MAX));
    let memory = positive(limits.memory_bytes);
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
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> Replica<'static> {
        Replica {
            image: "ringgate-server:latest",
            network: "net1",
            port: 5000,
            hostname: "server-1",
            labels: HashMap::from([("ringgate.managed".to_owned(), "true".to_owned())]),
        }
    }

    #[test]
    fn defaults_limit_and_harden_every_replica() {
        let limits = Limits::from_config(&ProviderConfig::default());
        let c = container_config(replica(), &limits);
        assert_eq!(
            c.env,
            Some(vec!["SERVER_ID=server-1".into(), "PORT=5000".into()])
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
        let log = h.log_config.expect("a log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let opts = log.config.expect("log options");
        assert_eq!(opts["max-size"], (10u64 << 20).to_string());
        assert_eq!(opts["max-file"], "3");
    }

    #[test]
    fn zero_turns_a_limit_off_but_never_the_hardening() {
        let limits = Limits {
            memory_bytes: 0,
            pids: 0,
            cpus: 0.0,
            log_max_size: 0,
            log_max_files: 3,
        };
        let h = container_config(replica(), &limits)
            .host_config
            .expect("host config");
        assert_eq!((h.memory, h.memory_swap, h.pids_limit), (None, None, None));
        assert_eq!(h.nano_cpus, None);
        assert!(h.log_config.is_none(), "the engine's logging defaults");
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        let half = Limits {
            cpus: 0.5,
            ..limits
        };
        let h = container_config(replica(), &half)
            .host_config
            .expect("host config");
        assert_eq!(h.nano_cpus, Some(500_000_000));
    }
}
