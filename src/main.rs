//! The `punica` command line. Parses and dispatches; the logic lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "punica", version, about = "Multi-tenant LoRA serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Run every backend op on random inputs against the reference; exit non-zero on failure.
    Selftest {
        #[arg(long, value_enum, default_value = "cuda")]
        device: DeviceArg,
        /// RNG seed for the inputs (fresh each run unless given).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The SGMV LoRA operator on the ANCHORS.md grid.
    Kernels {
        /// Graph replays per configuration (the median is reported).
        #[arg(long, default_value_t = 15)]
        replays: usize,
        /// Disable the shrink/expand overlap (programmatic dependent launch).
        #[arg(long)]
        no_pdl: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Selftest {
            device: DeviceArg::Cuda,
            seed,
        } => punica::engine::backend::cuda::selftest::main(seed),
        Command::Bench {
            what: BenchCommand::Kernels { replays, no_pdl },
        } => punica::engine::backend::cuda::bench::main(replays, !no_pdl),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
