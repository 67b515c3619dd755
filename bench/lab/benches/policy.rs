//! Cost of one Lua policy hook call against the built-in it replaces.
//!
//! `request_hash`: the built-in quadratic H vs. the `spread_hash.lua` example (and an empty
//! set, i.e. the check the gateway makes when no hook is defined). `request_key`: the
//! built-in `query:id` key source vs. the `sticky_cookie.lua` example on a request with
//! browser-like headers (this includes building the `req` table).
//!
//! Run: `cargo bench -p ringgate-lab --bench policy -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use ringgate::policy::{HookOutcome, KeyRequest, LuaKey, PolicyLimits, PolicySet};

const SLOTS: u32 = 512;

fn example(names: &[&str]) -> PolicySet {
    // The repository's examples: this package sits at `bench/lab`.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/examples");
    let files = names
        .iter()
        .map(|n| {
            let src = std::fs::read_to_string(dir.join(n)).expect("example exists");
            (n.to_string(), src)
        })
        .collect();
    PolicySet::from_sources(files, PolicyLimits::default(), 1).expect("example loads")
}

/// The built-in H(i) = i² + 2i + 17 mod slots, computed in u128 so no i overflows.
fn builtin_hash(i: u64, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    ((r * r + 2 * r + 17) % s) as u32
}

/// The built-in `query:id` key source: the decimal value of `id` in the query string.
fn builtin_key(query: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("id="))
        .and_then(|v| v.parse().ok())
}

fn request_hash(c: &mut Criterion) {
    let mut g = c.benchmark_group("request_hash");
    let mut i = 100_000u64;
    g.bench_function("builtin", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            builtin_hash(black_box(i), SLOTS)
        })
    });
    let empty = PolicySet::empty();
    g.bench_function("no_hook", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            empty.request_hash(black_box(i), SLOTS)
        })
    });
    let spread = example(&["spread_hash.lua"]);
    g.bench_function("lua_spread_hash", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            match spread.request_hash(black_box(i), SLOTS) {
                HookOutcome::Value(v) => v,
                other => panic!("hook failed: {other:?}"),
            }
        })
    });
    g.finish();
}

fn request_key(c: &mut Criterion) {
    let headers: &[(&str, &[u8])] = &[
        ("host", b"gateway.example:5000"),
        (
            "user-agent",
            b"Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        ),
        ("accept", b"text/html,application/xhtml+xml"),
        ("accept-encoding", b"gzip, deflate, br"),
        ("cookie", b"theme=dark; session=3f2a9c1e7b; lang=en"),
    ];
    let req = KeyRequest {
        method: "GET",
        path: "/home",
        query: "lang=en&id=123456",
        headers,
        client_ip: "10.0.0.7",
    };
    let mut g = c.benchmark_group("request_key");
    g.bench_function("builtin_query_id", |b| {
        b.iter(|| builtin_key(black_box(req.query)))
    });
    let trivial = PolicySet::from_sources(
        vec![(
            "k.lua".into(),
            "function request_key(req) return req.query end".into(),
        )],
        PolicyLimits::default(),
        1,
    )
    .expect("loads");
    let bare = KeyRequest {
        headers: &[],
        ..req
    };
    g.bench_function("lua_return_query_no_headers", |b| {
        b.iter(|| trivial.request_key(black_box(&bare)))
    });
    g.bench_function("lua_return_query_5_headers", |b| {
        b.iter(|| trivial.request_key(black_box(&req)))
    });
    let sticky = example(&["sticky_cookie.lua"]);
    g.bench_function("lua_sticky_cookie", |b| {
        b.iter(|| match sticky.request_key(black_box(&req)) {
            HookOutcome::Value(LuaKey::Str(s)) => s,
            other => panic!("hook failed: {other:?}"),
        })
    });
    g.finish();
}

criterion_group!(benches, request_hash, request_key);
criterion_main!(benches);
