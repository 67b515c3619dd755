//! The files in `policies/examples/`: each loads, answers as documented and has the effect claimed.

use super::*;

fn example(name: &str) -> PolicySet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies/examples")
        .join(name);
    let src = fs::read_to_string(&path).expect("example exists");
    PolicySet::from_sources(vec![(name.to_string(), src)], PolicyLimits::default(), 1)
        .expect("example loads")
}

/// The built-in H(i) = i² + 2i + 17 mod slots, without overflow.
fn default_h(i: u64, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    ((r * r + 2 * r + 17) % s) as u32
}

/// The built-in Φ(i, j) = i² + j² + 2j + 25 mod slots, without overflow.
fn default_phi(i: u64, j: u32, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    let j = u128::from(j);
    ((r * r + j * j + 2 * j + 25) % s) as u32
}

/// A minimal ring for measuring the examples (the gateway's ring module is the real one):
/// vnodes placed with forward probing, each slot owned by the next vnode clockwise.
fn owners(servers: &[u64], vnodes: u32, slots: u32, phi: impl Fn(u64, u32) -> u32) -> Vec<u64> {
    let mut at: Vec<Option<u64>> = vec![None; slots as usize];
    for &i in servers {
        for j in 0..vnodes {
            let mut p = phi(i, j) as usize;
            while at[p].is_some() {
                p = (p + 1) % slots as usize;
            }
            at[p] = Some(i);
        }
    }
    (0..slots as usize)
        .map(|s| {
            (0..slots as usize)
                .find_map(|k| at[(s + k) % slots as usize])
                .expect("ring not empty")
        })
        .collect()
}

/// max/mean of the load per bucket (1.0 is perfect).
fn peak_ratio(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let max = counts.iter().copied().max().unwrap_or(0);
    max as f64 * counts.len() as f64 / total as f64
}

#[test]
fn example_spread_hash_dry_run_and_effect() {
    let s = example("spread_hash.lua");
    assert_eq!(s.hooks(), vec!["request_hash"]);
    let slots = 512;
    let keys = 100_000u64..200_000; // 6-digit ids
    let mut lua_counts = vec![0u64; slots as usize];
    let mut default_counts = vec![0u64; slots as usize];
    for i in keys.clone() {
        let slot = s.request_hash(i, slots).value().expect("hook answers");
        assert!(slot < slots);
        lua_counts[slot as usize] += 1;
        default_counts[default_h(i, slots) as usize] += 1;
    }
    // Values above i64::MAX arrive negative (wrapped): the Lua code reads them back as the
    // same unsigned 64 bits, so it matches fmix64 in Rust for every u64, any slot count.
    fn fmix64(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
    for (i, n) in [
        (0u64, 512u32),
        (1, 512),
        (u64::MAX, 512),
        (1 << 63, 1000),
        (123_456, 7),
    ] {
        assert_eq!(
            s.request_hash(i, n),
            HookOutcome::Value((fmix64(i) % u64::from(n)) as u32),
            "i = {i}, slots = {n}"
        );
    }
    let used = |c: &[u64]| c.iter().filter(|&&n| n > 0).count();
    println!(
        "request_hash over {} keys, {slots} slots: default uses {} slots (peak {:.2}x mean), spread_hash uses {} (peak {:.2}x)",
        keys.end - keys.start,
        used(&default_counts),
        peak_ratio(&default_counts),
        used(&lua_counts),
        peak_ratio(&lua_counts),
    );
    assert!(
        used(&default_counts) < slots as usize / 4,
        "the default is skewed"
    );
    assert_eq!(used(&lua_counts), slots as usize);
    assert!(peak_ratio(&lua_counts) < 1.5);
    assert_eq!(s.stats().total_errors(), 0);
}

#[test]
fn example_spread_vnodes_dry_run_and_effect() {
    let s = example("spread_vnodes.lua");
    assert_eq!(s.hooks(), vec!["vnode_hash"]);
    let (slots, vnodes) = (512u32, 9u32);
    let servers: Vec<u64> = (1..=3).collect();
    let both = PolicySet::from_sources(
        ["spread_hash.lua", "spread_vnodes.lua"]
            .iter()
            .map(|n| {
                let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("policies/examples")
                    .join(n);
                (
                    n.to_string(),
                    fs::read_to_string(p).expect("example exists"),
                )
            })
            .collect(),
        PolicyLimits::default(),
        1,
    )
    .expect("the two hash examples load together");
    let lua_ring = owners(&servers, vnodes, slots, |i, j| {
        both.vnode_hash(i, j, slots).value().expect("hook answers")
    });
    let default_ring = owners(&servers, vnodes, slots, |i, j| default_phi(i, j, slots));
    let share = |ring: &[u64], hash: &dyn Fn(u64) -> u32| {
        let mut per = vec![0u64; servers.len()];
        for i in 100_000u64..200_000 {
            per[(ring[hash(i) as usize] - 1) as usize] += 1;
        }
        per
    };
    let default_load = share(&default_ring, &|i| default_h(i, slots));
    let lua_load = share(&lua_ring, &|i| {
        both.request_hash(i, slots).value().expect("hook answers")
    });
    println!(
        "3 servers x {vnodes} vnodes, {slots} slots, 100000 keys: default H+Phi load {default_load:?} (peak {:.2}x mean), spread_hash+spread_vnodes {lua_load:?} (peak {:.2}x)",
        peak_ratio(&default_load),
        peak_ratio(&lua_load)
    );
    assert!(peak_ratio(&lua_load) < peak_ratio(&default_load));
    assert!(peak_ratio(&lua_load) < 1.5);
    // Each server's nodes are spread: no server owns one contiguous arc.
    let distinct_positions: std::collections::HashSet<u32> = (0..vnodes)
        .map(|j| s.vnode_hash(1, j, slots).value().expect("hook answers"))
        .collect();
    assert!(distinct_positions.len() >= vnodes as usize - 1);
}

#[test]
fn example_sticky_cookie_dry_run() {
    let s = example("sticky_cookie.lua");
    assert_eq!(s.hooks(), vec!["request_key"]);
    let key = |headers: &[(&str, &[u8])]| s.request_key(&req("id=1", headers));
    assert_eq!(
        key(&[("cookie", b"theme=dark; session=abc123; lang=en")]),
        HookOutcome::Value(LuaKey::Str("abc123".into()))
    );
    assert_eq!(
        key(&[("Cookie", b"session=first"), ("cookie", b"x=1")]),
        HookOutcome::Value(LuaKey::Str("first".into()))
    );
    assert_eq!(
        key(&[("cookie", b"mysession=no"), ("X-Session-Id", b"hdr-7")]),
        HookOutcome::Value(LuaKey::Str("hdr-7".into()))
    );
    assert_eq!(key(&[("cookie", b"theme=dark")]), HookOutcome::Absent);
    assert_eq!(key(NO_HEADERS), HookOutcome::Absent);
    assert_eq!(s.stats().total_errors(), 0);
}

#[test]
fn example_latency_health_dry_run() {
    let s = example("latency_health.lua");
    assert_eq!(s.hooks(), vec!["health"]);
    assert_eq!(
        s.health("s1", &probe(Some(200), 12.0)),
        HookOutcome::Value(true)
    );
    assert_eq!(
        s.health("s1", &probe(Some(200), 250.0)),
        HookOutcome::Value(true)
    );
    assert_eq!(
        s.health("s1", &probe(Some(200), 251.0)),
        HookOutcome::Value(false)
    );
    assert_eq!(
        s.health("s1", &probe(Some(503), 3.0)),
        HookOutcome::Value(false)
    );
    let refused = ProbeView {
        status: None,
        latency_ms: 0.4,
        error: Some("connection refused"),
    };
    assert_eq!(s.health("s1", &refused), HookOutcome::Value(false));
}
