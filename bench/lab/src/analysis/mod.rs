//! Performance analysis: the experiments of the specification (A-1 … A-4, ring movement,
//! failover) run against live gateways this module starts itself, drawn as charts (`docs/img/`)
//! and written up in `docs/performance.md`; plus the driver of the proxy comparison behind
//! `make bench`.
//!
//! Owns: what is measured and how it is reported. Must not touch: the product's logic (it drives
//! the `ringgate` binary like an operator does; only [`theory`] calls the library's ring and hash
//! functions, to compute what they can reach).
//!
//! # Layout
//! - [`gateway`]: start/stop a gateway with a temporary config, call its API.
//! - [`experiments`]: the experiments and their result types.
//! - [`theory`]: what the specified hash functions can reach, computed.
//! - [`charts`]: plotters charts (SVG, or PNG where the SVG would be too big).
//! - [`report`]: the markdown report and its sections.
//! - [`proxies`]: ringgate against NGINX and HAProxy (`make bench`).
//! - [`proxies_tls`]: the same three terminating TLS (`make bench`, its TLS section), with
//!   [`handshakes`], a client of full TLS handshakes.

pub mod balancing;
pub mod charts;
pub mod experiments;
pub mod gateway;
pub mod handshakes;
pub mod proxies;
pub mod proxies_tls;
pub mod report;
pub mod theory;

use std::path::{Path, PathBuf};

use gateway::HashChoice;

use crate::loadgen::{ErrorKind, LoadError};

/// Errors of the analysis and benchmark tooling.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway: {0}")]
    Gateway(String),
    #[error("{0}")]
    Process(String),
    #[error("request to {url} failed: {kind}")]
    Request { url: String, kind: ErrorKind },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("chart {0}")]
    Chart(String),
    #[error("benchmark: {0}")]
    Bench(String),
}

impl AnalysisError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AnalysisError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The experiments `ringgate-lab analysis` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    A1,
    A2,
    A3,
    A4,
    Movement,
    /// A replica SIGKILLed every few seconds under load: detection, restore, failed requests.
    Failover,
}

/// `ringgate-lab analysis`: run the experiments, draw the charts, regenerate the report.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalysisArgs {
    #[command(subcommand)]
    pub command: Option<AnalysisCommand>,
    /// The `ringgate` binary to start gateways with (default: `ringgate` next to this executable)
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Where charts are written (committed beside the report, so a fresh clone shows them)
    #[arg(long, default_value = "docs/img")]
    pub out: PathBuf,
    /// The report to regenerate
    #[arg(long, default_value = "docs/performance.md")]
    pub doc: PathBuf,
    /// Requests per load run
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub requests: u64,
    /// Concurrency of the load runs
    #[arg(short = 'c', long, default_value_t = 32)]
    pub concurrency: usize,
    /// Run only these experiments (comma-separated; default: all)
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Experiment>,
    /// The Lua policy files of A-4's Lua variant (comma-separated; missing files are skipped)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "policies/examples/spread_hash.lua,policies/examples/spread_vnodes.lua"
    )]
    pub lua_policy: Vec<PathBuf>,
    /// Distinct keys routed for the ring-movement experiment
    #[arg(long, default_value_t = 3000)]
    pub movement_keys: usize,
    /// Length of the A-3 load, seconds
    #[arg(long, default_value_t = 8)]
    pub a3_secs: u64,
    /// Length of the failover run, seconds
    #[arg(long, default_value_t = 20)]
    pub failover_secs: u64,
    /// Seconds between two kills in the failover run
    #[arg(long, default_value_t = 4)]
    pub failover_every: u64,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AnalysisCommand {
    /// Throughput of ringgate against NGINX and HAProxy over the same backends (`make bench`)
    Proxies(proxies::ProxiesArgs),
    /// Bounded loads and slow start on live gateways (part of `make analysis`)
    Balancing(balancing::BalancingArgs),
    /// ringgate, NGINX and HAProxy terminating TLS over the same backends (`make bench`)
    Tls(proxies_tls::TlsArgs),
}

/// Everything one `ringgate-lab analysis` run measured.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub requests: u64,
    pub concurrency: usize,
    /// Per hash choice (label), the load per server for each N.
    pub per_hash: Vec<(String, Vec<experiments::Distribution>)>,
    pub movement: Vec<experiments::Movement>,
    pub resilience: Option<experiments::Resilience>,
    pub failover: Option<experiments::Failover>,
    /// The same failover run with `retry_on` including "reset".
    pub failover_reset: Option<experiments::Failover>,
    /// Notes on experiments that were skipped or failed.
    pub notes: Vec<String>,
}

/// Runs `ringgate-lab analysis`.
pub async fn run_cli(args: AnalysisArgs) -> Result<(), AnalysisError> {
    match args.command {
        Some(AnalysisCommand::Proxies(p)) => return proxies::run(p).await,
        Some(AnalysisCommand::Balancing(b)) => return balancing::run(b).await,
        Some(AnalysisCommand::Tls(t)) => return proxies_tls::run(t).await,
        None => {}
    }
    let bin = match &args.gateway_bin {
        Some(b) => b.clone(),
        None => crate::procs::product_binary("ringgate")?,
    };
    let results = run_experiments(&args, &bin).await;
    let charts = draw_charts(&args.out, &results)?;
    let md = report::render(&results, &charts, &args.doc);
    report::write_doc(&args.doc, &md)?;
    print!("{}", report::console_summary(&results));
    eprintln!("report written to {}", args.doc.display());
    Ok(())
}

fn wants(args: &AnalysisArgs, e: Experiment) -> bool {
    args.only.is_empty() || args.only.contains(&e)
}

async fn run_experiments(args: &AnalysisArgs, bin: &Path) -> Results {
    let mut r = Results {
        requests: args.requests,
        concurrency: args.concurrency,
        ..Results::default()
    };
    let mut choices = vec![HashChoice::Default];
    if wants(args, Experiment::A4) || wants(args, Experiment::Movement) {
        choices.push(HashChoice::Mix64);
        let (found, missing): (Vec<PathBuf>, Vec<PathBuf>) =
            args.lua_policy.iter().cloned().partition(|p| p.is_file());
        for m in &missing {
            r.notes
                .push(format!("Lua policy `{}` not found.", m.display()));
        }
        if found.is_empty() {
            r.notes.push(
                "No Lua policy found: the Lua variant of A-4 and ring movement was skipped."
                    .to_string(),
            );
        } else {
            choices.push(HashChoice::Lua(found));
        }
    }
    let ns: Vec<u32> = if wants(args, Experiment::A2) || wants(args, Experiment::A4) {
        (2..=6).collect()
    } else {
        vec![3]
    };
    let any_load =
        wants(args, Experiment::A1) || wants(args, Experiment::A2) || wants(args, Experiment::A4);
    for choice in &choices {
        if any_load && (*choice == HashChoice::Default || wants(args, Experiment::A4)) {
            eprintln!("load per server, {}", choice.label());
            match experiments::load_per_server(bin, choice, &ns, args.requests, args.concurrency)
                .await
            {
                Ok(d) => r.per_hash.push((choice.label().to_string(), d)),
                Err(e) => r
                    .notes
                    .push(format!("load per server with {}: {e}", choice.label())),
            }
        }
        if wants(args, Experiment::Movement) {
            match experiments::movement(bin, choice, args.movement_keys).await {
                Ok(m) => r.movement.push(m),
                Err(e) => r
                    .notes
                    .push(format!("ring movement with {}: {e}", choice.label())),
            }
        }
    }
    if wants(args, Experiment::A3) {
        match experiments::resilience(bin, args.a3_secs).await {
            Ok(x) => r.resilience = Some(x),
            Err(e) => r.notes.push(format!("A-3: {e}")),
        }
    }
    if wants(args, Experiment::Failover) {
        let (secs, every) = (args.failover_secs, args.failover_every);
        match experiments::failover(bin, secs, every, experiments::RETRY_ON_DEFAULT).await {
            Ok(x) => r.failover = Some(x),
            Err(e) => r.notes.push(format!("failover: {e}")),
        }
        match experiments::failover(bin, secs, every, experiments::RETRY_ON_RESET).await {
            Ok(x) => r.failover_reset = Some(x),
            Err(e) => r.notes.push(format!("failover with reset retries: {e}")),
        }
    }
    for n in &r.notes {
        eprintln!("note: {n}");
    }
    r
}

/// Chart files by name (`a1`, `a2`, `a4_a1`, `a4_a2`, `movement`, `a3`).
pub type ChartFiles = Vec<(&'static str, Vec<PathBuf>)>;

fn draw_charts(out: &Path, r: &Results) -> Result<ChartFiles, AnalysisError> {
    let mut files: ChartFiles = Vec::new();
    let bar_panel = |label: &str, d: &experiments::Distribution| charts::BarPanel {
        title: format!("{label}, N={}", d.n),
        labels: d.servers.iter().map(|s| s.0.clone()).collect(),
        values: d.counts().collect(),
        ideal: Some(d.total() / d.servers.len().max(1) as f64),
    };
    let line_panel = |label: &str, ds: &[experiments::Distribution]| charts::LinePanel {
        title: label.to_string(),
        series: vec![
            charts::Series {
                name: "mean".into(),
                points: ds.iter().map(|d| (f64::from(d.n), d.mean())).collect(),
                dashed: false,
            },
            charts::Series {
                name: "max".into(),
                points: ds.iter().map(|d| (f64::from(d.n), d.max())).collect(),
                dashed: true,
            },
            charts::Series {
                name: "min".into(),
                points: ds.iter().map(|d| (f64::from(d.n), d.min())).collect(),
                dashed: true,
            },
            charts::Series {
                name: "mean + stddev".into(),
                points: ds
                    .iter()
                    .map(|d| (f64::from(d.n), d.mean() + d.stddev()))
                    .collect(),
                dashed: true,
            },
        ],
    };
    let n3 = |ds: &[experiments::Distribution]| ds.iter().find(|d| d.n == 3).cloned();
    if let Some((label, ds)) = r.per_hash.first() {
        if let Some(d) = n3(ds) {
            let f = charts::bars(
                out,
                "a1_requests_per_server",
                &format!("A-1: {} requests over N=3", r.requests),
                "requests",
                &[bar_panel(label, &d)],
            )?;
            files.push(("a1", f));
        }
        if ds.len() > 1 {
            let f = charts::lines(
                out,
                "a2_load_vs_n",
                "A-2: requests per server as N grows",
                ("N", "requests per server"),
                &[line_panel(label, ds)],
            )?;
            files.push(("a2", f));
        }
    }
    if r.per_hash.len() > 1 {
        let panels: Vec<_> = r
            .per_hash
            .iter()
            .filter_map(|(l, ds)| n3(ds).map(|d| bar_panel(l, &d)))
            .collect();
        files.push((
            "a4_a1",
            charts::bars(
                out,
                "a4_a1_compare",
                "A-4: A-1 per hash choice",
                "requests",
                &panels,
            )?,
        ));
        let panels: Vec<_> = r.per_hash.iter().map(|(l, ds)| line_panel(l, ds)).collect();
        files.push((
            "a4_a2",
            charts::lines(
                out,
                "a4_a2_compare",
                "A-4: A-2 per hash choice",
                ("N", "requests per server"),
                &panels,
            )?,
        ));
    }
    if !r.movement.is_empty() {
        let panels: Vec<_> = r
            .movement
            .iter()
            .map(|m| charts::BarPanel {
                title: m.hash.clone(),
                labels: vec!["add: 3 → 4".into(), "remove: 4 → 3".into()],
                values: vec![100.0 * m.add_moved, 100.0 * m.rm_moved],
                ideal: Some(25.0),
            })
            .collect();
        files.push((
            "movement",
            charts::bars(
                out,
                "ring_movement",
                "Keys that change server (%), ideal 1/(N+1) = 25%",
                "% of keys moved",
                &panels,
            )?,
        ));
    }
    if let Some(x) = &r.resilience {
        files.push((
            "a3",
            charts::timeline(
                out,
                "a3_timeline",
                &format!(
                    "A-3: replica {} killed under load",
                    x.killed.as_deref().unwrap_or("?")
                ),
                &x.timeline,
            )?,
        ));
    }
    Ok(files)
}
