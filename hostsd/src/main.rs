//! `hostsd`: point containerd at the damselfly mirror on this node. Parses
//! flags, calls the library, prints the report, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use hostsd::options::{self, parse_go_duration};
use hostsd::{EcrOptions, ErrorKind, ReconcileOptions, RegistrySpec};

const EXIT_CODES: &str = "\
Exit codes:
  0  done (for check: every registry is routed to a live mirror)
  1  I/O or other runtime failure
  2  bad flags or values (registry name, mirror URL, duration, ECR id)
  3  containerd's config needs a person: no config_path (use --patch-config),
     inline registry.mirrors / configs.tls that conflict with config_path,
     an unparseable config, or a foreign hosts.toml containerd cannot decode
  4  check: some registry is not routed to a live mirror
  5  EC2 instance metadata (IMDSv2) discovery failed";

/// Wire containerd to the damselfly mirror: one certs.d/<registry>/hosts.toml
/// per registry, with the mirror as the first host.
#[derive(Parser, Debug)]
#[command(
    name = "hostsd",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Flags of `apply`, the default command.
    #[command(flatten)]
    apply: ApplyArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write or update hosts.toml files (the default).
    #[command(after_help = EXIT_CODES)]
    Apply(ApplyArgs),
    /// Put back every original hosts.toml hostsd replaced; delete the ones it created.
    #[command(after_help = EXIT_CODES)]
    Remove(RemoveArgs),
    /// Report, per registry, what containerd will do, and probe the mirror.
    #[command(after_help = EXIT_CODES)]
    Check(CheckArgs),
    /// Do nothing until killed: the main container of the uninstall
    /// DaemonSet (daemonset/uninstall), whose init container ran `remove`.
    Pause,
}

#[derive(Args, Debug, Clone)]
struct Where {
    /// containerd's config file, read for config_path.
    #[arg(long, env = "HOSTSD_CONTAINERD_CONFIG", default_value = options::DEFAULT_CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
    /// Use this certs.d directory instead of config_path's first entry
    /// (e.g. for `ctr --hosts-dir`).
    #[arg(long, env = "HOSTSD_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct Routing {
    #[command(flatten)]
    place: Where,
    /// The mirror, written as the first [host."..."] of every file.
    #[arg(long, env = "HOSTSD_MIRROR", default_value = options::DEFAULT_MIRROR)]
    mirror: String,
    /// A registry as in image references (ghcr.io, docker.io, 127.0.0.1:5000,
    /// or _default for every registry), optionally with its origin:
    /// 127.0.0.1:5000=http://127.0.0.1:5000. Repeatable.
    #[arg(long = "registry", env = "HOSTSD_REGISTRIES", value_delimiter = ',', value_parser = parse_registry)]
    registries: Vec<RegistrySpec>,
    /// ECR account id (12 digits); paired with every --ecr-region. Repeatable.
    #[arg(
        long = "ecr-account",
        env = "HOSTSD_ECR_ACCOUNTS",
        value_delimiter = ','
    )]
    ecr_accounts: Vec<String>,
    /// ECR region, e.g. us-east-1 or cn-north-1. Repeatable.
    #[arg(long = "ecr-region", env = "HOSTSD_ECR_REGIONS", value_delimiter = ',')]
    ecr_regions: Vec<String>,
    /// Also route the dkr.ecr-fips hostnames (US and GovCloud regions).
    #[arg(long, env = "HOSTSD_ECR_FIPS")]
    ecr_fips: bool,
    /// Add this instance's own account and region, from IMDSv2.
    #[arg(long, env = "HOSTSD_ECR_DISCOVER")]
    ecr_discover: bool,
    /// The instance metadata endpoint for --ecr-discover.
    #[arg(long, env = "HOSTSD_IMDS_ENDPOINT", default_value = options::DEFAULT_IMDS_ENDPOINT)]
    imds_endpoint: String,
    /// How long containerd waits to connect to the mirror before it tries the
    /// next host (Go duration; containerd 2.1+ honours it, older ones ignore
    /// it). A refused connection falls back at once regardless.
    #[arg(long, env = "HOSTSD_DIAL_TIMEOUT", default_value = options::DEFAULT_DIAL_TIMEOUT)]
    dial_timeout: String,
}

#[derive(Args, Debug, Clone)]
struct ApplyArgs {
    #[command(flatten)]
    routing: Routing,
    /// If containerd's config has no config_path, add one (keeps a backup).
    /// This is the one change that needs a containerd restart.
    #[arg(long, env = "HOSTSD_PATCH_CONFIG")]
    patch_config: bool,
    /// Show what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug, Clone)]
struct RemoveArgs {
    #[command(flatten)]
    place: Where,
    /// Also put back config.toml if hostsd added its config_path (needs a
    /// containerd restart).
    #[arg(long)]
    restore_config: bool,
    /// Show what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug, Clone)]
struct CheckArgs {
    #[command(flatten)]
    routing: Routing,
    /// How long to wait for the mirror's answer to GET /v2/ (Go duration).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    probe_timeout: Duration,
}

fn parse_registry(s: &str) -> Result<RegistrySpec, String> {
    s.parse().map_err(|e: hostsd::Error| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).map_err(|e| e.to_string())
}

impl Routing {
    fn options(&self) -> ReconcileOptions {
        ReconcileOptions {
            containerd_config: self.place.containerd_config.clone(),
            certs_dir: self.place.certs_dir.clone(),
            mirror: self.mirror.clone(),
            registries: self.registries.clone(),
            dial_timeout: self.dial_timeout.clone(),
            ecr: EcrOptions {
                accounts: self.ecr_accounts.clone(),
                regions: self.ecr_regions.clone(),
                fips: self.ecr_fips,
                discover: self.ecr_discover,
                imds_endpoint: self.imds_endpoint.clone(),
                ..EcrOptions::default()
            },
            ..ReconcileOptions::default()
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command.unwrap_or(Command::Apply(cli.apply)) {
        Command::Apply(a) => {
            let opts = ReconcileOptions {
                patch_config: a.patch_config,
                dry_run: a.dry_run,
                ..a.routing.options()
            };
            print!("{}", hostsd::reconcile(&opts)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Remove(r) => {
            let opts = ReconcileOptions {
                containerd_config: r.place.containerd_config,
                certs_dir: r.place.certs_dir,
                restore_config: r.restore_config,
                dry_run: r.dry_run,
                ..ReconcileOptions::default()
            };
            print!("{}", hostsd::remove(&opts)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause => loop {
            // No signal handler (the crate forbids unsafe code): as PID 1 it
            // ignores SIGTERM, so the uninstall DaemonSet's short
            // terminationGracePeriodSeconds ends it.
            std::thread::sleep(Duration::from_secs(3600));
        },
        Command::Check(c) => {
            let opts = ReconcileOptions {
                probe_timeout: c.probe_timeout,
                ..c.routing.options()
            };
            let report = hostsd::check(&opts)?;
            print!("{report}");
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            })
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hostsd: error: {e}");
            let code = match e.downcast_ref::<hostsd::Error>().map(hostsd::Error::kind) {
                Some(ErrorKind::Input) => 2,
                Some(ErrorKind::NodeConfig) => 3,
                Some(ErrorKind::Discovery) => 5,
                Some(ErrorKind::Runtime) | None => 1,
            };
            ExitCode::from(code)
        }
    }
}
