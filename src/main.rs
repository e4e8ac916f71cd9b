//! The `k3rs` binary: command line and process wiring.

use clap::{Parser, Subcommand};

/// k3rs: a lightweight, all-in-one Kubernetes distribution.
#[derive(Debug, Parser)]
#[command(name = "k3rs", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server (API server, controllers, scheduler, embedded store and agent).
    Server,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Server => {
            anyhow::bail!("`k3rs server` is not built yet: the API server lands with issue #3")
        }
    }
}
