//! Warm intents on the control plane: two gossipsub topics beside
//! membership and content, closed by the cluster key like them.
//!
//! - [`INTENTS_TOPIC`]: what the scaling sidecar publishes, the bytes of a
//!   `prewarm::Intent` (the swarm does not read them: imports point down).
//!   A release is the same intent with an expiry that has passed.
//! - [`READY_TOPIC`]: a daemon's ack when an intent's image is ready on it,
//!   so the sidecar can measure the lead time (publication to the first
//!   node that holds the image) and count warm nodes.
//!
//! The sidecar joins as [`SidecarLink`]: a member with [`Role::Sidecar`],
//! no data plane (its heartbeat names `0.0.0.0:0` and no certificate),
//! Kademlia in client mode (it takes no provider records), and a new
//! identity each start (it keeps no files).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::sync::{broadcast, watch};

use super::control::{Control, Member};
use super::{MemberInfo, Role, Swarm, SwarmError};
use crate::config::SwarmConfig;

pub const INTENTS_TOPIC: &str = "damselfly/intents/1";
pub const READY_TOPIC: &str = "damselfly/intents/ready/1";

/// The topics the control plane carries for others to read.
pub const TOPICS: &[&str] = &[INTENTS_TOPIC, READY_TOPIC];

/// A message on one of [`TOPICS`]; `from` is the verified gossipsub source.
#[derive(Clone, Debug)]
pub struct TopicMessage {
    pub topic: &'static str,
    pub from: PeerId,
    pub data: Vec<u8>,
}

impl Swarm {
    /// Messages from other members on [`TOPICS`].
    pub fn topic_messages(&self) -> broadcast::Receiver<TopicMessage> {
        self.inner.control.messages()
    }

    /// Publishes on one of [`TOPICS`]; best effort.
    pub fn publish(&self, topic: &'static str, data: Vec<u8>) {
        self.inner.control.publish(topic, data);
    }
}

/// The sidecar's place in the swarm: control plane only.
#[derive(Clone)]
pub struct SidecarLink {
    control: Control,
}

impl SidecarLink {
    /// Joins the cluster `cfg` describes (its key, bootstrap, listen
    /// address and heartbeat; `role` and the data-plane keys are not used).
    pub async fn join(cfg: &SwarmConfig) -> Result<SidecarLink, SwarmError> {
        let info = MemberInfo {
            data_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            fingerprint: String::new(),
            role: Role::Sidecar,
        };
        let control = Control::start(super::control_config(cfg, None, info)?).await?;
        tracing::info!(peer_id = %control.local_peer_id(), listen = %cfg.listen,
            "sidecar joined the swarm (control plane only)");
        Ok(SidecarLink { control })
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.control.local_peer_id()
    }

    /// The other members; `changed()` fires when one joins or leaves.
    pub fn members(&self) -> watch::Receiver<Arc<BTreeMap<PeerId, Member>>> {
        self.control.members()
    }

    pub fn publish(&self, topic: &'static str, data: Vec<u8>) {
        self.control.publish(topic, data);
    }

    pub fn messages(&self) -> broadcast::Receiver<TopicMessage> {
        self.control.messages()
    }

    /// Where the control plane listens (a `/tcp/0` listen address resolved).
    pub fn listen_addrs(&self) -> Vec<libp2p::Multiaddr> {
        self.control.listen_addrs()
    }

    pub async fn shutdown(&self) {
        self.control.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::oci::Digest;
    use crate::swarm::PieceSource;

    fn swarm_config(bootstrap: &[String]) -> SwarmConfig {
        let list: Vec<String> = bootstrap.iter().map(|b| format!("{b:?}")).collect();
        let text = format!(
            "[swarm]\nenabled = true\ninsecure_no_cluster_key = true\n\
             listen = \"/ip4/127.0.0.1/tcp/0\"\ndata_listen = \"127.0.0.1:0\"\n\
             heartbeat = \"200ms\"\nbootstrap = [{}]\n",
            list.join(", ")
        );
        crate::config::Config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .swarm
    }

    async fn node(dir: &std::path::Path, bootstrap: &[String]) -> Swarm {
        let metrics = crate::telemetry::Metrics::new(&prometheus::Registry::new()).unwrap();
        let (swarm, _listener) = Swarm::start(&swarm_config(bootstrap), dir, metrics)
            .await
            .unwrap();
        swarm.spawn_watchers(|_| {});
        swarm
    }

    fn addr(s: &Swarm) -> String {
        s.inner.control.listen_addrs()[0].to_string()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes until `rx` hears it (gossipsub meshes take a heartbeat to
    /// form), and returns what was heard.
    async fn hear(
        publish: impl Fn(),
        rx: &mut broadcast::Receiver<TopicMessage>,
        topic: &str,
    ) -> TopicMessage {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            publish();
            let got = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    match rx.recv().await {
                        Ok(m) if m.topic == topic => return Some(m),
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            })
            .await;
            if let Ok(Some(m)) = got {
                return m;
            }
            assert!(Instant::now() < deadline, "nothing heard on {topic}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sidecar_is_a_member_that_is_never_asked_for_data() {
        let dir = tempfile::tempdir().unwrap();
        let a = node(&dir.path().join("a"), &[]).await;
        let link = SidecarLink::join(&swarm_config(&[addr(&a)])).await.unwrap();
        let sidecar = link.local_peer_id();
        until("node a sees the sidecar", || {
            a.peers()
                .iter()
                .any(|p| p.peer_id == sidecar.to_string() && p.role == Role::Sidecar)
        })
        .await;
        until("the sidecar sees node a", || {
            link.members().borrow().contains_key(&a.local_peer_id())
        })
        .await;
        // Alone with the sidecar, a node has no peers: every piece is its
        // own to fetch from the origin.
        assert!(!a.has_peers());
        assert_eq!(a.metrics().swarm_members.get(), 0);
        let d = Digest::from_sha256(&[3; 32]);
        for piece in 0..64 {
            assert_eq!(
                a.piece_plan(&d, piece, Some(64), true, &HashSet::new()),
                vec![PieceSource::Origin]
            );
        }
        assert_eq!(a.member_by_ip("0.0.0.0".parse().unwrap()), None);

        let b = node(&dir.path().join("b"), &[addr(&a)]).await;
        until("node a sees node b", || a.has_peers()).await;
        until("node a counts one data member", || {
            a.metrics().swarm_members.get() == 1
        })
        .await;
        let owners: HashSet<PeerId> = (0..64)
            .flat_map(|piece| a.piece_plan(&d, piece, Some(64), true, &HashSet::new()))
            .filter_map(|s| match s {
                PieceSource::Peer(p) => Some(p.id),
                PieceSource::Origin => None,
            })
            .collect();
        assert_eq!(
            owners,
            HashSet::from([b.local_peer_id()]),
            "pieces are split with b, never the sidecar"
        );

        // Intents go out to both nodes; acks come back.
        let (mut ra, mut rb) = (a.topic_messages(), b.topic_messages());
        let m = hear(
            || link.publish(INTENTS_TOPIC, b"intent".to_vec()),
            &mut ra,
            INTENTS_TOPIC,
        )
        .await;
        assert_eq!((m.from, m.data.as_slice()), (sidecar, &b"intent"[..]));
        let m = hear(
            || link.publish(INTENTS_TOPIC, b"intent".to_vec()),
            &mut rb,
            INTENTS_TOPIC,
        )
        .await;
        assert_eq!(m.from, sidecar);
        let mut rs = link.messages();
        let m = hear(
            || b.publish(READY_TOPIC, b"ready".to_vec()),
            &mut rs,
            READY_TOPIC,
        )
        .await;
        assert_eq!(
            (m.from, m.data.as_slice()),
            (b.local_peer_id(), &b"ready"[..])
        );
        link.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
    }
}
