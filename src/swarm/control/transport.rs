//! How the control plane reaches peers: TCP (with DNS for `/dns`
//! multiaddrs), the cluster key's pnet beneath noise and yamux, and the
//! libp2p behaviours that run over it (identify, ping, gossipsub, Kademlia,
//! mDNS).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{
    Boxed, DialOpts, ListenerId, PortUse, TransportError, TransportEvent,
};
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore, store::MemoryStoreConfig};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Transport,
};
use tracing::warn;

use super::{ControlConfig, ControlError};

const IDENTIFY_PROTOCOL: &str = "/damselfly/id/1.0.0";
pub(super) const KAD_PROTOCOL: &str = "/damselfly/kad/1.0.0";

/// Bound on TCP connect + pnet + noise + yamux, so a black-holed address does
/// not hold a dial slot for the OS's SYN timeout.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Image caches easily hold more blobs than MemoryStore's default of 1024
/// provider keys; past the limit start_providing fails.
const MAX_PROVIDER_KEYS: usize = 1 << 16;

/// Bytes the control plane moved over TCP, every protocol and the pnet,
/// noise and yamux framing included: what the cluster's size costs a node.
#[derive(Debug, Default)]
pub struct WireBytes {
    pub read: AtomicU64,
    pub written: AtomicU64,
    /// Gossipsub messages delivered to this node (each once, whatever
    /// number of copies the mesh sent).
    pub messages: AtomicU64,
}

/// A TCP stream that counts what passes into [`WireBytes`].
struct Counted<S> {
    inner: S,
    wire: Arc<WireBytes>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wire.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wire.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

pub(super) fn build_transport(
    key: &Keypair,
    psk: Option<[u8; 32]>,
    wire: Arc<WireBytes>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, ControlError> {
    let tcp_cfg = tcp::Config::default().nodelay(true);
    let tcp = || {
        let wire = wire.clone();
        NewPortDials(tcp::tokio::Transport::new(tcp_cfg.clone())).map(move |inner, _| Counted {
            inner,
            wire: wire.clone(),
        })
    };
    // DNS only matters for /dns4|dns6 multiaddrs in the bootstrap list; a
    // host without a usable resolv.conf still works with IP addresses.
    match libp2p::dns::tokio::Transport::system(tcp()) {
        Ok(dns) => secure(dns, key, psk),
        Err(e) => {
            warn!(error = %e, "no system DNS config; /dns multiaddrs will not resolve");
            secure(tcp(), key, psk)
        }
    }
}

/// TCP that dials from an ephemeral port, never from the listen port.
///
/// libp2p dials with `PortUse::Reuse` unless a behaviour says otherwise:
/// the dial socket binds the listen address before `connect`. On a busy
/// node that bind can fail with EADDRINUSE (another socket holds the
/// address, or a TIME_WAIT from an earlier connection on it), and libp2p-tcp
/// falls back to a fresh port only on EADDRNOTAVAIL; every redial then fails
/// the same way until the kernel lets go of the address (seen in the lab: a
/// node that never joined, its bootstrap dial failing with "Address already
/// in use" every 3 s for 60 s). Reusing the port only helps hole punching
/// through NAT, which cluster nodes do not do; peers learn our listen
/// address from identify, not from the dial's source port.
struct NewPortDials<T>(T);

impl<T: Transport + Unpin> Transport for NewPortDials<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let opts = DialOpts {
            port_use: PortUse::New,
            ..opts
        };
        self.0.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.0).poll(cx)
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
pub(super) struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

pub(super) fn build_behaviour(
    key: &Keypair,
    cfg: &ControlConfig,
) -> Result<Behaviour, ControlError> {
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
    // Inbound provider records pass through the task, which drops those a
    // node withdrew a moment ago (`Announce::Gone`, raced by its own
    // provide still in flight); this node stores no other kind of record.
    kad_cfg.set_record_filtering(kad::StoreInserts::FilterBoth);
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

pub(super) fn tcp_socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
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
