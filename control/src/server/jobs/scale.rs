//! The autoscaler's I/O side: once a second the leader reads the mesh's
//! traffic (every server's proxies' summaries), turns it into each scaled
//! job's load, and lets the pure `autoscale` rule decide. Decisions are
//! kept with their reasons for `meshctl job status`.
//!
//! The counts are soft state on the leader. A new leader starts each job
//! from the instances it finds running and removes none before it has
//! seen a whole stabilization window.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::autoscale::{Autoscaler, Load, SMOOTHING};
use mesh_scheduler::job::Job;

use super::{Scheduler, SchedulerState};
use crate::auth::principal::Principal;
use crate::traffic::{Counts, Sums};

/// How often scaled jobs are decided.
pub const TICK: Duration = Duration::from_secs(1);

/// Decisions kept per job for `job status`.
const KEPT_DECISIONS: usize = 5;

/// The reason a proxy gives for a request that found no instance.
const NO_ENDPOINTS: &str = "no-endpoints";

/// One scaled job's autoscaler and its latest decisions.
pub(super) struct Scaling {
    pub scaler: Autoscaler,
    /// (when, "3 → 5: why"), newest last.
    pub decisions: VecDeque<(Instant, String)>,
    /// Why the last tick decided nothing, when it could not decide.
    pub holding: Option<String>,
}

/// The count a job should run now: its autoscaler's for a scaled job (or,
/// before its first tick, what already runs, within bounds), else the file's.
pub(super) fn replicas_of(state: &SchedulerState, job: &Job) -> u32 {
    match (&job.scale, state.scaling.get(&job.name)) {
        (Some(_), Some(scaling)) => scaling.scaler.replicas(),
        (Some(policy), None) => {
            let running = state.allocations.iter().filter(|a| a.job == job.name).count() as u32;
            job.replicas.max(running).clamp(policy.min, policy.max)
        }
        (None, _) => job.replicas,
    }
}

/// What the mesh measured for `service`: its own sidecars' inbound view,
/// or its callers' outbound view where that shows more (a request held
/// for lack of an instance is seen only by its caller).
fn load_of(sums: &Sums, bounds: &[f64], service: &str) -> Load {
    let mut inbound = (Counts::default(), 0i64, 0.0);
    let mut outbound = (Counts::default(), 0i64, 0.0);
    for (key, sum) in sums.iter().filter(|(key, _)| key.service == service) {
        let side = if key.inbound { &mut inbound } else { &mut outbound };
        side.0.add(&sum.counts);
        side.1 += sum.in_flight;
        side.2 += sum.requests_per_second;
    }
    let measured = if inbound.0.requests > 0 { &inbound.0 } else { &outbound.0 };
    // Interpolated inside its bucket, as a canary's gate reads it.
    let p99 = measured.quantile_interpolated(0.99, bounds).map(Duration::from_secs_f64);
    Load {
        in_flight: inbound.1.max(outbound.1).max(0) as f64,
        requests_per_second: f64::max(inbound.2, outbound.2),
        requests: inbound.0.requests.max(outbound.0.requests),
        p99,
        waiting: outbound.0.mesh_errors.get(NO_ENDPOINTS).copied().unwrap_or(0),
    }
}

impl Scheduler {
    /// Decides every scaled job's count, at most once a `TICK`. Returns
    /// the jobs whose count changed.
    pub(super) async fn autoscale(&self) -> BTreeSet<String> {
        let due = {
            let state = self.lock();
            state.scaled_at.is_none_or(|at| at.elapsed() >= TICK)
                && state.jobs.values().any(|(_, job)| job.scale.is_some())
        };
        if !due {
            return BTreeSet::new();
        }
        let window_ms = SMOOTHING.as_millis() as u64;
        let asked = pb::TrafficRequest::default();
        let everywhere = super::super::gather::traffic(
            &self.control,
            self.peers.get().map(|p| &**p),
            &Principal::ControlPlane,
            window_ms,
            &asked,
        )
        .await;
        let now = self.epoch.elapsed();
        let mut state = self.lock();
        state.scaled_at = Some(Instant::now());
        let mut changed = BTreeSet::new();
        let scaled: Vec<Job> =
            state.jobs.values().filter(|(_, job)| job.scale.is_some()).map(|(_, job)| job.clone()).collect();
        state.scaling.retain(|name, _| scaled.iter().any(|job| job.name == *name));
        for job in scaled {
            let Some(policy) = &job.scale else { continue };
            // Until a new leader has its instances back, it cannot know the count.
            if state.held.contains(&job.name) {
                continue;
            }
            let start = replicas_of(&state, &job);
            let scaling = state.scaling.entry(job.name.clone()).or_insert_with(|| Scaling {
                scaler: Autoscaler::new(policy, start, now),
                decisions: VecDeque::new(),
                holding: None,
            });
            // Part of the traffic is missing: a decision on the rest could remove instances in use.
            if !everywhere.left_out.is_empty() {
                scaling.holding =
                    Some(format!("holding: no traffic from {}", everywhere.left_out.join(", ")));
                continue;
            }
            scaling.holding = None;
            let load = load_of(&everywhere.sums, &everywhere.bounds, &job.service);
            if let Some(decision) = scaling.scaler.observe(policy, now, &load) {
                tracing::info!(job = %job.name, %decision, "scaled");
                scaling.decisions.push_back((Instant::now(), decision.to_string()));
                if scaling.decisions.len() > KEPT_DECISIONS {
                    scaling.decisions.pop_front();
                }
                changed.insert(job.name.clone());
            }
        }
        drop(state);
        changed
    }

    /// Adds to this round's scale decisions what keeps their instances
    /// from being placed.
    pub(super) fn note_unplaced(state: &mut SchedulerState, decided: &BTreeSet<String>) {
        for name in decided {
            let Some(why) = state.pending.get(name).cloned() else { continue };
            if let Some((_, decision)) = state.scaling.get_mut(name).and_then(|s| s.decisions.back_mut()) {
                decision.push_str(&format!("; not all can be placed: {why}"));
            }
        }
    }
}

/// A scaled job's policy and latest decisions as `job status` shows them.
pub(super) fn scale_status(state: &SchedulerState, job: &Job) -> (String, Vec<String>) {
    let Some(policy) = &job.scale else { return (String::new(), Vec::new()) };
    let target = match policy.target {
        mesh_scheduler::job::ScaleTarget::InFlightPerInstance(n) => format!("{n} in flight per instance"),
        mesh_scheduler::job::ScaleTarget::RpsPerInstance(n) => format!("{n} requests/s per instance"),
        mesh_scheduler::job::ScaleTarget::P99(d) => format!("p99 {}", humantime::format_duration(d)),
    };
    let scaling = state.scaling.get(&job.name);
    let now = scaling
        .map(|s| s.holding.clone().unwrap_or_else(|| s.scaler.measured().to_owned()))
        .unwrap_or_else(|| "not measured yet".to_owned());
    let summary = format!(
        "min {}, max {}, target {target}, scale down after {}; now {now}",
        policy.min,
        policy.max,
        humantime::format_duration(policy.scale_down_after)
    );
    let decisions = scaling
        .map(|s| {
            s.decisions
                .iter()
                .rev()
                .map(|(at, text)| format!("{text} ({}s ago)", at.elapsed().as_secs()))
                .collect()
        })
        .unwrap_or_default();
    (summary, decisions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{RowKey, Sum};

    fn row(inbound: bool, version: &str, requests: u64, in_flight: i64, rps: f64) -> (RowKey, Sum) {
        let key = RowKey { inbound, service: "web".into(), version: version.into() };
        let counts = Counts {
            requests,
            successes: requests,
            latency_buckets: vec![0, requests, 0, 0],
            ..Counts::default()
        };
        (key, Sum { counts, in_flight, proxies: 1, requests_per_second: rps })
    }

    #[test]
    fn a_services_load_sums_its_versions_and_takes_the_larger_side() {
        let bounds = [0.01, 0.1, 1.0];
        let mut sums = Sums::new();
        for (key, sum) in [
            row(true, "v1", 100, 10, 50.0),
            row(true, "v2", 20, 4, 10.0),
            row(false, "v1", 90, 12, 45.0),
            (RowKey { inbound: true, service: "other".into(), version: "v1".into() }, Sum::default()),
        ] {
            crate::traffic::add(&mut sums, key, sum);
        }
        let load = load_of(&sums, &bounds, "web");
        assert_eq!(load.in_flight, 14.0, "inbound 10 + 4 beats outbound 12");
        assert_eq!((load.requests, load.requests_per_second), (120, 60.0));
        // All in the 10–100 ms bucket: 99 % of the way through it.
        assert_eq!(load.p99, Some(Duration::from_secs_f64(0.01 + 0.09 * 0.99)));
        assert_eq!(load.waiting, 0);
        // No instance: only callers see the requests, held or refused.
        let mut held = Sums::new();
        let (key, mut sum) = row(false, "", 3, 2, 1.5);
        sum.counts.mesh_errors.insert(NO_ENDPOINTS.into(), 3);
        crate::traffic::add(&mut held, key, sum);
        let load = load_of(&held, &bounds, "web");
        assert_eq!((load.in_flight, load.requests, load.waiting), (2.0, 3, 3));
        assert_eq!(load_of(&held, &bounds, "api"), Load::default());
    }
}
