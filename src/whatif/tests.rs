use super::*;
use crate::control::membership::Phase;
use crate::policy::PolicyLimits;
use crate::ring::Ring;

fn id(n: u32) -> ServerId {
    ServerId::new(n).expect("non-zero")
}

/// A base like a fresh gateway's: server-1..3, all up, the given config and policy.
fn base_with(config: Config, policy: PolicySet) -> Base {
    let mut membership = Membership::default();
    for i in 1..=3 {
        membership.insert(id(i), format!("server-{i}"), Phase::Member);
    }
    let ids = membership.member_ids();
    let placement = Router::new(&config, &policy)
        .placement(&ids)
        .expect("placement");
    Base {
        config: Arc::new(config),
        policy: Arc::new(policy),
        membership,
        placement,
        routable: ids,
        cannot_start: None,
        tunnels: Vec::new(),
    }
}

fn base() -> Base {
    base_with(Config::default(), PolicySet::empty())
}

fn what(body: &str) -> WhatIf {
    parse(body.as_bytes()).expect("valid what-if")
}

fn share<'a>(a: &'a Answer, name: &str) -> &'a ServerShare {
    a.servers
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} missing: {a:?}"))
}

fn close(x: f64, y: f64) -> bool {
    (x - y).abs() < 1e-9
}

#[test]
fn parses_each_action() {
    assert_eq!(
        what(r#"{"action": "add"}"#),
        WhatIf {
            scenario: Scenario::Add { hostname: None },
            keys: DEFAULT_KEYS,
            seed: 1
        }
    );
    assert_eq!(
        what(r#"{"action": "add", "hostname": "S9", "keys": 500, "seed": 7}"#),
        WhatIf {
            scenario: Scenario::Add {
                hostname: Some("S9".into())
            },
            keys: 500,
            seed: 7
        }
    );
    assert_eq!(
        what(r#"{"action": "remove", "replica": "server-2"}"#).scenario,
        Scenario::Remove {
            replica: "server-2".into()
        }
    );
    assert_eq!(
        what(r#"{"action": "hash", "request_hash": "mix64"}"#).scenario,
        Scenario::Hash {
            request_hash: Some(HashFunction::Mix64),
            vnode_hash: None
        }
    );
    assert_eq!(
        what(r#"{"action": "policy", "lua": "x = 1"}"#).scenario,
        Scenario::Policy {
            lua: "x = 1".into()
        }
    );
}

#[test]
fn bad_requests_name_the_problem() {
    let err = |body: &str| parse(body.as_bytes()).expect_err("rejected").to_string();
    assert!(err("").contains("not valid JSON"));
    assert!(err("{action: 1}").contains("not valid JSON"));
    assert!(err("[1]").contains("JSON object"));
    assert!(err("{}").contains("'action' is missing"));
    assert!(err(r#"{"action": "explode"}"#).contains("Unknown action \"explode\""));
    assert!(err(r#"{"action": 3}"#).contains("Unknown action"));
    assert!(err(r#"{"action": "add", "n": 2}"#).contains("Unknown field 'n' for action add"));
    assert!(err(r#"{"action": "remove"}"#).contains("'replica'"));
    assert!(err(r#"{"action": "remove", "replica": 2}"#).contains("must be a string"));
    assert!(err(r#"{"action": "hash"}"#).contains("needs 'request_hash' or 'vnode_hash'"));
    assert!(
        err(r#"{"action": "hash", "vnode_hash": "md5"}"#).contains("\"quadratic\" or \"mix64\"")
    );
    assert!(err(r#"{"action": "policy"}"#).contains("'lua'"));
    assert!(err(r#"{"action": "add", "keys": 0}"#).contains("from 1 to 200000"));
    assert!(err(r#"{"action": "add", "keys": 200001}"#).contains("from 1 to 200000"));
    assert!(err(r#"{"action": "add", "keys": "many"}"#).contains("from 1 to 200000"));
}

#[test]
fn adding_moves_keys_only_to_the_new_replica() {
    let a = run(&base(), &what(r#"{"action": "add", "hostname": "S4"}"#)).expect("answer");
    assert_eq!(a.change, "add replica S4");
    let new = share(&a, "S4");
    assert_eq!((new.change, new.before), ("added", 0.0));
    assert!(new.after > 0.0 && new.slots_after > 0, "{a:?}");
    assert!(
        close(a.moved, new.after),
        "every moved key goes to S4: {a:?}"
    );
    assert!(
        a.moves.iter().all(|m| m.to.as_deref() == Some("S4")),
        "{:?}",
        a.moves
    );
    for s in a.servers.iter().filter(|s| s.name != "S4") {
        assert!(s.after <= s.before, "{s:?}");
    }
    let total: f64 = a.servers.iter().map(|s| s.after).sum();
    assert!(close(total, 1.0), "{total}");
    assert_eq!(a.owners_after.len(), 512);
}

#[test]
fn adding_uses_the_membership_rules() {
    let e = run(
        &base(),
        &what(r#"{"action": "add", "hostname": "server-2"}"#),
    )
    .expect_err("in use");
    assert_eq!(
        e,
        WhatIfError::Membership(MembershipError::HostnameInUse("server-2".into()))
    );
    let e = run(
        &base(),
        &what(r#"{"action": "add", "hostname": "bad name"}"#),
    )
    .expect_err("invalid");
    assert!(e.to_string().contains("not a valid container name"), "{e}");
    let mut c = Config::default();
    c.replicas.max_replicas = 3;
    let e = run(
        &base_with(c, PolicySet::empty()),
        &what(r#"{"action": "add"}"#),
    )
    .expect_err("full");
    assert!(
        e.to_string().contains("more than replicas.max_replicas"),
        "{e}"
    );
    // The generated name is the one /add would give.
    let a = run(&base(), &what(r#"{"action": "add"}"#)).expect("answer");
    assert_eq!(a.change, "add replica server-4");
}

#[test]
fn removing_moves_exactly_the_removed_replicas_keys() {
    let a = run(
        &base(),
        &what(r#"{"action": "remove", "replica": "server-1"}"#),
    )
    .expect("answer");
    let gone = share(&a, "server-1");
    assert_eq!(
        (gone.change, gone.after, gone.slots_after),
        ("removed", 0.0, 0)
    );
    assert!(close(a.moved, gone.before), "{a:?}");
    assert!(a
        .moves
        .iter()
        .all(|m| m.from.as_deref() == Some("server-1")));
    let e = run(
        &base(),
        &what(r#"{"action": "remove", "replica": "server-9"}"#),
    )
    .expect_err("unknown");
    assert_eq!(
        e,
        WhatIfError::Membership(MembershipError::UnknownHostname("server-9".into()))
    );
}

#[test]
fn mix64_spreads_the_keys_the_quadratic_hash_piles_up() {
    let b = base();
    let a = run(
        &b,
        &what(r#"{"action": "hash", "request_hash": "mix64", "vnode_hash": "mix64"}"#),
    )
    .expect("answer");
    let max = |f: fn(&ServerShare) -> f64| a.servers.iter().map(f).fold(0.0, f64::max);
    assert!(
        max(|s| s.before) > 0.6,
        "the specified hash piles keys on one server: {a:?}"
    );
    assert!(max(|s| s.after) < 0.6, "mix64 spreads them: {a:?}");
    assert!(a.moved > 0.0);
    assert_eq!(
        a.change,
        "ring.request_hash = \"mix64\", ring.vnode_hash = \"mix64\""
    );
    // The same hash as now changes nothing.
    let same = run(
        &b,
        &what(r#"{"action": "hash", "vnode_hash": "quadratic"}"#),
    )
    .expect("answer");
    assert_eq!(same.moved, 0.0);
    assert_eq!(same.owners_before, same.owners_after);
}

#[test]
fn the_before_side_is_the_live_ring_with_down_replicas_skipped() {
    let mut b = base();
    b.routable.retain(|r| *r != id(1));
    let a = run(
        &b,
        &what(r#"{"action": "hash", "request_hash": "quadratic"}"#),
    )
    .expect("answer");
    assert_eq!(share(&a, "server-1").before, 0.0);
    assert!(!a.owners_before.contains(&Some(1)));
}

#[test]
fn a_pasted_policy_is_simulated_in_the_sandbox() {
    let spread = std::fs::read_to_string("policies/examples/spread_hash.lua").expect("example");
    let body = serde_json::json!({"action": "policy", "lua": spread}).to_string();
    let a = run(&base(), &what(&body)).expect("answer");
    assert!(a.change.contains("request_hash"), "{}", a.change);
    assert!(a.moved > 0.0);

    let err = |lua: &str| {
        let body = serde_json::json!({"action": "policy", "lua": lua}).to_string();
        run(&base(), &what(&body)).expect_err("rejected")
    };
    assert!(matches!(err("function ("), WhatIfError::PolicyLoad(_)));
    assert!(
        matches!(err("os.exit(1)"), WhatIfError::PolicyLoad(_)),
        "no os in the sandbox"
    );
    assert!(
        matches!(err("while true do end"), WhatIfError::PolicyLoad(_)),
        "top level on the budget"
    );
    match err("function request_hash(i, s) error('boom') end") {
        WhatIfError::PolicyFailed { hook, message } => {
            assert_eq!(hook, "request_hash");
            assert!(message.contains("boom"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        err("function request_hash(i, s) while true do end end"),
        WhatIfError::PolicyFailed { .. }
    ));
    assert!(matches!(
        err("function vnode_hash(i, j, s) return nil + 1 end"),
        WhatIfError::PolicyFailed {
            hook: "vnode_hash",
            ..
        }
    ));
}

#[test]
fn a_slow_policy_is_stopped_at_the_time_limit() {
    let mut c = Config::default();
    c.policy.hook_timeout = Duration::from_secs(1);
    c.policy.instruction_budget = 100_000_000;
    let b = base_with(c, PolicySet::empty());
    // Each call stays within its own limits, but all of them would take minutes.
    let lua =
        "function request_hash(i, s) local x = 0 for k = 1, 300000 do x = x + k end return i end";
    let body = serde_json::json!({"action": "policy", "lua": lua}).to_string();
    let e = run(&b, &what(&body)).expect_err("too long");
    assert!(matches!(e, WhatIfError::TooLong(_)), "{e}");
}

#[test]
fn the_live_policy_runs_detached() {
    let live = PolicySet::from_sources(
        vec![(
            "p.lua".into(),
            "function request_hash(i, s) return i % s end".into(),
        )],
        PolicyLimits::default(),
        1,
    )
    .expect("loads");
    let b = base_with(Config::default(), live);
    let calls = b.policy.stats().calls(Hook::RequestHash);
    run(&b, &what(r#"{"action": "add", "keys": 1000}"#)).expect("answer");
    assert_eq!(
        b.policy.stats().calls(Hook::RequestHash),
        calls,
        "no call counted as the gateway's"
    );
}

#[test]
fn the_answer_counts_the_tunnels_the_change_would_close() {
    let mut b = base();
    let router = Router::new(&b.config, &b.policy);
    let ring = Ring::build(&b.placement, |_| true);
    b.tunnels = (0..3000u64)
        .map(|key| {
            let home = router.owner(&ring, key);
            crate::tunnel::Placed {
                key,
                replica: home.expect("a home"),
                incarnation: 1,
                home,
            }
        })
        .collect();
    let on_2 = b.tunnels.iter().filter(|t| t.replica == id(2)).count();
    let removed = run(&b, &what(r#"{"action": "remove", "replica": "server-2"}"#)).expect("runs");
    assert_eq!(removed.tunnels_open, 3000);
    assert_eq!(removed.tunnels_closed, on_2, "exactly server-2's tunnels");
    let added = run(&b, &what(r#"{"action": "add"}"#)).expect("runs");
    assert!(
        added.tunnels_closed > 0 && added.tunnels_closed < 3000,
        "{}",
        added.tunnels_closed
    );
    let unchanged = run(
        &b,
        &what(r#"{"action": "hash", "request_hash": "quadratic"}"#),
    )
    .expect("runs");
    assert_eq!(
        unchanged.tunnels_closed, 0,
        "no key moves, no tunnel closes"
    );
}
