//! Why a control-plane call changed nothing: an `/add`, `/rm` or `/lb/roll` refused by the
//! membership model, a replica that did not start, a roll in progress, the shared ring record
//! out of reach, or a controller that is shutting down.
//!
//! Owns: [`ControlError`], [`StartFailure`], [`RollError`]. Must not touch: HTTP (the edge, `crate::rescue`, gives each its
//! status).

use std::time::Duration;

use super::membership::MembershipError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Roll(#[from] RollError),
    #[error("Replica '{replica}' {cause}; nothing was added")]
    AddFailed {
        replica: String,
        cause: StartFailure,
    },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("other gateways changed the shared ring record at the same time, {attempts} times in a row; nothing was changed by this call: retry it")]
    RingContended { attempts: u32 },
    #[error("the engine that holds the shared ring record does not answer ({detail}); nothing was changed by this call: retry it when the engine is back (requests are still routed on the last ring seen)")]
    EngineUnavailable { detail: String },
    #[error("the shared ring record does not fit this gateway's [ring] ({detail}): every gateway of one ring needs the same ring.slots and ring.vnodes; nothing was changed")]
    RecordMismatch { detail: String },
    #[error("replica '{replica}' was removed from the shared ring record by another gateway before this /add committed; nothing was added: retry it")]
    ReservationLost { replica: String },
}

/// Why a replica's start failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartFailure {
    #[error("failed to start: {0}")]
    Provider(String),
    #[error("exited while starting ({0})")]
    Exited(String),
    /// It runs but did not pass its readiness checks in time.
    #[error("did not become ready: its health check ({check}) did not pass within provider.start_timeout ({timeout:?}); last check: {last}")]
    NotReady {
        check: String,
        timeout: Duration,
        last: String,
    },
    /// One of the above, and the last lines the replica wrote.
    #[error("{cause}{}", crate::provider::process::quote_output(output))]
    WithOutput {
        cause: Box<StartFailure>,
        output: Vec<String>,
    },
}

impl StartFailure {
    /// This failure with the replica's last lines of output (as it is when there are none).
    pub fn with_output(self, output: Vec<String>) -> StartFailure {
        if output.is_empty() || matches!(self, StartFailure::WithOutput { .. }) {
            return self;
        }
        StartFailure::WithOutput {
            cause: Box::new(self),
            output,
        }
    }
}

/// Why a roll cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollError {
    #[error("the {0} provider starts no replica, so there is nothing to roll")]
    NotManaged(&'static str),
    #[error("a roll is in progress ({done} of {total} replicas rolled): wait for it to finish (GET /lb/status shows it), then roll again")]
    InProgress { done: usize, total: usize },
    #[error("the {0} provider does not roll replicas in place yet: a spec edit applies to replicas started from now on (`docker service update --force <replica>` rolls one by hand)")]
    Unsupported(&'static str),
}
