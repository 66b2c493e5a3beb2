//! Membership: every member publishes a heartbeat on the members topic;
//! the swarm task keeps the live set, drops members that go quiet for
//! `member_ttl` or disconnect, and publishes the set on a watch channel.

use std::collections::{btree_map, BTreeMap};
use std::sync::Arc;
use std::time::Instant;

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
}

pub(super) type MemberMap = Arc<BTreeMap<PeerId, Member>>;

impl Task {
    pub(super) fn publish_heartbeat(&mut self) {
        let topic = self.members_topic.clone();
        let data = self.heartbeat.clone();
        self.publish(topic, data);
    }

    pub(super) fn expire_members(&mut self) {
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
}
