//! Why a control-plane call changed nothing: an `/add`, `/rm` or `/lb/roll` refused by the
//! membership model, a replica that did not start, a roll in progress, the shared ring record
//! out of reach, or a controller that is shutting down.
//!
//! Owns: [`ControlError`]. Must not touch: HTTP (the edge, `crate::rescue`, gives each its
//! status).

use super::lifecycle::StartFailure;
use super::membership::MembershipError;
use super::roll::RollError;

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
