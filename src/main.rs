//! The `punica` command line: parses arguments and dispatches into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use punica::config::SettingsArgs;
use punica::engine::model::gguf::{ImportDtype, import_gguf};
use punica::startup::{self, OperatorOutcome, StartupError};
use punica::telemetry;

#[derive(Parser)]
#[command(
    name = "punica",
    version,
    about = "Multi-tenant LoRA serving: one base model, many adapters, one batch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (HTTP API, console, engine).
    Serve {
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Manage operator (administrator) accounts.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Model files: conversion and inspection.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run every backend op on fresh random inputs against a reference; exit non-zero on failure.
    Selftest {
        #[arg(long, value_enum, default_value = "cuda")]
        device: SelftestDevice,
        /// RNG seed for the inputs (fresh each run unless given).
        #[arg(long)]
        seed: Option<u64>,
        /// Also check the whole model in this folder: the same greedy tokens on CUDA and on
        /// the CPU (import it with `--dtype bf16` so both start from the same weights).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SelftestDevice {
    Cuda,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// CPU decode tokens/s of a model at several batch sizes (f32 CPU backend).
    Cpu(punica::engine::model::bench::CpuBenchArgs),
    /// The whole engine under a synthetic multi-adapter workload: tokens/s, TTFT, ITL.
    Engine(punica::engine::bench::BenchEngineArgs),
    /// The SGMV LoRA operator on the CUDA GPU, on the ANCHORS.md grid.
    Kernels {
        /// Graph replays per configuration (the median is reported).
        #[arg(long, default_value_t = 15)]
        replays: usize,
        /// Disable the shrink/expand overlap (programmatic dependent launch).
        #[arg(long)]
        no_pdl: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Convert a Llama GGUF file into a Hugging Face style model folder.
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// The folder to create (must not exist, or be empty).
        out_dir: PathBuf,
        /// Weight dtype of the written safetensors.
        #[arg(long, value_enum, default_value_t = ImportDtype::F32)]
        dtype: ImportDtype,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Create a console login for an operator (or reset its password). The password is read
    /// from PUNICA_OPERATOR_PASSWORD or else the first line of stdin.
    Create {
        /// The operator's email address (the login name).
        #[arg(long)]
        email: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&StartupError::Task(e.to_string())),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.as_ref()),
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Serve { settings } => {
            let settings = settings.load()?;
            telemetry::init(&settings.log);
            Ok(startup::serve(settings).await?)
        }
        Command::Operator {
            command: OperatorCommand::Create { email, settings },
        } => {
            let mut settings = settings.load()?;
            // Keep the command's own output clean: only warnings from the library.
            settings.log = "warn".into();
            telemetry::init(&settings.log);
            let password = std::env::var("PUNICA_OPERATOR_PASSWORD").ok();
            let (operator, outcome) = startup::create_operator(&settings, &email, password).await?;
            let verb = match outcome {
                OperatorOutcome::Created => "created",
                OperatorOutcome::PasswordReset => "password reset for",
            };
            println!("operator {verb} {} (id {})", operator.email, operator.id);
            Ok(())
        }
        Command::Model {
            command:
                ModelCommand::ImportGguf {
                    file,
                    out_dir,
                    dtype,
                },
        } => {
            telemetry::init("info");
            // Dequantising a model is CPU work: keep it off the async workers.
            tokio::task::spawn_blocking(move || import_gguf(&file, &out_dir, dtype)).await??;
            Ok(())
        }
        Command::Bench(BenchCommand::Cpu(args)) => {
            telemetry::init("warn");
            // The CPU backend computes on rayon's threads; keep the async workers free.
            let report =
                tokio::task::spawn_blocking(move || punica::engine::model::bench::run(&args))
                    .await??;
            print!("{report}");
            Ok(())
        }
        Command::Bench(BenchCommand::Engine(args)) => {
            telemetry::init(
                "warn,punica::engine::executor=debug,punica::engine::runtime=debug,punica::engine::backend::cuda=debug,punica::engine::backend::cuda::profile=info",
            );
            let report =
                tokio::task::spawn_blocking(move || punica::engine::bench::run(&args)).await??;
            print!("{report}");
            Ok(())
        }
        Command::Bench(BenchCommand::Kernels { replays, no_pdl }) => {
            telemetry::init("info");
            let ok = tokio::task::spawn_blocking(move || {
                punica::engine::backend::cuda::bench::main(replays, !no_pdl)
            })
            .await??;
            if ok {
                Ok(())
            } else {
                Err("a configuration failed its correctness check".into())
            }
        }
        Command::Selftest {
            device: SelftestDevice::Cuda,
            seed,
            model,
        } => {
            telemetry::init("info");
            let ok = tokio::task::spawn_blocking(move || {
                let ops = punica::engine::backend::cuda::selftest::main(seed)?;
                let whole = match &model {
                    Some(dir) => {
                        punica::engine::backend::cuda::parity::run(dir, seed.unwrap_or(1))?
                    }
                    None => true,
                };
                Ok::<bool, punica::engine::backend::BackendError>(ops && whole)
            })
            .await??;
            if ok {
                Ok(())
            } else {
                Err("self-test failed".into())
            }
        }
    }
}

/// The one line a failed start leaves on stderr.
fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("punica: error: {}", telemetry::error_chain(error));
    ExitCode::FAILURE
}
