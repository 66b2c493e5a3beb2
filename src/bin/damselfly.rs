//! The `damselfly` binary: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use damselfly::cli;
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
    /// Wire containerd to this node's mirror with hostsd, from the daemon's
    /// own config (`[[registry]]`, `[containerd]`, `mirror.listen`).
    #[command(subcommand, after_help = HOSTS_HELP)]
    Hosts(HostsCommand),
    /// Inspect and manage this node's cache (through the daemon's admin socket).
    #[command(after_help = CACHE_HELP)]
    Cache {
        #[command(flatten)]
        global: cli::Global,
        #[command(subcommand)]
        command: cli::CacheCommand,
    },
    /// The images this node has seen, and how complete each is.
    #[command(after_help = IMAGES_HELP)]
    Images {
        #[command(flatten)]
        global: cli::Global,
    },
    /// Peers in the swarm: members, roles, latency, bytes each way.
    #[command(after_help = PEERS_HELP)]
    Peers {
        #[command(flatten)]
        global: cli::Global,
    },
    /// This node's GPUs as prewarm rules see them (NVML, GPU Feature Discovery labels, or [gpu.assume]).
    #[command(after_help = GPU_HELP)]
    Gpu {
        #[command(flatten)]
        global: cli::Global,
    },
    /// The images this node prewarms before its pods ask.
    #[command(subcommand)]
    Prewarm(PrewarmCommand),
    /// The scaling sidecar: watches the autoscaler's signal and, before a
    /// scale-out lands, tells every daemon to warm the workload's images.
    #[command(after_help = SIDECAR_HELP, args_conflicts_with_subcommands = true)]
    Sidecar {
        /// TOML config file with a [sidecar] section and the cluster's [swarm].
        #[arg(long, short, env = "DAMSELFLY_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<SidecarCommand>,
    },
    /// Measure pulls through this node: cold against warm, and where the bytes came from.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print shell completions, e.g. `damselfly completions bash > /etc/bash_completion.d/damselfly`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

const CACHE_HELP: &str = "Examples:
  damselfly cache ls --sort size
  damselfly cache inspect registry.example.com/team/model:v3
  damselfly cache stats -o json
  damselfly cache verify --repair
  damselfly cache gc --dry-run --target 50GiB
  damselfly cache pin registry.example.com/team/model:v3

When the daemon is down, ls, inspect, stats, verify and images read the store
directly (read-only); gc, pin, unpin and verify --repair take the store's lock.

Exit codes:
  0  success
  1  the command failed (an I/O error, an image never pulled here, ...)
  2  invalid input: bad flags, digest, image reference or config file
  3  the daemon is needed and unreachable (not running, socket refused)
  4  cache verify found corrupt blobs (without --repair)";

const IMAGES_HELP: &str = "Examples:
  damselfly images
  damselfly images -o json | jq '.images[] | select(.complete < 1)'";

const PEERS_HELP: &str = "Examples:
  damselfly peers
  damselfly peers -o json";

const GPU_HELP: &str = "Examples:
  damselfly gpu
  damselfly gpu -o json | jq '.devices[].product'

With the daemon down, discovery runs here with the config's [gpu] section.";

#[derive(Subcommand)]
enum PrewarmCommand {
    /// Each rule, whether it matched and why, and each image's state,
    /// progress and bytes by source.
    #[command(after_help = PREWARM_HELP)]
    Status {
        #[command(flatten)]
        global: cli::Global,
    },
}

const PREWARM_HELP: &str = "Examples:
  damselfly prewarm status
  damselfly prewarm status -o json | jq '.images[] | {reference, state}'

Exit codes:
  0  success
  3  the daemon is unreachable (prewarm runs inside it)";

const SIDECAR_HELP: &str = "Examples:
  damselfly sidecar --config /etc/damselfly/sidecar
  damselfly sidecar status
  damselfly sidecar status -o json | jq '.intent.images[] | {reference, lead_time_s}'

Exit codes:
  0  stopped on SIGTERM (run); success (status)
  1  the sidecar failed (cannot join the swarm, cannot listen)
  2  invalid config: a bad or missing [sidecar] key, or a query Prometheus refuses
  3  status: the sidecar does not answer";

#[derive(Subcommand)]
enum SidecarCommand {
    /// The signal, the wanted replicas, the live intent, and each image's
    /// lead time and the nodes that hold it.
    Status {
        #[command(flatten)]
        global: cli::Global,
        #[command(flatten)]
        args: cli::SidecarStatusArgs,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Pull an image through the mirror as containerd does; report resolve
    /// time, time to first byte, total time, throughput and bytes by source.
    #[command(after_help = BENCH_HELP)]
    Pull {
        #[command(flatten)]
        global: cli::Global,
        #[command(flatten)]
        args: cli::BenchPullArgs,
    },
}

const BENCH_HELP: &str = "Examples:
  damselfly bench pull registry.example.com/team/model:v3
  damselfly bench pull --cold --runs 3 registry.example.com/team/model:v3
  damselfly bench pull --expect-warm -o json 123456789012.dkr.ecr.us-east-1.amazonaws.com/llm:v1
  damselfly bench pull --cri-socket /run/containerd/containerd.sock registry.example.com/team/model:v3

The verdict line says how the bytes split between the cache, peers and the
origin. With --expect-warm, a run that took any blob byte from the origin
fails the verdict.

Exit codes:
  0  success
  1  the pull failed (mirror error, wrong content, CRI error)
  2  invalid input: bad flags, image reference or config file
  3  --cold needs the daemon's admin socket and it is unreachable
  5  --expect-warm and a run took bytes from the origin";

const HOSTS_HELP: &str = "Examples:
  damselfly hosts apply --config /etc/damselfly      (the DaemonSet's hostsd init container)
  damselfly hosts check --config /etc/damselfly
  damselfly hosts remove

Exit codes are hostsd's (see `hostsd --help`): 0 done, 1 runtime failure,
2 bad input, 3 containerd's config needs a person, 4 check: not routed.";

#[derive(Subcommand)]
enum HostsCommand {
    /// Write certs.d/<registry>/hosts.toml for every configured registry.
    Apply {
        #[arg(long, short, env = "DAMSELFLY_CONFIG")]
        config: Option<PathBuf>,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Report what containerd will do for each registry; warns about a SOCI
    /// snapshotter or another program on the mirror's port.
    Check {
        #[arg(long, short, env = "DAMSELFLY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Put back every hosts.toml hostsd replaced; delete the ones it created.
    Remove {
        #[arg(long, short, env = "DAMSELFLY_CONFIG")]
        config: Option<PathBuf>,
        /// Also put back config.toml if hostsd added its config_path.
        #[arg(long)]
        restore_config: bool,
    },
}

fn hosts(command: HostsCommand) -> ExitCode {
    let path = match &command {
        HostsCommand::Apply { config, .. }
        | HostsCommand::Check { config }
        | HostsCommand::Remove { config, .. } => config.clone(),
    };
    let cfg = match load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("damselfly: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = damselfly::daemon::hosts_options(&cfg, cfg.mirror.listen);
    let result = match command {
        HostsCommand::Apply { dry_run, .. } => {
            hostsd::reconcile(&hostsd::ReconcileOptions { dry_run, ..opts }).map(|r| {
                print!("{r}");
                ExitCode::SUCCESS
            })
        }
        HostsCommand::Check { .. } => hostsd::check(&opts).map(|r| {
            print!("{r}");
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            }
        }),
        HostsCommand::Remove { restore_config, .. } => hostsd::remove(&hostsd::ReconcileOptions {
            restore_config,
            ..opts
        })
        .map(|r| {
            print!("{r}");
            ExitCode::SUCCESS
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("damselfly: hostsd: {e}");
        ExitCode::from(match e.kind() {
            hostsd::ErrorKind::Input => 2,
            hostsd::ErrorKind::NodeConfig => 3,
            hostsd::ErrorKind::Discovery => 5,
            hostsd::ErrorKind::Runtime => 1,
        })
    })
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

/// Loads the config, starts logging and a runtime, and runs `service` until
/// SIGTERM or SIGINT: `damselfly daemon` and `damselfly sidecar`. A bad
/// config exits 2; a failure exits with `code(&error)`.
fn run_service<E, F>(
    config: Option<&PathBuf>,
    what: &str,
    service: impl FnOnce(Config, tokio_util::sync::CancellationToken) -> F,
    code: impl Fn(&E) -> u8,
) -> ExitCode
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<(), E>>,
{
    let cfg = match load(config) {
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
        if let Err(e) = damselfly::daemon::cancel_on_signals(token.clone()) {
            eprintln!("damselfly {what}: cannot handle signals: {e}");
            return Err(None);
        }
        service(cfg, token).await.map_err(Some)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(None) => ExitCode::FAILURE,
        Err(Some(e)) => {
            tracing::error!(error = %e, "damselfly {what} failed");
            eprintln!("damselfly {what}: {e}");
            ExitCode::from(code(&e))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon { config } => {
            run_service(config.as_ref(), "daemon", damselfly::daemon::run, |_| 1)
        }
        Command::Hosts(command) => hosts(command),
        Command::Sidecar {
            command: Some(SidecarCommand::Status { global, args }),
            ..
        } => cli::sidecar_status(&global, &args),
        Command::Sidecar {
            config,
            command: None,
        } => run_service(config.as_ref(), "sidecar", damselfly::sidecar::run, |e| {
            if e.is_config() {
                2
            } else {
                1
            }
        }),
        Command::Config(ConfigCommand::Check { config }) => match load(config.as_ref()) {
            Ok(c) => {
                println!("{c:#?}");
                for w in &c.warnings {
                    eprintln!("damselfly: warning: {}: {}", w.path, w.message);
                }
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
        Command::Cache { global, command } => cli::cache(&global, command),
        Command::Images { global } => cli::images(&global),
        Command::Peers { global } => cli::peers(&global),
        Command::Gpu { global } => cli::gpu(&global),
        Command::Prewarm(PrewarmCommand::Status { global }) => cli::prewarm_status(&global),
        Command::Bench(BenchCommand::Pull { global, args }) => {
            cli::bench(&global, cli::BenchCommand::Pull(args))
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "damselfly",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}
