//! Membership: every member publishes a heartbeat on the members topic;
//! the swarm task keeps the live set, drops members that go quiet for
//! `member_ttl` or disconnect, and publishes the set on a watch channel.

use std::collections::{btree_map, BTreeMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::task::Task;
use super::{Member, MemberInfo};

/// What each member publishes on the members topic. `pub(crate)` for the
/// fuzz target ([`crate::fuzzing`]).
#[derive(Serialize, Deserialize)]
pub(crate) struct Heartbeat {
    pub(crate) info: MemberInfo,
    /// The sender's heartbeat period in milliseconds, which grows with the
    /// cluster ([`heartbeat_period`]); receivers time the member out after
    /// as many of *its* periods as `member_ttl` is of `heartbeat`. Absent
    /// from nodes before it: their `heartbeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) every_ms: Option<u64>,
}

/// The most heartbeats a node takes in per second, whatever the size of
/// the cluster: every member beats every `max(heartbeat, members / 50 s)`.
/// So at 1,000 members each node still receives about 50 heartbeats a
/// second (each ~250 bytes), where a fixed 1 s period would make it 1,000,
/// and publishing, forwarding and checking their signatures would grow
/// with the cluster. The price: a silent member is noticed later (four
/// periods: 80 s at 1,000 members). A dead peer's data plane refuses at
/// once, so pieces move on without waiting for that.
pub(super) const HEARTBEATS_PER_SECOND: u32 = 50;

/// The heartbeat period of a node that sees `members` other members.
pub(crate) fn heartbeat_period(base: Duration, members: usize) -> Duration {
    let spread = Duration::from_secs(1) * (members as u32).min(1 << 20) / HEARTBEATS_PER_SECOND;
    base.max(spread)
}

/// The longest period a member may announce: a heartbeat that claims more
/// is read as this (bad input must not keep a dead member for hours).
const MAX_PERIOD: Duration = Duration::from_secs(600);

pub(super) type MemberMap = Arc<BTreeMap<PeerId, Member>>;

impl Task {
    pub(super) fn publish_heartbeat(&mut self) {
        let topic = self.members_topic.clone();
        let data = self.heartbeat.clone();
        self.publish(topic, data);
    }

    /// This node's heartbeat period for the members it sees now; the
    /// heartbeat it publishes says it. Changes of less than a tenth are
    /// ignored, so the period does not twitch with every join.
    pub(super) fn adapt_heartbeat(&mut self) -> Option<Duration> {
        if !self.adaptive_heartbeat {
            return None;
        }
        let want = heartbeat_period(self.base_heartbeat, self.members.len());
        let now = self.every;
        if want.abs_diff(now) * 10 <= now {
            return None;
        }
        self.every = want;
        self.heartbeat = encode_heartbeat(&self.info, self.base_heartbeat, want);
        Some(want)
    }

    pub(super) fn expire_members(&mut self) {
        let base = self.base_heartbeat;
        let ttl = self.member_ttl;
        let before = self.members.len();
        self.members.retain(|peer, m| {
            // As many of the member's own periods as `member_ttl` is of
            // this node's configured heartbeat.
            let ttl = ttl
                .mul_f64(m.every.as_secs_f64() / base.as_secs_f64())
                .max(ttl);
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

    pub(super) fn send_members(&self) {
        self.members_tx.send_replace(Arc::new(self.members.clone()));
    }

    pub(super) fn on_heartbeat(&mut self, from: PeerId, data: &[u8]) {
        let hb: Heartbeat = match serde_json::from_slice(data) {
            Ok(hb) => hb,
            Err(e) => {
                debug!(%from, error = %e, "ignoring malformed heartbeat");
                return;
            }
        };
        let now = Instant::now();
        let addrs = self.peer_addrs.get(&from).cloned().unwrap_or_default();
        let every = hb
            .every_ms
            .map_or(self.base_heartbeat, Duration::from_millis)
            .clamp(Duration::from_millis(1), MAX_PERIOD);
        match self.members.entry(from) {
            btree_map::Entry::Occupied(mut e) => {
                let m = e.get_mut();
                m.last_seen = now;
                m.every = every;
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
                    every,
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
}

/// The heartbeat payload: `every_ms` only once the period is not the
/// configured one, so a small cluster's heartbeats stay as they were.
pub(super) fn encode_heartbeat(info: &MemberInfo, base: Duration, every: Duration) -> Vec<u8> {
    serde_json::to_vec(&Heartbeat {
        info: info.clone(),
        every_ms: (every != base).then_some(every.as_millis() as u64),
    })
    .unwrap_or_default()
}
