//! Without a Docker engine: `docker` fails fast with an error that says what to do, and `auto`
//! falls back to local processes. Runs everywhere (it points DOCKER_HOST at a socket that does
//! not exist), in its own test binary because it changes the environment.

use std::time::{Duration, Instant};

use ringgate::config::{Config, ProviderKind};
use ringgate::provider::docker::DockerProvider;
use tokio::sync::mpsc;

#[tokio::test]
async fn no_engine_fails_fast_for_docker_and_falls_back_to_process_for_auto() {
    // The only test in this binary, so no other thread reads the environment meanwhile.
    std::env::set_var(
        "DOCKER_HOST",
        "unix:///nonexistent/ringgate-test/docker.sock",
    );

    let mut config = Config::default();
    config.provider.kind = ProviderKind::Docker;
    config.provider.server_binary = Some(env!("CARGO_BIN_EXE_ringgate-server").into());

    let (tx, _rx) = mpsc::channel(8);
    let started = Instant::now();
    let err = match DockerProvider::connect(&config.provider, tx.clone()).await {
        Ok(_) => panic!("connected to a socket that does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("no Docker engine answers at unix:///nonexistent"),
        "{err}"
    );
    assert!(
        err.contains("provider.kind = \"process\""),
        "says what to do: {err}"
    );

    let err = match ringgate::provider::from_config(&config, tx.clone()).await {
        Ok(p) => panic!(
            "kind = docker without an engine gave a {} provider",
            p.kind()
        ),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no Docker engine answers"), "{err}");

    config.provider.kind = ProviderKind::Auto;
    let started = Instant::now();
    let p = ringgate::provider::from_config(&config, tx)
        .await
        .expect("auto falls back to processes");
    assert_eq!(p.kind(), "process");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "auto decided in {:?}",
        started.elapsed()
    );
}
