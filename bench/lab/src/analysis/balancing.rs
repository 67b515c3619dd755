//! `ringgate-lab analysis balancing` (part of `make analysis`): bounded loads and slow start on
//! live gateways with `ringgate-server` replicas, written into their own marked section of
//! `docs/performance.md` with a chart each.
//!
//! - **Bounded loads**: the specified quadratic hash (most keys on one server) and `mix64`,
//!   `ring.balance_factor` off and 1.25, at two concurrencies: max/mean of the requests each
//!   server served and of its peak requests in flight, and the share of requests that left their
//!   key's owner.
//! - **Slow start**: N = 3 under steady load over a fixed set of keys; one replica is killed,
//!   and its replacement ramps up over `health.slow_start`. The share of its keys it answers,
//!   per second, and how many keys changed owner more than once while it ramped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;

use super::charts;
use super::gateway::{GatewaySpec, HashChoice, LabGateway};
use super::{report, AnalysisError};
use crate::loadgen::{self, KeyPlan, LoadConfig, Report};
use crate::procs::signal;

#[derive(Debug, Clone, clap::Args)]
pub struct BalancingArgs {
    /// The `ringgate` binary (default: `ringgate` next to this executable)
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Where charts are written (beside the report, so they render where it is read)
    #[arg(long, default_value = "docs/img")]
    pub out: PathBuf,
    /// The report whose balancing section is rewritten
    #[arg(long, default_value = "docs/performance.md")]
    pub doc: PathBuf,
    /// Requests per bounded-load run
    #[arg(short = 'n', long, default_value_t = 20_000)]
    pub requests: u64,
    /// Concurrencies of the bounded-load runs
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub concurrency: Vec<usize>,
    /// The balance factor measured against "off"
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// The slow-start window, seconds
    #[arg(long, default_value_t = 10)]
    pub slow_start_secs: u64,
}

/// One bounded-load run.
#[derive(Debug, Clone)]
pub struct LoadRun {
    pub hash: &'static str,
    pub concurrency: usize,
    pub factor: f64,
    pub served: Vec<(String, u64)>,
    pub peaks: Vec<(String, u64)>,
    pub diverted: f64,
    pub failed: u64,
}

fn max_over_mean(v: &[u64]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<u64>() as f64 / n;
    let max = v.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 {
        max / mean
    } else {
        0.0
    }
}

async fn status(gw: &LabGateway) -> Result<serde_json::Value, AnalysisError> {
    let (_, body) = gw.call(Method::GET, "/lb/status", None).await?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| v["message"].clone())
        .map_err(|e| AnalysisError::Gateway(format!("/lb/status: {e}")))
}

async fn metric(gw: &LabGateway, name: &str) -> Result<f64, AnalysisError> {
    let (_, body) = gw.call(Method::GET, "/lb/metrics", None).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn bounded_run(
    bin: &Path,
    hash: HashChoice,
    factor: f64,
    concurrency: usize,
    requests: u64,
) -> Result<LoadRun, AnalysisError> {
    let mut spec = GatewaySpec::new(3, hash.clone());
    spec.ring_extra = format!("balance_factor = {factor:?}\n");
    let gw = LabGateway::start(bin, &spec).await?;
    let mut cfg = LoadConfig::new(gw.url("/home"), requests, concurrency);
    cfg.keys = KeyPlan::Random6 { seed: 7 };
    let report = loadgen::run(&cfg).await;
    let result = async {
        let summary = report?.summary();
        let st = status(&gw).await?;
        let peaks = st["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("?").to_string(),
                    r["peak_in_flight"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let diverted = metric(&gw, "ringgate_diverted_total{reason=\"load\"}").await?;
        Ok::<_, AnalysisError>(LoadRun {
            hash: hash.slug(),
            concurrency,
            factor,
            served: summary.per_server.into_iter().collect(),
            peaks,
            diverted: diverted / summary.total.max(1) as f64,
            failed: summary.failed,
        })
    }
    .await;
    gw.stop().await;
    result
}

/// The slow-start run.
#[derive(Debug, Clone)]
pub struct SlowStart {
    pub window_secs: u64,
    /// `(seconds since the replacement answered first, share of its keys it answered)`.
    pub share: Vec<(f64, f64)>,
    pub keys_of_victim: usize,
    pub moved_twice: usize,
    pub failed: u64,
    pub total: u64,
}

async fn slow_start_run(bin: &Path, window: u64) -> Result<SlowStart, AnalysisError> {
    let mut spec = GatewaySpec::new(3, HashChoice::Mix64);
    spec.health_interval = "500ms";
    spec.recovery_delay = "500ms";
    spec.health_extra = format!("slow_start = \"{window}s\"\n");
    let gw = LabGateway::start(bin, &spec).await?;
    let keys: Arc<[String]> = (0..2000u64).map(|k| (100_000 + k).to_string()).collect();
    let secs = 3 + window + 6;
    let mut cfg = LoadConfig::new(gw.url("/home"), 0, 16);
    cfg.requests = None;
    cfg.duration = Some(Duration::from_secs(secs));
    cfg.keys = KeyPlan::List(keys.clone());
    let t0 = std::time::Instant::now();
    let load = tokio::spawn(async move { loadgen::run(&cfg).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim = "server-3";
    let pid = status(&gw).await?["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == victim)
        .and_then(|r| r["instance"].as_str()?.parse::<u32>().ok());
    let killed_at = t0.elapsed();
    if let Some(pid) = pid {
        signal(pid, "KILL");
    }
    let report = load
        .await
        .map_err(|e| AnalysisError::Bench(format!("load task: {e}")))?;
    gw.stop().await;
    Ok(analyse_slow_start(
        &report?, &keys, victim, window, killed_at,
    ))
}

/// The share of the victim's keys it answers over time, from when its replacement first
/// answered; and the keys whose owner changed more than once from then on.
pub fn analyse_slow_start(
    report: &Report,
    keys: &[String],
    victim: &str,
    window: u64,
    killed_at: Duration,
) -> SlowStart {
    let key_of = |seq: u64| (seq % keys.len() as u64) as usize;
    let mut first_owner: HashMap<usize, String> = HashMap::new();
    let mut records: Vec<_> = report.records.iter().filter(|r| r.is_ok()).collect();
    records.sort_by_key(|r| r.offset);
    for r in records.iter().filter(|r| r.offset < killed_at) {
        if let Some(s) = &r.server {
            first_owner
                .entry(key_of(r.seq))
                .or_insert_with(|| s.clone());
        }
    }
    let theirs: Vec<usize> = first_owner
        .iter()
        .filter(|(_, s)| s.as_str() == victim)
        .map(|(k, _)| *k)
        .collect();
    // Requests the victim answered just before it died can finish after the kill: its
    // replacement starts after `recovery_delay` (500 ms) at the earliest.
    let back = records
        .iter()
        .find(|r| {
            r.offset > killed_at + Duration::from_millis(300) && r.server.as_deref() == Some(victim)
        })
        .map(|r| r.offset)
        .unwrap_or(killed_at);
    let mut buckets: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut owners: HashMap<usize, Vec<String>> = HashMap::new();
    for r in records.iter().filter(|r| r.offset >= back) {
        let k = key_of(r.seq);
        let Some(s) = &r.server else { continue };
        let h = owners.entry(k).or_default();
        if h.last() != Some(s) {
            h.push(s.clone());
        }
        if theirs.contains(&k) {
            let b = buckets
                .entry((r.offset - back).as_millis() as u64 / 500)
                .or_default();
            b.1 += 1;
            if s == victim {
                b.0 += 1;
            }
        }
    }
    SlowStart {
        window_secs: window,
        share: buckets
            .iter()
            .map(|(b, (mine, all))| (*b as f64 * 0.5, *mine as f64 / (*all).max(1) as f64))
            .collect(),
        keys_of_victim: theirs.len(),
        moved_twice: owners.values().filter(|h| h.len() > 2).count(),
        failed: report.records.iter().filter(|r| !r.is_ok()).count() as u64,
        total: report.records.len() as u64,
    }
}

/// Runs the experiments and rewrites the balancing section of the report.
pub async fn run(args: BalancingArgs) -> Result<(), AnalysisError> {
    let bin = match &args.gateway_bin {
        Some(b) => b.clone(),
        None => crate::procs::product_binary("ringgate")?,
    };
    let mut runs = Vec::new();
    for hash in [HashChoice::Default, HashChoice::Mix64] {
        for &c in &args.concurrency {
            for factor in [0.0, args.factor] {
                eprintln!("bounded loads: {} c={c} factor={factor}", hash.label());
                runs.push(bounded_run(&bin, hash.clone(), factor, c, args.requests).await?);
            }
        }
    }
    eprintln!("slow start: {} s", args.slow_start_secs);
    let ss = slow_start_run(&bin, args.slow_start_secs).await?;

    let mut md = format!(
        "_Measured by `ringgate-lab analysis balancing` (`make analysis`): three `ringgate-server` \
replicas, {} requests with random 6-digit keys per run._\n\n### Bounded loads (`ring.balance_factor`)\n\n\
| hash | concurrency | balance_factor | max/mean requests served | max/mean peak in flight | requests that left their owner | failed |\n\
|---|---|---|---|---|---|---|\n",
        args.requests
    );
    for r in &runs {
        let served: Vec<u64> = r.served.iter().map(|(_, n)| *n).collect();
        let peaks: Vec<u64> = r.peaks.iter().map(|(_, n)| *n).collect();
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.1}% | {} |\n",
            r.hash,
            r.concurrency,
            if r.factor == 0.0 {
                "off".to_string()
            } else {
                format!("{}", r.factor)
            },
            max_over_mean(&served),
            max_over_mean(&peaks),
            100.0 * r.diverted,
            r.failed
        ));
    }
    let panels: Vec<charts::BarPanel> = runs
        .iter()
        .filter(|r| r.concurrency == args.concurrency.last().copied().unwrap_or(64))
        .map(|r| charts::BarPanel {
            title: format!(
                "{} factor {}",
                r.hash,
                if r.factor == 0.0 {
                    "off".into()
                } else {
                    r.factor.to_string()
                }
            ),
            labels: r.peaks.iter().map(|(n, _)| n.clone()).collect(),
            values: r.peaks.iter().map(|(_, v)| *v as f64).collect(),
            ideal: None,
        })
        .collect();
    let bars = charts::bars(
        &args.out,
        "bounded_load_peaks",
        "Peak requests in flight per server, bounded loads off and on",
        "peak in flight",
        &panels,
    )?;
    if let Some(f) = bars.first() {
        md.push_str(&format!(
            "\n![Peak in flight per server]({})\n",
            report::link(&args.doc, f)
        ));
    }
    md.push_str(&format!(
        "\n### Slow start (`health.slow_start = \"{}s\"`)\n\nA replica of N = 3 is SIGKILLed under steady \
load over 2,000 keys; its replacement (same id and slots) takes its {} keys over gradually. \
{} of {} requests failed; keys whose owner changed more than once after the replacement first \
answered: **{}**.\n",
        ss.window_secs, ss.keys_of_victim, ss.failed, ss.total, ss.moved_twice
    ));
    let line = charts::lines(
        &args.out,
        "slow_start_share",
        "Share of its keys the replacement answers",
        ("seconds since it first answered", "share of its keys"),
        &[charts::LinePanel {
            title: format!("slow_start = {}s", ss.window_secs),
            series: vec![charts::Series {
                name: "answered by the replacement".into(),
                points: ss.share.clone(),
                dashed: false,
            }],
        }],
    )?;
    if let Some(f) = line.first() {
        md.push_str(&format!(
            "\n![Slow start share]({})\n",
            report::link(&args.doc, f)
        ));
    }
    let old = std::fs::read_to_string(&args.doc).unwrap_or_default();
    std::fs::write(&args.doc, report::BALANCING.replace(&old, &md))
        .map_err(|e| AnalysisError::io(format!("writing {}", args.doc.display()), e))?;
    println!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_over_mean_of_loads() {
        assert_eq!(max_over_mean(&[10, 10, 10]), 1.0);
        assert_eq!(max_over_mean(&[30, 0, 0]), 3.0);
        assert_eq!(max_over_mean(&[]), 0.0);
    }
}
