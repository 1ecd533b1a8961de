//! The Jobs API: run, stop, promote, status, listings and logs, each a thin
//! call into the [`Scheduler`].

use std::sync::Arc;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::jobs_server::Jobs;
use mesh_scheduler::job::parse_job;
use tonic::{Request, Response, Status};

use super::Scheduler;
use crate::store::{Store, StoredJob};

pub struct JobsService {
    pub scheduler: Arc<Scheduler>,
    pub users: Arc<crate::auth::users::Users>,
    /// For meshd's calls to agents (logs).
    pub tls: Arc<crate::server::tls::ServerTls>,
    pub trust_domain: String,
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn run(&self, request: Request<pb::RunJobRequest>) -> Result<Response<pb::RunJobReply>, Status> {
        let submitter = request.extensions().get::<crate::auth::principal::Principal>().cloned();
        let request = request.into_inner();
        let job = parse_job(&request.text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if job.user.as_deref() == Some("root") {
            // Root on every node it lands on: more than an operator may grant.
            let admin = match &submitter {
                Some(crate::auth::principal::Principal::User { name, serial }) => {
                    self.users.role_of(name, serial) == Ok(crate::auth::policy::Role::Admin)
                }
                _ => false,
            };
            if !admin {
                return Err(Status::permission_denied(
                    "a job that runs as user \"root\" needs the admin role",
                ));
            }
        }
        let stored = StoredJob { text: request.text, dir: request.dir };
        let name = job.name.clone();
        let changed = self.scheduler.submit(stored, job).await?;
        Ok(Response::new(pb::RunJobReply { name, changed }))
    }

    async fn stop(&self, request: Request<pb::JobName>) -> Result<Response<pb::JobName>, Status> {
        let name = request.into_inner().name;
        if !self.scheduler.lock().jobs.contains_key(&name) {
            return Err(Status::not_found(format!("no job {name:?}")));
        }
        let key = name.clone();
        let based_on = self.scheduler.control.applied_version();
        let delete = move |store: &dyn Store| store.save_job_checked(&key, None, based_on);
        self.scheduler.control.durably(delete).await.map_err(crate::server::write_failure)?;
        self.scheduler.forget(&name);
        Ok(Response::new(pb::JobName { name }))
    }

    async fn promote(&self, request: Request<pb::JobName>) -> Result<Response<pb::JobName>, Status> {
        // Where instances run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let name = request.into_inner().name;
        let mut state = self.scheduler.lock();
        if !state.jobs.contains_key(&name) {
            return Err(Status::not_found(format!("no job {name:?}")));
        }
        let Some(rollout) = state.rollouts.get_mut(&name) else {
            return Err(Status::failed_precondition(format!("job {name:?} has no update in progress")));
        };
        rollout.promoted = true;
        drop(state);
        tracing::info!(job = %name, "canaries promoted");
        self.scheduler.wake.notify_one();
        Ok(Response::new(pb::JobName { name }))
    }

    async fn rollout_status(
        &self,
        request: Request<pb::JobName>,
    ) -> Result<Response<pb::RolloutReport>, Status> {
        // Rollouts are the leader's knowledge.
        self.scheduler.require_leader()?;
        self.scheduler.rollout_report(&request.into_inner().name).map(Response::new)
    }

    async fn set_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::RolloutReport>, Status> {
        self.scheduler.require_leader()?;
        let request = request.into_inner();
        let action = request.action();
        self.scheduler.act_on_rollout(&request.name, action).map(Response::new)
    }

    async fn status(&self, request: Request<pb::JobName>) -> Result<Response<pb::JobStatus>, Status> {
        // Where instances run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let name = request.into_inner().name;
        let state = self.scheduler.lock();
        self.scheduler
            .job_status(&state, &name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no job {name:?}")))
    }

    async fn list(&self, _: Request<pb::Empty>) -> Result<Response<pb::JobList>, Status> {
        // Where instances run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let state = self.scheduler.lock();
        let jobs = state.jobs.keys().filter_map(|name| self.scheduler.job_status(&state, name)).collect();
        Ok(Response::new(pb::JobList { jobs }))
    }

    async fn list_instances(&self, _: Request<pb::Empty>) -> Result<Response<pb::InstanceList>, Status> {
        // Where instances run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let state = self.scheduler.lock();
        Ok(Response::new(pb::InstanceList { instances: self.scheduler.instances(&state) }))
    }

    async fn scrape_proxies(&self, _: Request<pb::Empty>) -> Result<Response<pb::ProxyScrapes>, Status> {
        // Where sidecars run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let mut scrapes = tokio::task::JoinSet::new();
        let connected = self.scheduler.control.proxies().into_iter().filter(|(_, p)| p.connected);
        for (id, record) in connected.filter(|(_, p)| !p.admin_addr.is_empty()) {
            // Through the node's agent, which reaches its sidecars' admin
            // ports on its own host; a proxy no node runs (one started by
            // hand) is scraped directly.
            let through = match self.scheduler.logs_of(&id) {
                Some((node, agent)) if !agent.is_empty() => {
                    Some((self.tls.to_node(&self.trust_domain, &node).map_err(Status::internal)?, agent))
                }
                _ => None,
            };
            scrapes.spawn(async move {
                let admin = record.admin_addr.clone();
                let fetched = match through {
                    Some((tls, agent)) => crate::server::logs::proxy_metrics(tls, &agent, &admin).await,
                    None => crate::server::logs::direct_metrics(&admin).await,
                };
                let (metrics, error) = match fetched {
                    Ok(metrics) => (metrics, String::new()),
                    Err(error) => (String::new(), error),
                };
                pb::ProxyScrape { proxy_id: id, service: record.service, metrics, error }
            });
        }
        let mut proxies = scrapes.join_all().await;
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        Ok(Response::new(pb::ProxyScrapes { proxies }))
    }

    type LogsStream = crate::server::logs::LogStream;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        // Where instances run is the leader's knowledge.
        self.scheduler.require_leader()?;
        let request = request.into_inner();
        let Some((node, addr)) = self.scheduler.logs_of(&request.instance) else {
            return Err(Status::not_found(format!("no instance {:?}", request.instance)));
        };
        if addr.is_empty() {
            return Err(Status::unavailable(format!("node {node} serves no logs")));
        }
        let tls = self.tls.to_node(&self.trust_domain, &node).map_err(Status::internal)?;
        Ok(Response::new(crate::server::logs::fetch(tls, &addr, &request).await?))
    }
}
