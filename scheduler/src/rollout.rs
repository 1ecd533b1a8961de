//! Rolling updates, pure: given the old and new version of a job and how
//! healthy the new instances are, decide how many of each version to run
//! this round, and whether the update is done, waiting, or has failed.
//!
//! Old instances stop only as new ones have been healthy for
//! `min_healthy`, and at most `max_parallel` new instances are unproven at
//! once: capacity never dips below the replica count, so an update under
//! load fails no request. With `canary` > 0 that many new instances run
//! beside the full old set until promoted.

use std::time::Duration;

use super::JobSpec;
use crate::job::UpdatePolicy;

/// A new-version instance as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewInstance {
    /// How long it has been ready without a break; `None` while not ready.
    pub ready_for: Option<Duration>,
    /// Why it is unhealthy, when its agent said (exits, failed checks).
    pub trouble: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// Keep going: these are the replica counts for this round.
    Rolling,
    /// Canaries are healthy; the rest waits for `meshctl job promote`.
    AwaitingPromotion,
    /// Every instance runs the new version.
    Done,
    /// The new version did not become healthy in time: go back (with
    /// `auto_revert`) or stay stuck, and say why.
    Failed(String),
}

/// One round of an update from `old` to `new` (the same job, two versions).
/// Returns the two specs to reconcile, with their replica counts, and the progress.
pub fn step(
    old: &JobSpec,
    new: &JobSpec,
    policy: &UpdatePolicy,
    promoted: bool,
    new_instances: &[NewInstance],
    old_count: usize,
    elapsed: Duration,
) -> (JobSpec, JobSpec, Progress) {
    let replicas = new.replicas;
    let healthy =
        new_instances.iter().filter(|i| i.ready_for.is_some_and(|d| d >= policy.min_healthy)).count() as u32;
    let canary_phase = policy.canary > 0 && !promoted;
    let (new_target, old_target) = if canary_phase {
        (policy.canary.min(replicas), replicas)
    } else {
        ((healthy + policy.max_parallel).min(replicas), replicas.saturating_sub(healthy))
    };
    let wanted_healthy = if canary_phase { policy.canary.min(replicas) } else { replicas };
    let progress = if healthy >= wanted_healthy && !canary_phase && old_count == 0 {
        Progress::Done
    } else if healthy >= wanted_healthy && canary_phase {
        Progress::AwaitingPromotion
    } else if elapsed >= policy.healthy_deadline {
        let why = new_instances
            .iter()
            .find_map(|i| i.trouble.clone())
            .unwrap_or_else(|| "its instances never became ready".to_owned());
        Progress::Failed(format!(
            "{} not healthy within {}: {why}",
            new.version,
            humantime::format_duration(policy.healthy_deadline)
        ))
    } else {
        Progress::Rolling
    };
    let old = JobSpec { replicas: old_target, ..old.clone() };
    let new = JobSpec { replicas: new_target, ..new.clone() };
    (old, new, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Resources;

    fn spec(version: &str) -> JobSpec {
        JobSpec {
            revision: 0,
            name: "web".into(),
            version: version.into(),
            replicas: 3,
            resources: Resources::default(),
            constraints: vec![],
            strategy: Default::default(),
            anti_affinity: false,
        }
    }

    fn policy(canary: u32) -> UpdatePolicy {
        UpdatePolicy {
            max_parallel: 1,
            min_healthy: Duration::from_secs(2),
            canary,
            auto_revert: true,
            healthy_deadline: Duration::from_secs(30),
            gated: None,
        }
    }

    fn healthy(secs: u64) -> NewInstance {
        NewInstance { ready_for: Some(Duration::from_secs(secs)), trouble: None }
    }

    fn starting() -> NewInstance {
        NewInstance { ready_for: None, trouble: None }
    }

    #[test]
    fn updates_proceed_one_proven_instance_at_a_time() {
        // (canary, promoted, new instances, old still running, elapsed s) →
        // (old replicas, new replicas, progress)
        type Case = (u32, bool, Vec<NewInstance>, usize, u64, (u32, u32, Progress));
        let table: Vec<Case> = vec![
            // Start: one new beside three old.
            (0, false, vec![], 3, 0, (3, 1, Progress::Rolling)),
            // Ready but not yet for min_healthy: nothing stops.
            (0, false, vec![healthy(1)], 3, 1, (3, 1, Progress::Rolling)),
            // Proven: one old goes, the next new comes.
            (0, false, vec![healthy(2)], 3, 3, (2, 2, Progress::Rolling)),
            (0, false, vec![healthy(5), healthy(2), starting()], 1, 8, (1, 3, Progress::Rolling)),
            (0, false, vec![healthy(9), healthy(6), healthy(2)], 0, 12, (0, 3, Progress::Done)),
            // Never ready: failed at the deadline, with the agent's reason.
            (
                0,
                false,
                vec![NewInstance {
                    ready_for: None,
                    trouble: Some("not ready: GET /ready answered 503".into()),
                }],
                3,
                30,
                (
                    3,
                    1,
                    Progress::Failed("v2 not healthy within 30s: not ready: GET /ready answered 503".into()),
                ),
            ),
            // A canary runs beside all the old instances until promoted.
            (1, false, vec![], 3, 0, (3, 1, Progress::Rolling)),
            (1, false, vec![healthy(3)], 3, 5, (3, 1, Progress::AwaitingPromotion)),
            (1, true, vec![healthy(3)], 3, 5, (2, 2, Progress::Rolling)),
        ];
        for (canary, promoted, new_instances, old_count, elapsed, (old_n, new_n, progress)) in table {
            let (old, new, got) = step(
                &spec("v1"),
                &spec("v2"),
                &policy(canary),
                promoted,
                &new_instances,
                old_count,
                Duration::from_secs(elapsed),
            );
            let case = format!("canary {canary} promoted {promoted} {new_instances:?} old {old_count}");
            assert_eq!((old.replicas, new.replicas, got), (old_n, new_n, progress), "{case}");
            assert_eq!((old.version.as_str(), new.version.as_str()), ("v1", "v2"));
        }
    }
}
