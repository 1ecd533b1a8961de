//! The Admin API that meshctl calls.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::auth::principal::Principal;
use crate::convert::{policy_from_pb, policy_to_pb};
use crate::server::registry::status_of;
use crate::server::{ControlPlane, PeerTransport, ProxyRecord};
use crate::state::Change;

pub struct AdminService {
    pub control: Arc<ControlPlane>,
    pub nodes: Arc<crate::server::liveness::NodeRegistry>,
    pub leader: crate::server::leader::Leader,
    /// This server's address, as clients reach it.
    pub me: String,
    /// The other servers sharing the store, for their proxies' traffic.
    pub peers: Arc<crate::server::forward::Peers>,
}

/// The longest `--wait` the server accepts.
const MAX_WAIT: Duration = Duration::from_secs(600);

pub fn proxy_status(id: &str, record: &ProxyRecord, me: &str) -> pb::ProxyStatus {
    let (rejected_version, rejected_reason) = record.rejected.clone().unwrap_or_default();
    pb::ProxyStatus {
        proxy_id: id.to_owned(),
        service: record.service.clone(),
        acked_version: record.acked_version,
        rejected_reason,
        rejected_version,
        last_contact_unix_ms: record
            .last_contact
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64),
        connected: record.connected,
        admin_addr: record.admin_addr.clone(),
        stalled: record.stalled(),
        certificate_root: record.certificate_root.clone(),
        bundle_version: record.bundle_version,
        server: if record.server.is_empty() { me.to_owned() } else { record.server.clone() },
        peers: record.peers.iter().map(PeerTransport::to_pb).collect(),
    }
}

impl AdminService {
    async fn change(&self, change: Change) -> Result<Response<pb::ChangeReply>, Status> {
        let version = self.control.change(change).await.map_err(status_of)?;
        Ok(Response::new(pb::ChangeReply { version }))
    }

    fn convergence(
        &self,
        version: u64,
        converged: bool,
        proxies: &[(String, ProxyRecord)],
        waited: Duration,
    ) -> pb::Convergence {
        pb::Convergence {
            version,
            converged,
            proxies: proxies.iter().map(|(id, record)| proxy_status(id, record, &self.me)).collect(),
            waited_ms: waited.as_millis() as u64,
            server: self.me.clone(),
            leader: self.leader.current().leader.unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_services(&self, _: Request<pb::Empty>) -> Result<Response<pb::ServiceList>, Status> {
        let state = self.control.state().await;
        let services = state
            .services
            .iter()
            .map(|(name, service)| pb::ServiceInfo {
                name: name.clone(),
                policy: Some(policy_to_pb(&service.policy)),
                split: service.split.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                endpoints: service.endpoints.len() as u32,
                ready_endpoints: service.endpoints.values().filter(|e| e.ready).count() as u32,
            })
            .collect();
        Ok(Response::new(pb::ServiceList { services }))
    }

    async fn list_endpoints(&self, _: Request<pb::Empty>) -> Result<Response<pb::EndpointList>, Status> {
        let state = self.control.state().await;
        let endpoints = state
            .services
            .iter()
            .flat_map(|(name, service)| {
                crate::convert::route(name, service, &self.control.defaults).endpoints
            })
            .collect();
        Ok(Response::new(pb::EndpointList { endpoints }))
    }

    async fn traffic(
        &self,
        request: Request<pb::TrafficRequest>,
    ) -> Result<Response<pb::TrafficStats>, Status> {
        let caller = request.extensions().get::<Principal>().cloned().unwrap_or(Principal::Anonymous);
        let request = request.into_inner();
        let window_ms = match request.window_ms {
            0 => crate::traffic::DEFAULT_WINDOW_MS,
            ms if ms > crate::traffic::KEEP_MS => {
                return Err(Status::invalid_argument(format!(
                    "a window of {ms} ms is longer than the {} s of traffic meshd keeps",
                    crate::traffic::KEEP_MS / 1000
                )))
            }
            ms => ms,
        };
        let everywhere =
            super::gather::traffic(&self.control, Some(&self.peers), &caller, window_ms, &request).await;
        let super::gather::Everywhere { sums, bounds, proxies, left_out } = everywhere;
        let rows = crate::traffic::finish(sums, &bounds).into_iter().map(stat_to_pb).collect();
        let proxies = proxies as u32;
        Ok(Response::new(pb::TrafficStats {
            window_ms,
            proxies,
            rows,
            latency_bounds_seconds: bounds,
            left_out,
        }))
    }

    async fn list_proxies(&self, _: Request<pb::Empty>) -> Result<Response<pb::ProxyList>, Status> {
        let proxies =
            self.control.proxies().iter().map(|(id, record)| proxy_status(id, record, &self.me)).collect();
        Ok(Response::new(pb::ProxyList { proxies }))
    }

    async fn set_split(
        &self,
        request: Request<pb::SetSplitRequest>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        let request = request.into_inner();
        self.change(Change::SetSplit {
            service: request.service,
            weights: request.weights.into_iter().collect(),
        })
        .await
    }

    async fn clear_split(
        &self,
        request: Request<pb::ServiceName>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        self.change(Change::ClearSplit { service: request.into_inner().service }).await
    }

    async fn list_splits(&self, _: Request<pb::Empty>) -> Result<Response<pb::SplitList>, Status> {
        let state = self.control.state().await;
        let splits = state
            .services
            .iter()
            .filter(|(_, s)| !s.split.is_empty())
            .map(|(name, s)| pb::SplitEntry {
                service: name.clone(),
                weights: s.split.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            })
            .collect();
        Ok(Response::new(pb::SplitList { splits }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        let request = request.into_inner();
        let Some(policy) = request.policy else {
            return Err(Status::invalid_argument("SetPolicyRequest.policy is missing"));
        };
        // A policy is for a service that exists (a job's, or one with
        // endpoints); a typo must not create a new one.
        if !self.control.state().await.services.contains_key(&request.service) {
            return Err(Status::not_found(format!(
                "unknown service {:?}: no job or endpoint has it",
                request.service
            )));
        }
        let policy = policy_from_pb(&policy).map_err(Status::invalid_argument)?;
        self.change(Change::SetPolicy { service: request.service, policy }).await
    }

    async fn wait_converged(
        &self,
        request: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::Convergence>, Status> {
        let request = request.into_inner();
        let timeout = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
        let started = std::time::Instant::now();
        let (converged, proxies) = self.control.wait_converged(request.version, timeout).await;
        Ok(Response::new(self.convergence(request.version, converged, &proxies, started.elapsed())))
    }

    async fn status(&self, _: Request<pb::Empty>) -> Result<Response<pb::Convergence>, Status> {
        let version = self.control.current_version();
        let proxies = self.control.proxies();
        let converged = crate::server::converged(proxies.iter().map(|(_, p)| p), version);
        Ok(Response::new(self.convergence(version, converged, &proxies, Duration::ZERO)))
    }

    async fn apply_traffic_policy(
        &self,
        request: Request<pb::TrafficPolicyText>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        let text = request.into_inner().text;
        let file = mesh_common::traffic_policy::file::parse_traffic_policy(&text)
            .map_err(|e| Status::invalid_argument(format!("routes file: {e}")))?;
        self.change(Change::SetTrafficPolicy(file)).await
    }

    async fn list_traffic_policy(
        &self,
        request: Request<pb::ServiceName>,
    ) -> Result<Response<pb::TrafficPolicyList>, Status> {
        let only = request.into_inner().service;
        let state = self.control.state().await;
        if !only.is_empty() && !state.services.contains_key(&only) {
            return Err(Status::not_found(format!("unknown service {only:?}")));
        }
        let services = state
            .services
            .iter()
            .filter(|(name, s)| {
                (only.is_empty() || **name == only) && (!s.routes.is_empty() || s.rate_limit.is_some())
            })
            .map(|(name, s)| pb::ServiceTrafficPolicy {
                service: name.clone(),
                routes: s.routes.iter().map(mesh_proto::traffic_policy::route_to_pb).collect(),
                rate_limit: s.rate_limit.as_ref().map(mesh_proto::traffic_policy::rate_limit_to_pb),
            })
            .collect();
        Ok(Response::new(pb::TrafficPolicyList { services }))
    }

    async fn delete_route(
        &self,
        request: Request<pb::RouteName>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        let request = request.into_inner();
        self.change(Change::DeleteRoute { service: request.service, name: request.name }).await
    }

    async fn delete_rate_limit(
        &self,
        request: Request<pb::ServiceName>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        self.change(Change::DeleteRateLimit { service: request.into_inner().service }).await
    }

    async fn list_nodes(&self, _: Request<pb::Empty>) -> Result<Response<pb::NodeList>, Status> {
        // Nodes report to the leader.
        self.leader.require()?;
        Ok(Response::new(pb::NodeList { nodes: self.nodes.list() }))
    }
}

fn stat_to_pb(stat: crate::traffic::Stat) -> pb::TrafficStat {
    pb::TrafficStat {
        inbound: stat.key.inbound,
        service: stat.key.service,
        version: stat.key.version,
        requests: stat.counts.requests,
        requests_per_second: stat.requests_per_second,
        success_rate: stat.success_rate,
        p50_seconds: stat.p50_seconds,
        p99_seconds: stat.p99_seconds,
        in_flight: stat.in_flight,
        mesh_errors: stat.counts.mesh_errors.into_iter().collect(),
        status_classes: stat.counts.status_classes.to_vec(),
        proxies: stat.proxies,
        successes: stat.counts.successes,
        latency_buckets: stat.counts.latency_buckets,
    }
}
