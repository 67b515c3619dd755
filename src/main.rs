//! `ringgate`: the gateway and its tools as clap subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ringgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load generator against a loopback URL and print the summary
    Load(ringgate::loadgen::LoadArgs),
    /// Run the performance experiments against live gateways; charts and docs/performance.md
    Analysis(ringgate::analysis::AnalysisArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Load(args) => ringgate::loadgen::run_cli(args)
            .await
            .map(|_| ())
            .map_err(Into::into),
        Command::Analysis(args) => ringgate::analysis::run_cli(args).await.map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
