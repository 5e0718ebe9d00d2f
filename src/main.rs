//! The `punica` command line: parses arguments and dispatches into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use punica::engine::model::gguf::{ImportDtype, import_gguf};

/// Multi-tenant LoRA serving: one base LLM, many adapters, one batch.
#[derive(Debug, Parser)]
#[command(name = "punica", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model files: conversion and inspection.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Debug, Subcommand)]
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model {
            command:
                ModelCommand::ImportGguf {
                    file,
                    out_dir,
                    dtype,
                },
        } => import_gguf(&file, &out_dir, dtype).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
