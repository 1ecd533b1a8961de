//! Nodes: agents join with their capacity and heartbeat; a node that
//! misses heartbeats for the TTL is down. Nodes are soft state: after a
//! server restart the first heartbeat answers "unknown" and the agent
//! joins again, so nothing about nodes needs the store.
//!
//! Liveness is judged on the monotonic clock, and only for time meshd
//! itself was running: a gap in meshd's own loop (a SIGSTOP, a stalled
//! host) is credited to every node, since heartbeats sent meanwhile could
//! not be read.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so that in-process tests can run liveness on a paused one.
use tokio::time::Instant;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::nodes_server::Nodes;
use tonic::{Request, Response, Status};

use crate::auth::join::JoinTokens;
use crate::auth::principal::{node_id, Principal};
use crate::state::check_name;

pub struct NodeRecord {
    pub info: pb::NodeInfo,
    pub last_heartbeat: Instant,
    pub certificate_expires_unix_ms: u64,
    pub bundle_version: u64,
}

/// Every node that joined since the server started.
pub struct NodeRegistry {
    nodes: Mutex<Liveness>,
    pub interval: Duration,
    pub ttl: Duration,
    started: Instant,
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
        NodeRegistry { nodes: Mutex::new(nodes), interval, ttl, started: now }
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
        self.started.elapsed() < self.start_grace()
    }

    /// Records a node that joined (again): up from now.
    pub fn joined(&self, info: pb::NodeInfo) {
        let record = NodeRecord {
            info,
            last_heartbeat: Instant::now(),
            certificate_expires_unix_ms: 0,
            bundle_version: 0,
        };
        self.nodes.lock().expect("nodes lock").records.insert(record.info.name.clone(), record);
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
                }
            })
            .collect()
    }
}

pub struct NodesService {
    pub registry: std::sync::Arc<NodeRegistry>,
    pub scheduler: std::sync::Arc<super::jobs::Scheduler>,
    pub control: std::sync::Arc<super::ControlPlane>,
    pub trust: std::sync::Arc<super::identity::TrustKeeper>,
    pub join_tokens: std::sync::Arc<Mutex<JoinTokens>>,
    /// How long node certificates live.
    pub cert_ttl: Duration,
}

/// The node a request comes from, as its certificate names it; a call that
/// names another node is refused, logged and counted.
pub fn calling_node<'a, T>(
    request: &'a Request<T>,
    claimed: &str,
    control: &super::ControlPlane,
) -> Result<&'a str, Status> {
    let Some(Principal::Node(node)) = request.extensions().get::<Principal>() else {
        return Err(Status::unauthenticated("this call needs a node's certificate"));
    };
    if node != claimed {
        control.metrics.count_impostor();
        tracing::warn!(node = %node, claimed = %claimed, "a node spoke as another node: refused");
        return Err(Status::permission_denied(format!(
            "node {node:?} may speak only for itself, not for {claimed:?}"
        )));
    }
    Ok(node)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn check_node(info: &pb::NodeInfo) -> Result<(), Status> {
    check_name("node", &info.name).map_err(|e| Status::invalid_argument(e.0))?;
    if info.advertise_ip.parse::<IpAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "advertise_ip {:?} is not an IP address",
            info.advertise_ip
        )));
    }
    if info.cpu_millis == 0 || info.memory_mb == 0 {
        return Err(Status::invalid_argument("a node needs cpu_millis and memory_mb above 0"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        let request = request.into_inner();
        check_name("node", &request.name).map_err(|e| Status::invalid_argument(e.0))?;
        // A bad request is refused before the token is spent.
        crate::identity::ca::Authority::check_request(&request.csr_pem).map_err(Status::invalid_argument)?;
        if let Err(refusal) =
            self.join_tokens.lock().expect("join tokens lock").redeem(&request.token_secret, now_ms())
        {
            tracing::warn!(node = %request.name, reason = %refusal, "a join was refused");
            return Err(Status::permission_denied(refusal.to_string()));
        }
        let trust = self.trust.current();
        let id = node_id(trust.signer.trust_domain(), &request.name);
        let certificate_pem =
            trust.signer.sign_id(&request.csr_pem, &id, self.cert_ttl).map_err(Status::invalid_argument)?;
        tracing::info!(node = %request.name, "node enrolled with a join token");
        Ok(Response::new(pb::EnrollReply {
            certificate_pem,
            bundle: Some(self.trust.bundle()),
            expires_unix_ms: now_ms() + self.cert_ttl.as_millis() as u64,
        }))
    }

    async fn join(&self, request: Request<pb::NodeInfo>) -> Result<Response<pb::JoinReply>, Status> {
        calling_node(&request, &request.get_ref().name, &self.control)?;
        let info = request.into_inner();
        check_node(&info)?;
        tracing::info!(node = %info.name, ip = %info.advertise_ip, "node joined");
        self.registry.joined(info);
        Ok(Response::new(pb::JoinReply {
            heartbeat_interval_ms: self.registry.interval.as_millis() as u64,
            heartbeat_ttl_ms: self.registry.ttl.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        calling_node(&request, &request.get_ref().name, &self.control)?;
        let mut request = request.into_inner();
        let foreign = self.scheduler.foreign_reports(&request.name, &request.instances);
        if !foreign.is_empty() {
            // Reports of instances placed on other nodes are dropped, not believed.
            for _ in &foreign {
                self.control.metrics.count_impostor();
            }
            tracing::warn!(node = %request.name, instances = ?foreign, "a node reported instances placed on other nodes: ignored");
            request.instances.retain(|report| !foreign.contains(&report.id));
        }
        let known = {
            let mut nodes = self.registry.nodes.lock().expect("nodes lock");
            match nodes.records.get_mut(&request.name) {
                Some(record) => {
                    record.last_heartbeat = Instant::now();
                    record.certificate_expires_unix_ms = request.certificate_expires_unix_ms;
                    record.bundle_version = request.bundle_version;
                    true
                }
                None => false,
            }
        };
        // An unknown node joins again first; until then it gets no work.
        let assignments =
            if known { self.scheduler.heartbeat(&request.name, request.instances) } else { Vec::new() };
        let bundle_version = self.trust.current().bundle_version;
        Ok(Response::new(pb::HeartbeatReply { known, assignments, bundle_version }))
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

    #[test]
    fn bad_nodes_are_refused() {
        let good = pb::NodeInfo {
            name: "node-a".into(),
            advertise_ip: "127.0.0.2".into(),
            cpu_millis: 1000,
            memory_mb: 1024,
            attributes: Default::default(),
            logs_addr: String::new(),
        };
        assert!(check_node(&good).is_ok());
        let cases = [
            pb::NodeInfo { name: "Node A".into(), ..good.clone() },
            pb::NodeInfo { advertise_ip: "localhost".into(), ..good.clone() },
            pb::NodeInfo { cpu_millis: 0, ..good.clone() },
        ];
        for case in cases {
            assert!(check_node(&case).is_err(), "{case:?}");
        }
    }
}
