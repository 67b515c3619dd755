//! Criterion microbenches of the access log's per-request work on the serving thread:
//! formatting one line (JSON and combined) into a buffer. `make bench-log` measures the whole
//! cost end to end; this shows where it goes.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use ringgate::access_log::format::{self, Record};
use ringgate::config::AccessFormat;

fn record() -> Record<'static> {
    Record {
        time: SystemTime::now(),
        client: "127.0.0.1:51234".parse().expect("addr"),
        method: "GET",
        path: "/home?id=482913",
        protocol: "HTTP/1.1",
        scheme: "http",
        status: 200,
        bytes: 63,
        bytes_up: None,
        held: None,
        duration: Duration::from_micros(412),
        upstream: Some(Duration::from_micros(281)),
        replica: Some("server-1"),
        slot: Some(329),
        retries: 0,
        termination: "ok",
        referer: None,
        user_agent: Some(b"wrk/4.2.0"),
    }
}

fn lines(c: &mut Criterion) {
    let mut g = c.benchmark_group("access_log_line");
    let r = record();
    for (name, fmt) in [
        ("json", AccessFormat::Json),
        ("combined", AccessFormat::Combined),
    ] {
        let mut buf = Vec::with_capacity(64 * 1024);
        // Kept from line to line, as a serving thread keeps it.
        let mut dates = format::Dates::default();
        g.bench_function(name, |b| {
            b.iter(|| {
                if buf.len() > 60 * 1024 {
                    buf.clear();
                }
                format::write(&mut buf, &mut dates, fmt, black_box(&r));
            })
        });
    }
    g.bench_function("clocks", |b| {
        b.iter(|| black_box((SystemTime::now(), std::time::Instant::now())))
    });
    g.finish();
}

criterion_group!(benches, lines);
criterion_main!(benches);
