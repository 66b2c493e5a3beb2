//! Finding the rest of the cluster: the `bootstrap` entries (multiaddrs and
//! DNS names re-resolved in the background), and the swarm task's redial of
//! those that are not connected, skipping addresses that are this node.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::task::Task;
use super::transport::tcp_socket_addr;

/// How often static bootstrap addresses that are not connected are redialed.
pub(super) const REDIAL_EVERY: Duration = Duration::from_secs(3);

const DNS_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The grammar of a bootstrap entry is config's, which validates it.
pub use crate::config::Bootstrap;

pub(super) async fn resolve_loop(
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

pub(super) fn socket_multiaddr(sa: SocketAddr) -> Multiaddr {
    let ip = match sa.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port()))
}

pub(super) fn multiaddr_peer(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl Task {
    pub(super) fn on_resolved(&mut self, i: usize, addrs: Vec<SocketAddr>) {
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

    pub(super) fn dial_bootstrap(&mut self) {
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
