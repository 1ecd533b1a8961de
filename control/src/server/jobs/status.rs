//! What `meshctl job status` and `get instances` show: a job's state and
//! its instances, from allocations and the agents' latest reports.

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::job::JobKind;

use super::{Scheduler, SchedulerState};

impl Scheduler {
    pub(super) fn job_status(&self, state: &SchedulerState, name: &str) -> Option<pb::JobStatus> {
        let (_, job) = state.jobs.get(name)?;
        let replicas = super::replicas_of(state, job);
        let (scale, scale_decisions) = super::scale::scale_status(state, job);
        let instances: Vec<pb::Instance> =
            self.instances(state).into_iter().filter(|i| i.job == name).collect();
        let pending_reason = state.pending.get(name).cloned().unwrap_or_default();
        let complete = instances.iter().filter(|i| i.state() == pb::InstanceState::Complete).count() as u32;
        let running = instances.iter().filter(|i| i.state() == pb::InstanceState::Running).count() as u32;
        let ready = instances.iter().filter(|i| i.ready).count() as u32;
        let job_state = if job.kind == JobKind::Batch && complete >= replicas {
            pb::JobState::Complete
        } else if !pending_reason.is_empty() {
            pb::JobState::Pending
        } else if running >= replicas && (ready >= replicas || job.kind == JobKind::Batch) {
            pb::JobState::Running
        } else {
            pb::JobState::Starting
        };
        Some(pb::JobStatus {
            deployment: state.deployments.get(name).cloned().unwrap_or_default(),
            state: job_state as i32,
            name: job.name.clone(),
            service: job.service.clone(),
            version: job.version.clone(),
            replicas,
            kind: match job.kind {
                JobKind::Service => pb::JobKind::Service,
                JobKind::Batch => pb::JobKind::Batch,
            } as i32,
            running,
            ready,
            pending_reason,
            instances,
            scale,
            scale_decisions,
        })
    }

    /// Every instance as `get instances` lists it, now.
    pub fn instances_now(&self) -> Vec<pb::Instance> {
        let state = self.lock();
        self.instances(&state)
    }

    /// Every allocation with its latest report, plus completed batch instances.
    pub(super) fn instances(&self, state: &SchedulerState) -> Vec<pb::Instance> {
        let from_report = |node: &str, report: &pb::InstanceReport| pb::Instance {
            id: report.id.clone(),
            job: report.job.clone(),
            version: report.version.clone(),
            node: node.to_owned(),
            state: report.state,
            pid: report.pid,
            proxy_pid: report.proxy_pid,
            addr: report.addr.clone(),
            restarts: report.restarts,
            ready: report.ready,
            message: report.message.clone(),
            proxy_restarts: report.proxy_restarts,
        };
        let mut instances: Vec<pb::Instance> = state
            .allocations
            .iter()
            .map(|a| match state.reports.get(&a.id) {
                Some((node, report)) if *node == a.node => from_report(node, report),
                _ => pb::Instance {
                    id: a.id.clone(),
                    job: a.job.clone(),
                    version: a.version.clone(),
                    node: a.node.clone(),
                    state: pb::InstanceState::Pending as i32,
                    ..Default::default()
                },
            })
            .collect();
        for (id, (node, report)) in &state.reports {
            if report.state() == pb::InstanceState::Complete && !state.allocations.iter().any(|a| &a.id == id)
            {
                instances.push(from_report(node, report));
            }
        }
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        instances
    }
}
