//! The `punica` command line: parses arguments and dispatches into the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use punica::config::SettingsArgs;
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
        Err(e) => fail(&e),
    }
}

async fn run(cli: Cli) -> Result<(), StartupError> {
    match cli.command {
        Command::Serve { settings } => {
            let settings = settings.load()?;
            telemetry::init(&settings.log);
            startup::serve(settings).await
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
    }
}

/// The one line a failed start leaves on stderr.
fn fail(error: &StartupError) -> ExitCode {
    eprintln!("punica: error: {}", telemetry::error_chain(error));
    ExitCode::FAILURE
}
