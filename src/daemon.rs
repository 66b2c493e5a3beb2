//! Wires the parts together and owns the daemon's lifetime.

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::origin::{Origin, OriginError};
use crate::prewarm::{Prewarm, PrewarmMetrics};
use crate::registry::{self, Mirror};
use crate::store::{Store, StoreError};
use crate::telemetry::{self, Health, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the store at {dir}: {source}")]
    Store {
        dir: std::path::PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Listen(std::io::Error),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("swarm: {0}")]
    Swarm(#[from] crate::swarm::SwarmError),
    #[error("node gate: {0}")]
    Node(#[from] crate::node::NodeError),
    #[error("GPU discovery: {0}")]
    Gpu(String),
}

/// Runs the daemon until `shutdown` fires, then drains and returns.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let started = std::time::Instant::now();
    // node.deadline counts from here.
    let gate_start = tokio::time::Instant::now();
    for w in &cfg.warnings {
        tracing::warn!(key = %w.path, "config: {}", w.message);
    }
    if !cfg.swarm.implied_by.is_empty() {
        tracing::info!(by = ?cfg.swarm.implied_by,
            "the swarm is on: [swarm] says how to join (write enabled = false to keep it off)");
    }
    // A gate that cannot reach the API server would keep the node tainted
    // for good: fail at start-up, where the pod's status shows it.
    let node_api = if cfg.node.gate {
        Some(crate::node::NodeApi::connect(&cfg.node).await?)
    } else {
        None
    };
    let (store, recovery) =
        Store::open(&cfg.store.dir, cfg.store.max_size).map_err(|source| DaemonError::Store {
            dir: cfg.store.dir.clone(),
            source,
        })?;
    tracing::info!(dir = %cfg.store.dir.display(), blobs = recovery.blobs, bytes = recovery.bytes,
        partials = recovery.partials, removed = recovery.removed, "store opened");

    let prom = Registry::new();
    let metrics = Metrics::new(&prom)?;
    let usage = store.usage();
    usage.publish(&metrics);

    let origin = Origin::new(&cfg, metrics.clone())?;
    origin.prefetch_ecr_tokens();
    let swarm_stop = CancellationToken::new();
    let mut swarm_handle = None;
    // The swarm first: the engine takes pieces from it, and its data plane
    // serves the engine's blobs (started below, once the engine exists).
    let started_swarm = if cfg.swarm.enabled {
        Some(crate::swarm::Swarm::start(&cfg.swarm, &cfg.store.dir, metrics.clone()).await?)
    } else {
        None
    };
    let peers = started_swarm
        .as_ref()
        .map(|(s, _)| std::sync::Arc::new(s.clone()) as std::sync::Arc<dyn crate::swarm::PeerNet>);
    let fetcher = Fetcher::new(&cfg, store, origin, metrics.clone(), peers);
    if let Some((swarm, listener)) = started_swarm {
        let follower = fetcher.clone();
        let seed = cfg.swarm.role == crate::swarm::Role::Seed;
        swarm.spawn_watchers(move |a| {
            if let crate::swarm::control::Announce::Want { digest, ns, repo } = &a.what {
                if seed {
                    follower.follow(digest, ns, repo);
                }
            }
        });
        tokio::spawn(crate::swarm::data::serve(
            listener,
            std::sync::Arc::new(fetcher.clone()),
            swarm.clone(),
            swarm_stop.clone(),
        ));
        // A restarted node (a DaemonSet rollout) still holds its blobs:
        // tell the cluster, or latecomers would not find it.
        let held = fetcher.store().blobs();
        tracing::info!(
            blobs = held.len(),
            "announcing the store's blobs to the swarm"
        );
        let withdraw = swarm.clone();
        fetcher
            .store()
            .on_removed(move |d| withdraw.blob_removed(d));
        for b in held {
            swarm.provide(&b.digest);
        }
        swarm_handle = Some(swarm);
    }
    // The partial sweep and the scrub; stopped with the telemetry below.
    let upkeep_stop = CancellationToken::new();
    fetcher.spawn_upkeep(&cfg.store, upkeep_stop.clone());
    // NVML is a blocking C library; a hung driver must not hold a worker.
    let gpu_cfg = cfg.gpu.clone();
    let mut facts = tokio::task::spawn_blocking(move || crate::gpu::discover(&gpu_cfg))
        .await
        .map_err(|e| DaemonError::Gpu(e.to_string()))?;
    let named = crate::node::node_name(&cfg.node).is_ok();
    if crate::gpu::wants_node_labels(&cfg.gpu, &facts, named) {
        facts = crate::gpu::from_node_labels(facts, node_labels(&cfg).await);
    }
    crate::gpu::log_no_gpus(&facts);
    crate::gpu::export_metrics(&facts, &prom)?;
    let prewarm = Prewarm::new(
        &cfg,
        facts,
        fetcher.clone(),
        swarm_handle.clone(),
        PrewarmMetrics::new(&prom)?,
        started,
    );
    let admin_node = std::sync::Arc::new(
        admin::Node::daemon(fetcher.clone(), metrics.clone())
            .with_swarm(swarm_handle.clone())
            .with_prewarm(prewarm.clone()),
    );
    let mirror = Mirror::new(&cfg, fetcher, metrics);

    let mirror_listener = telemetry::bind(cfg.mirror.listen, "the mirror")
        .await
        .map_err(DaemonError::Listen)?;
    let telemetry_listener = telemetry::bind(cfg.telemetry.listen, "telemetry")
        .await
        .map_err(DaemonError::Listen)?;
    let admin_listener = admin::server::bind(&cfg.admin.socket)?;
    let health = Health::default();
    let telemetry_stop = CancellationToken::new();
    let telemetry_task = tokio::spawn(telemetry::serve(
        telemetry_listener,
        prom,
        health.clone(),
        telemetry_stop.clone(),
    ));
    let admin_task = tokio::spawn(admin::server::serve(
        admin_listener,
        admin_node,
        telemetry_stop.clone(),
    ));

    let registries: Vec<&str> = cfg.registries.iter().map(|r| r.host.as_str()).collect();
    tracing::info!(
        mirror = %mirror_listener.local_addr().map_err(DaemonError::Listen)?,
        telemetry = %cfg.telemetry.listen,
        registries = ?registries,
        "damselfly ready"
    );
    if cfg.prewarm.gate_readiness && prewarm.has_work() {
        gate_on_prewarm(&health, &prewarm, cfg.prewarm.ready_deadline);
    }
    health.set_ready(true);
    let mirror_addr = mirror_listener.local_addr().map_err(DaemonError::Listen)?;
    let (hosts_tx, hosts_wired) = tokio::sync::watch::channel(false);
    let hosts = if cfg.containerd.configure_hosts {
        let opts = hosts_options(&cfg, mirror_addr);
        // hostsd does blocking file and HTTP work; the mirror is already
        // listening, so containerd can use the files the moment they land.
        Some(tokio::task::spawn_blocking(
            move || match hostsd::reconcile(&opts) {
                Ok(report) => {
                    tracing::info!(report = %report, "containerd hosts.toml reconciled");
                    hosts_tx.send_replace(true);
                }
                Err(e) => tracing::error!(error = %e,
                "cannot wire containerd to the mirror; containerd keeps pulling from the origin"),
            },
        ))
    } else {
        if cfg.node.gate && cfg.node.check_hosts {
            // The DaemonSet's hostsd init container wrote the files: check,
            // read-only, that containerd really goes through this mirror.
            tokio::spawn(check_hosts_until_ok(
                hosts_options(&cfg, mirror_addr),
                cfg.node.poll_interval,
                hosts_tx,
                shutdown.clone(),
            ));
        }
        None
    };
    let prewarm_stop = CancellationToken::new();
    if let Some(swarm) = &swarm_handle {
        // Warm intents from the scaling sidecar; they wait in prewarm until
        // it starts below.
        crate::prewarm::feed::follow(prewarm.clone(), swarm.clone(), prewarm_stop.clone());
    }
    {
        let (prewarm, stop) = (prewarm.clone(), prewarm_stop.clone());
        tokio::spawn(async move {
            // Prewarm's CRI pulls must find containerd wired to the mirror,
            // or they would go to the origin.
            if let Some(h) = hosts {
                let _ = h.await;
            }
            prewarm.start(stop);
        });
    }
    if let Some(api) = node_api {
        let mut conditions = Vec::new();
        if cfg.node.check_hosts {
            conditions.push(crate::node::Condition {
                name: "hosts",
                met: hosts_wired,
            });
        }
        if cfg.node.wait_for_ready {
            conditions.push(crate::node::Condition {
                name: "ready",
                met: health.subscribe(),
            });
        }
        let node_cfg = cfg.node.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let deadline = gate_start + node_cfg.deadline;
            crate::node::gate(&api, &node_cfg, conditions, deadline, &stop).await
        });
    }

    let serve_stop = shutdown.clone();
    let not_ready = health.clone();
    tokio::spawn(async move {
        serve_stop.cancelled().await;
        not_ready.set_ready(false);
    });
    registry::serve(mirror_listener, mirror, shutdown, cfg.mirror.drain_timeout).await;
    telemetry_stop.cancel();
    upkeep_stop.cancel();
    prewarm_stop.cancel();
    swarm_stop.cancel();
    if let Some(swarm) = swarm_handle {
        swarm.shutdown().await;
    }
    let _ = telemetry_task.await;
    let _ = admin_task.await;
    tracing::info!("damselfly stopped");
    Ok(())
}

/// This node's Kubernetes labels (GPU Feature Discovery's among them),
/// bounded in time: an unreachable API server must not hold the start-up.
async fn node_labels(cfg: &Config) -> Result<std::collections::BTreeMap<String, String>, String> {
    let read = async {
        let api = crate::node::NodeApi::connect(&cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        api.labels().await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| Err("the API server did not answer in 10s".into()))
}

/// Holds `/readyz` until prewarm is done, or `deadline` passed (with a
/// warning: a broken origin must not keep a node out of service).
fn gate_on_prewarm(health: &Health, prewarm: &Prewarm, deadline: std::time::Duration) {
    const WHAT: &str = "prewarm";
    health.hold(WHAT);
    let health = health.clone();
    let mut ready = prewarm.ready();
    tokio::spawn(async move {
        match tokio::time::timeout(deadline, ready.wait_for(|r| *r)).await {
            Ok(_) => tracing::info!("prewarm done; the node reports ready"),
            Err(_) => tracing::warn!(
                deadline_s = deadline.as_secs(),
                "prewarm not done by prewarm.ready_deadline; reporting ready anyway"
            ),
        }
        health.release(WHAT);
    });
}

/// What hostsd should write for this daemon: every configured registry, with
/// its real endpoint as containerd's fallback, or `_default` when the mirror
/// serves any registry.
pub fn hosts_options(cfg: &Config, mirror: std::net::SocketAddr) -> hostsd::ReconcileOptions {
    // containerd dials the address written here; a wildcard listen address
    // is reached through loopback.
    let ip = if mirror.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        mirror.ip()
    };
    let mut registries: Vec<hostsd::RegistrySpec> = cfg
        .registries
        .iter()
        .map(|r| {
            hostsd::RegistrySpec::with_server(
                r.host.clone(),
                r.endpoint.as_str().trim_end_matches('/'),
            )
        })
        .collect();
    if registries.is_empty() {
        registries.push(hostsd::RegistrySpec::new("_default"));
    }
    hostsd::ReconcileOptions {
        containerd_config: cfg.containerd.config.clone(),
        certs_dir: cfg.containerd.certs_dir.clone(),
        mirror: format!("http://{}", std::net::SocketAddr::new(ip, mirror.port())),
        registries,
        dial_timeout: cfg.containerd.dial_timeout.clone(),
        patch_config: cfg.containerd.patch_config,
        ..Default::default()
    }
}

/// Runs `hostsd check` every `every` until it passes, then says so on `ok`.
/// The first failure is logged as a warning with the report.
async fn check_hosts_until_ok(
    opts: hostsd::ReconcileOptions,
    every: std::time::Duration,
    ok: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut warned = false;
    loop {
        let o = opts.clone();
        match tokio::task::spawn_blocking(move || hostsd::check(&o)).await {
            Ok(Ok(report)) if report.ok() => {
                tracing::info!(
                    "containerd goes through the mirror for every registry (hostsd check)"
                );
                ok.send_replace(true);
                return;
            }
            Ok(Ok(report)) if !warned => {
                tracing::warn!(report = %report,
                    "containerd is not wired to the mirror yet (hostsd check); checking again");
                warned = true;
            }
            Ok(Err(e)) if !warned => {
                tracing::warn!(error = %e, "hostsd check failed; checking again");
                warned = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Fires `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}
