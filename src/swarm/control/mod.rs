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
//!
//! The files, by responsibility:
//! - this one: the public face ([`Control`], its config, errors and message
//!   types) and [`Control::start`], which wires the parts below together;
//! - `bootstrap`: [`Bootstrap`] entries, DNS re-resolution, redials;
//! - `keys`: the node identity on disk and the cluster key ([`load_psk`]);
//! - `transport`: TCP, pnet, noise, yamux and the libp2p behaviours;
//! - `members`: heartbeats and the live member set;
//! - `task`: the event loop that owns the libp2p swarm.

mod bootstrap;
mod keys;
mod members;
mod task;
#[cfg(test)]
mod tests;
mod transport;

pub use bootstrap::Bootstrap;
pub use keys::load_psk;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::gossipsub::IdentTopic;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, Swarm};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::info;

use super::intents::{TopicMessage, TOPICS as EXTRA_TOPICS};
use super::{MemberInfo, Role};
use crate::oci::Digest;
use bootstrap::resolve_loop;
use keys::load_or_create_identity;
pub(crate) use members::Heartbeat;
use members::MemberMap;
use task::{Command, Task};
pub use transport::WireBytes;
use transport::{build_behaviour, build_transport, tcp_socket_addr};

/// How long a provider lookup goes on collecting after its first answer.
pub const PROVIDERS_GRACE: Duration = Duration::from_millis(15);
const MEMBERS_TOPIC: &str = "damselfly/members/1";
const CONTENT_TOPIC: &str = "damselfly/content/1";

/// Members are expected to stay connected; gossipsub's long-lived streams
/// already keep connections open, this only covers the gaps.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
const ANNOUNCEMENT_BUFFER: usize = 1024;

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
    /// Whether the heartbeat period grows with the cluster
    /// ([`members::HEARTBEATS_PER_SECOND`]). Always on in the daemon;
    /// `false` only to measure the fixed period it replaced.
    pub adaptive_heartbeat: bool,
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
    ClusterKey(#[from] crate::config::ClusterKeyError),
    #[error(transparent)]
    Bootstrap(#[from] crate::config::BootstrapError),
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
    /// The heartbeat period it announced (the configured one when it said
    /// none).
    pub every: Duration,
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

/// Content announcements, published on the content topic. A [`Digest`]
/// travels as its `sha256:<hex>` string, the form these messages had when
/// the field was a plain string, so nodes of either build understand each
/// other; a message whose digest does not parse is dropped whole.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Announce {
    /// This node holds the whole verified blob.
    Have { digest: Digest, size: u64 },
    /// This node no longer holds the blob (evicted or removed): receivers
    /// drop it from their copy of the provider records. Kademlia itself
    /// has no retraction; without this, peers would keep asking for 48
    /// hours (the records' TTL). Nodes of an older build drop the message
    /// as malformed.
    Gone { digest: Digest },
    /// This node started pulling it (seeds use this).
    Want {
        digest: Digest,
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
    wire: Arc<WireBytes>,
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
        let wire = Arc::new(WireBytes::default());
        let transport = build_transport(&key, cfg.psk, wire.clone())?;
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

        let heartbeat = members::encode_heartbeat(&cfg.info, cfg.heartbeat, cfg.heartbeat);

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
            info: cfg.info.clone(),
            base_heartbeat: cfg.heartbeat,
            adaptive_heartbeat: cfg.adaptive_heartbeat,
            wire: wire.clone(),
            every: cfg.heartbeat,
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
            withdrawn: HashMap::new(),
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
            wire,
        })
    }

    /// Bytes read and written on the control plane's TCP connections,
    /// and gossip messages delivered, since it started
    /// (`benches/control_plane.rs` reads them).
    pub fn traffic(&self) -> (u64, u64, u64) {
        (
            self.wire.read.load(Ordering::Relaxed),
            self.wire.written.load(Ordering::Relaxed),
            self.wire.messages.load(Ordering::Relaxed),
        )
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
    pub fn provide(&self, digest: &Digest) {
        let _ = self.cmd_tx.send(Command::Provide(digest.clone()));
    }

    /// Stops announcing `digest`, and tells the cluster ([`Announce::Gone`])
    /// so that the records other nodes store of it go now rather than
    /// when they expire.
    pub fn unprovide(&self, digest: &Digest) {
        let _ = self.cmd_tx.send(Command::Unprovide(digest.clone()));
    }

    /// Other nodes that provide `digest` (never this node), collected until
    /// the Kademlia query finishes, `timeout` passes, or [`PROVIDERS_GRACE`]
    /// after the first one was found, whichever is first.
    pub async fn providers(&self, digest: &Digest, timeout: Duration) -> Vec<PeerId> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cmd = Command::Providers {
            digest: digest.clone(),
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
