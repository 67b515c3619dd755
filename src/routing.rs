//! Routing: how a request becomes a slot, and how a server's virtual nodes become slots.
//!
//! Owns: the three routing decisions, each "the Lua hook if it answers, else the configured
//! built-in": the request key (`request_key` → `hashing.key` → a random 6-digit id), the request
//! slot (`request_hash` → `ring.request_hash`) and the virtual-node slot (`vnode_hash` →
//! `ring.vnode_hash`), plus building a [`Placement`] with them.
//! Must not touch: health, replicas, I/O. The request path, the controller and the offline tools
//! (`ringgate ring`, `ringgate simulate`) all route through [`Router`], so a simulation runs
//! exactly the code the gateway serves with.

use std::net::IpAddr;

use crate::config::Config;
use crate::hashing::{cookie_key, key_to_int, random_key};
use crate::policy::{Hook, HookOutcome, KeyRequest, LuaKey, PolicySet};
use crate::ring::{Placement, Ring, RingError, ServerId};

/// A request's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub value: u64,
    /// Made up by the gateway for a client without a key, to be given to it in the
    /// `hashing.set_cookie` cookie.
    pub give: bool,
}

/// The routing functions of one config and one policy set.
#[derive(Clone, Copy)]
pub struct Router<'a> {
    config: &'a Config,
    policy: &'a PolicySet,
}

impl<'a> Router<'a> {
    pub fn new(config: &'a Config, policy: &'a PolicySet) -> Router<'a> {
        Router { config, policy }
    }

    pub fn slots(&self) -> u32 {
        self.config.ring.slots
    }

    pub fn vnodes(&self) -> u32 {
        self.config.ring.vnodes
    }

    /// The request key as an integer: the Lua `request_key` hook if it answers, else
    /// `hashing.key`, else a random 6-digit id.
    pub fn key(&self, parts: &http::request::Parts, client_ip: IpAddr) -> u64 {
        self.key_of(parts, client_ip).value
    }

    /// The request key, and whether the gateway made it up for a client it is to give it to:
    /// with `hashing.set_cookie`, that cookie is read first, and a request without any key gets
    /// a random one to keep ([`RequestKey::give`]).
    pub fn key_of(&self, parts: &http::request::Parts, client_ip: IpAddr) -> RequestKey {
        let found = |value| RequestKey { value, give: false };
        if self.policy.has_hook(Hook::RequestKey) {
            if let Some(key) = self.lua_key(parts, client_ip) {
                return found(key);
            }
        }
        let sticky = self.config.hashing.set_cookie.as_str();
        if !sticky.is_empty() {
            if let Some(v) = cookie_key(parts, sticky) {
                return found(key_to_int(v));
            }
        }
        match self.config.hashing.key.extract(parts, client_ip) {
            Some(k) => found(key_to_int(&k)),
            // A key for the client to keep: the whole 64 bits, decimal in the cookie (a
            // decimal key is its own integer).
            None if !sticky.is_empty() => RequestKey {
                value: fastrand::u64(..),
                give: true,
            },
            None => found(random_key()),
        }
    }

    fn lua_key(&self, parts: &http::request::Parts, client_ip: IpAddr) -> Option<u64> {
        let headers: Vec<(&str, &[u8])> = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let ip = client_ip.to_canonical().to_string();
        let req = KeyRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &headers,
            client_ip: &ip,
        };
        match self.policy.request_key(&req) {
            // A negative Lua integer keeps its bits: i64 → u64 is the documented mapping.
            HookOutcome::Value(LuaKey::Int(i)) => Some(i as u64),
            HookOutcome::Value(LuaKey::Str(s)) => Some(key_to_int(&s)),
            HookOutcome::Absent | HookOutcome::Failed(_) => None,
        }
    }

    /// The slot of key `i`: the Lua `request_hash` hook if it answers, else `ring.request_hash`.
    #[inline]
    pub fn request_slot(&self, i: u64) -> u32 {
        let slots = self.config.ring.slots;
        if self.policy.has_hook(Hook::RequestHash) {
            if let HookOutcome::Value(s) = self.policy.request_hash(i, slots) {
                return s;
            }
        }
        self.config.ring.request_hash.request_slot(i, slots)
    }

    /// The preferred slot of virtual node `j` of server `id`: the Lua `vnode_hash` hook if it
    /// answers, else `ring.vnode_hash`.
    pub fn vnode_slot(&self, id: ServerId, j: u32) -> u32 {
        let (i, slots) = (u64::from(id.get()), self.config.ring.slots);
        if self.policy.has_hook(Hook::VnodeHash) {
            if let HookOutcome::Value(s) = self.policy.vnode_hash(i, j, slots) {
                return s;
            }
        }
        self.config.ring.vnode_hash.vnode_slot(i, j, slots)
    }

    /// Places server `id` on `placement` with this router's virtual-node hash.
    pub fn place(&self, placement: &mut Placement, id: ServerId) -> Result<(), RingError> {
        placement.add(id, |j| self.vnode_slot(id, j))
    }

    /// A placement of `ids`, added in the given order.
    pub fn placement(&self, ids: &[ServerId]) -> Result<Placement, RingError> {
        let ring = &self.config.ring;
        Placement::build(ring.slots, ring.vnodes, ids, |id, j| self.vnode_slot(id, j))
    }

    /// The owner table of `ids` with every one of them up (the offline tools' view).
    pub fn ring_of(&self, ids: &[ServerId]) -> Result<(Placement, Ring), RingError> {
        let placement = self.placement(ids)?;
        let ring = Ring::build(&placement, |_| true);
        Ok((placement, ring))
    }

    /// The server that owns key `i` on `ring`.
    pub fn owner(&self, ring: &Ring, i: u64) -> Option<ServerId> {
        ring.owner(self.request_slot(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::HashFunction;
    use crate::policy::PolicyLimits;

    fn id(n: u32) -> ServerId {
        ServerId::new(n).expect("non-zero")
    }

    fn lua(src: &str) -> PolicySet {
        PolicySet::from_sources(
            vec![("p.lua".into(), src.into())],
            PolicyLimits::default(),
            1,
        )
        .expect("policy loads")
    }

    fn parts(uri: &str) -> http::request::Parts {
        http::Request::builder()
            .uri(uri)
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    #[test]
    fn built_ins_without_a_policy() {
        let c = Config::default();
        let p = PolicySet::empty();
        let r = Router::new(&c, &p);
        assert_eq!(r.request_slot(10), 137, "H(10) = 100 + 20 + 17");
        assert_eq!(r.vnode_slot(id(1), 0), 26, "Φ(1,0) = 1 + 0 + 0 + 25");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(r.key(&parts("/home?id=42"), ip), 42);
        let random = r.key(&parts("/home"), ip);
        assert!((100_000..=999_999).contains(&random), "{random}");
    }

    #[test]
    fn hooks_override_and_nil_defers_to_the_built_in() {
        let mut c = Config::default();
        c.ring.request_hash = HashFunction::Mix64;
        let p = lua(
            "function request_hash(i, slots) if i == 7 then return nil end return 5 end\n\
             function vnode_hash(i, j, slots) return i * 100 + j end\n\
             function request_key(req) return req.path end",
        );
        let r = Router::new(&c, &p);
        assert_eq!(r.request_slot(1), 5);
        assert_eq!(r.request_slot(7), HashFunction::Mix64.request_slot(7, 512));
        assert_eq!(r.vnode_slot(id(2), 3), 203);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(
            r.key(&parts("/a?id=1"), ip),
            crate::hashing::key_to_int("/a")
        );
    }

    #[test]
    fn a_failing_hook_falls_back_to_the_built_in() {
        let c = Config::default();
        let p = lua("function request_hash(i, slots) error('boom') end");
        let r = Router::new(&c, &p);
        assert_eq!(r.request_slot(10), 137);
        assert_eq!(p.stats().errors(Hook::RequestHash), 1);
    }

    #[test]
    fn placement_uses_the_vnode_hook() {
        let c = Config::default();
        let p = lua("function vnode_hash(i, j, slots) return 400 + j end");
        let (placement, ring) = Router::new(&c, &p).ring_of(&[id(1)]).expect("placement");
        assert_eq!(placement.positions(id(1)), (400..409).collect::<Vec<_>>());
        assert_eq!(ring.owner(0), Some(id(1)));
    }
}
