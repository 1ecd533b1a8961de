//! Nodes: agents join with their capacity and heartbeat; a node that
//! misses heartbeats for the TTL is down. Nodes are soft state: after a
//! server restart the first heartbeat answers "unknown" and the agent
//! joins again, so nothing about nodes needs the store.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::nodes_server::Nodes;
use tonic::{Request, Response, Status};

use crate::state::check_name;

pub struct NodeRecord {
    pub info: pb::NodeInfo,
    pub last_heartbeat: Instant,
}

/// Every node that joined since the server started.
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, NodeRecord>>,
    pub interval: Duration,
    pub ttl: Duration,
}

impl NodeRegistry {
    pub fn new(interval: Duration, ttl: Duration) -> NodeRegistry {
        NodeRegistry { nodes: Mutex::new(BTreeMap::new()), interval, ttl }
    }

    /// Whether a node last heard of `since` ago is up: a pure rule.
    pub fn is_up(since: Duration, ttl: Duration) -> bool {
        since < ttl
    }

    pub fn list(&self) -> Vec<pb::NodeStatus> {
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes
            .values()
            .map(|record| {
                let since = record.last_heartbeat.elapsed();
                pb::NodeStatus {
                    info: Some(record.info.clone()),
                    up: NodeRegistry::is_up(since, self.ttl),
                    last_heartbeat_ms_ago: since.as_millis() as u64,
                }
            })
            .collect()
    }
}

pub struct NodesService {
    pub registry: std::sync::Arc<NodeRegistry>,
    pub scheduler: std::sync::Arc<super::jobs::Scheduler>,
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
    async fn join(&self, request: Request<pb::NodeInfo>) -> Result<Response<pb::JoinReply>, Status> {
        let info = request.into_inner();
        check_node(&info)?;
        tracing::info!(node = %info.name, ip = %info.advertise_ip, "node joined");
        let name = info.name.clone();
        self.registry
            .nodes
            .lock()
            .expect("nodes lock")
            .insert(name, NodeRecord { info, last_heartbeat: Instant::now() });
        Ok(Response::new(pb::JoinReply {
            heartbeat_interval_ms: self.registry.interval.as_millis() as u64,
            heartbeat_ttl_ms: self.registry.ttl.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let request = request.into_inner();
        let known = {
            let mut nodes = self.registry.nodes.lock().expect("nodes lock");
            match nodes.get_mut(&request.name) {
                Some(record) => {
                    record.last_heartbeat = Instant::now();
                    true
                }
                None => false,
            }
        };
        // An unknown node joins again first; until then it gets no work.
        let assignments =
            if known { self.scheduler.heartbeat(&request.name, request.instances) } else { Vec::new() };
        Ok(Response::new(pb::HeartbeatReply { known, assignments }))
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
