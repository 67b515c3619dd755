//! Who decides membership: chosen once, when the controller is built, from the provider's
//! [`Mode`].
//!
//! Owns: the [`Authority`] value and the shared-record authority's state ([`SharedRecord`]: the
//! record handle, who this gateway is in it, the last version applied, the engine's running
//! tasks and reachability, cleanups and grows in progress). Under the local authority none of
//! that exists, so no code can read it by mistake; the controller asks [`Authority::shared`]
//! instead of testing an optional record in a dozen places.
//! Must not touch: the membership model (`membership`), the record's pure decisions (`shared`)
//! or their effects (`shared_ops`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::membership::OpId;
use super::shared_ops::EngineState;
use crate::provider::{Instance, Mode, SharedRing};
use crate::ring::ServerId;

/// The membership authority this controller runs under.
pub(super) enum Authority {
    /// This gateway's own membership model is the truth (`process`, `docker`, `static`).
    Local,
    /// Membership lives in the engine's ring record, shared with other gateways (`swarm`).
    Shared(Box<SharedRecord>),
}

/// The shared-record authority's state.
pub(super) struct SharedRecord {
    pub ring: Arc<dyn SharedRing>,
    /// Who this run of the gateway is in the ring record: its name and a nonce, so that a
    /// restarted gateway recognises the reservations its earlier run left.
    pub me: String,
    /// The version of the last record applied; older observations are ignored.
    pub version: Option<u64>,
    /// The tasks the engine runs, by hostname: attached when their replica is a member,
    /// whichever event came first.
    pub tasks: HashMap<String, Instance>,
    pub engine: EngineState,
    /// Stale record entries being cleaned up by this gateway.
    pub cleaning: HashSet<ServerId>,
    /// Grows to `replicas.count` through the record not finished yet: readiness waits for
    /// them, so a gateway that starts a ring serves once its replicas do.
    pub grows: HashSet<OpId>,
}

impl Authority {
    /// The authority `mode` calls for; `name` is this gateway's name.
    pub fn for_mode(mode: &Mode, name: &str) -> Authority {
        match mode.record() {
            None => Authority::Local,
            Some(ring) => Authority::Shared(Box::new(SharedRecord {
                ring: ring.clone(),
                me: format!("{name}/{:08x}", fastrand::u32(..)),
                version: None,
                tasks: HashMap::new(),
                engine: EngineState::default(),
                cleaning: HashSet::new(),
                grows: HashSet::new(),
            })),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Authority::Shared(_))
    }

    pub fn shared(&self) -> Option<&SharedRecord> {
        match self {
            Authority::Shared(s) => Some(s),
            Authority::Local => None,
        }
    }

    pub fn shared_mut(&mut self) -> Option<&mut SharedRecord> {
        match self {
            Authority::Shared(s) => Some(s),
            Authority::Local => None,
        }
    }

    /// Whether a grow through the record is pending (readiness waits for it).
    pub fn growing(&self) -> bool {
        self.shared().is_some_and(|s| !s.grows.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testkit::MemoryRecord;

    #[test]
    fn the_mode_chooses_the_authority_once() {
        assert!(!Authority::for_mode(&Mode::Owned, "gw").is_shared());
        assert!(!Authority::for_mode(&Mode::Fixed, "gw").is_shared());
        let local = Authority::for_mode(&Mode::Owned, "gw");
        assert!(local.shared().is_none() && !local.growing());
        let record: Arc<dyn SharedRing> = Arc::new(MemoryRecord::default());
        let mut shared = Authority::for_mode(&Mode::Shared(record), "gw-a");
        let s = shared.shared_mut().expect("shared");
        // Its name and a nonce: a restarted gateway tells its earlier run's reservations apart.
        assert!(
            s.me.starts_with("gw-a/") && s.me.len() == "gw-a/".len() + 8,
            "{}",
            s.me
        );
        assert_eq!(s.version, None);
        s.grows.insert(7);
        assert!(
            shared.growing(),
            "readiness waits for a grow through the record"
        );
    }
}
