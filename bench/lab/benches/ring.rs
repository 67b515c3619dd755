//! Criterion microbenches of the routing hot path: ring lookup, key extraction, the hash
//! functions `H` and `Φ`, and ring rebuilds for N = 3 and 50. `make bench-micro` runs them.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringgate::hashing::{key_to_int, HashFunction, KeySource};
use ringgate::ring::{Placement, Ring, ServerId};

const SLOTS: u32 = 512;
const VNODES: u32 = 9;

fn ids(n: u32) -> Vec<ServerId> {
    (1..=n).filter_map(ServerId::new).collect()
}

fn build(n: u32, f: HashFunction) -> Option<Ring> {
    let placement = Placement::build(SLOTS, VNODES, &ids(n), |i, j| {
        f.vnode_slot(u64::from(i.get()), j, SLOTS)
    })
    .ok()?;
    Some(Ring::build(&placement, |_| true))
}

fn ring_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_lookup");
    for n in [3, 50] {
        let Some(ring) = build(n, HashFunction::Mix64) else {
            continue;
        };
        g.bench_with_input(BenchmarkId::new("owner", n), &ring, |b, ring| {
            let mut slot = 0u32;
            b.iter(|| {
                slot = (slot + 97) % SLOTS;
                black_box(ring.owner(black_box(slot)))
            })
        });
        g.bench_with_input(BenchmarkId::new("key_to_owner", n), &ring, |b, ring| {
            let mut i = 100_000u64;
            b.iter(|| {
                i += 7;
                let slot = HashFunction::Quadratic.request_slot(black_box(i), SLOTS);
                black_box(ring.owner(slot))
            })
        });
    }
    g.finish();
}

fn hash_functions(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    for f in [HashFunction::Quadratic, HashFunction::Mix64] {
        g.bench_function(format!("H/{}", f.name()), |b| {
            let mut i = 123_456u64;
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(f.request_slot(black_box(i), SLOTS))
            })
        });
        g.bench_function(format!("phi/{}", f.name()), |b| {
            let mut j = 0u32;
            b.iter(|| {
                j = (j + 1) % VNODES;
                black_box(f.vnode_slot(black_box(7), black_box(j), SLOTS))
            })
        });
    }
    g.finish();
}

fn key_extraction(c: &mut Criterion) {
    let mut g = c.benchmark_group("key");
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let request = |uri: &str| {
        hyper::Request::builder()
            .uri(uri)
            .header("x-user", "alice")
            .header("cookie", "theme=dark; session=abc123")
            .body(())
            .map(|r| r.into_parts().0)
    };
    let Ok(parts) = request("/home?lang=en&id=482913") else {
        return;
    };
    let sources: [(&str, &str); 4] = [
        ("query", "query:id"),
        ("header", "header:x-user"),
        ("cookie", "cookie:session"),
        ("path", "path"),
    ];
    for (name, spec) in sources {
        let Ok(source) = spec.parse::<KeySource>() else {
            continue;
        };
        g.bench_function(format!("extract/{name}"), |b| {
            b.iter(|| black_box(source.extract(black_box(&parts), ip)))
        });
    }
    g.bench_function("to_int/decimal", |b| {
        b.iter(|| key_to_int(black_box("482913")))
    });
    g.bench_function("to_int/string", |b| {
        b.iter(|| key_to_int(black_box("alice@example.org")))
    });
    g.finish();
}

fn ring_rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_rebuild");
    for n in [3, 50] {
        for f in [HashFunction::Quadratic, HashFunction::Mix64] {
            g.bench_function(BenchmarkId::new(f.name(), n), |b| {
                b.iter(|| black_box(build(black_box(n), f)))
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    ring_lookup,
    hash_functions,
    key_extraction,
    ring_rebuild
);
criterion_main!(benches);
