//! The Grafana dashboard (`docs/grafana/ringgate.json`) queries only what a running gateway
//! exports: every `ringgate_*` name in its PromQL has samples in `/lb/metrics`.

mod support;

use std::collections::BTreeSet;

use serde_json::Value;
use support::*;

/// Every PromQL expression in the dashboard (panels, rows' panels, template queries).
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => expressions(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| expressions(x, out)),
        _ => {}
    }
}

/// The `ringgate_*` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("ringgate_") {
        let start = i + at;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|n| start + n)
            .unwrap_or(expr.len());
        if before_ok {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn names_are_read_from_promql() {
    assert_eq!(
        metric_names("histogram_quantile(0.5, sum by (le) (rate(ringgate_a_bucket{job=~\"$job\"}[1m]))) / ringgate_b"),
        ["ringgate_a_bucket", "ringgate_b"]
    );
    assert!(metric_names("label_values(up, job)").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let text = std::fs::read_to_string("docs/grafana/ringgate.json").expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "ringgate");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(names.len() >= 15, "the dashboard queries {names:?}");
    for wanted in [
        "ringgate_requests_total",
        "ringgate_replica_latency_seconds_bucket",
        "ringgate_ring_slots",
        "ringgate_ejections_total",
        "ringgate_policy_hook_errors_total",
        "ringgate_config_reloads_total",
    ] {
        assert!(names.contains(wanted), "the dashboard shows {wanted}");
    }
    // Panel ids are unique and every query has a refId, as Grafana needs.
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len());
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            assert!(t["refId"].is_string() && t["expr"].is_string(), "{p}");
        }
    }

    let gw = GatewayProcess::start(&Conf {
        replicas: "count = 2\n".into(),
        ..Conf::default()
    });
    for id in 0..20 {
        assert_eq!(get(&gw.url(&format!("/home?id={id}"))).await.0, 200);
    }
    let exported = gw.metrics().await;
    let sampled: BTreeSet<&str> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !sampled.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /lb/metrics does not export: {missing:?}\n{exported}"
    );
}
