//! The scheduler's I/O side: jobs (durable, in the store), allocations and
//! instance reports (soft state, rebuilt from agents' heartbeats), the loop
//! that runs the pure reconciler, and the endpoints it registers for the
//! instances agents report.
//!
//! Allocations are soft state: after a server restart an agent's heartbeat
//! reports what it runs, and instances of known jobs are adopted back
//! instead of started twice.
//!
//! Here: the state, submissions, heartbeats, the loop and rollout
//! bookkeeping. `status.rs` renders job and instance status, `endpoints.rs`
//! decides the endpoints to register, `api.rs` is the gRPC API.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so that in-process tests can run the scheduler on a paused one.
use tokio::time::Instant;

use mesh_proto::mesh::v1 as pb;
use tokio::sync::Notify;
use tonic::Status;

use super::leader::Leader;
use super::liveness::NodeRegistry;
use super::ControlPlane;
use crate::state::{Change, Policy};
use crate::store::{Store, StoredJob};
use mesh_scheduler::job::{parse_job, Job, JobKind};
use mesh_scheduler::reconcile::reconcile;
use mesh_scheduler::rollout::{self, NewInstance, Progress};
use mesh_scheduler::{Allocation, JobSpec, Node};

pub use api::JobsService;
use endpoints::endpoint_changes;
use scale::{replicas_of, Scaling};

mod api;
mod canary;
mod endpoints;
mod scale;
mod status;

#[cfg(test)]
mod rollout_tests;

/// How often a job change that lost a race with another server's is
/// decided again before it fails.
const CONFLICT_ATTEMPTS: usize = 3;

/// How often the loop looks again when nothing woke it.
const TICK: Duration = Duration::from_millis(250);

#[derive(Default)]
struct SchedulerState {
    jobs: BTreeMap<String, (StoredJob, Job)>,
    allocations: Vec<Allocation>,
    /// Per allocation id: the node that reported it and what it said.
    reports: HashMap<String, (String, pb::InstanceReport)>,
    /// Per job: why instances wait unplaced.
    pending: BTreeMap<String, String>,
    /// Endpoints this scheduler registered: (service, addr) → (version, ready, serves QUIC).
    registered: BTreeMap<(String, String), (String, bool, bool)>,
    /// Batch instances that ran to completion are not placed again.
    completed: BTreeMap<String, u32>,
    /// Every instance id this server has handed out or adopted. Ids never
    /// repeat, and a stopped instance an agent still reports is not adopted.
    used_ids: std::collections::HashSet<String>,
    /// Updates in progress, per job.
    rollouts: BTreeMap<String, Rollout>,
    /// Per job: where its latest update stands or how it ended.
    deployments: BTreeMap<String, String>,
    /// Per instance id: since when it has been ready without a break.
    ready_since: HashMap<String, Instant>,
    /// Jobs loaded from the store at start that nothing is placed for
    /// until their instances are adopted or the start grace is over: their
    /// nodes may still be on their way back.
    held: std::collections::BTreeSet<String>,
    /// After a take-over with node leases: the nodes that were up, and
    /// those of them that have reported since. Once all have, nothing
    /// more can come back, and jobs are no longer held.
    expected: Option<std::collections::BTreeSet<String>>,
    reported: std::collections::BTreeSet<String>,
    rounds: u64,
    /// Scaled jobs' autoscalers.
    scaling: BTreeMap<String, Scaling>,
    /// When scaled jobs were last decided.
    scaled_at: Option<Instant>,
    /// When canary rollouts were last measured.
    canaries_at: Option<Instant>,
    /// Per job: the split a finished canary rollout left on its service,
    /// cleared once the losing version's instances are gone.
    split_cleanup: BTreeMap<String, (String, String)>,
    /// Per job: how its last canary rollout ended.
    last_rollouts: BTreeMap<String, pb::RolloutReport>,
}

/// A job moving from one version to another.
struct Rollout {
    old: (StoredJob, Job),
    started: Instant,
    promoted: bool,
    /// A canary rollout's progress (`[update] strategy = "canary"`).
    canary: Option<canary::CanaryRun>,
}

pub struct Scheduler {
    control: Arc<ControlPlane>,
    nodes: Arc<NodeRegistry>,
    state: Mutex<SchedulerState>,
    wake: Notify,
    /// Only the leader places, stops and registers; every server keeps the jobs.
    pub leader: Leader,
    /// The leader's term this scheduler has taken over for.
    taken_over: std::sync::atomic::AtomicU64,
    /// With a shared store: node liveness on etcd leases.
    node_leases: std::sync::OnceLock<Arc<super::node_leases::NodeLeases>>,
    /// With a shared store: the other servers, whose proxies' traffic
    /// the autoscaler adds to this one's.
    peers: std::sync::OnceLock<Arc<super::forward::Peers>>,
    /// The autoscaler's clock starts here.
    epoch: Instant,
}

/// A job file that no longer parses is left out, not fatal: the other
/// jobs are still run, and the log names the job and the cause.
fn parsed(name: &str, stored: &StoredJob) -> Option<Job> {
    match parse_job(&stored.text) {
        Ok(job) => Some(job),
        Err(error) => {
            tracing::error!(job = %name, %error, "a stored job does not parse; it is not run");
            None
        }
    }
}

impl Scheduler {
    /// Loads the stored jobs and starts the reconciliation loop, which
    /// acts while `leader` says this server leads.
    pub fn start(
        control: Arc<ControlPlane>,
        nodes: Arc<NodeRegistry>,
        leader: Leader,
    ) -> Result<Arc<Scheduler>, String> {
        let mut state = SchedulerState::default();
        for (name, stored) in control.store().load_jobs().map_err(|e| e.to_string())? {
            let job = parse_job(&stored.text).map_err(|e| format!("stored job {name:?}: {e}"))?;
            state.held.insert(name.clone());
            state.jobs.insert(name, (stored, job));
        }
        let taken_over = std::sync::atomic::AtomicU64::new(leader.current().term);
        let scheduler = Arc::new(Scheduler {
            control,
            nodes,
            state: Mutex::new(state),
            wake: Notify::new(),
            leader,
            taken_over,
            node_leases: std::sync::OnceLock::new(),
            peers: std::sync::OnceLock::new(),
            epoch: Instant::now(),
        });
        tokio::spawn(run_loop(scheduler.clone()));
        Ok(scheduler)
    }

    /// Ok when this server leads and its scheduler has taken over: before
    /// that, what a node reports would be forgotten by the take-over.
    pub fn require_leader(&self) -> Result<(), Status> {
        self.leader.require()?;
        let term = self.leader.current().term;
        if self.taken_over.load(std::sync::atomic::Ordering::SeqCst) != term {
            let mut status = Status::unavailable("this server is taking over as the leader; try again");
            status
                .metadata_mut()
                .insert("mesh-failure", tonic::metadata::MetadataValue::from_static("not-leader"));
            return Err(status);
        }
        Ok(())
    }

    /// Keeps node liveness on etcd leases (a shared store).
    pub fn set_node_leases(&self, leases: Arc<super::node_leases::NodeLeases>) {
        let _ = self.node_leases.set(leases);
    }

    /// Reads the other servers' traffic too when scaling.
    pub fn set_peers(&self, peers: Arc<super::forward::Peers>) {
        let _ = self.peers.set(peers);
    }

    pub fn node_leases(&self) -> Option<&Arc<super::node_leases::NodeLeases>> {
        self.node_leases.get()
    }

    /// Becomes the one that acts: what a former leader placed is learned
    /// again from the nodes' reports, so every job waits for its instances
    /// to be adopted (or the start grace to pass) before more are placed.
    /// With node leases, the nodes that are up are known at once, and
    /// jobs wait only until each of them has reported.
    async fn take_over(&self) {
        let live = match self.node_leases.get() {
            Some(leases) => {
                let leases = leases.clone();
                match tokio::task::spawn_blocking(move || leases.live()).await {
                    Ok(Ok(live)) => Some(live),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cannot read the nodes' leases; waiting out the start grace");
                        None
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let jobs = match self.control.store().load_jobs() {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::error!(%error, "the new leader cannot read the jobs; keeping the ones it knows");
                Vec::new()
            }
        };
        let mut state = self.lock();
        for (name, stored) in jobs {
            if state.jobs.get(&name).is_none_or(|(known, _)| *known != stored) {
                if let Some(job) = parsed(&name, &stored) {
                    state.jobs.insert(name, (stored, job));
                }
            }
        }
        state.allocations.clear();
        state.reports.clear();
        state.ready_since.clear();
        state.registered.clear();
        // Ids are learned again from the reports: one this server handed
        // out in an earlier term may have been adopted by another leader.
        state.used_ids.clear();
        // Counts are learned again from what runs, once it is back.
        state.scaling.clear();
        state.held = state.jobs.keys().cloned().collect();
        state.reported.clear();
        state.expected = live.as_ref().map(|live| live.iter().map(|info| info.name.clone()).collect());
        drop(state);
        self.nodes.restart_grace();
        for info in live.into_iter().flatten() {
            self.nodes.joined(info);
        }
    }

    /// Puts a job from the store in force, as another server took it; or
    /// with `None`, a job another server stopped.
    pub fn follow_job(&self, name: &str, stored: Option<StoredJob>) {
        match stored {
            Some(stored) => {
                if let Some(job) = parsed(name, &stored) {
                    self.adopt(stored, job);
                }
            }
            None => self.forget(name),
        }
    }

    /// Makes the jobs in force exactly `jobs`, as read from the store.
    pub fn follow_all_jobs(&self, jobs: Vec<(String, StoredJob)>) {
        let known: Vec<String> = self.lock().jobs.keys().cloned().collect();
        for name in known.iter().filter(|name| !jobs.iter().any(|(stored, _)| stored == *name)) {
            self.forget(name);
        }
        for (name, stored) in jobs {
            self.follow_job(&name, Some(stored));
        }
    }

    /// Takes a job as submitted: its service's protocol published, the
    /// file stored durably, then the job (and for a new version or task,
    /// the rollout) in force. False when the same file was already.
    pub async fn submit(&self, stored: StoredJob, job: Job) -> Result<bool, Status> {
        let name = job.name.clone();
        for attempt in 1..=CONFLICT_ATTEMPTS {
            // The version the decision below is made on.
            let based_on = self.control.applied_version();
            let changed = {
                let state = self.lock();
                if let Some((_, old)) = state.jobs.get(&name) {
                    check_service_change(old, &job).map_err(Status::failed_precondition)?;
                }
                state.jobs.get(&name).is_none_or(|(old, _)| *old != stored)
            };
            if !changed {
                return Ok(false);
            }
            // The job's port protocol is its service's: proxies on both hops need it.
            // So is how long callers hold a request while it runs no instance.
            let hold = job.scale.as_ref().filter(|scale| scale.min == 0).map(|s| s.hold_requests_for);
            let policy = Policy {
                protocol: Some(job.protocol),
                hold_when_empty_ms: Some(hold.map_or(0, |d| d.as_millis() as u64)),
                ..Policy::default()
            };
            let change = Change::SetPolicy { service: job.service.clone(), policy };
            self.control.change(change).await.map_err(super::registry::status_of)?;
            // Durable before it is acted on or answered.
            let (key, value) = (name.clone(), stored.clone());
            let save = move |store: &dyn Store| store.save_job_checked(&key, Some(&value), based_on);
            match self.control.durably(save).await {
                Ok(()) => {
                    self.adopt(stored, job);
                    return Ok(true);
                }
                // Another server changed this job first: decide again on what it stored.
                Err(error) if error.conflict_at.is_some() && attempt < CONFLICT_ATTEMPTS => {
                    let jobs = self.control.durably(|store: &dyn Store| store.load_jobs()).await;
                    let now = jobs.map_err(super::store_failure)?.into_iter().find(|(n, _)| *n == name);
                    self.follow_job(&name, now.map(|(_, stored)| stored));
                }
                Err(error) => return Err(super::write_failure(error)),
            }
        }
        Err(Status::aborted(format!("job {name:?} kept changing on other servers; submit it again")))
    }

    /// Puts a stored job in force (and for a new version or task, its
    /// rollout); false when the same file already was.
    fn adopt(&self, stored: StoredJob, mut job: Job) -> bool {
        let name = job.name.clone();
        {
            let mut state = self.lock();
            if state.jobs.get(&name).is_some_and(|(known, _)| *known == stored) {
                return false;
            }
            let version_changed = state.jobs.get(&name).is_some_and(|(_, old)| old.version != job.version);
            // The same version with another task is an update too: its
            // instances are replaced as a new version's would be.
            let task_changed = match state.jobs.get(&name) {
                Some((_, old)) if old.version == job.version => {
                    let changed = !old.same_task(&job);
                    job.revision = old.revision + u64::from(changed);
                    changed
                }
                _ => false,
            };
            if (version_changed || task_changed) && job.kind == JobKind::Service {
                // The version being replaced: the one still running if an update was under way.
                let old = match state.rollouts.remove(&name) {
                    Some(rollout) => rollout.old,
                    None => state.jobs[&name].clone(),
                };
                let update = Rollout { old, started: Instant::now(), promoted: false, canary: None };
                state.rollouts.insert(name.clone(), update);
            }
            state.completed.remove(&name);
            state.jobs.insert(name.clone(), (stored, job));
        }
        tracing::info!(job = %name, "job in force");
        self.wake.notify_one();
        true
    }

    /// Stops running `name`: its instances are stopped at the next round.
    pub fn forget(&self, name: &str) {
        let mut state = self.lock();
        if state.jobs.remove(name).is_none() {
            return;
        }
        state.held.remove(name);
        state.rollouts.remove(name);
        state.deployments.remove(name);
        state.completed.remove(name);
        state.pending.remove(name);
        state.scaling.remove(name);
        state.split_cleanup.remove(name);
        drop(state);
        tracing::info!(job = %name, "job stopped");
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SchedulerState> {
        self.state.lock().expect("scheduler lock")
    }

    /// The service of `instance` if the scheduler placed it on `node`: what
    /// an identity token for it may grant.
    pub fn service_of(&self, node: &str, instance: &str) -> Option<String> {
        let state = self.lock();
        let allocation = state.allocations.iter().find(|a| a.id == instance && a.node == node)?;
        job_of(&state, allocation).map(|job| job.service.clone())
    }

    /// The node an instance runs (or last ran) on, and that node's logs address.
    pub fn logs_of(&self, instance: &str) -> Option<(String, String)> {
        let node = {
            let state = self.lock();
            let placed = state.allocations.iter().find(|a| a.id == instance).map(|a| a.node.clone());
            placed.or_else(|| state.reports.get(instance).map(|(node, _)| node.clone()))?
        };
        let addr = self
            .nodes
            .list()
            .into_iter()
            .filter_map(|status| status.info)
            .find(|info| info.name == node)
            .map(|info| info.logs_addr)?;
        Some((node, addr))
    }

    /// The ids among `reports` of instances placed on another node than `node`.
    pub fn foreign_reports(&self, node: &str, reports: &[pb::InstanceReport]) -> Vec<String> {
        let state = self.lock();
        reports
            .iter()
            .filter(|report| state.allocations.iter().any(|a| a.id == report.id && a.node != node))
            .map(|report| report.id.clone())
            .collect()
    }

    /// Records a node's heartbeat report and answers with what it should run.
    pub fn heartbeat(&self, node: &str, reports: Vec<pb::InstanceReport>) -> Vec<pb::Assignment> {
        let mut state = self.lock();
        state.reported.insert(node.to_owned());
        let mut woke = false;
        for report in reports {
            let known = state.allocations.iter().any(|a| a.id == report.id);
            let retired = !known && state.used_ids.contains(&report.id);
            if !known
                && !retired
                && state.jobs.contains_key(&report.job)
                && report.state() != pb::InstanceState::Complete
            {
                // Running before a server restart: adopt it rather than start another.
                let (_, job) = &state.jobs[&report.job];
                // Its task revision: the one of its version the server knows
                // (revisions start again at 0 when the server does).
                let old = state.rollouts.get(&report.job).map(|r| &r.old.1);
                let revision = [Some(job), old]
                    .into_iter()
                    .flatten()
                    .find(|known| known.version == report.version)
                    .map_or(0, |known| known.revision);
                let allocation = Allocation {
                    id: report.id.clone(),
                    job: report.job.clone(),
                    version: report.version.clone(),
                    revision,
                    node: node.to_owned(),
                    resources: job.resources,
                };
                state.used_ids.insert(allocation.id.clone());
                state.allocations.push(allocation);
                woke = true;
            }
            if report.state() == pb::InstanceState::Complete && known {
                *state.completed.entry(report.job.clone()).or_default() += 1;
                state.allocations.retain(|a| a.id != report.id);
                woke = true;
            }
            if report.ready && report.state() == pb::InstanceState::Running {
                state.ready_since.entry(report.id.clone()).or_insert_with(Instant::now);
            } else {
                state.ready_since.remove(&report.id);
            }
            let previous = state.reports.insert(report.id.clone(), (node.to_owned(), report.clone()));
            woke |= previous.is_none_or(|(_, old)| old != report);
        }
        let assignments = state
            .allocations
            .iter()
            .filter(|a| a.node == node)
            .filter_map(|a| {
                let (stored, job) = stored_job_of(&state, a)?;
                Some(pb::Assignment {
                    id: a.id.clone(),
                    job: a.job.clone(),
                    version: a.version.clone(),
                    service: job.service.clone(),
                    job_text: stored.text.clone(),
                    job_dir: stored.dir.clone(),
                })
            })
            .collect();
        drop(state);
        if woke {
            self.wake.notify_one();
        }
        assignments
    }

    /// One round: place and stop, then bring the registry in line with what
    /// agents report.
    async fn round(&self) {
        let node_status = self.nodes_by_lease(self.nodes.list()).await;
        let nodes: Vec<Node> = node_status
            .iter()
            .filter_map(|status| {
                let info = status.info.as_ref()?;
                Some(Node {
                    name: info.name.clone(),
                    cpu_millis: info.cpu_millis,
                    memory_mb: info.memory_mb,
                    attributes: info.attributes.clone().into_iter().collect(),
                    up: status.up,
                })
            })
            .collect();
        let behind = self.control.proxies_behind();
        let scaled = self.autoscale().await;
        let measured = self.measure_canaries().await;
        let mut reverted = Vec::new();
        let mut splits = Vec::new();
        let changes = {
            let mut state = self.lock();
            state.rounds += 1;
            let specs = self.specs(&mut state, &mut reverted, &measured, &mut splits);
            let mut plan = reconcile(&specs, &nodes, &state.allocations, state.rounds);
            let held = self.hold_after_start(&mut state, &specs, &mut plan);
            for id in &plan.stop {
                tracing::info!(instance = %id, "stopping instance");
            }
            for placed in &plan.place {
                tracing::info!(instance = %placed.id, node = %placed.node, "placed instance");
            }
            state.allocations.retain(|a| !plan.stop.contains(&a.id));
            for mut placed in plan.place {
                if state.used_ids.contains(&placed.id) {
                    placed.id = fresh_id(&placed.job, &state.used_ids);
                }
                state.used_ids.insert(placed.id.clone());
                state.allocations.push(placed);
            }
            state.pending = plan
                .pending
                .into_iter()
                .map(|(job, count, why)| (job, format!("{count} unplaced: {why}")))
                .chain(held)
                .collect();
            Self::note_unplaced(&mut state, &scaled);
            Self::clear_finished_splits(&mut state, &mut splits);
            let live: Vec<String> = state.allocations.iter().map(|a| a.id.clone()).collect();
            state
                .reports
                .retain(|id, (_, report)| live.contains(id) || report.state() == pb::InstanceState::Complete);
            state.ready_since.retain(|id, _| live.contains(id));
            endpoint_changes(&mut state, &nodes, &behind)
        };
        for (name, job) in reverted {
            if let Err(error) = self.control.durably(move |store| store.save_job(&name, Some(&job))).await {
                tracing::error!(%error, "could not store the rolled-back job");
            }
        }
        for change in changes {
            if let Err(error) = self.control.change_as_leader(change).await {
                tracing::warn!(?error, "the scheduler could not update an endpoint");
            }
        }
        // After the endpoints: a split may name a version only once it has one.
        self.apply_splits(splits).await;
    }

    /// With node leases, a node this server has not heard from for the TTL
    /// is down only once its lease has expired too: it may be heartbeating
    /// to another server (a follower keeps its lease while it looks for the
    /// leader). The lease's expiry marks it down, whichever server it reached.
    async fn nodes_by_lease(&self, mut nodes: Vec<pb::NodeStatus>) -> Vec<pb::NodeStatus> {
        let Some(leases) = self.node_leases.get().cloned() else { return nodes };
        if nodes.iter().all(|node| node.up) {
            return nodes;
        }
        let live = match tokio::task::spawn_blocking(move || leases.live()).await {
            Ok(Ok(live)) => live,
            _ => return nodes,
        };
        for node in nodes.iter_mut().filter(|node| !node.up) {
            let Some(name) = node.info.as_ref().map(|info| info.name.clone()) else { continue };
            if live.iter().any(|info| info.name == name) {
                self.nodes.kept_alive(&name);
                node.up = true;
            }
        }
        nodes
    }

    /// Inside the start grace, keeps the plan from placing instances of
    /// stored jobs that are not all back: their nodes may still report
    /// them. Returns why each held job waits.
    fn hold_after_start(
        &self,
        state: &mut SchedulerState,
        specs: &[JobSpec],
        plan: &mut mesh_scheduler::reconcile::Plan,
    ) -> Vec<(String, String)> {
        // With no node known to be up, any may still come back: wait.
        let all_reported = state
            .expected
            .as_ref()
            .is_some_and(|expected| !expected.is_empty() && expected.is_subset(&state.reported));
        if !self.nodes.settling() || all_reported {
            state.held.clear();
        }
        let allocations = &state.allocations;
        let back = |job: &str| {
            let wanted: u32 = specs.iter().filter(|s| s.name == job).map(|s| s.replicas).sum();
            allocations.iter().filter(|a| a.job == job).count() >= wanted as usize
        };
        state.held.retain(|job| !back(job));
        if state.held.is_empty() {
            return Vec::new();
        }
        plan.place.retain(|placed| !state.held.contains(&placed.job));
        plan.pending.retain(|(job, _, _)| !state.held.contains(job));
        let grace = self.nodes.start_grace();
        let why = format!("waiting up to {grace:?} after a server start for nodes to report their instances");
        state.held.iter().map(|job| (job.clone(), why.clone())).collect()
    }

    /// What to reconcile this round: every job's spec, and for a job being
    /// updated its two versions with the counts the rollout allows.
    /// Jobs rolled back here go into `reverted`, to be stored.
    fn specs(
        &self,
        state: &mut SchedulerState,
        reverted: &mut Vec<(String, StoredJob)>,
        measured: &BTreeMap<String, Result<mesh_scheduler::canary::Measured, String>>,
        splits: &mut Vec<canary::SplitChange>,
    ) -> Vec<JobSpec> {
        let mut specs = Vec::new();
        let names: Vec<String> = state.jobs.keys().cloned().collect();
        for name in names {
            let mut job = state.jobs[&name].1.clone();
            job.replicas = replicas_of(state, &job);
            let Some(update) = state.rollouts.get(&name) else {
                let mut spec = job.spec();
                if job.kind == JobKind::Batch {
                    let done = state.completed.get(&job.name).copied().unwrap_or(0);
                    spec.replicas = spec.replicas.saturating_sub(done);
                }
                specs.push(spec);
                continue;
            };
            if let Some(policy) = canary::gated(&job, &update.old.1).cloned() {
                let measured = measured.get(&name);
                self.canary_round(state, &name, &job, &policy, measured, &mut specs, reverted, splits);
                continue;
            }
            let old_job = update.old.1.clone();
            let new_instances: Vec<NewInstance> = state
                .allocations
                .iter()
                .filter(|a| a.job == name && a.version == job.version && a.revision == job.revision)
                .map(|a| {
                    let report = state.reports.get(&a.id).map(|(_, r)| r);
                    let troubled = report.filter(|r| !r.ready && (r.restarts > 0 || !r.message.is_empty()));
                    NewInstance {
                        ready_for: state.ready_since.get(&a.id).map(Instant::elapsed),
                        trouble: troubled.map(|r| format!("instance {}: {}", r.id, r.message)),
                    }
                })
                .collect();
            let old_count = state
                .allocations
                .iter()
                .filter(|a| a.job == name && a.version == old_job.version && a.revision == old_job.revision)
                .count();
            let (old_spec, new_spec, progress) = rollout::step(
                &old_job.spec(),
                &job.spec(),
                &job.update,
                update.promoted,
                &new_instances,
                old_count,
                update.started.elapsed(),
            );
            let healthy = new_instances.iter().filter(|i| i.ready_for.is_some()).count();
            let (from, to) = (&old_job.version, &job.version);
            match progress {
                Progress::Done => {
                    tracing::info!(job = %name, version = %to, "update complete");
                    state.rollouts.remove(&name);
                    let what = if from == to {
                        format!("updated {to} to its new task")
                    } else {
                        format!("updated from {from} to {to}")
                    };
                    state.deployments.insert(name.clone(), what);
                    specs.push(job.spec());
                }
                Progress::Failed(why) if job.update.auto_revert => {
                    tracing::warn!(job = %name, %why, "update failed; rolling back");
                    let old = state.rollouts.remove(&name).expect("the rollout").old;
                    // Stored by the round once the lock is released.
                    reverted.push((name.clone(), old.0.clone()));
                    specs.push(old.1.spec());
                    state.jobs.insert(name.clone(), old);
                    state.deployments.insert(name.clone(), format!("rolled back to {from}: {why}"));
                }
                Progress::Failed(why) => {
                    state.deployments.insert(name.clone(), format!("stuck updating {from} → {to}: {why}"));
                    specs.extend([old_spec, new_spec]);
                }
                Progress::AwaitingPromotion => {
                    let message = format!(
                        "canary {to} ({healthy} healthy) beside {from}: waiting for `meshctl job promote {name}`"
                    );
                    state.deployments.insert(name.clone(), message);
                    specs.extend([old_spec, new_spec]);
                }
                Progress::Rolling => {
                    let message = format!("updating {from} → {to}: {healthy} of {} ready", job.replicas);
                    state.deployments.insert(name.clone(), message);
                    specs.extend([old_spec, new_spec]);
                }
            }
        }
        specs
    }
}

/// A job may move to another service only with a new version: its
/// instances then roll over to sidecars holding the new service's identity.
/// At the same version, running sidecars would keep the old identity while
/// their endpoints moved, and no call would reach the job.
fn check_service_change(old: &Job, new: &Job) -> Result<(), String> {
    if old.service != new.service && old.version == new.version {
        return Err(format!(
            "job {:?} would move from service {:?} to {:?} at the same version {:?}: give it a new version to roll it out, or stop the job first",
            new.name, old.service, new.service, new.version
        ));
    }
    Ok(())
}

/// The job an allocation was placed from: during an update, instances of
/// the version being replaced keep their old service and identity.
fn job_of<'s>(state: &'s SchedulerState, allocation: &Allocation) -> Option<&'s Job> {
    stored_job_of(state, allocation).map(|(_, job)| job)
}

fn stored_job_of<'s>(state: &'s SchedulerState, allocation: &Allocation) -> Option<&'s (StoredJob, Job)> {
    if let Some(rollout) = state.rollouts.get(&allocation.job) {
        let old = &rollout.old.1;
        if old.version == allocation.version && old.revision == allocation.revision {
            return Some(&rollout.old);
        }
    }
    state.jobs.get(&allocation.job)
}

/// The lowest `<job>-<n>` not handed out before.
fn fresh_id(job: &str, used: &std::collections::HashSet<String>) -> String {
    (0u64..).map(|n| format!("{job}-{n}")).find(|id| !used.contains(id)).expect("an unused id")
}

/// Rounds while this server leads. Each time it becomes the leader again
/// it takes over afresh: what it knew before may be stale.
async fn run_loop(scheduler: Arc<Scheduler>) {
    let mut leadership = scheduler.leader.watch();
    loop {
        let now = scheduler.leader.current();
        if now.leading {
            let taken = scheduler.taken_over.load(std::sync::atomic::Ordering::SeqCst);
            if now.term != taken {
                tracing::info!(term = now.term, "taking over the scheduling");
                scheduler.take_over().await;
                scheduler.taken_over.store(now.term, std::sync::atomic::Ordering::SeqCst);
            }
            scheduler.round().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = scheduler.wake.notified() => {}
            _ = leadership.changed() => {}
        }
    }
}
