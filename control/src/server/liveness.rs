//! Node liveness: a node that misses heartbeats for the TTL is down.
//!
//! Liveness is judged on the monotonic clock, and only for time meshd
//! itself was running: a gap in meshd's own loop (a SIGSTOP, a stalled
//! host) is credited to every node, since heartbeats sent meanwhile could
//! not be read. The scheduler reads it; the Nodes API feeds it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
// tokio's clock, so that in-process tests can run liveness on a paused one.
use tokio::time::Instant;

pub struct NodeRecord {
    pub info: pb::NodeInfo,
    pub last_heartbeat: Instant,
    pub certificate_expires_unix_ms: u64,
    pub bundle_version: u64,
    /// The serial of the root its certificate is from ("" until it says).
    pub certificate_root: String,
}

/// Every node that joined since the server started.
pub struct NodeRegistry {
    nodes: Mutex<Liveness>,
    pub interval: Duration,
    pub ttl: Duration,
    /// When this server started, or last became the leader.
    started: Mutex<Instant>,
}

struct Liveness {
    records: BTreeMap<String, NodeRecord>,
    /// When liveness was last looked at: the scheduler looks every round,
    /// so a longer gap means meshd itself was not running.
    last_look: Instant,
}

/// A gap between two looks at liveness longer than this is meshd's stall.
/// The scheduler looks at least every 250 ms.
const STALL: Duration = Duration::from_secs(1);

impl NodeRegistry {
    pub fn new(interval: Duration, ttl: Duration) -> NodeRegistry {
        let now = Instant::now();
        let nodes = Liveness { records: BTreeMap::new(), last_look: now };
        NodeRegistry { nodes: Mutex::new(nodes), interval, ttl, started: Mutex::new(now) }
    }

    /// Whether a node last heard of `since` ago is up: a pure rule.
    pub fn is_up(since: Duration, ttl: Duration) -> bool {
        since < ttl
    }

    /// How much of `gap` (time since liveness was last looked at) meshd
    /// was stalled for, to be forgiven to every node: a pure rule.
    pub fn stalled_for(gap: Duration) -> Duration {
        if gap > STALL {
            gap
        } else {
            Duration::ZERO
        }
    }

    /// How long after a start nodes have to report before their instances
    /// count as lost: a TTL for a node that was up to notice the restart,
    /// and another to join again and report what it runs.
    pub fn start_grace(&self) -> Duration {
        self.ttl * 2
    }

    /// Whether the server is still inside its start grace.
    pub fn settling(&self) -> bool {
        self.started.lock().expect("start lock").elapsed() < self.start_grace()
    }

    /// Starts over as a new leader: nodes are known again as they join
    /// this server, and the start grace runs from now.
    pub fn restart_grace(&self) {
        *self.started.lock().expect("start lock") = Instant::now();
        let mut nodes = self.nodes.lock().expect("nodes lock");
        nodes.records.clear();
        nodes.last_look = Instant::now();
    }

    /// Records a node that joined (again): up from now.
    pub fn joined(&self, info: pb::NodeInfo) {
        let record = NodeRecord {
            info,
            last_heartbeat: Instant::now(),
            certificate_expires_unix_ms: 0,
            bundle_version: 0,
            certificate_root: String::new(),
        };
        self.nodes.lock().expect("nodes lock").records.insert(record.info.name.clone(), record);
    }

    /// A heartbeat from `name`; false for a node that has not joined (since
    /// this server started).
    pub fn heard_from(&self, heartbeat: &pb::HeartbeatRequest) -> bool {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        let Some(record) = nodes.records.get_mut(&heartbeat.name) else { return false };
        record.last_heartbeat = Instant::now();
        record.certificate_expires_unix_ms = heartbeat.certificate_expires_unix_ms;
        record.bundle_version = heartbeat.bundle_version;
        record.certificate_root.clone_from(&heartbeat.certificate_root);
        true
    }

    /// `name` is known to be alive elsewhere (its lease): up from now.
    pub fn kept_alive(&self, name: &str) {
        if let Some(record) = self.nodes.lock().expect("nodes lock").records.get_mut(name) {
            record.last_heartbeat = Instant::now();
        }
    }

    /// What `name` said of itself when it joined.
    pub fn info(&self, name: &str) -> Option<pb::NodeInfo> {
        self.nodes.lock().expect("nodes lock").records.get(name).map(|record| record.info.clone())
    }

    pub fn list(&self) -> Vec<pb::NodeStatus> {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        let now = Instant::now();
        let stalled = NodeRegistry::stalled_for(now.saturating_duration_since(nodes.last_look));
        nodes.last_look = now;
        if !stalled.is_zero() {
            tracing::warn!(?stalled, "meshd did not run for a while; nodes get a fresh TTL");
            for record in nodes.records.values_mut() {
                record.last_heartbeat = (record.last_heartbeat + stalled).min(now);
            }
        }
        nodes
            .records
            .values()
            .map(|record| {
                let since = record.last_heartbeat.elapsed();
                pb::NodeStatus {
                    info: Some(record.info.clone()),
                    up: NodeRegistry::is_up(since, self.ttl),
                    last_heartbeat_ms_ago: since.as_millis() as u64,
                    certificate_expires_unix_ms: record.certificate_expires_unix_ms,
                    bundle_version: record.bundle_version,
                    certificate_root: record.certificate_root.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_down_after_the_ttl() {
        let ttl = Duration::from_secs(3);
        // (time since the last heartbeat in ms, up?)
        for (since, up) in [(0, true), (2_999, true), (3_000, false), (60_000, false)] {
            assert_eq!(NodeRegistry::is_up(Duration::from_millis(since), ttl), up, "{since} ms");
        }
    }

    #[test]
    fn a_stall_of_meshd_is_forgiven_to_the_nodes() {
        // (gap between two looks in ms, forgiven ms)
        for (gap, forgiven) in [(0, 0), (250, 0), (1_000, 0), (1_001, 1_001), (10_000, 10_000)] {
            let forgiven_for = NodeRegistry::stalled_for(Duration::from_millis(gap));
            assert_eq!(forgiven_for, Duration::from_millis(forgiven), "{gap} ms");
        }
    }
}
