//! Waiting for swarm membership: one poll of `damselfly_swarm_members`
//! for the loopback cluster ([`crate::cluster`]) and the network lab
//! ([`crate::netlab`]), with one timeout message that names every node and
//! its count.

use std::time::{Duration, Instant};

use crate::daemon::{parse_samples, scrape};

/// `damselfly_swarm_members` of the daemon whose telemetry listens on
/// `telemetry` (`host:port`): the live members other than itself; 0 when
/// it does not answer.
pub fn swarm_members(telemetry: &str) -> f64 {
    parse_samples(&scrape(telemetry), "damselfly_swarm_members", &[])
        .iter()
        .map(|(_, v)| v)
        .sum()
}

/// A swarm node that [`wait_members`] watches: a [`crate::cluster::Node`]
/// on loopback or a [`crate::netlab::Node`] in a namespace.
pub trait SwarmMember {
    /// How messages name it (`node 3 (127.0.0.5)`, its namespace).
    fn name(&self) -> String;
    /// Its telemetry `host:port`, where [`swarm_members`] reads its count.
    fn telemetry(&self) -> String;
    /// What a timeout message shows of it (metrics, log tail).
    fn report(&self) -> String;
}

/// How many other members each node must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Members {
    /// Exactly this many (also after a member left).
    Exactly(usize),
    /// This many or more.
    AtLeast(usize),
}

impl Members {
    fn holds(self, count: f64) -> bool {
        match self {
            Members::Exactly(n) => count == n as f64,
            Members::AtLeast(n) => count >= n as f64,
        }
    }
}

impl std::fmt::Display for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Members::Exactly(n) => write!(f, "{n}"),
            Members::AtLeast(n) => write!(f, "at least {n}"),
        }
    }
}

/// Polls every node's [`swarm_members`] until each count is `want`, and
/// returns how long that took. After `timeout`, the error names each node
/// and its count (`members did not reach 3 each within 60s: node 0
/// (127.0.0.2): 2, ...`), then every node's report.
pub fn wait_members<M: SwarmMember + ?Sized>(
    nodes: &[&M],
    want: Members,
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let counts: Vec<f64> = nodes
            .iter()
            .map(|node| swarm_members(&node.telemetry()))
            .collect();
        if counts.iter().all(|c| want.holds(*c)) {
            return Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            let detail: Vec<String> = nodes
                .iter()
                .zip(&counts)
                .map(|(node, c)| format!("{}: {c}", node.name()))
                .collect();
            let reports: Vec<String> = nodes.iter().map(|node| node.report()).collect();
            return Err(format!(
                "members did not reach {want} each within {timeout:?}: {}\n{}",
                detail.join(", "),
                reports.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
