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
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Load(args) => loadgen::run_cli(args)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Command::Analysis(args) => analysis::run_cli(*args).await.map_err(|e| e.to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringgate-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
