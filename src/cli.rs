//! The CLI for operators: inspect and manage a node's cache and peers.
//!
//! Every command asks the daemon over its admin socket. When no daemon
//! answers, the commands that only read (`cache ls`, `inspect`, `stats`,
//! `verify` without `--repair`, `images`, `peers`) read the store directory
//! themselves, without its lock and without writing; the commands that
//! change the store (`gc`, `pin`, `unpin`, `verify --repair`) take the
//! store's lock, which only succeeds while the daemon is down. Opened that
//! way the store has no quota: nothing is evicted on opening or unpinning,
//! only by `gc`, down to `--target` or the config file's `[store] max_size`.
//!
//! Output is a table for people or, with `-o json`, the admin API's JSON
//! ([`crate::admin::api`]) for scripts. Exit codes: see [`EXIT_CODES`].

mod client;
pub mod render;
mod sidecar;

pub use sidecar::{sidecar_status, SidecarStatusArgs};

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::admin::api::{self, path, ApiError, GcRequest, TargetRequest, VerifyEvent};
use crate::admin::{AdminError, Node};
use crate::config::Config;
use crate::store::{Store, StoreError};
use client::{Client, Unreachable};

/// The exit codes, as `--help` and docs/cli.md list them.
pub const EXIT_CODES: &str = "Exit codes:
  0  success
  1  the command failed (an I/O error, an image never pulled here, ...)
  2  invalid input: bad flags, digest, image reference or config file
  3  the daemon is needed and unreachable (not running, socket refused)
  4  cache verify found corrupt blobs (without --repair)";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the daemon on {socket}: {reason}")]
    Unreachable { socket: PathBuf, reason: String },
    #[error("cannot reach the sidecar at {url}: {reason}")]
    SidecarUnreachable { url: String, reason: String },
    #[error("{}", .0.message)]
    Api(ApiError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("talking to the daemon: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0} corrupt blob(s) found; run `damselfly cache verify --repair` to remove them")]
    Corrupt(usize),
}

impl From<crate::oci::ReferenceError> for CliError {
    fn from(e: crate::oci::ReferenceError) -> CliError {
        CliError::Admin(e.into())
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        let usage_code = |code: &str| matches!(code, "invalid_digest" | "invalid_reference");
        match self {
            CliError::Usage(_) => 2,
            CliError::Admin(e) if usage_code(e.code()) => 2,
            CliError::Api(e) if usage_code(&e.code) => 2,
            CliError::Unreachable { .. } | CliError::SidecarUnreachable { .. } => 3,
            CliError::Corrupt(_) => 4,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The admin API's JSON (documented in docs/cli.md).
    Json,
}

/// Where to find the daemon or the store, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The daemon's admin socket [default: `[admin] socket` from the
    /// config, else <store>/admin.sock].
    #[arg(long, global = true, env = "DAMSELFLY_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The store directory, read directly when the daemon is down
    /// [default: `[store] dir` from the config].
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The daemon's config file, for the socket and store paths.
    #[arg(
        long,
        short,
        global = true,
        env = "DAMSELFLY_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Most recently used first.
    Accessed,
    /// Largest first.
    Size,
    Digest,
    /// By kind: index, manifest, config, layer, unknown.
    Type,
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    #[arg(long, value_enum, default_value = "accessed")]
    pub sort: SortKey,
    /// Reverse the order.
    #[arg(long, short)]
    pub reverse: bool,
    /// Only pinned blobs.
    #[arg(long, conflicts_with = "unpinned")]
    pub pinned: bool,
    /// Only blobs that are not pinned.
    #[arg(long)]
    pub unpinned: bool,
    /// Only blobs of this image (a reference as `damselfly images` shows).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// Only blobs that came from here.
    #[arg(long, value_enum)]
    pub source: Option<SourceFilter>,
    /// Only blobs at least this large, e.g. 100MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub min_size: Option<u64>,
    /// Show whole digests.
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceFilter {
    Origin,
    Peer,
    Unknown,
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 512MiB or 10GiB: {e}"))
}

#[derive(Debug, Clone, Subcommand)]
pub enum CacheCommand {
    /// List committed blobs: digest, type, size, last access, pin, source, images.
    #[command(
        after_help = "Examples:\n  damselfly cache ls\n  damselfly cache ls --sort size --min-size 100MiB\n  damselfly cache ls --image registry.example.com/team/model:v3 -o json"
    )]
    Ls(LsArgs),
    /// Show one blob (state, progress, readers, holders) or one image (layers, completeness).
    #[command(
        after_help = "Examples:\n  damselfly cache inspect sha256:4f4fb700ef54...<64 hex>\n  damselfly cache inspect registry.example.com/team/model:v3"
    )]
    Inspect {
        /// A digest (sha256:<hex>) or an image reference.
        target: String,
    },
    /// Store usage and quota, hit ratio, and bytes by source since the daemon started.
    #[command(
        after_help = "Examples:\n  damselfly cache stats\n  damselfly cache stats -o json | jq .daemon.hit_ratio"
    )]
    Stats,
    /// Re-hash every blob and report corrupt ones; --repair removes them.
    #[command(
        after_help = "Examples:\n  damselfly cache verify\n  damselfly cache verify --repair"
    )]
    Verify {
        /// Remove corrupt blobs so the next pull fetches them again.
        #[arg(long)]
        repair: bool,
    },
    /// Evict least recently used blobs now. Pinned and in-use blobs are never touched.
    #[command(
        after_help = "Examples:\n  damselfly cache gc --dry-run --target 50GiB\n  damselfly cache gc --target 0"
    )]
    Gc {
        /// Only show what would be evicted.
        #[arg(long)]
        dry_run: bool,
        /// Free space down to this size [default: the daemon's quota; with
        /// the daemon down, `[store] max_size` from --config, and without a
        /// config file this is required].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        target: Option<u64>,
    },
    /// Exempt an image (all its blobs) or a digest from eviction and GC.
    #[command(
        after_help = "Examples:\n  damselfly cache pin registry.example.com/team/model:v3\n  damselfly cache pin sha256:<64 hex>"
    )]
    Pin {
        /// An image reference or a digest.
        target: String,
    },
    /// Remove a pin made with `cache pin`.
    #[command(
        after_help = "Examples:\n  damselfly cache unpin registry.example.com/team/model:v3"
    )]
    Unpin {
        /// The image reference or digest that was pinned.
        target: String,
    },
}

/// How a command reaches the node.
enum Backend {
    Daemon(Client),
    // Boxed: a Node (with its metric handles) is ten times a Client.
    Local(Box<Node>),
}

struct Resolved {
    socket: PathBuf,
    store: PathBuf,
    /// `[store] max_size` from the config file; `None` without one, as the
    /// daemon's quota is then unknown (the built-in default may not be it).
    quota: Option<u64>,
    /// The quota a read-only view reports: the config's, else the default.
    shown_quota: u64,
}

fn resolve(g: &Global) -> Result<Resolved, CliError> {
    let cfg = match &g.config {
        Some(p) => Config::load(p),
        None => Config::defaults(),
    }
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let quota = g.config.as_ref().map(|_| cfg.store.max_size);
    let store = g.store.clone().unwrap_or_else(|| cfg.store.dir.clone());
    let socket = match (&g.socket, &g.store, &g.config) {
        (Some(s), _, _) => s.clone(),
        (None, Some(dir), None) => dir.join("admin.sock"),
        _ => cfg.admin.socket.clone(),
    };
    Ok(Resolved {
        socket,
        store,
        quota,
        shown_quota: cfg.store.max_size,
    })
}

async fn backend(g: &Global, write: bool) -> Result<Backend, CliError> {
    let r = resolve(g)?;
    let why = match Client::probe(&r.socket).await {
        Ok(c) => return Ok(Backend::Daemon(c)),
        Err(Unreachable::Refused(e)) => {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (the socket is root-only: run as root, e.g. via kubectl exec)"
            } else {
                ""
            };
            return Err(CliError::Unreachable {
                socket: r.socket,
                reason: format!("{e}{hint}"),
            });
        }
        Err(Unreachable::Down(e)) => e,
    };
    let down = |reason: String| CliError::Unreachable {
        socket: r.socket.clone(),
        reason,
    };
    if !r.store.join("blobs/sha256").is_dir() {
        return Err(down(format!(
            "{why}; is the daemon running? There is no store at {} to read instead",
            r.store.display()
        )));
    }
    let store = if write {
        // No quota: opening and unpinning never evict. Only an explicit
        // `cache gc` frees space, down to its target (see `gc_target`).
        match Store::open(&r.store, u64::MAX) {
            Ok((s, _)) => s,
            Err(StoreError::Locked { .. }) => {
                return Err(down(format!(
                    "{why}, yet a daemon holds the store at {}",
                    r.store.display()
                )))
            }
            Err(e) => return Err(AdminError::from(e).into()),
        }
    } else {
        Store::open_read_only(&r.store, r.shown_quota).map_err(AdminError::from)?
    };
    let mode = if write { "with its lock" } else { "read-only" };
    eprintln!(
        "damselfly: no daemon answers on {}; using the store at {} directly ({mode})",
        r.socket.display(),
        r.store.display()
    );
    Ok(Backend::Local(Box::new(Node::offline(store))))
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Prints the error and turns it into the process exit code.
fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("damselfly: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn print<T: Serialize>(
    g: &Global,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    let text = match g.output {
        Output::Json => {
            let mut s = serde_json::to_string_pretty(value)
                .map_err(|e| CliError::Protocol(e.to_string()))?;
            s.push('\n');
            s
        }
        Output::Table => table(value),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `damselfly cache ...`.
pub fn cache(g: &Global, cmd: CacheCommand) -> ExitCode {
    finish(runtime().and_then(|rt| rt.block_on(cache_async(g, cmd))))
}

/// Terminal width for tables, when stdout is a terminal.
fn width() -> Option<usize> {
    let term = console::Term::stdout();
    if !term.is_term() {
        return None;
    }
    term.size_checked().map(|(_, w)| w as usize)
}

async fn cache_async(g: &Global, cmd: CacheCommand) -> Result<(), CliError> {
    let now = render::now();
    let write = matches!(
        cmd,
        CacheCommand::Gc { dry_run: false, .. }
            | CacheCommand::Pin { .. }
            | CacheCommand::Unpin { .. }
            | CacheCommand::Verify { repair: true }
    );
    if let CacheCommand::Inspect { target }
    | CacheCommand::Pin { target }
    | CacheCommand::Unpin { target } = &cmd
    {
        // Bad input is caught before anything is contacted.
        crate::admin::images::Target::parse(target)?;
    }
    let be = backend(g, write).await?;
    match cmd {
        CacheCommand::Ls(args) => {
            let mut list: api::BlobList = match &be {
                Backend::Daemon(c) => c.get(path::BLOBS).await?,
                Backend::Local(n) => n.list(),
            };
            let image = match &args.image {
                Some(r) => Some(crate::admin::images::ImageRef::parse(r)?.to_string()),
                None => None,
            };
            render::filter_sort(&mut list, &args, image.as_deref());
            print(g, &list, |l| render::ls(l, args.full, now, width()))
        }
        CacheCommand::Inspect { target } => {
            let req = TargetRequest { target };
            let i: api::Inspection = match &be {
                Backend::Daemon(c) => c.post(path::INSPECT, &req).await?,
                Backend::Local(n) => n.inspect(&req.target)?,
            };
            print(g, &i, |i| render::inspect(i, now))
        }
        CacheCommand::Stats => {
            let s: api::Stats = match &be {
                Backend::Daemon(c) => c.get(path::STATS).await?,
                Backend::Local(n) => n.stats(),
            };
            print(g, &s, render::stats)
        }
        CacheCommand::Verify { repair } => verify(g, &be, repair).await,
        CacheCommand::Gc { dry_run, target } => {
            let r: api::GcReport = match &be {
                Backend::Daemon(c) => c.post(path::GC, &GcRequest { target, dry_run }).await?,
                Backend::Local(n) => {
                    let target = Some(gc_target(g, target)?);
                    n.gc(&GcRequest { target, dry_run })?
                }
            };
            print(g, &r, render::gc)
        }
        CacheCommand::Pin { target } => pin(g, &be, TargetRequest { target }, true).await,
        CacheCommand::Unpin { target } => pin(g, &be, TargetRequest { target }, false).await,
    }
}

/// What `cache gc` frees down to without the daemon: `--target`, else the
/// quota from the config file. Without either the quota is unknown, and
/// guessing (the built-in default) could evict far more than the daemon
/// would, so this refuses.
fn gc_target(g: &Global, target: Option<u64>) -> Result<u64, CliError> {
    if let Some(t) = target {
        return Ok(t);
    }
    resolve(g)?.quota.ok_or_else(|| {
        CliError::Usage(
            "no daemon answers and no config file was given, so the store's quota is unknown: \
             pass --target SIZE, or --config with the daemon's config file \
             (or set DAMSELFLY_CONFIG)"
                .into(),
        )
    })
}

async fn pin(g: &Global, be: &Backend, req: TargetRequest, pin: bool) -> Result<(), CliError> {
    let r: api::PinResponse = match (be, pin) {
        (Backend::Daemon(c), true) => c.post(path::PIN, &req).await?,
        (Backend::Daemon(c), false) => c.post(path::UNPIN, &req).await?,
        (Backend::Local(n), true) => n.pin(&req.target)?,
        (Backend::Local(n), false) => n.unpin(&req.target)?,
    };
    print(g, &r, |r| render::pin(r, pin))
}

async fn verify(g: &Global, be: &Backend, repair: bool) -> Result<(), CliError> {
    let show_bar = g.output == Output::Table
        && std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal();
    let bar = if show_bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:30} {binary_bytes}/{binary_total_bytes} {msg} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut on_progress = |p: &api::VerifyProgress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} blobs", p.blobs_done, p.blobs_total));
    };
    let report = match be {
        Backend::Daemon(c) => {
            let mut report = None;
            let mut on_line = |line: &[u8]| -> Result<(), CliError> {
                match serde_json::from_slice::<VerifyEvent>(line) {
                    Ok(VerifyEvent::Progress(p)) => on_progress(&p),
                    Ok(VerifyEvent::Report(r)) => report = Some(r),
                    Ok(VerifyEvent::Error(e)) => return Err(CliError::Api(e)),
                    Err(e) => return Err(CliError::Protocol(format!("bad progress line: {e}"))),
                }
                Ok(())
            };
            c.post_lines(path::VERIFY, &api::VerifyRequest { repair }, &mut on_line)
                .await?;
            report.ok_or_else(|| CliError::Protocol("verify ended without a report".into()))?
        }
        Backend::Local(n) => n.verify(repair, &mut on_progress)?,
    };
    bar.finish_and_clear();
    print(g, &report, render::verify)?;
    let unrepaired = report.corrupt.iter().filter(|c| !c.removed).count();
    if unrepaired > 0 {
        return Err(CliError::Corrupt(unrepaired));
    }
    Ok(())
}

/// `damselfly gpu`: the daemon's GPU facts, or, with no daemon, what
/// discovery finds now with the config's `[gpu]` section.
pub fn gpu(g: &Global) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let r = resolve(g)?;
            let facts: api::GpuFacts = match Client::probe(&r.socket).await {
                Ok(c) => c.get(path::GPU).await?,
                Err(Unreachable::Refused(e)) => {
                    return Err(CliError::Unreachable {
                        socket: r.socket,
                        reason: e.to_string(),
                    })
                }
                Err(Unreachable::Down(_)) => {
                    let cfg = match &g.config {
                        Some(p) => Config::load(p),
                        None => Config::defaults(),
                    }
                    .map_err(|e| CliError::Usage(e.to_string()))?;
                    eprintln!(
                        "damselfly: no daemon answers on {}; discovering GPUs here",
                        r.socket.display()
                    );
                    crate::gpu::discover(&cfg.gpu)
                }
            };
            print(g, &facts, render::gpu)
        })
    }))
}

/// `damselfly prewarm status`: needs the daemon (the engine lives there).
pub fn prewarm_status(g: &Global) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let r = resolve(g)?;
            let c = Client::probe(&r.socket)
                .await
                .map_err(|e| CliError::Unreachable {
                    socket: r.socket.clone(),
                    reason: match e {
                        Unreachable::Down(e) => {
                            format!("{e}; prewarm status comes from the running daemon")
                        }
                        Unreachable::Refused(e) => e.to_string(),
                    },
                })?;
            let s: api::PrewarmStatus = c.get(path::PREWARM).await?;
            print(g, &s, |s| render::prewarm_status(s, width()))
        })
    }))
}

/// `damselfly images`.
pub fn images(g: &Global) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let list: api::ImageList = match backend(g, false).await? {
                Backend::Daemon(c) => c.get(path::IMAGES).await?,
                Backend::Local(n) => n.images(),
            };
            print(g, &list, |l| render::images(l, render::now(), width()))
        })
    }))
}

/// `damselfly peers`.
pub fn peers(g: &Global) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            // The answer does not depend on the node yet; ask the daemon
            // when it is there so that this keeps working when it does.
            let p: api::Peers = match backend(g, false).await {
                Ok(Backend::Daemon(c)) => c.get(path::PEERS).await?,
                Ok(Backend::Local(n)) => n.peers(),
                Err(CliError::Unreachable { .. }) => Node::peers_disabled(),
                Err(e) => return Err(e),
            };
            print(g, &p, render::peers)
        })
    }))
}

/// `damselfly bench ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Pull an image through this node's mirror the way containerd does, and
    /// report times and where the bytes came from.
    Pull(BenchPullArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchPullArgs {
    /// The image: `[registry/]repository[:tag][@digest]`.
    pub image: String,
    /// How many times to pull.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Evict the image's blobs from this node's store before each run, so
    /// the peers (or the origin) are what is measured.
    #[arg(long)]
    pub cold: bool,
    /// Fail (exit 5) if any run took a blob byte from the origin.
    #[arg(long)]
    pub expect_warm: bool,
    /// The platform to pick from an index, `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// The mirror [default: `[mirror] listen` from the config].
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// The node's Prometheus endpoint [default: `[telemetry] listen` from
    /// the config, `/metrics`].
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// Blobs fetched at once (containerd's default is 3).
    #[arg(long, default_value_t = 3)]
    pub concurrency: usize,
    /// Also time containerd's own PullImage over this CRI socket, after
    /// removing the image from containerd (what the kubelet sees).
    #[arg(long, value_name = "PATH")]
    pub cri_socket: Option<PathBuf>,
}

/// `damselfly bench pull`: exit 0 on success, 5 when `--expect-warm` found
/// origin bytes, and the usual codes otherwise.
pub fn bench(g: &Global, cmd: BenchCommand) -> ExitCode {
    let BenchCommand::Pull(args) = cmd;
    match runtime().and_then(|rt| rt.block_on(bench_pull(g, args))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(5),
        Err(e) => {
            eprintln!("damselfly: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn local_url(addr: std::net::SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

async fn bench_pull(g: &Global, a: BenchPullArgs) -> Result<bool, CliError> {
    use crate::bench::{self, BenchError, PullOptions, Puller};
    let cfg = match &g.config {
        Some(p) => Config::load(p),
        None => Config::defaults(),
    }
    .map_err(|e| CliError::Usage(e.to_string()))?;
    if a.runs == 0 {
        return Err(CliError::Usage("--runs must be at least 1".into()));
    }
    let image = crate::admin::images::ImageRef::parse(&a.image)?;
    let opts = PullOptions {
        image: image.clone(),
        mirror: a
            .mirror
            .clone()
            .unwrap_or_else(|| local_url(cfg.mirror.listen)),
        metrics: Some(
            a.metrics
                .clone()
                .unwrap_or_else(|| format!("{}/metrics", local_url(cfg.telemetry.listen))),
        ),
        platform: a.platform.clone(),
        concurrency: a.concurrency,
    };
    let bench_err = |e: BenchError| match e {
        BenchError::Usage(m) => CliError::Usage(m),
        e => CliError::Protocol(e.to_string()),
    };
    let puller = Puller::new(opts).map_err(bench_err)?;
    let admin = if a.cold {
        let r = resolve(g)?;
        match Client::probe(&r.socket).await {
            Ok(c) => Some(c),
            Err(Unreachable::Down(e) | Unreachable::Refused(e)) => {
                return Err(CliError::Unreachable {
                    socket: r.socket,
                    reason: format!("{e} (--cold evicts through the daemon's admin socket)"),
                })
            }
        }
    } else {
        None
    };
    let show_bar = g.output == Output::Table && std::io::stderr().is_terminal();
    let bar = if show_bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "pulling {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut runs = Vec::new();
    let mut manifest = String::new();
    for run in 1..=a.runs {
        let resolved = puller.resolve().await.map_err(bench_err)?;
        manifest = resolved.manifest.to_string();
        let mut evicted = 0;
        if let Some(c) = &admin {
            // The manifests stay: the resolve above already needed them,
            // and containerd resolves at the origin anyway.
            let digests: Vec<String> = resolved
                .digests()
                .iter()
                .filter(|d| !resolved.manifests.contains(d))
                .map(|d| d.to_string())
                .collect();
            let r: api::EvictResponse = c.post(path::EVICT, &api::EvictRequest { digests }).await?;
            evicted = r.removed;
        }
        let mut result = puller
            .pull(&resolved, run, a.cold, evicted, &bar)
            .await
            .map_err(bench_err)?;
        if let Some(sock) = &a.cri_socket {
            let took = bench::cri::timed_pull(
                sock,
                &image.to_string(),
                std::time::Duration::from_secs(600),
            )
            .await
            .map_err(bench_err)?;
            result.cri_pull_ms = Some(took.as_secs_f64() * 1000.0);
        }
        runs.push(result);
    }
    bar.finish_and_clear();
    let verdict = bench::verdict(&runs, a.expect_warm);
    let pass = verdict.pass;
    let report = bench::PullReport {
        image: image.to_string(),
        manifest,
        platform: a.platform,
        runs,
        verdict,
    };
    print(g, &report, bench::render)?;
    Ok(pass)
}
