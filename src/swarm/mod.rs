//! The swarm: every byte from the origin once per cluster, fanned out peer
//! to peer.
//!
//! Two planes. The control plane ([`control`]) is libp2p: TCP, noise and
//! yamux, closed by a pre-shared cluster key (pnet); identify; gossipsub for
//! membership heartbeats and announcements; Kademlia for "who holds this
//! digest"; discovery from static multiaddrs, DNS names re-resolved
//! periodically, and mDNS. The data plane ([`data`]) moves piece bytes as
//! HTTP Range requests over TLS 1.3 on the peer port, by digest only; both
//! ends present a self-signed certificate whose fingerprint the other learnt
//! from a membership heartbeat on the key-protected control plane ([`tls`]).
//!
//! Which node fetches a piece from the origin is decided without a
//! coordinator: rendezvous hashing of (digest, piece) over the live members,
//! with bounded loads so that every member owns its share ([`rendezvous`]).
//!
//! The scaling sidecar is a member too ([`Role::Sidecar`]), on the control
//! plane only: it publishes warm intents ([`intents`]) and has no data
//! plane, so it is never a piece owner, a holder, or a peer to ask.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub mod control;
pub mod intents;
pub mod memory;
pub mod model;
pub mod net;
pub mod rendezvous;
pub mod tls;

pub use net::{PeerError, PeerNet, PeerRef, PeerResponse, PieceRequest, PieceSource};

/// What a node is for (defined in config, which validates `swarm.role`).
pub use crate::config::Role;

/// What each member announces about itself in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Where its data plane listens.
    pub data_addr: SocketAddr,
    /// Lower-case hex SHA-256 of its TLS certificate (DER); empty when the
    /// data plane runs plain HTTP.
    pub fingerprint: String,
    pub role: Role,
}

pub mod data;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::watch;

use crate::config::SwarmConfig;
use crate::oci::Digest;
use crate::telemetry::Metrics;

/// A failure to start the swarm.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on the data plane address {addr}: {source}")]
    DataListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data plane client: {0}")]
    Client(String),
}

/// An error with its causes, `a: b: c`: reqwest's own message alone
/// ("error sending request") hides what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// How long a `Want` makes its sender a relay for the blob's pieces. Past
/// it the sender has committed the blob (and is a holder), given up, or
/// is still at it on a link so slow that relaying through it would not
/// help. A relay that is wrong about it answers 404 and is passed over.
const PULLING_TTL: Duration = Duration::from_secs(30 * 60);

/// The most digests whose pullers a node remembers.
const PULLING_DIGESTS: usize = 4096;

/// The swarm, as the fetch engine and the admin API see it. Cheap to clone.
#[derive(Clone)]
pub struct Swarm {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SwarmConfig,
    control: control::Control,
    local: PeerId,
    members: watch::Receiver<Arc<BTreeMap<PeerId, control::Member>>>,
    /// Peers known to hold a whole blob, from announcements and Kademlia.
    holders: Mutex<HashMap<String, HashSet<PeerId>>>,
    /// Peers known to pull a blob now, from their `Want`s, with when: the
    /// relays of its pieces ([`rendezvous::relay_parent`]).
    pulling: Mutex<HashMap<String, HashMap<PeerId, std::time::Instant>>>,
    distrusted: Mutex<HashSet<PeerId>>,
    owners: net::OwnerCache,
    client: reqwest::Client,
    scheme: &'static str,
    metrics: Metrics,
    upload_limit: Option<data::RateLimiter>,
    download_limit: Option<data::RateLimiter>,
    trusted: tls::Trusted,
    fingerprint: String,
    data_addr: SocketAddr,
}

/// A member, as `damselfly peers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub data_addr: SocketAddr,
    pub role: Role,
    pub last_seen_ms: u64,
    pub distrusted: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Swarm {
    /// Starts the control plane and the data-plane client. The data-plane
    /// server is [`data::serve`], started by the daemon with the fetcher.
    pub async fn start(
        cfg: &SwarmConfig,
        store_dir: &std::path::Path,
        metrics: Metrics,
    ) -> Result<(Swarm, data::Listener), SwarmError> {
        let identity = tls::TlsIdentity::generate()?;
        let trusted = tls::Trusted::default();
        let listener =
            data::Listener::bind(cfg, &identity, trusted.clone(), metrics.clone()).await?;
        let data_addr = SocketAddr::new(advertise_ip(cfg), listener.local_addr().port());
        let fingerprint = if cfg.data_tls {
            identity.fingerprint().to_owned()
        } else {
            String::new()
        };
        let control = control::Control::start(control_config(
            cfg,
            Some(store_dir.join("identity/p2p.key")),
            MemberInfo {
                data_addr,
                fingerprint: fingerprint.clone(),
                role: cfg.role,
            },
        )?)
        .await?;
        let mut builder = reqwest::Client::builder()
            // A dead peer refuses at once; a timeout means a loaded one (or
            // a lost host), which gets as long as the last peer before the
            // origin does (see fetch::pieces).
            .connect_timeout(cfg.stall_timeout * 3)
            // Below the data plane's idle limit, so the client drops an
            // idle connection before the server does.
            .pool_idle_timeout(data::IDLE_TIMEOUT / 2)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if cfg.data_tls {
            let tls = tls::client_config(&identity, trusted.clone())?;
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        let client = builder
            .build()
            .map_err(|e| SwarmError::Client(e.to_string()))?;
        let local = control.local_peer_id();
        let swarm = Swarm {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                members: control.members(),
                control,
                local,
                holders: Mutex::new(HashMap::new()),
                pulling: Mutex::new(HashMap::new()),
                distrusted: Mutex::new(HashSet::new()),
                owners: net::OwnerCache::default(),
                client,
                scheme: if cfg.data_tls { "https" } else { "http" },
                metrics,
                upload_limit: data::RateLimiter::new(cfg.upload_limit),
                download_limit: data::RateLimiter::new(cfg.download_limit),
                trusted,
                fingerprint,
                data_addr,
            }),
        };
        tracing::info!(peer_id = %local, data = %data_addr, role = cfg.role.as_str(),
            listen = %cfg.listen, "swarm started");
        Ok((swarm, listener))
    }

    /// Keeps the trusted fingerprints and the member gauge in step with the
    /// membership, and hands announcements to `on_announce` (seeds react to
    /// them). Runs until the control plane stops.
    pub fn spawn_watchers(
        &self,
        on_announce: impl Fn(control::Announcement) + Send + Sync + 'static,
    ) {
        let me = self.clone();
        let mut rx = self.inner.control.members();
        tokio::spawn(async move {
            loop {
                {
                    let members = rx.borrow_and_update().clone();
                    me.inner.trusted.replace(
                        members
                            .values()
                            .filter(|m| m.info.role.serves_data())
                            .map(|m| m.info.fingerprint.clone())
                            .filter(|f| !f.is_empty()),
                    );
                    let serving = members.values().filter(|m| m.info.role.serves_data());
                    me.inner.metrics.swarm_members.set(serving.count() as i64);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        let me = self.clone();
        let mut ann = self.inner.control.announcements();
        tokio::spawn(async move {
            loop {
                match ann.recv().await {
                    Ok(a) => {
                        match &a.what {
                            control::Announce::Have { digest, .. } => {
                                me.add_holder(&digest.to_string(), a.from)
                            }
                            control::Announce::Gone { digest } => {
                                me.remove_holder(&digest.to_string(), a.from)
                            }
                            control::Announce::Want { digest, .. } => {
                                me.add_pulling(&digest.to_string(), a.from)
                            }
                        }
                        on_announce(a);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "swarm announcements lagged");
                    }
                    Err(_) => return,
                }
            }
        });
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local
    }

    pub fn role(&self) -> Role {
        self.inner.cfg.role
    }

    pub fn piece_size(&self) -> u64 {
        self.inner.cfg.piece_size
    }

    pub fn max_piece_transfers(&self) -> usize {
        self.inner.cfg.max_piece_transfers
    }

    pub fn hedge_after(&self) -> Duration {
        self.inner.cfg.hedge_after
    }

    pub fn stall_timeout(&self) -> Duration {
        self.inner.cfg.stall_timeout
    }

    pub(crate) fn max_uploads(&self) -> usize {
        self.inner.cfg.max_uploads
    }

    /// Whether any other member that serves data is alive (else downloads
    /// go straight to the origin, sequentially).
    pub fn has_peers(&self) -> bool {
        self.inner
            .members
            .borrow()
            .values()
            .any(|m| m.info.role.serves_data())
    }

    /// Records that `peer` pulls `digest`. Bounded: at most
    /// [`PULLING_DIGESTS`] digests, the stalest dropped first, each entry
    /// forgotten after [`PULLING_TTL`].
    fn add_pulling(&self, digest: &str, peer: PeerId) {
        if peer == self.inner.local {
            return;
        }
        let now = std::time::Instant::now();
        let mut pulling = self.inner.pulling.lock().unwrap_or_else(|p| p.into_inner());
        pulling.retain(|_, m| {
            m.retain(|_, at| now.duration_since(*at) < PULLING_TTL);
            !m.is_empty()
        });
        if pulling.len() >= PULLING_DIGESTS && !pulling.contains_key(digest) {
            let stalest = pulling
                .iter()
                .min_by_key(|(_, m)| m.values().max().copied())
                .map(|(d, _)| d.clone());
            if let Some(d) = stalest {
                pulling.remove(&d);
            }
        }
        pulling
            .entry(digest.to_owned())
            .or_default()
            .insert(peer, now);
    }

    /// The peers that pull `digest` now, as far as this node knows.
    fn pulling(&self, digest: &str) -> HashSet<PeerId> {
        let now = std::time::Instant::now();
        self.inner
            .pulling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .map(|m| {
                m.iter()
                    .filter(|(_, at)| now.duration_since(**at) < PULLING_TTL)
                    .map(|(p, _)| *p)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn add_holder(&self, digest: &str, peer: PeerId) {
        // A holder serves from its store; it pulls no more.
        self.forget_pulling(digest, peer);
        if peer == self.inner.local {
            return;
        }
        self.inner
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.to_owned())
            .or_default()
            .insert(peer);
    }

    fn forget_pulling(&self, digest: &str, peer: PeerId) {
        let mut pulling = self.inner.pulling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = pulling.get_mut(digest) {
            m.remove(&peer);
            if m.is_empty() {
                pulling.remove(digest);
            }
        }
    }

    fn remove_holder(&self, digest: &str, peer: PeerId) {
        self.forget_pulling(digest, peer);
        let mut holders = self.inner.holders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = holders.get_mut(digest) {
            set.remove(&peer);
            if set.is_empty() {
                holders.remove(digest);
            }
        }
    }

    /// Asks Kademlia who holds `digest`, for at most `timeout`, and
    /// remembers the answer for [`Swarm::piece_plan`].
    pub async fn find_holders(&self, digest: &Digest, timeout: Duration) {
        let key = digest.to_string();
        let found = self.inner.control.providers(digest, timeout).await;
        for p in found {
            self.add_holder(&key, p);
        }
    }

    /// Tells the cluster this node starts pulling `digest` (seeds follow).
    pub fn announce_want(&self, digest: &Digest, ns: &str, repo: &str) {
        self.inner.control.announce(control::Announce::Want {
            digest: digest.clone(),
            ns: ns.to_owned(),
            repo: repo.to_owned(),
        });
    }

    /// Tells the cluster this node holds the whole verified blob.
    pub fn blob_committed(&self, digest: &Digest, size: u64) {
        self.inner.control.provide(digest);
        self.inner.control.announce(control::Announce::Have {
            digest: digest.clone(),
            size,
        });
    }

    /// Makes this node findable as a holder of `digest` (Kademlia only; no
    /// announcement, for blobs held since before the swarm started).
    pub fn provide(&self, digest: &Digest) {
        self.inner.control.provide(digest);
    }

    /// The blob is gone from the store (evicted or removed).
    pub fn blob_removed(&self, digest: &Digest) {
        self.inner.control.unprovide(digest);
    }

    /// Where piece `piece` of `digest` should come from, best first, always
    /// ending with the origin: [`rendezvous::plan`] over the live members
    /// that are not distrusted and have not `failed`. Holders of the whole
    /// blob, spread by rendezvous; for a node pulling the whole blob
    /// (`full`), the piece's owner too: first when it holds nothing yet (it
    /// fetches the piece once and passes it on), none when it is this node
    /// (this node fetches it). A serving download (`full == false`) never
    /// asks non-holders, so requests cannot loop.
    pub fn piece_plan(
        &self,
        digest: &Digest,
        piece: u64,
        pieces: Option<u64>,
        full: bool,
        failed: &HashSet<PeerId>,
    ) -> Vec<PieceSource> {
        // The sidecar is a member with no data plane: never asked, never
        // an owner.
        let members: Vec<(PeerId, SocketAddr)> = self
            .inner
            .members
            .borrow()
            .values()
            .filter(|m| m.info.role.serves_data())
            .map(|m| (m.peer_id, m.info.data_addr))
            .collect();
        let distrusted = self
            .inner
            .distrusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let holders = self
            .inner
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest.to_string())
            .cloned()
            .unwrap_or_default();
        let pulling = self.pulling(&digest.to_string());
        let view = net::PlanView {
            local: self.inner.local,
            members: &members,
            holders: &holders,
            pulling: &pulling,
            distrusted: &distrusted,
            relay_fanout: self.inner.cfg.relay_fanout,
            owners: &self.inner.owners,
        };
        net::plan_piece(&view, digest, piece, pieces, full, failed)
    }

    /// Asks a peer for a piece, over the data plane.
    pub async fn open_piece(&self, req: PieceRequest<'_>) -> Result<PeerResponse, PeerError> {
        let addr = req.peer.addr;
        let url = format!("{}://{}/v1/blobs/{}", self.inner.scheme, addr, req.digest);
        let mut get = self
            .inner
            .client
            .get(url)
            .header(
                http::header::RANGE,
                format!("bytes={}-{}", req.start, req.end_incl),
            )
            .header(data::REGISTRY_HEADER, req.registry)
            .header(data::REPOSITORY_HEADER, req.repo);
        if let Some(s) = req.size {
            get = get.header(data::SIZE_HEADER, s.to_string());
        }
        if req.relay() {
            get = get.header(data::RELAY_HEADER, "1");
        }
        let resp = get.send().await.map_err(|e| PeerError::Request {
            addr,
            reason: error_chain(&e),
        })?;
        if resp.status() != http::StatusCode::PARTIAL_CONTENT {
            return Err(PeerError::Status {
                addr,
                status: resp.status(),
            });
        }
        let (rstart, total) = resp
            .headers()
            .get(http::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::http::parse_content_range)
            .map(|r| (r.first, r.size))
            .ok_or(PeerError::NoRange { addr })?;
        let sums = resp
            .headers()
            .get(data::SUMS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(data::parse_sums);
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        use futures_util::{StreamExt, TryStreamExt};
        Ok(PeerResponse {
            start: rstart,
            total,
            sums,
            content_type,
            body: resp
                .bytes_stream()
                .map_err(|e| std::io::Error::other(error_chain(&e)))
                .boxed(),
        })
    }

    /// Stops asking `peer` for anything, for the life of this process.
    pub fn distrust(&self, peer: &PeerId, why: &str) {
        let new = self
            .inner
            .distrusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*peer);
        if new {
            self.inner.metrics.distrusted_peers.inc();
            tracing::warn!(peer = %peer, reason = why, "peer distrusted");
        }
    }

    /// Waits as the download limit asks, for `n` bytes from peers.
    pub async fn throttle_in(&self, n: u64) {
        if let Some(l) = &self.inner.download_limit {
            l.take(n).await;
        }
    }

    pub async fn throttle_out(&self, n: u64) {
        if let Some(l) = &self.inner.upload_limit {
            l.take(n).await;
        }
    }

    /// The data-plane byte counter for `peer` in `direction` (`in`, `out`).
    pub fn peer_counter(&self, peer: &PeerId, direction: &str) -> prometheus::IntCounter {
        self.inner
            .metrics
            .peer_bytes
            .with_label_values(&[&peer.to_string(), direction])
    }

    /// The member whose certificate has this fingerprint.
    pub fn member_by_fingerprint(&self, fp: &str) -> Option<PeerId> {
        self.inner
            .members
            .borrow()
            .values()
            .find(|m| m.info.role.serves_data() && m.info.fingerprint == fp)
            .map(|m| m.peer_id)
    }

    /// The member with this data-plane IP, for plain-HTTP peers.
    pub fn member_by_ip(&self, ip: std::net::IpAddr) -> Option<PeerId> {
        self.inner
            .members
            .borrow()
            .values()
            .find(|m| m.info.role.serves_data() && m.info.data_addr.ip() == ip)
            .map(|m| m.peer_id)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The members, for `damselfly peers`.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let members = self.inner.members.borrow().clone();
        let distrusted = self
            .inner
            .distrusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let bytes = |id: &PeerId, dir: &str| {
            self.inner
                .metrics
                .peer_bytes
                .get_metric_with_label_values(&[&id.to_string(), dir])
                .map(|c| c.get())
                .unwrap_or(0)
        };
        members
            .values()
            .map(|m| PeerStatus {
                peer_id: m.peer_id.to_string(),
                data_addr: m.info.data_addr,
                role: m.info.role,
                last_seen_ms: m.last_seen.elapsed().as_millis() as u64,
                distrusted: distrusted.contains(&m.peer_id),
                bytes_in: bytes(&m.peer_id, "in"),
                bytes_out: bytes(&m.peer_id, "out"),
            })
            .collect()
    }

    /// This node as the swarm knows it.
    pub fn local_info(&self) -> (String, SocketAddr, Role, &str) {
        (
            self.inner.local.to_string(),
            self.inner.data_addr,
            self.inner.cfg.role,
            &self.inner.fingerprint,
        )
    }

    pub async fn shutdown(&self) {
        self.inner.control.shutdown().await;
    }
}

impl PeerNet for Swarm {
    fn piece_size(&self) -> u64 {
        Swarm::piece_size(self)
    }

    fn max_piece_transfers(&self) -> usize {
        Swarm::max_piece_transfers(self)
    }

    fn hedge_after(&self) -> Duration {
        Swarm::hedge_after(self)
    }

    fn stall_timeout(&self) -> Duration {
        Swarm::stall_timeout(self)
    }

    fn has_peers(&self) -> bool {
        Swarm::has_peers(self)
    }

    fn piece_plan(
        &self,
        digest: &Digest,
        piece: u64,
        pieces: Option<u64>,
        full: bool,
        failed: &HashSet<PeerId>,
    ) -> Vec<PieceSource> {
        Swarm::piece_plan(self, digest, piece, pieces, full, failed)
    }

    fn find_holders<'a>(
        &'a self,
        digest: &'a Digest,
        timeout: Duration,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(Swarm::find_holders(self, digest, timeout))
    }

    fn open_piece<'a>(
        &'a self,
        req: PieceRequest<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<PeerResponse, PeerError>> {
        Box::pin(Swarm::open_piece(self, req))
    }

    fn distrust(&self, peer: &PeerId, why: &str) {
        Swarm::distrust(self, peer, why)
    }

    fn announce_want(&self, digest: &Digest, registry: &str, repo: &str) {
        Swarm::announce_want(self, digest, registry, repo)
    }

    fn blob_committed(&self, digest: &Digest, size: u64) {
        Swarm::blob_committed(self, digest, size)
    }

    fn throttle_in(&self, n: u64) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(Swarm::throttle_in(self, n))
    }

    fn bytes_in_counter(&self, peer: &PeerId) -> prometheus::IntCounter {
        self.peer_counter(peer, "in")
    }
}

/// The control plane's config for `cfg`'s `[swarm]`, announcing `info`.
pub(crate) fn control_config(
    cfg: &SwarmConfig,
    identity_file: Option<std::path::PathBuf>,
    info: MemberInfo,
) -> Result<control::ControlConfig, SwarmError> {
    let psk = match &cfg.cluster_key_file {
        Some(path) => Some(control::load_psk(path).map_err(control::ControlError::from)?),
        None => {
            tracing::warn!("swarm running without a cluster key (swarm.insecure_no_cluster_key): any node that reaches the port can join");
            None
        }
    };
    let bootstrap = cfg
        .bootstrap
        .iter()
        .filter_map(|b| b.parse::<control::Bootstrap>().ok())
        .collect();
    let listen = cfg
        .listen
        .parse()
        .map_err(|e| SwarmError::Client(format!("swarm.listen: {e}")))?;
    Ok(control::ControlConfig {
        listen,
        bootstrap,
        psk,
        mdns: cfg.mdns,
        identity_file,
        dns_refresh: cfg.dns_refresh,
        heartbeat: cfg.heartbeat,
        member_ttl: cfg.heartbeat * 4,
        adaptive_heartbeat: true,
        info,
    })
}

/// The IP peers should dial for this node's data plane.
fn advertise_ip(cfg: &SwarmConfig) -> std::net::IpAddr {
    if let Some(ip) = cfg.advertise {
        return ip;
    }
    if !cfg.data_listen.ip().is_unspecified() {
        return cfg.data_listen.ip();
    }
    for var in ["POD_IP", "HOST_IP"] {
        if let Some(ip) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            return ip;
        }
    }
    // The source address of the default route; connect() on UDP sends
    // nothing.
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("10.255.255.255:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}
