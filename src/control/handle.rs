//! How the rest of the gateway talks to the controller: [`ControllerHandle`] and the messages.
//!
//! Owns: the message types ([`Command`]) and the request/reply plumbing (mpsc to the controller,
//! a oneshot back). Must not touch: state. Every method here only sends a message.

use tokio::sync::{mpsc, oneshot};

use super::membership::ScaleRequest;
use crate::config::Config;
use crate::error::GatewayError;
use crate::policy::PolicySet;
use crate::ring::ServerId;

pub(super) type Reply<T> = oneshot::Sender<Result<T, GatewayError>>;

/// Requests to the controller.
#[derive(Debug)]
pub enum Command {
    Add {
        request: ScaleRequest,
        reply: Reply<Vec<String>>,
    },
    Remove {
        request: ScaleRequest,
        reply: Reply<Vec<String>>,
    },
    Status {
        reply: oneshot::Sender<serde_json::Value>,
    },
    Metrics {
        reply: oneshot::Sender<super::MetricsSources>,
    },
    /// A copy of what a what-if simulation starts from (`POST /lb/simulate`).
    WhatIfBase {
        reply: oneshot::Sender<crate::whatif::Base>,
    },
    /// A connect to this replica failed on the request path.
    PassiveFailure {
        id: ServerId,
        incarnation: u64,
        detail: String,
    },
    /// A replica answered `consecutive` 5xx in a row (`health.eject_after_5xx`).
    Outlier {
        id: ServerId,
        incarnation: u64,
        consecutive: u64,
    },
    /// Answered once every member is up or has failed to start (or immediately if they are).
    WaitReady {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// A new, valid config from the watcher.
    Reload {
        config: Box<Config>,
    },
    /// A new, loaded policy set from the watcher.
    PolicyLoaded {
        policy: Box<PolicySet>,
    },
    /// An edit that was rejected (invalid config, a policy that fails to load): nothing changes.
    ReloadFailed {
        what: ReloadKind,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    Config,
    Policy,
}

/// The cheap, cloneable way to talk to the controller.
#[derive(Clone, Debug)]
pub struct ControllerHandle {
    pub(super) tx: mpsc::Sender<Command>,
}

impl ControllerHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| GatewayError::ShuttingDown)?;
        rx.await.map_err(|_| GatewayError::ShuttingDown)
    }

    pub async fn add(&self, request: ScaleRequest) -> Result<Vec<String>, GatewayError> {
        self.ask(|reply| Command::Add { request, reply }).await?
    }

    pub async fn remove(&self, request: ScaleRequest) -> Result<Vec<String>, GatewayError> {
        self.ask(|reply| Command::Remove { request, reply }).await?
    }

    pub async fn status(&self) -> Result<serde_json::Value, GatewayError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// What `/lb/metrics` shows, read now (render it with [`crate::exposition::render`]).
    pub async fn metrics(&self) -> Result<super::MetricsSources, GatewayError> {
        self.ask(|reply| Command::Metrics { reply }).await
    }

    pub async fn whatif_base(&self) -> Result<crate::whatif::Base, GatewayError> {
        self.ask(|reply| Command::WhatIfBase { reply }).await
    }

    pub async fn wait_ready(&self) -> Result<(), GatewayError> {
        self.ask(|reply| Command::WaitReady { reply }).await
    }

    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Command::Shutdown { reply }).await;
    }

    /// Sends a reload message (from the watcher); returns false once the controller is gone.
    pub async fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Never waits: a full queue drops the hint (the next 5xx repeats it past the threshold only
    /// through the failure percentage; the count crosses the threshold once).
    pub fn outlier(&self, id: ServerId, incarnation: u64, consecutive: u64) {
        let _ = self.tx.try_send(Command::Outlier {
            id,
            incarnation,
            consecutive,
        });
    }

    /// Never waits: a full queue drops the hint (the next failure or check repeats it).
    pub fn passive_failure(&self, id: ServerId, incarnation: u64, detail: String) {
        let _ = self.tx.try_send(Command::PassiveFailure {
            id,
            incarnation,
            detail,
        });
    }
}
