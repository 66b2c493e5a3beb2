//! The one task that owns the libp2p [`Swarm`]: it takes [`Command`]s from
//! the [`super::Control`] handles, and turns swarm events into membership,
//! announcements, topic messages and provider answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, PublishError};
use libp2p::kad::{self, GetProvidersOk, QueryResult};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{identify, mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::bootstrap::REDIAL_EVERY;
use super::members::MemberMap;
use super::transport::{tcp_socket_addr, Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::{Announce, Announcement, ControlError, Member, TopicMessage};
use crate::oci::Digest;

/// Wait for the routing table to settle after a new peer before re-announcing
/// our provider records, so a burst of joins costs one round.
const REPROVIDE_DEBOUNCE: Duration = Duration::from_secs(1);

/// What a [`super::Control`] handle asks of the task.
pub(super) enum Command {
    Announce(Announce),
    Publish {
        topic: &'static str,
        data: Vec<u8>,
    },
    Provide(Digest),
    Unprovide(Digest),
    Providers {
        digest: Digest,
        found: mpsc::UnboundedSender<PeerId>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// The Kademlia key of a blob is the bytes of its `sha256:<hex>` string, as
/// it was when digests crossed this module as strings: records from nodes
/// of either build are found by the other.
/// How long a withdrawn provider record is kept out after its `Gone`: far
/// longer than an ADD_PROVIDER takes to arrive (the query timeout is 30 s).
const WITHDRAWN_TTL: Duration = Duration::from_secs(120);

fn record_key(digest: &Digest) -> kad::RecordKey {
    kad::RecordKey::new(&digest.to_string())
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(super) struct Task {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) members_topic: IdentTopic,
    pub(super) content_topic: IdentTopic,
    pub(super) extra_topics: Vec<(IdentTopic, &'static str)>,
    pub(super) msg_tx: broadcast::Sender<TopicMessage>,
    /// Our heartbeat payload; MemberInfo does not change while running,
    /// the period in it may ([`Task::adapt_heartbeat`]).
    pub(super) heartbeat: Vec<u8>,
    pub(super) info: super::MemberInfo,
    /// `heartbeat` as configured, and the period now.
    pub(super) base_heartbeat: Duration,
    pub(super) every: Duration,
    pub(super) adaptive_heartbeat: bool,
    pub(super) wire: Arc<super::WireBytes>,
    pub(super) member_ttl: Duration,
    pub(super) cfg_listen: Multiaddr,
    pub(super) members: BTreeMap<PeerId, Member>,
    pub(super) members_tx: watch::Sender<MemberMap>,
    pub(super) ann_tx: broadcast::Sender<Announcement>,
    pub(super) connected: Arc<AtomicUsize>,
    pub(super) listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    /// Listen addresses from identify, for peers we are connected to.
    pub(super) peer_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    pub(super) static_addrs: Vec<Multiaddr>,
    /// Latest answer per Bootstrap::Dns entry.
    pub(super) dns_addrs: Vec<Vec<Multiaddr>>,
    /// Bootstrap addresses that turned out to be this node.
    pub(super) self_addrs: HashSet<Multiaddr>,
    /// Bootstrap dials in flight.
    pub(super) dialing: HashMap<ConnectionId, Multiaddr>,
    /// Which peer answered at a bootstrap address, so it is only redialed
    /// once that peer is gone.
    pub(super) addr_peer: HashMap<Multiaddr, PeerId>,
    pub(super) provided: HashSet<Digest>,
    /// Provider records withdrawn by their providers (`Announce::Gone`),
    /// and when: an ADD_PROVIDER of theirs still in flight must not put
    /// them back. Cleared by their `Have`; forgotten after [`WITHDRAWN_TTL`].
    pub(super) withdrawn: HashMap<(kad::RecordKey, PeerId), tokio::time::Instant>,
    pub(super) provider_queries: HashMap<kad::QueryId, mpsc::UnboundedSender<PeerId>>,
    pub(super) reprovide_at: Option<tokio::time::Instant>,
}

impl Task {
    pub(super) async fn wait_listening(
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

    pub(super) async fn run(
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
                    if let Some(every) = self.adapt_heartbeat() {
                        debug!(?every, members = self.members.len(), "heartbeat period");
                        hb = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
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

    fn announce(&mut self, a: &Announce) {
        let data = match serde_json::to_vec(a) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot encode announcement");
                return;
            }
        };
        let topic = self.content_topic.clone();
        self.publish(topic, data);
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Announce(a) => self.announce(&a),
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
                    .stop_providing(&record_key(&digest));
                self.provided.remove(&digest);
                self.announce(&Announce::Gone { digest });
            }
            Command::Providers { digest, found } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(record_key(&digest));
                self.provider_queries.insert(id, found);
            }
            // run() intercepts it before dispatching here.
            Command::Shutdown(_) => {}
        }
    }

    fn start_providing(&mut self, digest: &Digest) {
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(record_key(digest))
        {
            warn!(%digest, error = ?e, "cannot record provider entry");
        }
    }

    /// libp2p only republishes provider records every 12 h, and a node that
    /// joins later would otherwise not learn what existing members hold.
    fn reprovide(&mut self) {
        self.reprovide_at = None;
        let digests: Vec<Digest> = self.provided.iter().cloned().collect();
        debug!(n = digests.len(), "re-announcing provider records");
        for d in digests {
            self.start_providing(&d);
        }
    }

    pub(super) fn publish(&mut self, topic: IdentTopic, data: Vec<u8>) {
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
                self.wire
                    .messages
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                            self.on_content(from, &what);
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

    /// What the content topic changes in this node's provider records.
    fn on_content(&mut self, from: PeerId, what: &Announce) {
        use libp2p::kad::store::RecordStore;
        match what {
            Announce::Gone { digest } => {
                let key = record_key(digest);
                self.swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .remove_provider(&key, &from);
                let now = tokio::time::Instant::now();
                self.withdrawn
                    .retain(|_, at| now.duration_since(*at) < WITHDRAWN_TTL);
                self.withdrawn.insert((key, from), now);
            }
            Announce::Have { digest, .. } => {
                self.withdrawn.remove(&(record_key(digest), from));
            }
            Announce::Want { .. } => {}
        }
    }

    fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => {
                use libp2p::kad::store::RecordStore;
                let withdrawn = self
                    .withdrawn
                    .get(&(record.key.clone(), record.provider))
                    .is_some_and(|at| at.elapsed() < WITHDRAWN_TTL);
                if withdrawn {
                    debug!(provider = %record.provider, "ignoring a provider record its provider withdrew");
                } else if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .add_provider(record)
                {
                    debug!(error = %e, "cannot store a provider record");
                }
            }
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
}
