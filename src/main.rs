//! `ringgate`: the gateway and its tools. This file only parses arguments and wires.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringgate::config::{Config, ProviderKind};
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
        /// Provider, overriding `provider.kind`: auto, process, docker or static.
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

fn load(path: &Path, explicit_default: bool) -> Result<Config, String> {
    if !path.exists() && explicit_default {
        tracing::warn!(path = %path.display(), "config file not found; using defaults");
        return Ok(Config::default());
    }
    Config::load(path).map_err(|e| e.to_string())
}

/// The policy the offline tools use: `--policy FILE`, else the config's policy directory.
fn active_policy(config: &Config, file: Option<&Path>) -> Result<PolicySet, String> {
    match file {
        Some(f) => ringgate::tools::load_policy_file(f, config),
        None => PolicySet::load_dir(&config.policy.dir, config.policy.limits(), 1)
            .map_err(|e| e.to_string()),
    }
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
        } => load(&config, config == default_path).and_then(|mut c| {
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(p) = provider {
                c.provider.kind = p;
            }
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            let watched = config.exists().then_some(config);
            runtime
                .block_on(ringgate::app::run(c, watched))
                .map_err(|e| e.to_string())
        }),
        Command::Check { config } => load(&config, false).and_then(|c| {
            let policy = ringgate::tools::check_policy(&c)?;
            println!("{}: OK: {}", config.display(), ringgate::tools::summary(&c));
            print!("{policy}");
            Ok(())
        }),
        Command::Ring { config } => load(&config, config == default_path).and_then(|c| {
            let policy = active_policy(&c, None)?;
            let report = ringgate::tools::ring_report(&c, &policy).map_err(|e| e.to_string())?;
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
                .map_err(|e| e.to_string())?;
            print!("{report}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringgate: {e}");
            ExitCode::FAILURE
        }
    }
}
