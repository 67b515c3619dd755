//! `ringgate-lab`: the load generator and the performance analysis. This file only parses
//! arguments and runs the chosen tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringgate_lab::{analysis, loadgen};

#[derive(Parser)]
#[command(
    name = "ringgate-lab",
    version,
    about = "ringgate's lab: load generator, analysis experiments, proxy benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load generator against a loopback URL and print the summary.
    Load(loadgen::LoadArgs),
    /// Run the performance experiments against live gateways; charts and docs/performance.md.
    Analysis(Box<analysis::AnalysisArgs>),
    /// The lightest HTTP/1.1 backend we can make (for `make bench`): SERVER_ID, PORT, BIND.
    Backend,
    /// The floor of `make bench`: a proxy that only moves bytes (FORWARD_TO, THREADS, PORT, BIND).
    Forward,
}

/// Runs `f` on a multi-threaded runtime of its own.
fn on_runtime<F: std::future::Future<Output = Result<(), String>>>(f: F) -> Result<(), String> {
    tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(f))
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Load(args) => on_runtime(async {
            loadgen::run_cli(args)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
        Command::Analysis(args) => {
            on_runtime(async { analysis::run_cli(*args).await.map_err(|e| e.to_string()) })
        }
        // Single-threaded on a runtime of its own: the lightest backend we can make.
        Command::Backend => ringgate_lab::backend::run(),
        // One current-thread runtime per thread, as the gateway's serving threads.
        Command::Forward => ringgate_lab::forward::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringgate-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
