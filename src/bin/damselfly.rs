//! The `damselfly` binary: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use damselfly::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "damselfly",
    version,
    about = "Node-local image distribution: a verified registry mirror for containerd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the registry mirror, the cache, and telemetry.
    #[command(
        after_help = "Examples:\n  damselfly daemon\n  damselfly daemon --config /etc/damselfly/damselfly.toml"
    )]
    Daemon {
        /// TOML config file. Without it the built-in defaults apply.
        #[arg(long, short, env = "DAMSELFLY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the result with defaults applied.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the configuration reference (Markdown), generated from the code.
    Reference,
}

fn load(path: Option<&PathBuf>) -> Result<Config, config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Config::defaults(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon { config } => {
            let cfg = match load(config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("damselfly: {e}");
                    return ExitCode::from(2);
                }
            };
            damselfly::telemetry::init_logging(&cfg.telemetry);
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("damselfly: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
                let token = tokio_util::sync::CancellationToken::new();
                damselfly::daemon::cancel_on_signals(token.clone())
                    .map_err(damselfly::daemon::DaemonError::Listen)?;
                damselfly::daemon::run(cfg, token).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "damselfly failed");
                    eprintln!("damselfly: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config(ConfigCommand::Check { config }) => match load(config.as_ref()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("damselfly: {e}");
                ExitCode::from(2)
            }
        },
        Command::Config(ConfigCommand::Reference) => {
            print!("{}", config::reference_markdown());
            ExitCode::SUCCESS
        }
    }
}
