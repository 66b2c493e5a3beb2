//! The swarm's control plane: libp2p membership, announcements and provider
//! lookups.
//!
//! One spawned task owns the libp2p [`Swarm`]; [`Control`] is a cheap handle
//! that talks to it over an mpsc channel. Membership is published on a watch
//! channel, other nodes' announcements on a broadcast channel.
//!
//! Wire formats (JSON, gossipsub, signed by the sender's node key):
//! - `damselfly/members/1`: `{"info": MemberInfo}` every heartbeat.
//! - `damselfly/content/1`: [`Announce`], tagged as `{"type": "have", ...}`.
//! - the topics of [`super::intents::TOPICS`]: bytes this module does not
//!   read, handed out as [`TopicMessage`]s (warm intents and their acks).

use std::collections::{btree_map, BTreeMap, HashMap, HashSet};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::io::{AsyncRead, AsyncWrite};
use futures_util::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, PublishError, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{
    self, store::MemoryStore, store::MemoryStoreConfig, GetProvidersOk, QueryResult,
};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::intents::{TopicMessage, TOPICS as EXTRA_TOPICS};
use super::{MemberInfo, Role};
pub use crate::config::{load_psk, Bootstrap};
use crate::config::{warn_if_readable_by_others, BootstrapError, ClusterKeyError};

/// How long a provider lookup goes on collecting after its first answer.
pub const PROVIDERS_GRACE: Duration = Duration::from_millis(15);
const MEMBERS_TOPIC: &str = "damselfly/members/1";
const CONTENT_TOPIC: &str = "damselfly/content/1";
const IDENTIFY_PROTOCOL: &str = "/damselfly/id/1.0.0";
const KAD_PROTOCOL: &str = "/damselfly/kad/1.0.0";

/// Members are expected to stay connected; gossipsub's long-lived streams
/// already keep connections open, this only covers the gaps.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on TCP connect + pnet + noise + yamux, so a black-holed address does
/// not hold a dial slot for the OS's SYN timeout.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often static bootstrap addresses that are not connected are redialed.
const REDIAL_EVERY: Duration = Duration::from_secs(3);
/// Wait for the routing table to settle after a new peer before re-announcing
/// our provider records, so a burst of joins costs one round.
const REPROVIDE_DEBOUNCE: Duration = Duration::from_secs(1);
const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
const ANNOUNCEMENT_BUFFER: usize = 1024;
/// Image caches easily hold more blobs than MemoryStore's default of 1024
/// provider keys; past the limit start_providing fails.
const MAX_PROVIDER_KEYS: usize = 1 << 16;

/// Everything the control plane needs to start.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// Where to listen, e.g. `/ip4/127.0.0.2/tcp/4003`.
    pub listen: Multiaddr,
    pub bootstrap: Vec<Bootstrap>,
    /// Cluster key; `None` means anyone who can reach the port may join.
    pub psk: Option<[u8; 32]>,
    pub mdns: bool,
    /// Protobuf-encoded ed25519 keypair; created (0600) when missing.
    /// `None`: a new identity each start (the sidecar, which keeps nothing).
    pub identity_file: Option<PathBuf>,
    /// How often `Bootstrap::Dns` entries are re-resolved.
    pub dns_refresh: Duration,
    /// Membership heartbeat period.
    pub heartbeat: Duration,
    /// A member not heard from for this long is dropped.
    pub member_ttl: Duration,
    /// What this node announces about itself.
    pub info: MemberInfo,
}

/// Control-plane errors; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("identity file {path}: {source}")]
    IdentityIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "identity file {path} is not a protobuf-encoded libp2p keypair ({reason}); \
         move it aside to generate a new identity (this node's PeerId will change)"
    )]
    IdentityCorrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    ClusterKey(#[from] ClusterKeyError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("invalid control-plane config: {0}")]
    Config(String),
    #[error("cannot set up the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot set up {what}: {reason}")]
    Behaviour { what: &'static str, reason: String },
    #[error(
        "cannot listen on {addr}: {reason}; check that the address is local and the port is free"
    )]
    Listen { addr: Multiaddr, reason: String },
}

/// A live member of the cluster other than this node.
#[derive(Clone, Debug)]
pub struct Member {
    pub peer_id: PeerId,
    pub info: MemberInfo,
    /// When its last heartbeat arrived.
    pub last_seen: Instant,
    /// Its listen addresses as reported by identify; empty until we have been
    /// directly connected to it.
    pub addrs: Vec<Multiaddr>,
}

impl Member {
    /// Seeds keep full copies of what the cluster pulls.
    pub fn is_seed(&self) -> bool {
        self.info.role == Role::Seed
    }
}

/// Content announcements, published on the content topic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Announce {
    /// This node holds the whole verified blob.
    Have { digest: String, size: u64 },
    /// This node started pulling it (seeds use this).
    Want {
        digest: String,
        ns: String,
        repo: String,
    },
}

/// An announcement from another node; `from` is the verified gossipsub
/// source, not whoever relayed it.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub from: PeerId,
    pub what: Announce,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    info: MemberInfo,
}

type MemberMap = Arc<BTreeMap<PeerId, Member>>;

enum Command {
    Announce(Announce),
    Publish {
        topic: &'static str,
        data: Vec<u8>,
    },
    Provide(String),
    Unprovide(String),
    Providers {
        digest: String,
        found: mpsc::UnboundedSender<PeerId>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// Handle on the control plane. Cloning is cheap; the swarm task stops on
/// [`Control::shutdown`] or when every handle is dropped.
#[derive(Clone)]
pub struct Control {
    peer_id: PeerId,
    cmd_tx: mpsc::UnboundedSender<Command>,
    members_rx: watch::Receiver<MemberMap>,
    ann_tx: broadcast::Sender<Announcement>,
    msg_tx: broadcast::Sender<TopicMessage>,
    connected: Arc<AtomicUsize>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
}

impl Control {
    /// Binds `cfg.listen` (failing if it cannot), spawns the swarm task and
    /// returns without waiting for any peer.
    pub async fn start(cfg: ControlConfig) -> Result<Control, ControlError> {
        validate(&cfg)?;
        let key = match &cfg.identity_file {
            Some(path) => load_or_create_identity(path)?,
            None => Keypair::generate_ed25519(),
        };
        let peer_id = key.public().to_peer_id();
        let transport = build_transport(&key, cfg.psk)?;
        let behaviour = build_behaviour(&key, &cfg)?;
        let swarm_cfg = libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
        let mut swarm = Swarm::new(transport, behaviour, peer_id, swarm_cfg);

        let members_topic = IdentTopic::new(MEMBERS_TOPIC);
        let content_topic = IdentTopic::new(CONTENT_TOPIC);
        let extra_topics: Vec<(IdentTopic, &'static str)> = EXTRA_TOPICS
            .iter()
            .map(|t| (IdentTopic::new(*t), *t))
            .collect();
        for t in [&members_topic, &content_topic]
            .into_iter()
            .chain(extra_topics.iter().map(|(t, _)| t))
        {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(t)
                .map_err(|e| ControlError::Behaviour {
                    what: "gossipsub subscription",
                    reason: e.to_string(),
                })?;
        }

        // libp2p-tcp sets SO_REUSEPORT on every listening socket, so a
        // second daemon on the same port would bind "successfully" and the
        // kernel would split inbound connections between the two. A plain
        // bind first (no SO_REUSEPORT) fails if anyone holds the port.
        if let Some(sa) = tcp_socket_addr(&cfg.listen).filter(|sa| sa.port() != 0) {
            std::net::TcpListener::bind(sa).map_err(|e| ControlError::Listen {
                addr: cfg.listen.clone(),
                reason: e.to_string(),
            })?;
        }
        let listener = swarm
            .listen_on(cfg.listen.clone())
            .map_err(|e| ControlError::Listen {
                addr: cfg.listen.clone(),
                reason: e.to_string(),
            })?;

        let heartbeat = serde_json::to_vec(&Heartbeat {
            info: cfg.info.clone(),
        })
        .expect("MemberInfo serializes");

        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (members_tx, members_rx) = watch::channel(MemberMap::default());
        let (ann_tx, _) = broadcast::channel(ANNOUNCEMENT_BUFFER);
        let (msg_tx, _) = broadcast::channel(ANNOUNCEMENT_BUFFER);
        let connected = Arc::new(AtomicUsize::new(0));
        let listen_addrs = Arc::new(Mutex::new(Vec::new()));

        let mut static_addrs = Vec::new();
        let mut dns_names = Vec::new();
        for b in &cfg.bootstrap {
            match b {
                Bootstrap::Addr(a) => static_addrs.push(a.clone()),
                Bootstrap::Dns { host, port } => dns_names.push((host.clone(), *port)),
            }
        }

        let mut task = Task {
            swarm,
            members_topic,
            content_topic,
            extra_topics,
            msg_tx: msg_tx.clone(),
            heartbeat,
            member_ttl: cfg.member_ttl,
            cfg_listen: cfg.listen.clone(),
            members: BTreeMap::new(),
            members_tx,
            ann_tx: ann_tx.clone(),
            connected: connected.clone(),
            listen_addrs: listen_addrs.clone(),
            peer_addrs: HashMap::new(),
            static_addrs,
            dns_addrs: vec![Vec::new(); dns_names.len()],
            self_addrs: HashSet::new(),
            dialing: HashMap::new(),
            addr_peer: HashMap::new(),
            provided: HashSet::new(),
            provider_queries: HashMap::new(),
            reprovide_at: None,
        };

        // The listener reports its address (or its failure) on the first
        // poll; waiting for it makes bind errors surface here and fills
        // listen_addrs() before start returns.
        task.wait_listening(listener, &cfg.listen).await?;

        let (dns_tx, dns_rx) = mpsc::channel(4);
        let resolver = if dns_names.is_empty() {
            None
        } else {
            Some(tokio::spawn(resolve_loop(
                dns_names,
                cfg.dns_refresh,
                dns_tx,
            )))
        };
        tokio::spawn(task.run(cfg.heartbeat, cmd_rx, dns_rx, resolver));
        info!(%peer_id, listen = %cfg.listen, "control plane started");

        Ok(Control {
            peer_id,
            cmd_tx,
            members_rx,
            ann_tx,
            msg_tx,
            connected,
            listen_addrs,
        })
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Addresses the swarm actually listens on (a `/tcp/0` listen address
    /// resolves to the port picked by the OS).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Live members other than this node. `changed()` fires when a member
    /// joins or leaves or its info or addresses change; `last_seen` is kept
    /// fresh in the current value without waking receivers.
    pub fn members(&self) -> watch::Receiver<Arc<BTreeMap<PeerId, Member>>> {
        self.members_rx.clone()
    }

    /// Publishes on the content topic; best effort (no peers, no delivery).
    pub fn announce(&self, a: Announce) {
        let _ = self.cmd_tx.send(Command::Announce(a));
    }

    /// Publishes `data` on one of [`EXTRA_TOPICS`]; best effort, like
    /// [`Control::announce`].
    pub fn publish(&self, topic: &'static str, data: Vec<u8>) {
        let _ = self.cmd_tx.send(Command::Publish { topic, data });
    }

    /// Other nodes' messages on [`EXTRA_TOPICS`] (never our own).
    pub fn messages(&self) -> broadcast::Receiver<TopicMessage> {
        self.msg_tx.subscribe()
    }

    /// Announces in Kademlia that this node holds `digest`, and keeps
    /// re-announcing it to peers that join later.
    pub fn provide(&self, digest: &str) {
        let _ = self.cmd_tx.send(Command::Provide(digest.to_string()));
    }

    /// Stops announcing `digest`. Records already stored by other nodes
    /// expire on their own (Kademlia has no retraction).
    pub fn unprovide(&self, digest: &str) {
        let _ = self.cmd_tx.send(Command::Unprovide(digest.to_string()));
    }

    /// Other nodes that provide `digest` (never this node), collected until
    /// the Kademlia query finishes, `timeout` passes, or [`PROVIDERS_GRACE`]
    /// after the first one was found, whichever is first.
    pub async fn providers(&self, digest: &str, timeout: Duration) -> Vec<PeerId> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cmd = Command::Providers {
            digest: digest.to_string(),
            found: tx,
        };
        if self.cmd_tx.send(cmd).is_err() {
            return Vec::new();
        }
        let mut found = Vec::new();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => {
                        if !found.contains(&p) {
                            found.push(p);
                        }
                        // One holder is enough to start: the caller is
                        // waiting to send its first byte. Others that answer
                        // within a moment are kept, to spread the load.
                        let soon = tokio::time::Instant::now() + PROVIDERS_GRACE;
                        if deadline.deadline() > soon {
                            deadline.as_mut().reset(soon);
                        }
                    }
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        found
    }

    /// Other nodes' announcements (never our own).
    pub fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.ann_tx.subscribe()
    }

    /// Number of peers with at least one open connection.
    pub fn connected_peers(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Stops the swarm task and waits until its connections are dropped.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn validate(cfg: &ControlConfig) -> Result<(), ControlError> {
    if cfg.heartbeat.is_zero() {
        return Err(ControlError::Config(
            "heartbeat must be greater than zero".into(),
        ));
    }
    if cfg.member_ttl <= cfg.heartbeat {
        return Err(ControlError::Config(format!(
            "member_ttl ({:?}) must be longer than heartbeat ({:?}), \
             or members are dropped between heartbeats; use 3-4 heartbeats",
            cfg.member_ttl, cfg.heartbeat
        )));
    }
    let has_dns = cfg
        .bootstrap
        .iter()
        .any(|b| matches!(b, Bootstrap::Dns { .. }));
    if has_dns && cfg.dns_refresh < Duration::from_secs(1) {
        return Err(ControlError::Config(format!(
            "dns_refresh ({:?}) must be at least 1s",
            cfg.dns_refresh
        )));
    }
    Ok(())
}

fn load_or_create_identity(path: &Path) -> Result<Keypair, ControlError> {
    let io_err = |source| ControlError::IdentityIo {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path, "identity");
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| ControlError::IdentityCorrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| io_err(io::Error::other(e.to_string())))?;
            write_private_file(path, &bytes).map_err(io_err)?;
            info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created node identity");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves a
/// truncated identity that would fail the next start.
fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn build_transport(
    key: &Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, ControlError> {
    let tcp_cfg = tcp::Config::default().nodelay(true);
    // DNS only matters for /dns4|dns6 multiaddrs in the bootstrap list; a
    // host without a usable resolv.conf still works with IP addresses.
    match libp2p::dns::tokio::Transport::system(tcp::tokio::Transport::new(tcp_cfg.clone())) {
        Ok(dns) => secure(dns, key, psk),
        Err(e) => {
            warn!(error = %e, "no system DNS config; /dns multiaddrs will not resolve");
            secure(tcp::tokio::Transport::new(tcp_cfg), key, psk)
        }
    }
}

/// pnet has to wrap the raw TCP stream, beneath noise: a peer with another
/// key then fails the noise handshake on garbled bytes, before any protocol
/// runs.
fn secure<T>(
    base: T,
    key: &Keypair,
    psk: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, ControlError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(key).map_err(|e| ControlError::Transport(e.to_string()))?;
    Ok(match psk {
        Some(psk) => {
            let pnet = PnetConfig::new(PreSharedKey::new(psk));
            base.and_then(move |socket, _| pnet.handshake(socket))
                .upgrade(Version::V1)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(UPGRADE_TIMEOUT)
                .boxed()
        }
        None => base
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
    })
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

fn build_behaviour(key: &Keypair, cfg: &ControlConfig) -> Result<Behaviour, ControlError> {
    let peer_id = key.public().to_peer_id();
    let gossip_err = |reason: String| ControlError::Behaviour {
        what: "gossipsub",
        reason,
    };

    // Mesh repair and gossip run on gossipsub's own heartbeat; keeping it
    // at or below the membership heartbeat lets a relayed member show up
    // within about one membership period.
    let gossip_heartbeat = cfg
        .heartbeat
        .clamp(Duration::from_millis(100), Duration::from_millis(500));
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(gossip_heartbeat)
        .validation_mode(ValidationMode::Strict)
        .flood_publish(true)
        .build()
        .map_err(|e| gossip_err(e.to_string()))?;
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_cfg)
        .map_err(|e| gossip_err(e.to_string()))?;

    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_provided_keys: MAX_PROVIDER_KEYS,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
    // Default mode is client until an external address is confirmed, which
    // never happens without AutoNAT; nodes on a cluster network all serve.
    // The sidecar holds nothing, so it takes no provider records either.
    kad.set_mode(Some(if cfg.info.role.serves_data() {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));

    let mdns = if cfg.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id).map_err(|e| {
                ControlError::Behaviour {
                    what: "mDNS",
                    reason: e.to_string(),
                }
            })?,
        )
    } else {
        None
    };

    Ok(Behaviour {
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("damselfly/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::new(ping::Config::new()),
        gossipsub,
        kad,
        mdns: Toggle::from(mdns),
    })
}

async fn resolve_loop(
    names: Vec<(String, u16)>,
    every: Duration,
    tx: mpsc::Sender<(usize, Vec<SocketAddr>)>,
) {
    loop {
        for (i, (host, port)) in names.iter().enumerate() {
            let lookup = tokio::net::lookup_host((host.as_str(), *port));
            match tokio::time::timeout(DNS_LOOKUP_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    debug!(%host, n = addrs.len(), "resolved bootstrap name");
                    if tx.send((i, addrs)).await.is_err() {
                        return;
                    }
                }
                // Keep the previous answer: a transient resolver failure
                // should not make us forget the cluster.
                Ok(Err(e)) => warn!(%host, error = %e, "cannot resolve bootstrap name"),
                Err(_) => warn!(%host, "resolving bootstrap name timed out"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

fn socket_multiaddr(sa: SocketAddr) -> Multiaddr {
    let ip = match sa.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port()))
}

fn tcp_socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(port) => return ip.map(|ip| SocketAddr::new(ip, port)),
            _ => {}
        }
    }
    None
}

fn multiaddr_peer(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Task {
    swarm: Swarm<Behaviour>,
    members_topic: IdentTopic,
    content_topic: IdentTopic,
    extra_topics: Vec<(IdentTopic, &'static str)>,
    msg_tx: broadcast::Sender<TopicMessage>,
    /// Our heartbeat payload; MemberInfo does not change while running.
    heartbeat: Vec<u8>,
    member_ttl: Duration,
    cfg_listen: Multiaddr,
    members: BTreeMap<PeerId, Member>,
    members_tx: watch::Sender<MemberMap>,
    ann_tx: broadcast::Sender<Announcement>,
    connected: Arc<AtomicUsize>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Listen addresses from identify, for peers we are connected to.
    peer_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    static_addrs: Vec<Multiaddr>,
    /// Latest answer per Bootstrap::Dns entry.
    dns_addrs: Vec<Vec<Multiaddr>>,
    /// Bootstrap addresses that turned out to be this node.
    self_addrs: HashSet<Multiaddr>,
    /// Bootstrap dials in flight.
    dialing: HashMap<ConnectionId, Multiaddr>,
    /// Which peer answered at a bootstrap address, so it is only redialed
    /// once that peer is gone.
    addr_peer: HashMap<Multiaddr, PeerId>,
    provided: HashSet<String>,
    provider_queries: HashMap<kad::QueryId, mpsc::UnboundedSender<PeerId>>,
    reprovide_at: Option<tokio::time::Instant>,
}

impl Task {
    async fn wait_listening(
        &mut self,
        listener: libp2p::core::transport::ListenerId,
        addr: &Multiaddr,
    ) -> Result<(), ControlError> {
        let fail = |reason: String| ControlError::Listen {
            addr: addr.clone(),
            reason,
        };
        let wait = async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr {
                        listener_id,
                        address,
                    } if listener_id == listener => {
                        self.on_new_listen_addr(address);
                        return Ok(());
                    }
                    SwarmEvent::ListenerClosed {
                        listener_id,
                        reason,
                        ..
                    } if listener_id == listener => {
                        return Err(fail(match reason {
                            Err(e) => e.to_string(),
                            Ok(()) => "listener closed".into(),
                        }))
                    }
                    SwarmEvent::ListenerError { listener_id, error } if listener_id == listener => {
                        return Err(fail(error.to_string()))
                    }
                    ev => self.on_swarm_event(ev),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| fail("no listen address reported within 10s".into()))?
    }

    async fn run(
        mut self,
        heartbeat: Duration,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut dns_rx: mpsc::Receiver<(usize, Vec<SocketAddr>)>,
        resolver: Option<tokio::task::JoinHandle<()>>,
    ) {
        let mut hb = tokio::time::interval(heartbeat);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(REDIAL_EVERY);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let ack = loop {
            let reprovide_at = self.reprovide_at;
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown(ack)) => break Some(ack),
                    Some(cmd) => self.on_command(cmd),
                    None => break None,
                },
                _ = hb.tick() => {
                    self.publish_heartbeat();
                    self.expire_members();
                }
                // The first tick is immediate: dial bootstrap peers at once.
                _ = redial.tick() => self.dial_bootstrap(),
                Some((i, addrs)) = dns_rx.recv() => self.on_resolved(i, addrs),
                _ = sleep_until_opt(reprovide_at) => self.reprovide(),
            }
        };

        if let Some(r) = resolver {
            r.abort();
        }
        self.connected.store(0, Ordering::Relaxed);
        self.members_tx.send_replace(MemberMap::default());
        info!("control plane stopped");
        // Dropping the swarm closes every connection; ack only afterwards so
        // shutdown() means the peers can see us gone.
        drop(self);
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Announce(a) => {
                let data = match serde_json::to_vec(&a) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "cannot encode announcement");
                        return;
                    }
                };
                let topic = self.content_topic.clone();
                self.publish(topic, data);
            }
            Command::Publish { topic, data } => {
                match self.extra_topics.iter().find(|(_, name)| *name == topic) {
                    Some((t, _)) => {
                        let t = t.clone();
                        self.publish(t, data);
                    }
                    None => warn!(topic, "publish on a topic this node does not carry"),
                }
            }
            Command::Provide(digest) => {
                self.start_providing(&digest);
                self.provided.insert(digest);
            }
            Command::Unprovide(digest) => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&kad::RecordKey::new(&digest));
                self.provided.remove(&digest);
            }
            Command::Providers { digest, found } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&digest));
                self.provider_queries.insert(id, found);
            }
            // run() intercepts it before dispatching here.
            Command::Shutdown(_) => {}
        }
    }

    fn start_providing(&mut self, digest: &str) {
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(kad::RecordKey::new(&digest))
        {
            warn!(%digest, error = ?e, "cannot record provider entry");
        }
    }

    /// libp2p only republishes provider records every 12 h, and a node that
    /// joins later would otherwise not learn what existing members hold.
    fn reprovide(&mut self) {
        self.reprovide_at = None;
        let digests: Vec<String> = self.provided.iter().cloned().collect();
        debug!(n = digests.len(), "re-announcing provider records");
        for d in digests {
            self.start_providing(&d);
        }
    }

    fn publish(&mut self, topic: IdentTopic, data: Vec<u8>) {
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), data)
        {
            Ok(_) => {}
            // Alone in the cluster, or peers still exchanging subscriptions.
            Err(PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => debug!(topic = %topic, error = %e, "gossipsub publish failed"),
        }
    }

    fn publish_heartbeat(&mut self) {
        let topic = self.members_topic.clone();
        let data = self.heartbeat.clone();
        self.publish(topic, data);
    }

    fn expire_members(&mut self) {
        let ttl = self.member_ttl;
        let before = self.members.len();
        self.members.retain(|peer, m| {
            let keep = m.last_seen.elapsed() <= ttl;
            if !keep {
                info!(%peer, "member timed out");
            }
            keep
        });
        if self.members.len() != before {
            self.send_members();
        }
    }

    fn send_members(&self) {
        self.members_tx.send_replace(Arc::new(self.members.clone()));
    }

    fn on_heartbeat(&mut self, from: PeerId, data: &[u8]) {
        let hb: Heartbeat = match serde_json::from_slice(data) {
            Ok(hb) => hb,
            Err(e) => {
                debug!(%from, error = %e, "ignoring malformed heartbeat");
                return;
            }
        };
        let now = Instant::now();
        let addrs = self.peer_addrs.get(&from).cloned().unwrap_or_default();
        match self.members.entry(from) {
            btree_map::Entry::Occupied(mut e) => {
                let m = e.get_mut();
                m.last_seen = now;
                if m.info != hb.info || m.addrs != addrs {
                    m.info = hb.info;
                    m.addrs = addrs;
                    self.send_members();
                } else {
                    let members = &self.members;
                    self.members_tx.send_if_modified(|cur| {
                        *cur = Arc::new(members.clone());
                        false
                    });
                }
            }
            btree_map::Entry::Vacant(e) => {
                info!(peer = %from, role = hb.info.role.as_str(), data_addr = %hb.info.data_addr, "member joined");
                e.insert(Member {
                    peer_id: from,
                    info: hb.info,
                    last_seen: now,
                    addrs,
                });
                self.send_members();
                // Heard through a relay: connect directly if Kademlia knows
                // an address, so the cluster does not hinge on one node.
                if !self.swarm.is_connected(&from) {
                    let opts = DialOpts::peer_id(from)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(peer = %from, error = %e, "no direct route to member yet");
                    }
                }
            }
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if let Some(addr) = self.dialing.remove(&connection_id) {
                    self.addr_peer.insert(addr, peer_id);
                }
                self.update_connected();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer = %peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    self.peer_addrs.remove(&peer_id);
                    if self.members.remove(&peer_id).is_some() {
                        info!(peer = %peer_id, "member disconnected");
                        self.send_members();
                    }
                }
                self.update_connected();
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let addr = self.dialing.remove(&connection_id);
                if let DialError::LocalPeerId { .. } = error {
                    if let Some(addr) = addr {
                        info!(%addr, "bootstrap address is this node; not dialing it again");
                        self.self_addrs.insert(addr);
                    }
                    return;
                }
                debug!(?peer_id, ?addr, error = %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // Includes peers with another cluster key: their noise
                // handshake fails on the pnet-garbled stream.
                debug!(from = %send_back_addr, error = %error, "inbound connection failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed { reason, .. } => {
                warn!(?reason, "control-plane listener closed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(error = %error, "control-plane listener error");
            }
            _ => {}
        }
    }

    fn on_new_listen_addr(&mut self, address: Multiaddr) {
        info!(%address, "control plane listening");
        let mut addrs = self.listen_addrs.lock().unwrap_or_else(|p| p.into_inner());
        if !addrs.contains(&address) {
            addrs.push(address);
        }
    }

    fn update_connected(&self) {
        self.connected
            .store(self.swarm.connected_peers().count(), Ordering::Relaxed);
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(ev) => self.on_gossipsub(ev),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .filter(|a| {
                        tcp_socket_addr(a)
                            .is_some_and(|sa| !sa.ip().is_unspecified() && sa.port() != 0)
                    })
                    .collect();
                let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
                if speaks_kad {
                    for a in &addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, a.clone());
                    }
                }
                if let Some(m) = self.members.get_mut(&peer_id) {
                    if m.addrs != addrs {
                        m.addrs = addrs.clone();
                        self.send_members();
                    }
                }
                self.peer_addrs.insert(peer_id, addrs);
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Kad(ev) => self.on_kad(ev),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let local = *self.swarm.local_peer_id();
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if peer != local {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "cannot dial mDNS peer");
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
        }
    }

    fn on_gossipsub(&mut self, ev: gossipsub::Event) {
        match ev {
            gossipsub::Event::Message { message, .. } => {
                let Some(from) = message.source else {
                    debug!("ignoring unsigned gossipsub message");
                    return;
                };
                if from == *self.swarm.local_peer_id() {
                    return;
                }
                if message.topic == self.members_topic.hash() {
                    self.on_heartbeat(from, &message.data);
                } else if message.topic == self.content_topic.hash() {
                    match serde_json::from_slice::<Announce>(&message.data) {
                        Ok(what) => {
                            // No receivers is fine: nobody is listening yet.
                            let _ = self.ann_tx.send(Announcement { from, what });
                        }
                        Err(e) => debug!(%from, error = %e, "ignoring malformed announcement"),
                    }
                } else if let Some(topic) = self
                    .extra_topics
                    .iter()
                    .find(|(t, _)| message.topic == t.hash())
                    .map(|(_, name)| *name)
                {
                    let _ = self.msg_tx.send(TopicMessage {
                        topic,
                        from,
                        data: message.data,
                    });
                } else {
                    debug!(%from, topic = %message.topic, "message on unknown topic");
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic, .. }
                if topic == self.members_topic.hash() =>
            {
                debug!(peer = %peer_id, "peer joined the members topic");
                // Let the joiner see us now rather than a heartbeat later.
                self.publish_heartbeat();
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                debug!(peer = %peer_id, "peer does not speak gossipsub");
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::GetProviders(res),
                step,
                ..
            } => {
                let local = *self.swarm.local_peer_id();
                if let Some(tx) = self.provider_queries.get(&id) {
                    let mut gone = false;
                    match res {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            for p in providers.into_iter().filter(|p| *p != local) {
                                gone |= tx.send(p).is_err();
                            }
                        }
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                        Err(e) => debug!(error = %e, "provider lookup ended early"),
                    }
                    if gone || tx.is_closed() {
                        // The caller timed out; stop asking the network.
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                    if step.last || gone {
                        self.provider_queries.remove(&id);
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                result: QueryResult::StartProviding(res),
                ..
            } => match res {
                Ok(ok) => debug!(key = ?ok.key, "provider record published"),
                Err(e) => debug!(error = %e, "provider record not published"),
            },
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            } => {
                debug!(%peer, "new peer in the routing table");
                if !self.provided.is_empty() && self.reprovide_at.is_none() {
                    self.reprovide_at = Some(tokio::time::Instant::now() + REPROVIDE_DEBOUNCE);
                }
            }
            _ => {}
        }
    }

    fn on_resolved(&mut self, i: usize, addrs: Vec<SocketAddr>) {
        if let Some(slot) = self.dns_addrs.get_mut(i) {
            *slot = addrs.into_iter().map(socket_multiaddr).collect();
        }
        self.dial_bootstrap();
    }

    fn is_self(&self, addr: &Multiaddr) -> bool {
        if self.self_addrs.contains(addr) {
            return true;
        }
        if multiaddr_peer(addr).is_some_and(|p| p == *self.swarm.local_peer_id()) {
            return true;
        }
        let Some(target) = tcp_socket_addr(addr) else {
            return false;
        };
        let listening = self
            .listen_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        listening
            .iter()
            .chain(std::iter::once(&self.cfg_listen))
            .filter_map(tcp_socket_addr)
            .any(|l| {
                l == target
                    || (l.ip().is_unspecified()
                        && l.port() == target.port()
                        && target.ip().is_loopback())
            })
    }

    fn dial_bootstrap(&mut self) {
        let targets: Vec<Multiaddr> = self
            .static_addrs
            .iter()
            .chain(self.dns_addrs.iter().flatten())
            .cloned()
            .collect();
        // Forget peers behind addresses DNS no longer returns.
        self.addr_peer.retain(|a, _| targets.contains(a));
        for addr in targets {
            if self.is_self(&addr) || self.dialing.values().any(|a| a == &addr) {
                continue;
            }
            let known = self
                .addr_peer
                .get(&addr)
                .copied()
                .or_else(|| multiaddr_peer(&addr));
            if known.is_some_and(|p| self.swarm.is_connected(&p)) {
                continue;
            }
            let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.dialing.insert(id, addr);
                }
                Err(e) => debug!(%addr, error = %e, "cannot dial bootstrap address"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SEQ: AtomicUsize = AtomicUsize::new(0);

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "damselfly-control-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const PSK: [u8; 32] = [7; 32];

    fn info(n: u16) -> MemberInfo {
        MemberInfo {
            data_addr: SocketAddr::from(([127, 0, 0, 1], 5000 + n)),
            fingerprint: format!("{n:064x}"),
            role: if n == 0 { Role::Seed } else { Role::Node },
        }
    }

    fn config(
        dir: &TempDir,
        n: u16,
        psk: Option<[u8; 32]>,
        bootstrap: Vec<Bootstrap>,
    ) -> ControlConfig {
        ControlConfig {
            listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
            bootstrap,
            psk,
            mdns: false,
            identity_file: Some(dir.0.join(format!("node{n}")).join("identity.key")),
            dns_refresh: Duration::from_secs(30),
            heartbeat: Duration::from_millis(250),
            member_ttl: Duration::from_millis(1500),
            info: info(n),
        }
    }

    fn boot(c: &Control) -> Vec<Bootstrap> {
        vec![Bootstrap::Addr(c.listen_addrs()[0].clone())]
    }

    async fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn sees(c: &Control, others: &[(&Control, u16)]) -> bool {
        let m = c.members().borrow().clone();
        m.len() == others.len()
            && others.iter().all(|(o, n)| {
                m.get(&o.local_peer_id())
                    .is_some_and(|m| m.info == info(*n))
            })
    }

    async fn chain(dir: &TempDir) -> (Control, Control, Control) {
        let a = Control::start(config(dir, 0, Some(PSK), vec![]))
            .await
            .unwrap();
        let b = Control::start(config(dir, 1, Some(PSK), boot(&a)))
            .await
            .unwrap();
        let c = Control::start(config(dir, 2, Some(PSK), boot(&b)))
            .await
            .unwrap();
        (a, b, c)
    }

    #[tokio::test]
    async fn three_nodes_form_a_cluster() {
        let dir = TempDir::new("cluster");
        let (a, b, c) = chain(&dir).await;
        let ok = wait_for(Duration::from_secs(5), || {
            sees(&a, &[(&b, 1), (&c, 2)])
                && sees(&b, &[(&a, 0), (&c, 2)])
                && sees(&c, &[(&a, 0), (&b, 1)])
        })
        .await;
        assert!(
            ok,
            "members: a={:?} b={:?} c={:?}",
            a.members().borrow(),
            b.members().borrow(),
            c.members().borrow()
        );
        assert!(a.connected_peers() >= 1);
        for n in [&a, &b, &c] {
            n.shutdown().await;
        }
    }

    #[tokio::test]
    async fn other_key_or_no_key_never_joins() {
        let dir = TempDir::new("psk");
        let a = Control::start(config(&dir, 0, Some(PSK), vec![]))
            .await
            .unwrap();
        let x = Control::start(config(&dir, 1, Some([9; 32]), boot(&a)))
            .await
            .unwrap();
        let y = Control::start(config(&dir, 2, None, boot(&a)))
            .await
            .unwrap();
        let stayed_apart = !wait_for(Duration::from_secs(3), || {
            !a.members().borrow().is_empty()
                || !x.members().borrow().is_empty()
                || !y.members().borrow().is_empty()
                || a.connected_peers() > 0
                || x.connected_peers() > 0
                || y.connected_peers() > 0
        })
        .await;
        assert!(stayed_apart, "a node without the cluster key got in");
        for n in [&a, &x, &y] {
            n.shutdown().await;
        }
    }

    #[tokio::test]
    async fn provider_found_two_hops_away() {
        let dir = TempDir::new("kad");
        let (a, b, c) = chain(&dir).await;
        assert!(
            wait_for(Duration::from_secs(5), || sees(&c, &[(&a, 0), (&b, 1)])).await,
            "cluster did not form"
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        a.provide(&digest);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = Vec::new();
        while Instant::now() < deadline {
            found = c.providers(&digest, Duration::from_secs(1)).await;
            if found.contains(&a.local_peer_id()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(found.contains(&a.local_peer_id()), "providers: {found:?}");
        assert!(!found.contains(&c.local_peer_id()));
        let other = format!("sha256:{}", "cd".repeat(32));
        assert!(c.providers(&other, Duration::from_secs(2)).await.is_empty());
        for n in [&a, &b, &c] {
            n.shutdown().await;
        }
    }

    #[tokio::test]
    async fn announcements_reach_others_not_self() {
        let dir = TempDir::new("ann");
        let a = Control::start(config(&dir, 0, Some(PSK), vec![]))
            .await
            .unwrap();
        let b = Control::start(config(&dir, 1, Some(PSK), boot(&a)))
            .await
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1)])
                && sees(&b, &[(&a, 0)]))
            .await
        );
        let mut a_rx = a.announcements();
        let mut b_rx = b.announcements();
        let what = Announce::Have {
            digest: format!("sha256:{}", "01".repeat(32)),
            size: 1234,
        };
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                a.announce(what.clone());
                match tokio::time::timeout(Duration::from_millis(500), b_rx.recv()).await {
                    Ok(Ok(got)) => return got,
                    Ok(Err(e)) => panic!("broadcast: {e}"),
                    Err(_) => continue,
                }
            }
        })
        .await
        .expect("B never got A's announcement");
        assert_eq!(got.from, a.local_peer_id());
        assert_eq!(got.what, what);
        assert!(a_rx.try_recv().is_err(), "A received its own announcement");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn stopped_member_is_dropped() {
        let dir = TempDir::new("drop");
        let (a, b, c) = chain(&dir).await;
        assert!(wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1), (&c, 2)])).await);
        let c_id = c.local_peer_id();
        c.shutdown().await;
        let stopped = Instant::now();
        let ttl = Duration::from_millis(1500);
        assert!(
            wait_for(ttl + Duration::from_secs(1), || !a
                .members()
                .borrow()
                .contains_key(&c_id))
            .await,
            "C still a member of A after {:?}",
            stopped.elapsed()
        );
        assert!(a.members().borrow().contains_key(&b.local_peer_id()));
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn dns_bootstrap_joins_and_skips_self() {
        let dir = TempDir::new("dns");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dns = vec![Bootstrap::Dns {
            host: "localhost".into(),
            port,
        }];
        let mut cfg_a = config(&dir, 0, Some(PSK), dns.clone());
        cfg_a.listen = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        cfg_a.dns_refresh = Duration::from_secs(1);
        let a = Control::start(cfg_a).await.unwrap();
        let mut cfg_b = config(&dir, 1, Some(PSK), dns);
        cfg_b.dns_refresh = Duration::from_secs(1);
        let b = Control::start(cfg_b).await.unwrap();
        assert!(
            wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1)])
                && sees(&b, &[(&a, 0)]))
            .await,
            "a={:?} b={:?}",
            a.members().borrow(),
            b.members().borrow()
        );
        // Across a couple of refreshes A must not have connected to itself.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(a.connected_peers(), 1);
        assert!(!a.members().borrow().contains_key(&a.local_peer_id()));
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn identity_persists_and_corruption_is_reported() {
        let dir = TempDir::new("id");
        let cfg = config(&dir, 0, Some(PSK), vec![]);
        let path = cfg.identity_file.clone().unwrap();
        let first = Control::start(cfg.clone()).await.unwrap();
        let id = first.local_peer_id();
        first.shutdown().await;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = Control::start(cfg.clone()).await.unwrap();
        assert_eq!(second.local_peer_id(), id);
        second.shutdown().await;

        std::fs::write(&path, b"not a key").unwrap();
        let err = Control::start(cfg.clone())
            .await
            .err()
            .expect("garbage identity accepted");
        assert!(matches!(err, ControlError::IdentityCorrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn listen_failure_is_an_error() {
        let dir = TempDir::new("listen");
        let a = Control::start(config(&dir, 0, None, vec![])).await.unwrap();
        let mut cfg = config(&dir, 1, None, vec![]);
        cfg.listen = a.listen_addrs()[0].clone();
        let err = Control::start(cfg)
            .await
            .err()
            .expect("second bind on the same port");
        assert!(matches!(err, ControlError::Listen { .. }), "{err}");
        a.shutdown().await;
    }

    #[test]
    fn wire_formats() {
        let hb = serde_json::to_value(Heartbeat { info: info(1) }).unwrap();
        assert_eq!(hb["info"]["role"], "node");
        let a = Announce::Want {
            digest: "sha256:00".into(),
            ns: "docker.io".into(),
            repo: "library/alpine".into(),
        };
        let s = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Announce>(&s).unwrap(), a);
        assert!(serde_json::from_slice::<Heartbeat>(b"{\"info\":42}").is_err());
    }
}
