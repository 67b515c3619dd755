//! `ringgate`: the gateway and its tools.
//!
//! This file parses arguments, sets up tracing, loads and validates the config (with the
//! command-line overrides, which are validated too), binds the listeners (plain and TLS as the
//! config says), installs the signal handlers, prints the `listening on` lines and chooses the
//! exit code (2 for a config problem, a bad certificate included). The gateway itself runs
//! in the library ([`ringgate::gateway`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringgate::config::{Config, ProviderKind};
use ringgate::gateway::{serving_threads, Gateway, Listeners};
use ringgate::policy::PolicySet;

#[derive(Parser)]
#[command(
    name = "ringgate",
    version,
    about = "A load-balancing HTTP gateway on a consistent-hash ring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (defaults apply when the default path does not exist).
        #[arg(long, default_value = "conf/lb.toml")]
        config: PathBuf,
        /// Listen address, overriding `listen` in the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Provider, overriding `provider.kind`: auto, process, docker, swarm or static.
        #[arg(long)]
        provider: Option<ProviderKind>,
    },
    /// Validate a config; exits non-zero with every problem named.
    Check {
        #[arg(long, default_value = "conf/lb.toml")]
        config: PathBuf,
    },
    /// Print the ring a config builds: each server's virtual-node slots and share.
    Ring {
        #[arg(long, default_value = "conf/lb.toml")]
        config: PathBuf,
    },
    /// Replay random 6-digit keys through the ring offline and print the load per server.
    Simulate {
        #[arg(long, default_value = "conf/lb.toml")]
        config: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// A Lua policy file to simulate instead of the policy directory.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

/// Why `ringgate` exits non-zero: a config or argument problem (exit 2), or a failure while
/// running (exit 1).
enum Failure {
    Config(String),
    Run(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Config(_) => 2,
            Failure::Run(_) => 1,
        }
    }
}

fn load(path: &Path, explicit_default: bool) -> Result<Config, Failure> {
    if !path.exists() && explicit_default {
        tracing::warn!(path = %path.display(), "config file not found; using defaults");
        return Ok(Config::default());
    }
    Config::load(path).map_err(|e| Failure::Config(e.to_string()))
}

/// The config with the command-line overrides applied, validated as a whole again.
fn with_overrides(
    mut config: Config,
    listen: Option<SocketAddr>,
    provider: Option<ProviderKind>,
) -> Result<Config, Failure> {
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(p) = provider {
        config.provider.kind = p;
    }
    let problems = config.problems();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(Failure::Config(format!(
            "the config with the command-line overrides is invalid:\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )))
    }
}

/// The policy the offline tools use: `--policy FILE`, else the config's policy directory.
fn active_policy(config: &Config, file: Option<&Path>) -> Result<PolicySet, Failure> {
    match file {
        Some(f) => ringgate::tools::load_policy_file(f, config),
        None => PolicySet::load_dir(&config.policy.dir, config.policy.limits(), 1)
            .map_err(|e| e.to_string()),
    }
    .map_err(Failure::Config)
}

/// Raises the open-files limit to its hard limit: every client connection, upstream connection
/// and replica pipe is a descriptor, and the connection cap is derived from this limit.
fn raise_nofile() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(nofile = n, "open-files limit raised to its hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// Binds, starts, announces and serves until SIGTERM or SIGINT.
fn serve(config: Config, watched: Option<PathBuf>) -> Result<(), Failure> {
    raise_nofile();
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::Run(format!("cannot start the runtime: {e}")))?;
    let run = |e: ringgate::gateway::StartError| match e {
        ringgate::gateway::StartError::Tls(_) => Failure::Config(e.to_string()),
        e => Failure::Run(e.to_string()),
    };
    let served = runtime.block_on(async move {
        let listeners = Listeners::for_config(&config, serving_threads()).map_err(run)?;
        let shutdown = shutdown_signal()
            .map_err(|e| Failure::Run(format!("cannot install the signal handlers: {e}")))?;
        let gateway = Gateway::start(config, listeners, watched)
            .await
            .map_err(run)?;
        reopen_on_sighup(gateway.access_log().clone())
            .map_err(|e| Failure::Run(format!("cannot install the SIGHUP handler: {e}")))?;
        if let Err(e) =
            ringgate::listening::announce_gateway(gateway.plain_addr(), gateway.tls_addr())
        {
            tracing::warn!(error = %e, "cannot print the listening line on stdout");
        }
        gateway.serve(shutdown).await.map_err(run)
    });
    // The gateway has drained; a blocking task still running (a simulation, a state build)
    // must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(250));
    served
}

/// SIGHUP reopens the access log file (logrotate's `postrotate`), instead of ending the process.
fn reopen_on_sighup(log: std::sync::Arc<ringgate::access_log::AccessLog>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reopening the access log");
            log.reopen();
        }
    });
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let default_path = Path::new("conf/lb.toml");
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            provider,
        } => load(&config, config == default_path)
            .and_then(|c| with_overrides(c, listen, provider))
            .and_then(|c| serve(c, config.exists().then_some(config))),
        Command::Check { config } => load(&config, false).and_then(|c| {
            let text = Config::read_text(&config).map_err(|e| Failure::Config(e.to_string()))?;
            let replicas =
                ringgate::tools::check_replicas(&config, &text, &c).map_err(Failure::Config)?;
            let policy = ringgate::tools::check_policy(&c).map_err(Failure::Config)?;
            let tls = ringgate::tools::check_tls(&c).map_err(Failure::Config)?;
            println!("{}: OK: {}", config.display(), ringgate::tools::summary(&c));
            print!("{replicas}{policy}{tls}");
            Ok(())
        }),
        Command::Ring { config } => load(&config, config == default_path).and_then(|c| {
            let policy = active_policy(&c, None)?;
            let report = ringgate::tools::ring_report(&c, &policy)
                .map_err(|e| Failure::Config(e.to_string()))?;
            print!("{report}");
            Ok(())
        }),
        Command::Simulate {
            config,
            keys,
            seed,
            policy,
        } => load(&config, config == default_path).and_then(|c| {
            let policy = active_policy(&c, policy.as_deref())?;
            let report = ringgate::tools::simulate_report(&c, &policy, keys, seed)
                .map_err(|e| Failure::Config(e.to_string()))?;
            print!("{report}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let code = failure.code();
            let (Failure::Config(e) | Failure::Run(e)) = failure;
            eprintln!("ringgate: {e}");
            ExitCode::from(code)
        }
    }
}
