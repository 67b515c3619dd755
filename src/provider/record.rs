//! The ring record: the membership a shared-ring provider (`swarm`) keeps in the engine, so
//! that every gateway watching the engine rebuilds the same owner table from it.
//!
//! Owns: [`RingRecord`] (every replica's id, hostname, recorded slots and phase, and every
//! gateway's autoscaling [`Proposal`], at one engine version), its text form as labels of one
//! engine object (`ringgate.member.<id>` = `<hostname> <phase> <slots>`,
//! `ringgate.proposal.<gateway>` = `<n> <unix ms> <gateway>`), and the [`SharedRing`] trait through which the controller
//! reads it and replaces it with optimistic concurrency (a write names the version it was
//! planned on; the engine refuses it when the record moved on).
//! Must not touch: the engine (providers implement [`SharedRing`]) or decisions (the
//! controller plans every edit with the same membership model and placement as for local
//! providers).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::{BoxFuture, ProviderError};
use crate::ring::ServerId;

/// Prefix of the labels that hold one member each.
pub const MEMBER_LABEL_PREFIX: &str = "ringgate.member.";
/// Prefix of the labels that hold one gateway's autoscaling proposal each.
pub const PROPOSAL_LABEL_PREFIX: &str = "ringgate.proposal.";

/// Where a recorded replica is in its membership, as every gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedPhase {
    /// Reserved by an `/add` on gateway `by` that has not committed: its slots are taken,
    /// nobody routes to it yet.
    Joining { by: String, since: u64 },
    /// Routed by every gateway.
    Member,
    /// Removed by an `/rm` on gateway `by`: nobody routes to it; `by` drains and deletes it.
    Leaving { by: String, since: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMember {
    pub hostname: String,
    /// In vnode order: where its virtual nodes were placed when it was planned.
    pub slots: Vec<u32>,
    pub phase: RecordedPhase,
}

/// One gateway's autoscaling proposal: the N its own autoscaler asks for, and when it said
/// so (wall-clock ms since the epoch, compared across gateways), so that the proposal of a
/// gateway that stopped refreshing it stops counting (`control::agree`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Proposal {
    /// The gateway's name in the record (its name and a nonce per run).
    pub gateway: String,
    pub n: u32,
    pub at_ms: u64,
}

/// Every gateway's proposal, by gateway.
pub type Proposals = BTreeMap<String, Proposal>;

/// The membership as the engine holds it at `version` (the engine's own version of the
/// object, which grows with every write).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RingRecord {
    pub version: u64,
    pub members: BTreeMap<ServerId, RecordedMember>,
    /// The autoscaling proposals of the gateways sharing the ring (empty with autoscale off).
    pub proposals: Proposals,
}

/// Why a record entry could not be read (it is skipped, and reported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ring record label {key}={value:?} cannot be read: {why}")]
pub struct BadEntry {
    pub key: String,
    pub value: String,
    pub why: &'static str,
}

impl fmt::Display for RecordedPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordedPhase::Member => f.write_str("member"),
            RecordedPhase::Joining { by, since } => write!(f, "joining:{since}:{by}"),
            RecordedPhase::Leaving { by, since } => write!(f, "leaving:{since}:{by}"),
        }
    }
}

fn parse_phase(text: &str) -> Option<RecordedPhase> {
    if text == "member" {
        return Some(RecordedPhase::Member);
    }
    let mut parts = text.splitn(3, ':');
    let (kind, since, by) = (parts.next()?, parts.next()?, parts.next()?);
    let since = since.parse().ok()?;
    let by = by.to_owned();
    match kind {
        "joining" => Some(RecordedPhase::Joining { by, since }),
        "leaving" => Some(RecordedPhase::Leaving { by, since }),
        _ => None,
    }
}

fn parse_proposal(text: &str) -> Option<Proposal> {
    let mut parts = text.splitn(3, ' ');
    let (n, at_ms, gateway) = (parts.next()?, parts.next()?, parts.next()?);
    if gateway.is_empty() {
        return None;
    }
    Some(Proposal {
        gateway: gateway.to_owned(),
        n: n.parse().ok()?,
        at_ms: at_ms.parse().ok()?,
    })
}

impl RecordedMember {
    /// The label value: `<hostname> <phase> <slots>`.
    pub fn to_label(&self) -> String {
        format!(
            "{} {} {}",
            self.hostname,
            self.phase,
            super::format_slots(&self.slots)
        )
    }
}

impl RingRecord {
    /// The members as labels of the engine object.
    pub fn member_labels(members: &BTreeMap<ServerId, RecordedMember>) -> HashMap<String, String> {
        members
            .iter()
            .map(|(id, m)| (format!("{MEMBER_LABEL_PREFIX}{id}"), m.to_label()))
            .collect()
    }

    /// The proposals as labels of the engine object: the key carries the gateway's name with
    /// anything but `[A-Za-z0-9_.-]` as `-` (a label key's safe set), the value the name itself.
    pub fn proposal_labels(proposals: &Proposals) -> HashMap<String, String> {
        proposals
            .values()
            .map(|p| {
                let key: String = p
                    .gateway
                    .chars()
                    .map(|c| match c {
                        'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '.' | '-' => c,
                        _ => '-',
                    })
                    .collect();
                (
                    format!("{PROPOSAL_LABEL_PREFIX}{key}"),
                    format!("{} {} {}", p.n, p.at_ms, p.gateway),
                )
            })
            .collect()
    }

    /// Reads the members and proposals out of an object's labels (other labels are ignored);
    /// entries that cannot be read are skipped and returned, so they can be reported.
    pub fn from_labels(
        version: u64,
        labels: &HashMap<String, String>,
    ) -> (RingRecord, Vec<BadEntry>) {
        let mut members = BTreeMap::new();
        let mut proposals = BTreeMap::new();
        let mut bad = Vec::new();
        for (key, value) in labels {
            if key.starts_with(PROPOSAL_LABEL_PREFIX) {
                match parse_proposal(value) {
                    Some(p) => {
                        proposals.insert(p.gateway.clone(), p);
                    }
                    None => bad.push(BadEntry {
                        key: key.clone(),
                        value: value.clone(),
                        why: "a proposal is <n> <unix ms> <gateway>",
                    }),
                }
                continue;
            }
            let Some(id) = key.strip_prefix(MEMBER_LABEL_PREFIX) else {
                continue;
            };
            let fail = |why| BadEntry {
                key: key.clone(),
                value: value.clone(),
                why,
            };
            let Some(id) = id.parse().ok().and_then(ServerId::new) else {
                bad.push(fail("the id is not a positive integer"));
                continue;
            };
            let mut parts = value.split(' ');
            let (Some(hostname), Some(phase), Some(slots), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bad.push(fail("three fields separated by single spaces expected"));
                continue;
            };
            if !crate::config::is_valid_hostname(hostname) {
                bad.push(fail("the hostname is not a valid container name"));
                continue;
            }
            let Some(phase) = parse_phase(phase) else {
                bad.push(fail(
                    "the phase is not member, joining:<t>:<by> or leaving:<t>:<by>",
                ));
                continue;
            };
            let Some(slots) = super::parse_slots(slots) else {
                bad.push(fail("the slots are not comma-separated integers"));
                continue;
            };
            members.insert(
                id,
                RecordedMember {
                    hostname: hostname.to_owned(),
                    slots,
                    phase,
                },
            );
        }
        bad.sort_by(|a, b| a.key.cmp(&b.key));
        let record = RingRecord {
            version,
            members,
            proposals,
        };
        (record, bad)
    }
}

/// Why a record write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RecordWriteError {
    /// Another gateway wrote the record since it was read: read it again and re-plan.
    #[error("the ring record changed since it was read")]
    Conflict,
    #[error(transparent)]
    Engine(#[from] ProviderError),
}

/// The record's home in the engine: read it, and replace its members if nobody else wrote it
/// since (optimistic concurrency on the engine object's version).
pub trait SharedRing: Send + Sync + 'static {
    fn read(&self) -> BoxFuture<'_, Result<RingRecord, ProviderError>>;

    /// Replaces the members and proposals with these if the record is still at `version`.
    fn write(
        &self,
        version: u64,
        members: BTreeMap<ServerId, RecordedMember>,
        proposals: Proposals,
    ) -> BoxFuture<'_, Result<(), RecordWriteError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    #[test]
    fn labels_round_trip() {
        let mut members = BTreeMap::new();
        members.insert(
            id(1),
            RecordedMember {
                hostname: "server-1".into(),
                slots: vec![26, 29, 34],
                phase: RecordedPhase::Member,
            },
        );
        members.insert(
            id(4),
            RecordedMember {
                hostname: "S5".into(),
                slots: vec![5, 9, 200],
                phase: RecordedPhase::Joining {
                    by: "gw:a/1f".into(),
                    since: 1_700_000_000,
                },
            },
        );
        members.insert(
            id(7),
            RecordedMember {
                hostname: "S7".into(),
                slots: vec![1, 2, 3],
                phase: RecordedPhase::Leaving {
                    by: "gw-b/2".into(),
                    since: 5,
                },
            },
        );
        let mut labels = RingRecord::member_labels(&members);
        assert_eq!(labels["ringgate.member.1"], "server-1 member 26,29,34");
        assert_eq!(
            labels["ringgate.member.4"],
            "S5 joining:1700000000:gw:a/1f 5,9,200"
        );
        labels.insert("ringgate.managed".into(), "true".into());
        let proposals: Proposals = [("gw:a/1f", 3), ("gw-b/2", 5)]
            .into_iter()
            .map(|(g, n)| {
                let p = Proposal {
                    gateway: g.into(),
                    n,
                    at_ms: 1_700_000_000_123,
                };
                (g.to_owned(), p)
            })
            .collect();
        let written = RingRecord::proposal_labels(&proposals);
        assert_eq!(
            written["ringgate.proposal.gw-a-1f"],
            "3 1700000000123 gw:a/1f"
        );
        labels.extend(written);
        let (record, bad) = RingRecord::from_labels(42, &labels);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(record.version, 42);
        assert_eq!(record.members, members);
        assert_eq!(record.proposals, proposals);
    }

    #[test]
    fn unreadable_entries_are_skipped_and_named() {
        let labels: HashMap<String, String> = [
            ("ringgate.member.0", "a member 1,2"),
            ("ringgate.member.x", "a member 1,2"),
            ("ringgate.member.2", "a member"),
            ("ringgate.member.3", "bad/name member 1"),
            ("ringgate.member.4", "a sleeping 1"),
            ("ringgate.member.5", "a member 1,x"),
            ("ringgate.member.6", "b joining:soon:gw 1"),
            ("ringgate.member.9", "ok member 3"),
            ("ringgate.proposal.a", "x 1 a"),
            ("ringgate.proposal.b", "2 1"),
            ("ringgate.proposal.c", "2 1 c"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (record, bad) = RingRecord::from_labels(1, &labels);
        assert_eq!(
            record.members.keys().copied().collect::<Vec<_>>(),
            vec![id(9)]
        );
        assert_eq!(bad.len(), 9);
        assert_eq!(record.proposals.keys().collect::<Vec<_>>(), vec!["c"]);
        assert!(
            bad[0].to_string().contains("ringgate.member.0"),
            "{}",
            bad[0]
        );
    }
}
