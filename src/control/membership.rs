//! The membership model: which replicas the gateway keeps, their ids and names, and the plans
//! `/add`, `/rm` and `replicas.count` turn into.
//!
//! Owns: ids (the smallest free one, so ids stay small and stable), generated names
//! (`<name_prefix><id>`), each replica's phase (joining with an uncommitted `/add`, reserved by
//! another gateway's, member, leaving), and validating a scale request into a plan or a typed [`MembershipError`].
//! Must not touch: I/O, time, health, the ring. It is a value the controller keeps; plans are
//! computed from it and applied to it, so every rule here is a unit test away.

use std::collections::{BTreeMap, HashSet};

use crate::config::is_valid_hostname;
use crate::ring::ServerId;

/// Identifies one `/add` call until it commits or rolls back.
pub type OpId = u64;

/// Where a replica is in its membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started by an `/add` of this gateway that has not committed: placed (its slots are
    /// taken) but not routed, not in `/rep`.
    Joining(OpId),
    /// Reserved in the shared ring record by another gateway's `/add` that has not committed:
    /// placed, not routed, not checked by this gateway, not in `/rep`.
    Reserved,
    /// Part of the membership `/rep` reports and the ring places.
    Member,
    /// Removed by `/rm` (or a scale-down) and draining: off the ring, not in `/rep`.
    Leaving,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub phase: Phase,
}

/// Why a scale request is refused. Every variant is the client's to fix (400); the texts are
/// the replica API's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("Length of hostname list is more than newly added instances")]
    TooManyHostnamesToAdd,
    #[error("Length of hostname list is more than removable instances")]
    TooManyHostnamesToRemove,
    #[error("The {provider} provider cannot start replicas: list them in provider.servers in the config")]
    CannotStart { provider: &'static str },
    #[error("Hostname '{0}' is not a valid container name: use [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}}")]
    InvalidHostname(String),
    #[error("Hostname '{0}' appears more than once")]
    DuplicateHostname(String),
    #[error("Hostname '{0}' is already in use")]
    HostnameInUse(String),
    #[error("Hostname '{0}' does not exist")]
    UnknownHostname(String),
    #[error("Adding {n} replicas would make {total}, more than replicas.max_replicas ({max})")]
    AboveMax { n: u32, total: usize, max: usize },
    #[error("Cannot remove {n} replicas: only {have} exist")]
    NotEnough { n: u32, have: usize },
    #[error("Adding {n} replicas would make {total}, more than autoscale.max ({max})")]
    AboveAutoscaleMax { n: u32, total: usize, max: u32 },
    #[error("Removing {n} replicas would leave {left}, fewer than autoscale.min ({min})")]
    BelowAutoscaleMin { n: u32, left: usize, min: u32 },
}

/// `/add` or `/rm` as the API gives it: a count and up to that many hostnames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleRequest {
    pub n: u32,
    pub hostnames: Vec<String>,
}

/// The rules a plan is checked against, from the config and the provider.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub max_replicas: u32,
    pub name_prefix: &'a str,
    /// `None` when the provider starts replicas; else its name (the `static` provider).
    pub cannot_start: Option<&'static str>,
}

/// New replicas to start: ids and names, in start order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddPlan {
    pub replicas: Vec<(ServerId, String)>,
}

/// Members to remove: named ones first, then the most recently added (highest ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovePlan {
    pub ids: Vec<ServerId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    entries: BTreeMap<ServerId, Entry>,
}

impl Membership {
    pub fn get(&self, id: ServerId) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub fn name(&self, id: ServerId) -> Option<&str> {
        self.entries.get(&id).map(|e| e.name.as_str())
    }

    pub fn phase(&self, id: ServerId) -> Option<Phase> {
        self.entries.get(&id).map(|e| e.phase)
    }

    pub fn is_member(&self, id: ServerId) -> bool {
        self.phase(id) == Some(Phase::Member)
    }

    /// Every replica kept, whatever its phase, in id order.
    pub fn all(&self) -> impl Iterator<Item = (ServerId, &Entry)> {
        self.entries.iter().map(|(&id, e)| (id, e))
    }

    /// The members (`/rep`), in id order.
    pub fn members(&self) -> impl Iterator<Item = (ServerId, &str)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.phase == Phase::Member)
            .map(|(&id, e)| (id, e.name.as_str()))
    }

    pub fn member_ids(&self) -> Vec<ServerId> {
        self.members().map(|(id, _)| id).collect()
    }

    pub fn member_names(&self) -> Vec<String> {
        self.members().map(|(_, n)| n.to_owned()).collect()
    }

    /// N: the members the gateway keeps.
    pub fn desired(&self) -> usize {
        self.members().count()
    }

    /// Every replica kept, in any phase (what `max_replicas` bounds).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn id_of(&self, name: &str) -> Option<ServerId> {
        self.entries
            .iter()
            .find(|(_, e)| e.name == name)
            .map(|(&id, _)| id)
    }

    fn name_in_use(&self, name: &str) -> bool {
        self.id_of(name).is_some()
    }

    /// Adds a replica in `phase`. The caller ensures the id and name are free (plans do).
    pub fn insert(&mut self, id: ServerId, name: String, phase: Phase) {
        self.entries.insert(id, Entry { name, phase });
    }

    pub fn set_phase(&mut self, id: ServerId, phase: Phase) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.phase = phase;
        }
    }

    pub fn remove(&mut self, id: ServerId) -> Option<Entry> {
        self.entries.remove(&id)
    }

    /// The replicas an uncommitted `/add` started.
    pub fn joining(&self, op: OpId) -> Vec<ServerId> {
        self.entries
            .iter()
            .filter(|(_, e)| e.phase == Phase::Joining(op))
            .map(|(&id, _)| id)
            .collect()
    }

    /// `count` new replicas with generated names (start-up and `replicas.count` edits).
    pub fn plan_grow(&self, count: usize, prefix: &str) -> AddPlan {
        self.allocate(count, Vec::new(), prefix)
    }

    /// Validates an `/add` against the membership and the limits.
    pub fn plan_add(
        &self,
        req: &ScaleRequest,
        limits: &Limits<'_>,
    ) -> Result<AddPlan, MembershipError> {
        if req.hostnames.len() > req.n as usize {
            return Err(MembershipError::TooManyHostnamesToAdd);
        }
        if let Some(provider) = limits.cannot_start {
            return Err(MembershipError::CannotStart { provider });
        }
        check_names(&req.hostnames)?;
        if let Some(h) = req.hostnames.iter().find(|h| self.name_in_use(h)) {
            return Err(MembershipError::HostnameInUse(h.clone()));
        }
        let (total, max) = (self.len() + req.n as usize, limits.max_replicas as usize);
        if total > max {
            return Err(MembershipError::AboveMax {
                n: req.n,
                total,
                max,
            });
        }
        Ok(self.allocate(req.n as usize, req.hostnames.clone(), limits.name_prefix))
    }

    /// Validates an `/rm`: the named members, then the most recently added ones.
    pub fn plan_remove(&self, req: &ScaleRequest) -> Result<RemovePlan, MembershipError> {
        if req.hostnames.len() > req.n as usize {
            return Err(MembershipError::TooManyHostnamesToRemove);
        }
        check_names(&req.hostnames)?;
        let members: Vec<(ServerId, &str)> = self.members().collect();
        if req.n as usize > members.len() {
            return Err(MembershipError::NotEnough {
                n: req.n,
                have: members.len(),
            });
        }
        let mut ids = Vec::with_capacity(req.n as usize);
        for h in &req.hostnames {
            match members.iter().find(|(_, name)| name == h) {
                Some(&(id, _)) => ids.push(id),
                None => return Err(MembershipError::UnknownHostname(h.clone())),
            }
        }
        for &(id, _) in members.iter().rev() {
            if ids.len() == req.n as usize {
                break;
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(RemovePlan { ids })
    }

    /// Ids and names for `count` new replicas: the given hostnames first, generated ones for the
    /// rest. Ids are the smallest free ones.
    fn allocate(&self, count: usize, hostnames: Vec<String>, prefix: &str) -> AddPlan {
        let mut taken_ids: HashSet<ServerId> = self.entries.keys().copied().collect();
        let mut taken_names: HashSet<String> =
            self.entries.values().map(|e| e.name.clone()).collect();
        taken_names.extend(hostnames.iter().cloned());
        let mut given = hostnames.into_iter();
        let mut replicas = Vec::with_capacity(count);
        for _ in 0..count {
            let id = free_id(&taken_ids);
            let name = given
                .next()
                .unwrap_or_else(|| generated_name(id, prefix, &taken_names));
            taken_ids.insert(id);
            taken_names.insert(name.clone());
            replicas.push((id, name));
        }
        AddPlan { replicas }
    }
}

/// The smallest id not in `taken`.
fn free_id(taken: &HashSet<ServerId>) -> ServerId {
    // The ring holds far fewer than u32::MAX servers, so a free id always exists.
    (1u32..)
        .filter_map(ServerId::new)
        .find(|id| !taken.contains(id))
        .unwrap_or(ServerId::MAX)
}

/// `<prefix><id>`, or the next free `<prefix><k>` when a hostname already took it.
fn generated_name(id: ServerId, prefix: &str, taken: &HashSet<String>) -> String {
    (id.get()..)
        .map(|k| format!("{prefix}{k}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| format!("{prefix}{id}"))
}

/// Whether an operator's `/add` (`grow`) or `/rm` of `n` keeps N within the autoscaler's
/// bounds, N being `members` now; `None` when autoscaling is off.
pub fn check_autoscale_bounds(
    members: usize,
    n: u32,
    grow: bool,
    bounds: Option<(u32, u32)>,
) -> Result<(), MembershipError> {
    let Some((min, max)) = bounds else {
        return Ok(());
    };
    if grow {
        let total = members.saturating_add(n as usize);
        if total > max as usize {
            return Err(MembershipError::AboveAutoscaleMax { n, total, max });
        }
    } else {
        let left = members.saturating_sub(n as usize);
        if left < min as usize {
            return Err(MembershipError::BelowAutoscaleMin { n, left, min });
        }
    }
    Ok(())
}

/// The hostname rules shared by `/add` and `/rm`: valid container names, no duplicates.
pub fn check_names(hostnames: &[String]) -> Result<(), MembershipError> {
    if let Some(h) = hostnames.iter().find(|h| !is_valid_hostname(h)) {
        return Err(MembershipError::InvalidHostname(h.clone()));
    }
    let mut seen = HashSet::new();
    if let Some(h) = hostnames.iter().find(|h| !seen.insert(h.as_str())) {
        return Err(MembershipError::DuplicateHostname(h.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    const LIMITS: Limits<'static> = Limits {
        max_replicas: 5,
        name_prefix: "server-",
        cannot_start: None,
    };

    fn req(n: u32, hostnames: &[&str]) -> ScaleRequest {
        ScaleRequest {
            n,
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn three() -> Membership {
        let mut m = Membership::default();
        for (id, name) in m.plan_grow(3, "server-").replicas {
            m.insert(id, name, Phase::Member);
        }
        m
    }

    #[test]
    fn grow_uses_the_smallest_free_ids_and_prefixed_names() {
        let m = three();
        assert_eq!(m.member_names(), vec!["server-1", "server-2", "server-3"]);
        let mut m = m;
        m.remove(id(2));
        let plan = m.plan_grow(2, "server-");
        assert_eq!(
            plan.replicas,
            vec![(id(2), "server-2".into()), (id(4), "server-4".into())]
        );
    }

    #[test]
    fn add_takes_given_names_first_and_skips_generated_names_in_use() {
        let mut m = three();
        m.insert(id(4), "server-5".into(), Phase::Member);
        let roomy = Limits {
            max_replicas: 10,
            ..LIMITS
        };
        let plan = m.plan_add(&req(2, &["S9"]), &roomy).expect("valid");
        // id 5's generated name server-5 is taken by replica 4, so it gets server-6.
        assert_eq!(
            plan.replicas,
            vec![(id(5), "S9".into()), (id(6), "server-6".into())]
        );
        assert_eq!(
            m.plan_add(&req(1, &["server-6"]), &roomy)
                .expect("valid")
                .replicas,
            vec![(id(5), "server-6".into())]
        );
    }

    #[test]
    fn add_rules_in_order() {
        let m = three();
        use MembershipError::*;
        assert_eq!(
            m.plan_add(&req(1, &["a", "b"]), &LIMITS),
            Err(TooManyHostnamesToAdd)
        );
        let static_limits = Limits {
            cannot_start: Some("static"),
            ..LIMITS
        };
        assert_eq!(
            m.plan_add(&req(1, &[]), &static_limits),
            Err(CannotStart { provider: "static" })
        );
        assert_eq!(
            m.plan_add(&req(1, &["bad name"]), &LIMITS),
            Err(InvalidHostname("bad name".into()))
        );
        assert_eq!(
            m.plan_add(&req(2, &["a", "a"]), &LIMITS),
            Err(DuplicateHostname("a".into()))
        );
        assert_eq!(
            m.plan_add(&req(1, &["server-2"]), &LIMITS),
            Err(HostnameInUse("server-2".into()))
        );
        assert_eq!(
            m.plan_add(&req(3, &[]), &LIMITS),
            Err(AboveMax {
                n: 3,
                total: 6,
                max: 5
            })
        );
        assert!(m.plan_add(&req(2, &[]), &LIMITS).is_ok());
    }

    #[test]
    fn joining_and_leaving_replicas_count_against_max_but_not_n() {
        let mut m = three();
        m.insert(id(4), "j".into(), Phase::Joining(7));
        m.set_phase(id(1), Phase::Leaving);
        assert_eq!(m.desired(), 2);
        assert_eq!(m.len(), 4);
        assert_eq!(m.joining(7), vec![id(4)]);
        assert!(matches!(
            m.plan_add(&req(2, &[]), &LIMITS),
            Err(MembershipError::AboveMax { total: 6, .. })
        ));
        assert_eq!(
            m.plan_remove(&req(1, &["server-1"])),
            Err(MembershipError::UnknownHostname("server-1".into())),
            "a leaving replica cannot be removed twice"
        );
    }

    #[test]
    fn remove_takes_named_then_newest() {
        let m = three();
        assert_eq!(
            m.plan_remove(&req(2, &["server-1"])).expect("valid").ids,
            vec![id(1), id(3)]
        );
        assert_eq!(m.plan_remove(&req(1, &[])).expect("valid").ids, vec![id(3)]);
        use MembershipError::*;
        assert_eq!(
            m.plan_remove(&req(1, &["a", "b"])),
            Err(TooManyHostnamesToRemove)
        );
        assert_eq!(
            m.plan_remove(&req(4, &[])),
            Err(NotEnough { n: 4, have: 3 })
        );
        assert_eq!(
            m.plan_remove(&req(1, &["nope"])),
            Err(UnknownHostname("nope".into()))
        );
        assert_eq!(
            m.plan_remove(&req(2, &["x", "x"])),
            Err(DuplicateHostname("x".into()))
        );
    }

    #[test]
    fn with_autoscale_on_add_and_rm_stay_within_its_bounds() {
        use MembershipError::*;
        let b = Some((2, 5));
        assert_eq!(check_autoscale_bounds(3, 2, true, b), Ok(()));
        assert_eq!(
            check_autoscale_bounds(3, 3, true, b),
            Err(AboveAutoscaleMax {
                n: 3,
                total: 6,
                max: 5
            })
        );
        assert_eq!(check_autoscale_bounds(3, 1, false, b), Ok(()));
        assert_eq!(
            check_autoscale_bounds(3, 2, false, b),
            Err(BelowAutoscaleMin {
                n: 2,
                left: 1,
                min: 2
            })
        );
        assert_eq!(check_autoscale_bounds(3, 3, false, None), Ok(()));
        assert!(BelowAutoscaleMin {
            n: 2,
            left: 1,
            min: 2
        }
        .to_string()
        .contains("fewer than autoscale.min (2)"));
    }

    #[test]
    fn error_texts_are_the_contract() {
        assert_eq!(
            MembershipError::TooManyHostnamesToAdd.to_string(),
            "Length of hostname list is more than newly added instances"
        );
        assert_eq!(
            MembershipError::TooManyHostnamesToRemove.to_string(),
            "Length of hostname list is more than removable instances"
        );
        assert!(MembershipError::InvalidHostname("x y".into())
            .to_string()
            .contains("not a valid container name"));
    }
}
