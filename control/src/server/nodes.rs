//! The Nodes API: agents enroll with a join token, join with their
//! capacity and heartbeat with their instances' reports; the reply carries
//! their assignments. Nodes are soft state: after a server restart the
//! first heartbeat answers "unknown" and the agent joins again, so nothing
//! about nodes needs the store. Liveness itself is `liveness.rs`.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::nodes_server::Nodes;
use tonic::{Request, Response, Status};

use super::liveness::NodeRegistry;
use crate::auth::join::JoinTokens;
use crate::auth::principal::{node_id, Principal};
use crate::state::check_name;

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

impl NodesService {
    /// Ok on the leader. On a follower, the refusal that names the leader;
    /// the node is alive, whichever server it reached, so its lease is
    /// kept while it finds the leader (or one is elected).
    fn leader_or_keep_lease(&self, node: &str) -> Result<(), Status> {
        let not_leader = self.scheduler.require_leader();
        if not_leader.is_err() {
            if let Some(leases) = self.scheduler.node_leases() {
                leases.keep(node);
            }
        }
        not_leader
    }
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        self.scheduler.require_leader()?;
        let request = request.into_inner();
        check_name("node", &request.name).map_err(|e| Status::invalid_argument(e.0))?;
        // A bad request is refused before the token is spent.
        crate::identity::ca::Authority::check_request(&request.csr_pem)?;
        if let Err(refusal) =
            self.join_tokens.lock().expect("join tokens lock").redeem(&request.token_secret, now_ms())
        {
            tracing::warn!(node = %request.name, reason = %refusal, "a join was refused");
            return Err(Status::permission_denied(refusal.to_string()));
        }
        let trust = self.trust.current();
        let id = node_id(trust.signer.trust_domain(), &request.name);
        let certificate_pem = trust.signer.sign_id(&request.csr_pem, &id, self.cert_ttl)?;
        tracing::info!(node = %request.name, "node enrolled with a join token");
        Ok(Response::new(pb::EnrollReply {
            certificate_pem,
            bundle: Some(self.trust.bundle()),
            expires_unix_ms: now_ms() + self.cert_ttl.as_millis() as u64,
        }))
    }

    async fn join(&self, request: Request<pb::NodeInfo>) -> Result<Response<pb::JoinReply>, Status> {
        calling_node(&request, &request.get_ref().name, &self.control)?;
        self.leader_or_keep_lease(&request.get_ref().name)?;
        let info = request.into_inner();
        check_node(&info)?;
        tracing::info!(node = %info.name, ip = %info.advertise_ip, "node joined");
        if let Some(leases) = self.scheduler.node_leases() {
            leases.heard(info.clone(), true);
        }
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
        self.leader_or_keep_lease(&request.get_ref().name)?;
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
        let known = self.registry.heard_from(&request);
        if let Some((leases, info)) = self.scheduler.node_leases().zip(self.registry.info(&request.name)) {
            if known {
                leases.heard(info, false);
            }
        }
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
