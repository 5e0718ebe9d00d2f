//! The `punica` command line: parses arguments and dispatches into the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "punica", version, about = "Multi-tenant LoRA serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// CPU decode tokens/s of a model at several batch sizes.
    Cpu(punica::engine::model::bench::CpuBenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(BenchCommand::Cpu(args)) => {
            print!("{}", punica::engine::model::bench::run(&args)?)
        }
    }
    Ok(())
}
