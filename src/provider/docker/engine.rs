//! The Docker engine connection: finding and reaching the engine, negotiating its API version,
//! and reading its errors.
//!
//! Owns: [`connect_engine`], [`image_exists`] (for `ringgate check`) and the error helpers the
//! other docker modules share.
//! Must not touch: containers, networks or events.

use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::Docker;

use crate::provider::ProviderError;

/// Budget of one engine call (create, start, inspect…).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where bollard will look for the engine, for error messages.
fn engine_address() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

pub(crate) fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(crate) fn message_of(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Connects and checks that the engine answers within `timeout`.
pub(crate) async fn connect_engine(timeout: Duration) -> Result<(Docker, String), ProviderError> {
    let addr = engine_address();
    let no_engine = |why: String| {
        ProviderError::Setup(format!(
            "no Docker engine answers at {addr}: {why}; start Docker (or set DOCKER_HOST), \
             or use provider.kind = \"process\""
        ))
    };
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| no_engine(e.to_string()))?
        .with_timeout(REQUEST_TIMEOUT);
    let negotiated = tokio::time::timeout(timeout, async {
        let docker = docker.negotiate_version().await?;
        let version = docker.version().await?;
        Ok::<_, DockerError>((docker, version))
    })
    .await;
    match negotiated {
        Err(_) => Err(no_engine(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => {
            let text = e.to_string();
            if text.contains("ermission denied") {
                Err(no_engine(format!(
                    "{text} (add your user to the `docker` group, or run with access to the socket)"
                )))
            } else {
                Err(no_engine(text))
            }
        }
        Ok(Ok((docker, v))) => {
            let version = format!(
                "{} (API {})",
                v.version.as_deref().unwrap_or("?"),
                v.api_version.as_deref().unwrap_or("?")
            );
            Ok((docker, version))
        }
    }
}

/// Whether `image` exists on the local engine (`ringgate check`); `Err` when no engine answers
/// within `timeout`.
pub(crate) async fn image_exists(image: &str, timeout: Duration) -> Result<bool, String> {
    let (docker, _) = connect_engine(timeout).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, docker.inspect_image(image)).await {
        Err(_) => Err(format!("the engine did not answer within {timeout:?}")),
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) if status_of(&e) == Some(404) => Ok(false),
        Ok(Err(e)) => Err(message_of(&e)),
    }
}
