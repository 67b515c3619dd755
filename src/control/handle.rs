//! How the rest of the gateway talks to the controller: [`ControllerHandle`] and the messages.
//!
//! Owns: the message types ([`Command`]) and the request/reply plumbing (mpsc to the controller,
//! a oneshot back). Must not touch: state. Every method here only sends a message.

use tokio::sync::{mpsc, oneshot};

use super::error::{ControlError, StartFailure};
use super::membership::ScaleRequest;
use crate::config::Config;
use crate::policy::PolicySet;
use crate::provider::{Instance, ProviderError, RingRecord};
use crate::ring::ServerId;

pub(super) type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// What `/add` and `/rm` answer: the membership after the call, and the replicas the call
/// added or removed (the seed's `added` and `removed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub members: Vec<String>,
    pub changed: Vec<String>,
}

/// Requests to the controller.
#[derive(Debug)]
pub enum Command {
    Add {
        request: ScaleRequest,
        reply: Reply<Scaled>,
    },
    Remove {
        request: ScaleRequest,
        reply: Reply<Scaled>,
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
    /// A request is held because the autoscaler scaled N to zero: start a replica.
    Wake,
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
    /// `POST /lb/roll`: roll every replica to a new instance of the same spec.
    Roll {
        reply: Reply<serde_json::Value>,
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
    ) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        rx.await.map_err(|_| ControlError::ShuttingDown)
    }

    pub async fn add(&self, request: ScaleRequest) -> Result<Scaled, ControlError> {
        self.ask(|reply| Command::Add { request, reply }).await?
    }

    pub async fn remove(&self, request: ScaleRequest) -> Result<Scaled, ControlError> {
        self.ask(|reply| Command::Remove { request, reply }).await?
    }

    /// Starts a roll of every replica (`POST /lb/roll`); answers at once with the roll's
    /// status (`/lb/status` follows it).
    pub async fn roll(&self) -> Result<serde_json::Value, ControlError> {
        self.ask(|reply| Command::Roll { reply }).await?
    }

    pub async fn status(&self) -> Result<serde_json::Value, ControlError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// What `/lb/metrics` shows, read now (render it with [`crate::exposition::render`]).
    pub async fn metrics(&self) -> Result<super::MetricsSources, ControlError> {
        self.ask(|reply| Command::Metrics { reply }).await
    }

    pub async fn whatif_base(&self) -> Result<crate::whatif::Base, ControlError> {
        self.ask(|reply| Command::WhatIfBase { reply }).await
    }

    pub async fn wait_ready(&self) -> Result<(), ControlError> {
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

    /// Never waits: a request is held at N = 0 (scale to zero) and asks for a replica. A full
    /// queue drops the hint; the next held request repeats it, and the held requests count as
    /// load at the next tick anyway.
    pub fn wake(&self) {
        let _ = self.tx.try_send(Command::Wake);
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

/// Reports from the controller's own spawned tasks.
pub(super) enum Internal {
    Spawned {
        id: ServerId,
        incarnation: u64,
        result: Result<Instance, ProviderError>,
    },
    StartTimeout {
        id: ServerId,
        incarnation: u64,
    },
    RespawnDue {
        id: ServerId,
        incarnation: u64,
    },
    /// A start failed; `output` is what the instance wrote last (fetched from the provider
    /// before the failure is reported).
    StartFailed {
        id: ServerId,
        incarnation: u64,
        cause: StartFailure,
        output: Vec<String>,
    },
    /// A roll's replacement started (or not).
    SuccessorSpawned {
        id: ServerId,
        incarnation: u64,
        result: Result<Instance, ProviderError>,
    },
    /// A roll's replacement had `provider.start_timeout` to get ready.
    SuccessorTimeout {
        id: ServerId,
        incarnation: u64,
    },
    /// A rolled-out instance drained and stopped; what it counted after the swap.
    Retired {
        id: ServerId,
        since_swap: crate::snapshot::Totals,
    },
    /// The last output of the replacement that stopped the roll to `target`.
    RollOutput {
        target: u64,
        replica: String,
        output: Vec<String>,
    },
    /// `/rm` finished draining and stopping these replicas.
    Removed {
        ids: Vec<ServerId>,
        reply: Reply<Scaled>,
    },
    /// Shared ring: an `/add` (or a grow) reserved these replicas in the record, or failed.
    Reserved {
        op: super::membership::OpId,
        result: Result<(RingRecord, super::shared::Reserved), ControlError>,
        reply: Reply<Scaled>,
    },
    /// Shared ring: `/add` `op` committed in the record, or failed to.
    Committed {
        op: super::membership::OpId,
        ids: Vec<ServerId>,
        result: Result<RingRecord, ControlError>,
        reply: Reply<Scaled>,
    },
    /// Shared ring: an `/rm` marked these replicas leaving in the record, or failed to.
    RemovalPlanned {
        result: Result<(RingRecord, Vec<ServerId>), ControlError>,
        reply: Reply<Scaled>,
    },
    /// Shared ring: this gateway's autoscaling proposal was written (or not).
    Proposed {
        result: Result<RingRecord, ControlError>,
    },
    /// Shared ring: an agreed scale-down marked these replicas leaving, or failed to.
    Shrunk {
        result: Result<(RingRecord, Vec<ServerId>), ControlError>,
    },
    /// Shared ring: this gateway wrote the record (applied like an observation).
    RecordWritten {
        record: RingRecord,
    },
    /// Shared ring: an entry a dead gateway left was cleaned up.
    CleanedUp {
        id: ServerId,
        record: Option<RingRecord>,
    },
    /// The TLS client config edit `edit` asked for was built from its CA file (off the loop),
    /// or why not; `plan` waits for it.
    UpstreamClientBuilt {
        edit: u64,
        plan: Box<super::reload::ReloadPlan>,
        result: Result<Option<std::sync::Arc<crate::tls::upstream::UpstreamTls>>, String>,
    },
}
