//! Canary rollouts' I/O side: once a second the leader measures each
//! rollout's new version as its callers saw it over the step's interval
//! (every server's proxies' summaries), lets the pure `canary` rule judge,
//! moves the service's split to the step's weights, and rolls back or
//! completes. The split is the mesh's own: a rollout sets it step by step
//! and clears it once the losing version's instances are gone.
//!
//! Rollouts are soft state on the leader, like the rolling kind: a new
//! leader starts a canary in progress again from its first step.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::canary::{Canary, CanaryPolicy, Gate, Measured, Verdict};
use mesh_scheduler::job::Job;
use mesh_scheduler::JobSpec;

use super::{Scheduler, SchedulerState};
use crate::auth::principal::Principal;
use crate::state::Change;
use crate::store::StoredJob;
use crate::traffic::{Counts, Sums};

/// How often rollouts in progress are measured.
const TICK: Duration = Duration::from_secs(1);

/// A canary rollout in progress.
#[derive(Default)]
pub(super) struct CanaryRun {
    pub canary: Canary,
    /// The new version's weight the mesh's split has, once set.
    pub applied_weight: Option<u32>,
    /// The latest measurement over an interval, and why there is none.
    pub measured: Option<Measured>,
    pub unmeasured: Option<String>,
    /// Where it stands, as `job status` and `rollout status` say.
    pub message: String,
    pub abort: bool,
    pub promote: bool,
}

/// A split change a rollout asks for, and the weight it puts in force.
pub(super) struct SplitChange {
    pub job: String,
    pub new_weight: Option<u32>,
    pub change: Change,
}

/// What the new version's callers saw, and what its own sidecars served:
/// the lower success rate and the higher p99 of the two. A failure a
/// caller's retry hid still shows at the new version's inbound.
pub fn measured_of(sums: &Sums, bounds: &[f64], service: &str, version: &str) -> Measured {
    let mut sides = [Counts::default(), Counts::default()];
    for (key, sum) in sums.iter().filter(|(key, _)| key.service == service && key.version == version) {
        sides[usize::from(key.inbound)].add(&sum.counts);
    }
    let seen = sides.iter().filter(|c| c.requests > 0);
    let success_rate = seen.clone().map(|c| c.successes as f64 / c.requests as f64).fold(1.0_f64, f64::min);
    let p99 = seen
        .filter_map(|c| c.quantile_interpolated(0.99, bounds))
        .fold(None, |worst: Option<f64>, p| Some(worst.map_or(p, |w| w.max(p))))
        .map(Duration::from_secs_f64);
    Measured { requests: sides.iter().map(|c| c.requests).max().unwrap_or(0), success_rate, p99 }
}

/// The split for a step: the rest of the traffic stays on the old version.
fn split(service: &str, old: &str, new: &str, new_weight: u32) -> Change {
    let weights = BTreeMap::from([(old.to_owned(), 100 - new_weight), (new.to_owned(), new_weight)]);
    Change::SetSplit { service: service.to_owned(), weights }
}

impl Scheduler {
    /// Measures every canary rollout's new version over its interval, at
    /// most once a `TICK`; a rollout measured this time gets `Ok`, or
    /// `Err` with why its traffic is incomplete.
    pub(super) async fn measure_canaries(&self) -> BTreeMap<String, Result<Measured, String>> {
        let wanted: Vec<(String, String, String, Duration)> = {
            let mut state = self.lock();
            if state.canaries_at.is_some_and(|at| at.elapsed() < TICK) {
                return BTreeMap::new();
            }
            state.canaries_at = Some(Instant::now());
            state
                .rollouts
                .iter()
                .filter_map(|(name, rollout)| {
                    let (_, job) = state.jobs.get(name)?;
                    let policy = gated(job, &rollout.old.1)?;
                    Some((name.clone(), job.service.clone(), job.version.clone(), policy.interval))
                })
                .collect()
        };
        let mut measured = BTreeMap::new();
        for (name, service, version, interval) in wanted {
            let asked = pb::TrafficRequest { service: service.clone(), ..Default::default() };
            let window_ms = interval.as_millis() as u64;
            let peers = self.peers.get().map(|p| &**p);
            let everywhere = super::super::gather::traffic(
                &self.control,
                peers,
                &Principal::ControlPlane,
                window_ms,
                &asked,
            )
            .await;
            let result = if everywhere.left_out.is_empty() {
                Ok(measured_of(&everywhere.sums, &everywhere.bounds, &service, &version))
            } else {
                Err(format!("no traffic from {}", everywhere.left_out.join(", ")))
            };
            measured.insert(name, result);
        }
        measured
    }

    /// One round of a canary rollout of `name` to `job` (its count
    /// already the one to run): the specs to reconcile, the split to put
    /// in force, or the rollout's end.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn canary_round(
        &self,
        state: &mut SchedulerState,
        name: &str,
        job: &Job,
        policy: &CanaryPolicy,
        measured: Option<&Result<Measured, String>>,
        specs: &mut Vec<JobSpec>,
        reverted: &mut Vec<(String, StoredJob)>,
        splits: &mut Vec<SplitChange>,
    ) {
        let now = self.epoch.elapsed();
        let rollout = state.rollouts.get(name).expect("a rollout in progress");
        let old = rollout.old.1.clone();
        let replicas = job.replicas;
        let step = rollout.canary.as_ref().map_or(0, |run| run.canary.step);
        let wanted_new = policy.new_replicas(step, replicas);
        let ready_new = state
            .allocations
            .iter()
            .filter(|a| a.job == name && a.version == job.version && a.revision == job.revision)
            .filter(|a| state.ready_since.contains_key(&a.id))
            .count() as u32;
        let new_registered = state
            .registered
            .iter()
            .any(|((service, _), (version, _, _))| *service == job.service && *version == job.version);
        let run = state.rollouts.get_mut(name).expect("a rollout").canary.get_or_insert_default();
        match measured {
            Some(Ok(m)) => {
                run.measured = Some(m.clone());
                run.unmeasured = None;
            }
            Some(Err(why)) => run.unmeasured = Some(why.clone()),
            None => {}
        }
        let verdict = if run.abort {
            Verdict::Failed("aborted by `meshctl rollout abort`".to_owned())
        } else if run.promote {
            Verdict::Promoted("promoted by `meshctl rollout promote`".to_owned())
        } else if let Some(why) = &run.unmeasured {
            Verdict::Stay(format!("holding: {why}"))
        } else {
            let m = run.measured.clone().unwrap_or_default();
            run.canary.judge(policy, job.update.healthy_deadline, now, ready_new >= wanted_new, &m)
        };
        let (from, to) = (old.version.clone(), job.version.clone());
        match verdict {
            Verdict::Stay(message) | Verdict::Advanced(message) => {
                if message != run.message {
                    tracing::info!(job = %name, %message, "canary rollout");
                }
                let weight = policy.weight(run.canary.step);
                if run.applied_weight != Some(weight) && new_registered {
                    let change = split(&job.service, &from, &to, weight);
                    splits.push(SplitChange { job: name.to_owned(), new_weight: Some(weight), change });
                }
                run.message = message.clone();
                let new_count = policy.new_replicas(run.canary.step, replicas);
                state.deployments.insert(name.to_owned(), format!("canary {from} → {to}: {message}"));
                specs.push(JobSpec { replicas, ..old.spec() });
                specs.push(JobSpec { replicas: new_count, ..job.spec() });
            }
            Verdict::Promoted(why) => {
                tracing::info!(job = %name, version = %to, %why, "canary promoted");
                let report = report_of(state, name, "promoted", &format!("{to} promoted: {why}"));
                let weights = BTreeMap::from([(to.clone(), 100)]);
                let change = Change::SetSplit { service: job.service.clone(), weights };
                splits.push(SplitChange { job: name.to_owned(), new_weight: None, change });
                state.rollouts.remove(name);
                state.split_cleanup.insert(name.to_owned(), (job.service.clone(), from.clone()));
                state.deployments.insert(name.to_owned(), format!("updated from {from} to {to}: {why}"));
                state.last_rollouts.insert(name.to_owned(), report);
                specs.push(job.spec());
            }
            Verdict::Failed(why) => {
                tracing::warn!(job = %name, %why, "canary failed; rolling back");
                let report = report_of(state, name, "rolled back", &format!("rolled back to {from}: {why}"));
                // The old version takes all traffic at once; the new instances then stop.
                let weights = BTreeMap::from([(from.clone(), 100)]);
                let change = Change::SetSplit { service: job.service.clone(), weights };
                splits.push(SplitChange { job: name.to_owned(), new_weight: None, change });
                let rollout = state.rollouts.remove(name).expect("the rollout");
                reverted.push((name.to_owned(), rollout.old.0.clone()));
                specs.push(JobSpec { replicas, ..rollout.old.1.spec() });
                state.jobs.insert(name.to_owned(), rollout.old);
                state.split_cleanup.insert(name.to_owned(), (job.service.clone(), to.clone()));
                state.deployments.insert(name.to_owned(), format!("rolled back to {from}: {why}"));
                state.last_rollouts.insert(name.to_owned(), report);
            }
        }
    }

    /// Clears the split a finished rollout left once the losing version's
    /// instances are gone: the service's endpoints then share as before.
    pub(super) fn clear_finished_splits(state: &mut SchedulerState, splits: &mut Vec<SplitChange>) {
        let done: Vec<String> = state
            .split_cleanup
            .iter()
            .filter(|(job, (_, version))| {
                !state.allocations.iter().any(|a| a.job == **job && a.version == *version)
            })
            .map(|(job, _)| job.clone())
            .collect();
        for job in done {
            let (service, _) = state.split_cleanup.remove(&job).expect("listed");
            // A rollout begun since sets its own split.
            if state.rollouts.contains_key(&job) {
                continue;
            }
            splits.push(SplitChange { job, new_weight: None, change: Change::ClearSplit { service } });
        }
    }

    /// Puts the rollouts' split changes in force; a step's weight counts
    /// as applied only once the change is.
    pub(super) async fn apply_splits(&self, splits: Vec<SplitChange>) {
        for SplitChange { job, new_weight, change } in splits {
            match self.control.change_as_leader(change).await {
                Ok(_) => {
                    if let Some(weight) = new_weight {
                        let mut state = self.lock();
                        if let Some(run) = state.rollouts.get_mut(&job).and_then(|r| r.canary.as_mut()) {
                            run.applied_weight = Some(weight);
                        }
                    }
                }
                Err(error) => tracing::warn!(%job, ?error, "a rollout could not set its split"),
            }
        }
    }

    /// `meshctl rollout status`: the canary in progress, or the last one's outcome.
    pub(super) fn rollout_report(&self, name: &str) -> Result<pb::RolloutReport, tonic::Status> {
        let state = self.lock();
        let Some((_, job)) = state.jobs.get(name) else {
            return Err(tonic::Status::not_found(format!("no job {name:?}")));
        };
        if let Some(rollout) = state.rollouts.get(name) {
            if gated(job, &rollout.old.1).is_none() {
                return Err(tonic::Status::failed_precondition(format!(
                    "job {name:?} is in a rolling update, not a canary rollout: see `meshctl job status {name}`"
                )));
            }
            let message = rollout.canary.as_ref().map(|run| run.message.clone()).unwrap_or_default();
            let paused = rollout.canary.as_ref().is_some_and(|run| run.canary.paused);
            return Ok(report_of(&state, name, if paused { "paused" } else { "progressing" }, &message));
        }
        state.last_rollouts.get(name).cloned().ok_or_else(|| {
            tonic::Status::not_found(format!(
                "job {name:?} has no canary rollout in progress or on record ([update] strategy = \"canary\" makes one)"
            ))
        })
    }

    /// `meshctl rollout pause|resume|abort|promote`.
    pub(super) fn act_on_rollout(
        &self,
        name: &str,
        action: pb::rollout_action::Action,
    ) -> Result<pb::RolloutReport, tonic::Status> {
        use pb::rollout_action::Action;
        {
            let mut state = self.lock();
            let job = state.jobs.get(name).map(|(_, job)| job.clone());
            let Some(rollout) = state.rollouts.get_mut(name) else {
                return Err(tonic::Status::failed_precondition(format!(
                    "job {name:?} has no rollout in progress"
                )));
            };
            if job.as_ref().and_then(|job| gated(job, &rollout.old.1)).is_none() {
                return Err(tonic::Status::failed_precondition(format!(
                    "job {name:?} is in a rolling update, not a canary rollout"
                )));
            }
            let run = rollout.canary.get_or_insert_default();
            match action {
                Action::Pause => run.canary.paused = true,
                Action::Resume => run.canary.paused = false,
                Action::Abort => run.abort = true,
                Action::Promote => run.promote = true,
                Action::Unspecified => {
                    return Err(tonic::Status::invalid_argument(
                        "name an action: pause, resume, abort or promote",
                    ))
                }
            }
            tracing::info!(job = %name, ?action, "rollout action");
        }
        self.wake.notify_one();
        self.rollout_report(name)
    }
}

/// The canary policy of an update from `old` to `job`, when it is one: a
/// new version under `strategy = "canary"`. The same version with a new
/// task cannot be told apart by a split, so it rolls.
pub(super) fn gated<'j>(job: &'j Job, old: &Job) -> Option<&'j CanaryPolicy> {
    job.update.gated.as_ref().filter(|_| old.version != job.version)
}

/// A rollout's report as it stands (from the rollout in progress).
fn report_of(state: &SchedulerState, name: &str, phase: &str, message: &str) -> pb::RolloutReport {
    let Some((_, job)) = state.jobs.get(name) else { return pb::RolloutReport::default() };
    let Some(rollout) = state.rollouts.get(name) else { return pb::RolloutReport::default() };
    let old = &rollout.old.1;
    let policy = gated(job, old);
    let run = rollout.canary.as_ref();
    let over = phase != "progressing" && phase != "paused";
    let weights = match (over, run.and_then(|r| r.applied_weight)) {
        (false, Some(w)) => BTreeMap::from([(old.version.clone(), 100 - w), (job.version.clone(), w)]),
        (false, None) => BTreeMap::from([(old.version.clone(), 100)]),
        (true, _) if phase == "promoted" => BTreeMap::from([(job.version.clone(), 100)]),
        (true, _) => BTreeMap::from([(old.version.clone(), 100)]),
    };
    let gates: Vec<Gate> = match (policy, run.and_then(|r| r.measured.as_ref())) {
        (Some(policy), Some(m)) => policy.gates(m),
        _ => Vec::new(),
    };
    pb::RolloutReport {
        job: name.to_owned(),
        service: job.service.clone(),
        from_version: old.version.clone(),
        to_version: job.version.clone(),
        state: phase.to_owned(),
        step: if over { 0 } else { run.map_or(1, |r| r.canary.step as u32 + 1) },
        steps: policy.map(|p| p.steps.clone()).unwrap_or_default(),
        weights: weights.into_iter().collect(),
        gates: gates
            .into_iter()
            .map(|g| pb::RolloutGate {
                name: g.name.to_owned(),
                measured: g.measured,
                threshold: g.threshold,
                passed: g.passed,
            })
            .collect(),
        message: message.to_owned(),
        interval_ms: policy.map_or(0, |p| p.interval.as_millis() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{RowKey, Sum};

    fn row(inbound: bool, version: &str, requests: u64, successes: u64, buckets: &[u64]) -> (RowKey, Sum) {
        let key = RowKey { inbound, service: "web".into(), version: version.into() };
        let counts = Counts { requests, successes, latency_buckets: buckets.to_vec(), ..Counts::default() };
        (key, Sum { counts, in_flight: 0, proxies: 1, requests_per_second: 0.0 })
    }

    #[test]
    fn a_version_is_measured_at_its_worst_side() {
        let bounds = [0.01, 0.1, 1.0];
        let mut sums = Sums::new();
        for (key, sum) in [
            // Callers saw 100 % (a retry hid one failure); the instances served 99 of 100.
            row(false, "v2", 100, 100, &[100, 0, 0, 0]),
            row(true, "v2", 101, 100, &[0, 101, 0, 0]),
            row(false, "v1", 1000, 500, &[0, 0, 0, 1000]),
        ] {
            crate::traffic::add(&mut sums, key, sum);
        }
        let m = measured_of(&sums, &bounds, "web", "v2");
        assert_eq!(m.requests, 101);
        assert!((m.success_rate - 100.0 / 101.0).abs() < 1e-9, "{m:?}");
        let p99 = m.p99.unwrap().as_secs_f64();
        assert!((0.09..=0.1).contains(&p99), "the instances' slower view: {p99}");
        assert_eq!(
            measured_of(&sums, &bounds, "web", "v3"),
            Measured { success_rate: 1.0, ..Measured::default() }
        );
    }
}
