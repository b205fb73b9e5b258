//! The `agentd` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentd",
    version,
    about = "Contain AI agents with kernel-enforced policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what this host can enforce, found by loading real programs (needs root).
    ///
    /// Exits 0 when agentd can contain agents here, 1 when it cannot.
    ///
    /// Examples:
    ///   sudo agentd doctor
    ///   sudo agentd doctor --json | jq '.checks[] | select(.status != "ok")'
    #[command(verbatim_doc_comment)]
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor { json } => {
            let report = agentd::doctor::run();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializable")
                );
            } else {
                print!("{}", agentd::doctor::render(&report));
            }
            if report.usable {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
