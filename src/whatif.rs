//! What-if: the simulator behind `POST /lb/simulate`. "If I added a replica, removed one,
//! switched a hash to `mix64` or loaded this Lua policy, who would own which share of the keys,
//! and which share would move?" Nothing is applied: applying stays `/add`, `/rm` and file edits.
//!
//! Owns: parsing a what-if request into a [`WhatIf`] (every bad input a typed [`WhatIfError`],
//! a 400), applying its [`Scenario`] to a copy of the live state ([`Base`], which the controller
//! hands out), and the [`Answer`]. The change is made the way the controller would make it (the
//! membership model plans the `/add` or `/rm`, a new virtual-node hash places every member
//! again) and keys are routed with [`Router`] and [`crate::tools`]' simulation primitives, so
//! the answer is what the gateway would do.
//! Must not touch: the live state. It works on clones; a pasted policy is its own sandboxed
//! set with the configured limits, and the live policy runs detached (its counters stay as
//! they are).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::Config;
use crate::control::membership::{Limits, Membership, MembershipError, ScaleRequest};
use crate::hashing::HashFunction;
use crate::policy::{Hook, PolicySet};
use crate::ring::{Placement, Ring, RingError, ServerId};
use crate::routing::Router;
use crate::tools::{key_counts, moved_share, route_keys, sample_keys, TooLong};

/// Keys replayed when the request does not say.
pub const DEFAULT_KEYS: u64 = 20_000;
/// Most keys one simulation replays.
pub const MAX_KEYS: u64 = 200_000;
/// Wall-clock budget of one simulation (both rings): a slow Lua hook is stopped here.
pub const TIME_LIMIT: Duration = Duration::from_secs(2);

/// The live state a simulation starts from: clones, taken by the controller in one step.
#[derive(Debug, Clone)]
pub struct Base {
    pub config: Arc<Config>,
    pub policy: Arc<PolicySet>,
    pub membership: Membership,
    pub placement: Placement,
    /// The replicas the ring routes to now.
    pub routable: Vec<ServerId>,
    /// Why `/add` cannot start replicas (the `static` provider), if it cannot.
    pub cannot_start: Option<&'static str>,
    /// The open tunnels: the answer says how many the change would close.
    pub tunnels: Vec<crate::tunnel::Placed>,
}

/// One change to simulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// `/add` of one replica (named, or with the name the gateway would generate).
    Add { hostname: Option<String> },
    /// `/rm` of the named replica.
    Remove { replica: String },
    /// `ring.request_hash` and/or `ring.vnode_hash` switched.
    Hash {
        request_hash: Option<HashFunction>,
        vnode_hash: Option<HashFunction>,
    },
    /// This Lua source as the whole policy set (in place of `policy.dir`'s files).
    Policy { lua: String },
}

/// A parsed what-if request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhatIf {
    pub scenario: Scenario,
    pub keys: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WhatIfError {
    #[error("Request body is not valid JSON ({0}): send {{\"action\": \"add\"}}")]
    NotJson(String),
    #[error("Request body must be a JSON object like {{\"action\": \"remove\", \"replica\": \"server-2\"}}")]
    NotAnObject,
    #[error("Field 'action' is missing: use add, remove, hash or policy")]
    MissingAction,
    #[error("Unknown action {0:?}: use add, remove, hash or policy")]
    UnknownAction(String),
    #[error("Unknown field '{field}' for action {action}: it takes {takes}")]
    UnknownField {
        action: String,
        field: String,
        takes: &'static str,
    },
    #[error("Field '{field}' must be {expected}")]
    BadField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("Action hash needs 'request_hash' or 'vnode_hash' (\"quadratic\" or \"mix64\")")]
    NoHashGiven,
    #[error("{0}")]
    Membership(#[from] MembershipError),
    #[error("{0}")]
    Ring(#[from] RingError),
    #[error("The policy does not load: {0}")]
    PolicyLoad(String),
    #[error("The policy's {hook} hook failed during the simulation: {message}")]
    PolicyFailed { hook: &'static str, message: String },
    #[error("{0}")]
    TooLong(#[from] TooLong),
    #[error("Another simulation is running: try again in a moment")]
    Busy,
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn text(obj: &Map<String, Value>, name: &'static str) -> Result<Option<String>, WhatIfError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(WhatIfError::BadField {
            field: name,
            expected: "a string",
        }),
    }
}

fn hash(obj: &Map<String, Value>, name: &'static str) -> Result<Option<HashFunction>, WhatIfError> {
    let bad = WhatIfError::BadField {
        field: name,
        expected: "\"quadratic\" or \"mix64\"",
    };
    match text(obj, name).map_err(|_| bad.clone())? {
        None => Ok(None),
        Some(s) => serde_json::from_value(Value::String(s))
            .map(Some)
            .map_err(|_| bad),
    }
}

fn count(
    obj: &Map<String, Value>,
    name: &'static str,
    max: u64,
) -> Result<Option<u64>, WhatIfError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => {
            v.as_u64()
                .filter(|&n| n > 0 && n <= max)
                .map(Some)
                .ok_or(WhatIfError::BadField {
                    field: name,
                    expected: if name == "keys" {
                        "an integer from 1 to 200000"
                    } else {
                        "a positive integer"
                    },
                })
        }
    }
}

/// Parses `{"action": "add" | "remove" | "hash" | "policy", …, "keys": n, "seed": n}`.
pub fn parse(body: &[u8]) -> Result<WhatIf, WhatIfError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| WhatIfError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(WhatIfError::NotAnObject);
    };
    let action = match obj.get("action") {
        None | Some(Value::Null) => return Err(WhatIfError::MissingAction),
        Some(Value::String(a)) => a.clone(),
        Some(other) => return Err(WhatIfError::UnknownAction(other.to_string())),
    };
    let (own, takes): (&[&str], &'static str) = match action.as_str() {
        "add" => (&["hostname"], "'hostname' (optional)"),
        "remove" => (&["replica"], "'replica'"),
        "hash" => (
            &["request_hash", "vnode_hash"],
            "'request_hash' and/or 'vnode_hash'",
        ),
        "policy" => (&["lua"], "'lua'"),
        _ => return Err(WhatIfError::UnknownAction(action)),
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["action", "keys", "seed"].contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(WhatIfError::UnknownField {
            action,
            field: k.clone(),
            takes,
        });
    }
    let scenario = match action.as_str() {
        "add" => Scenario::Add {
            hostname: text(&obj, "hostname")?,
        },
        "remove" => Scenario::Remove {
            replica: text(&obj, "replica")?.ok_or(WhatIfError::BadField {
                field: "replica",
                expected: "the name of a replica (see /rep)",
            })?,
        },
        "hash" => {
            let (request_hash, vnode_hash) =
                (hash(&obj, "request_hash")?, hash(&obj, "vnode_hash")?);
            if request_hash.is_none() && vnode_hash.is_none() {
                return Err(WhatIfError::NoHashGiven);
            }
            Scenario::Hash {
                request_hash,
                vnode_hash,
            }
        }
        _ => Scenario::Policy {
            lua: text(&obj, "lua")?.ok_or(WhatIfError::BadField {
                field: "lua",
                expected: "the Lua source of a policy file",
            })?,
        },
    };
    Ok(WhatIf {
        scenario,
        keys: count(&obj, "keys", MAX_KEYS)?.unwrap_or(DEFAULT_KEYS),
        seed: count(&obj, "seed", u64::MAX)?.unwrap_or(1),
    })
}

/// One server in an [`Answer`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerShare {
    pub id: u32,
    pub name: String,
    /// Share of the keys it owns now, and would own after the change.
    pub before: f64,
    pub after: f64,
    /// Ring slots it owns now, and would own.
    pub slots_before: u32,
    pub slots_after: u32,
    /// "kept", "added" or "removed".
    pub change: &'static str,
}

/// Keys that would move from one server to another.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Move {
    pub from: Option<String>,
    pub to: Option<String>,
    pub share: f64,
}

/// What a change would do.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    /// The change, in words.
    pub change: String,
    pub keys: usize,
    pub seed: u64,
    pub slots: u32,
    pub servers: Vec<ServerShare>,
    /// Share of the keys whose owner would change.
    pub moved: f64,
    /// The largest flows of keys between servers, largest first.
    pub moves: Vec<Move>,
    /// Share of the keys no replica would serve (503), now and after.
    pub unrouted_before: f64,
    pub unrouted_after: f64,
    /// The replica id each slot routes to, now and after (`null`: none).
    pub owners_before: Vec<Option<u32>>,
    pub owners_after: Vec<Option<u32>>,
    /// Tunnels open now, and how many of them the change would close (their key's home
    /// would move, or their replica would leave the ring), as re-homing would.
    pub tunnels_open: usize,
    pub tunnels_closed: usize,
    /// What the simulation cost, in milliseconds.
    pub took_ms: f64,
}

/// One side of the comparison: the routing functions and the ring they would serve with.
struct Side {
    config: Arc<Config>,
    policy: Arc<PolicySet>,
    ring: Ring,
    /// Every server on it, with its name: ids in order.
    names: Vec<(ServerId, String)>,
}

fn named(base: &Base, ids: &[ServerId]) -> Vec<(ServerId, String)> {
    ids.iter()
        .filter_map(|&id| Some((id, base.membership.name(id)?.to_owned())))
        .collect()
}

/// The side after `scenario`, built the way the controller would build it.
fn after(base: &Base, scenario: &Scenario) -> Result<(Side, String), WhatIfError> {
    let mut placement = base.placement.clone();
    let mut routable = base.routable.clone();
    let mut names = named(base, base.placement.members());
    let (mut config, mut policy) = (base.config.clone(), base.policy.clone());
    let change = match scenario {
        Scenario::Add { hostname } => {
            let limits = Limits {
                max_replicas: config.replicas.max_replicas,
                name_prefix: &config.replicas.name_prefix,
                cannot_start: base.cannot_start,
            };
            let request = ScaleRequest {
                n: 1,
                hostnames: hostname.iter().cloned().collect(),
            };
            let plan = base.membership.plan_add(&request, &limits)?;
            for (id, name) in plan.replicas {
                Router::new(&config, &policy).place(&mut placement, id)?;
                routable.push(id);
                names.push((id, name));
            }
            let added: Vec<&str> = names.last().map(|(_, n)| n.as_str()).into_iter().collect();
            format!("add replica {}", added.join(", "))
        }
        Scenario::Remove { replica } => {
            let plan = base.membership.plan_remove(&ScaleRequest {
                n: 1,
                hostnames: vec![replica.clone()],
            })?;
            for id in plan.ids {
                placement.remove(id);
                routable.retain(|r| *r != id);
                names.retain(|(i, _)| *i != id);
            }
            format!("remove replica {replica}")
        }
        Scenario::Hash {
            request_hash,
            vnode_hash,
        } => {
            let mut c = (*config).clone();
            let mut words = Vec::new();
            if let Some(h) = request_hash {
                c.ring.request_hash = *h;
                words.push(format!("ring.request_hash = \"{h}\""));
            }
            let placement_changes = vnode_hash.is_some_and(|h| h != c.ring.vnode_hash);
            if let Some(h) = vnode_hash {
                c.ring.vnode_hash = *h;
                words.push(format!("ring.vnode_hash = \"{h}\""));
            }
            config = Arc::new(c);
            if placement_changes {
                placement = Router::new(&config, &policy).placement(base.placement.members())?;
            }
            words.join(", ")
        }
        Scenario::Policy { lua } => {
            let set = PolicySet::from_sources(
                vec![("what-if.lua".into(), lua.clone())],
                config.policy.limits(),
                base.policy.generation() + 1,
            )
            .map_err(|e| WhatIfError::PolicyLoad(e.to_string()))?;
            let vnodes_involved =
                set.has_hook(Hook::VnodeHash) || base.policy.has_hook(Hook::VnodeHash);
            policy = Arc::new(set);
            if vnodes_involved {
                placement = Router::new(&config, &policy).placement(base.placement.members())?;
                check_hooks(&policy)?;
            }
            let hooks = policy.hooks();
            format!(
                "policy with {}",
                if hooks.is_empty() {
                    "no hooks".to_string()
                } else {
                    hooks.join(", ")
                }
            )
        }
    };
    let ring = Ring::build(&placement, |id| routable.contains(&id));
    Ok((
        Side {
            config,
            policy,
            ring,
            names,
        },
        change,
    ))
}

/// A hook that failed during the simulation makes its answer meaningless: say so.
fn check_hooks(policy: &PolicySet) -> Result<(), WhatIfError> {
    let stats = policy.stats();
    if Hook::ALL.iter().any(|&h| stats.errors(h) > 0) {
        let (hook, message) = stats
            .last_error()
            .map(|e| (e.hook.name(), e.message))
            .unwrap_or(("a", "it failed".into()));
        return Err(WhatIfError::PolicyFailed { hook, message });
    }
    Ok(())
}

fn owner_table(ring: &Ring) -> Vec<Option<u32>> {
    (0..ring.slots())
        .map(|s| ring.owner(s).map(ServerId::get))
        .collect()
}

/// Runs `what` against `base`. CPU-bound (up to [`TIME_LIMIT`]): call it off the serving
/// threads.
pub fn run(base: &Base, what: &WhatIf) -> Result<Answer, WhatIfError> {
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    // The live policy runs detached, so the simulation's calls do not count as the gateway's.
    let live = Base {
        policy: Arc::new(base.policy.detached()),
        ..base.clone()
    };
    let before = Side {
        config: live.config.clone(),
        policy: live.policy.clone(),
        ring: Ring::build(&live.placement, |id| live.routable.contains(&id)),
        names: named(&live, live.placement.members()),
    };
    let (after, change) = after(&live, &what.scenario)?;
    let keys = sample_keys(what.keys, what.seed);
    let route = |side: &Side| {
        let router = Router::new(&side.config, &side.policy);
        route_keys(&router, &side.ring, &keys, |routed| {
            check_hooks(&side.policy)?;
            if Instant::now() > deadline {
                return Err(WhatIfError::TooLong(TooLong {
                    limit: TIME_LIMIT,
                    routed,
                    total: keys.len(),
                }));
            }
            Ok(())
        })
    };
    let (owners_before, owners_after) = (route(&before)?, route(&after)?);

    let mut all: Vec<(ServerId, String)> = before.names.clone();
    for n in &after.names {
        if !all.iter().any(|(id, _)| *id == n.0) {
            all.push(n.clone());
        }
    }
    all.sort();
    let ids: Vec<ServerId> = all.iter().map(|(id, _)| *id).collect();
    let n = keys.len().max(1) as f64;
    let (table_before, table_after) = (owner_table(&before.ring), owner_table(&after.ring));
    let slots_of =
        |t: &[Option<u32>], id: ServerId| t.iter().filter(|o| **o == Some(id.get())).count() as u32;
    let servers = all
        .iter()
        .zip(key_counts(&owners_before, &ids))
        .zip(key_counts(&owners_after, &ids))
        .map(|(((id, name), b), a)| {
            let in_before = before.names.iter().any(|(i, _)| i == id);
            let in_after = after.names.iter().any(|(i, _)| i == id);
            ServerShare {
                id: id.get(),
                name: name.clone(),
                before: b as f64 / n,
                after: a as f64 / n,
                slots_before: slots_of(&table_before, *id),
                slots_after: slots_of(&table_after, *id),
                change: match (in_before, in_after) {
                    (false, true) => "added",
                    (true, false) => "removed",
                    _ => "kept",
                },
            }
        })
        .collect();
    let name_of = |o: Option<ServerId>| {
        o.and_then(|id| all.iter().find(|(i, _)| *i == id).map(|(_, n)| n.clone()))
    };
    let mut flows: std::collections::BTreeMap<(Option<ServerId>, Option<ServerId>), u64> =
        std::collections::BTreeMap::new();
    for (b, a) in owners_before.iter().zip(&owners_after) {
        if b != a {
            *flows.entry((*b, *a)).or_default() += 1;
        }
    }
    let mut moves: Vec<Move> = flows
        .into_iter()
        .map(|((from, to), c)| Move {
            from: name_of(from),
            to: name_of(to),
            share: c as f64 / n,
        })
        .collect();
    moves.sort_by(|x, y| y.share.total_cmp(&x.share));
    moves.truncate(12);
    let unrouted = |o: &[Option<ServerId>]| o.iter().filter(|x| x.is_none()).count() as f64 / n;
    let routable_after: std::collections::BTreeSet<u32> =
        table_after.iter().flatten().copied().collect();
    let router_after = Router::new(&after.config, &after.policy);
    let tunnels_closed = live
        .tunnels
        .iter()
        .filter(|t| {
            let alive = routable_after.contains(&t.replica.get());
            let home = router_after.owner(&after.ring, t.key);
            crate::tunnel::rehome::judge(t, alive, home).is_some()
        })
        .count();
    Ok(Answer {
        change,
        keys: keys.len(),
        seed: what.seed,
        slots: before.ring.slots(),
        servers,
        moved: moved_share(&owners_before, &owners_after),
        moves,
        unrouted_before: unrouted(&owners_before),
        unrouted_after: unrouted(&owners_after),
        owners_before: table_before,
        owners_after: table_after,
        tunnels_open: live.tunnels.len(),
        tunnels_closed,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests;
