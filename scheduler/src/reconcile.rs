//! Reconciliation: compare the jobs as declared with the instances as
//! allocated and produce the plan that closes the gap.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::placement::{choose_node, Unplaceable, Usage};
use super::{Allocation, JobSpec, Node};

/// What to do to reach the declared state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub place: Vec<Allocation>,
    /// Allocation ids to stop: extras, jobs that are gone, instances on down nodes.
    pub stop: Vec<String>,
    /// Instances that could not be placed, per job, with the reason.
    pub pending: Vec<(String, u32, Unplaceable)>,
}

/// The highest instance number of each job among `allocations` (ids are `<job>-<n>`).
fn highest_ids(allocations: &[Allocation]) -> HashMap<String, u64> {
    let mut highest: HashMap<String, u64> = HashMap::new();
    for allocation in allocations {
        let number = allocation
            .id
            .strip_prefix(allocation.job.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(number) = number {
            let entry = highest.entry(allocation.job.clone()).or_insert(number);
            *entry = (*entry).max(number);
        }
    }
    highest
}

/// The next free instance id of a job: `<job>-<n>`, above every id taken.
fn next_id(job: &str, highest: &mut HashMap<String, u64>) -> String {
    let next = highest.get(job).map_or(0, |n| n + 1);
    highest.insert(job.to_owned(), next);
    format!("{job}-{next}")
}

/// Whether an allocation is an instance of this spec: a job's versions
/// (and task revisions) are separate specs while it is being updated.
fn belongs(allocation: &Allocation, job: &JobSpec) -> bool {
    allocation.job == job.name && allocation.version == job.version && allocation.revision == job.revision
}

/// The plan for `jobs` on `nodes` given `allocations`. The same inputs and
/// seed always give the same plan.
pub fn reconcile(jobs: &[JobSpec], nodes: &[Node], allocations: &[Allocation], seed: u64) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Plan::default();
    let node_up = |name: &str| nodes.iter().any(|n| n.name == name && n.up);
    // What keeps running, and so keeps its resources.
    let mut kept: Vec<Allocation> = Vec::new();
    for allocation in allocations {
        let declared = jobs.iter().any(|j| belongs(allocation, j));
        if declared && node_up(&allocation.node) {
            kept.push(allocation.clone());
        } else {
            plan.stop.push(allocation.id.clone());
        }
    }
    for job in jobs {
        let mut live: Vec<&Allocation> = kept.iter().filter(|a| belongs(a, job)).collect();
        // Newest instances (highest ids) go first when scaling down.
        live.sort_by_key(|a| std::cmp::Reverse(a.id.clone()));
        let wanted = job.replicas as usize;
        if live.len() > wanted {
            plan.stop.extend(live[..live.len() - wanted].iter().map(|a| a.id.clone()));
        }
    }
    kept.retain(|a| !plan.stop.contains(&a.id));
    // Ids must not be reused while the old instance may still be stopping.
    let mut highest = highest_ids(allocations);
    let mut usage = Usage::of(&kept);
    for job in jobs {
        let live = kept.iter().filter(|a| belongs(a, job)).count();
        let missing = (job.replicas as usize).saturating_sub(live);
        for placed in 0..missing {
            match choose_node(job, nodes, &usage, &mut rng) {
                Ok(node) => {
                    let allocation = Allocation {
                        id: next_id(&job.name, &mut highest),
                        job: job.name.clone(),
                        version: job.version.clone(),
                        revision: job.revision,
                        node: node.name.clone(),
                        resources: job.resources,
                    };
                    usage.add(&allocation);
                    plan.place.push(allocation);
                }
                Err(reason) => {
                    plan.pending.push((job.name.clone(), (missing - placed) as u32, reason));
                    break;
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Resources, Strategy};
    use std::collections::BTreeMap;

    fn node(name: &str, up: bool) -> Node {
        Node { name: name.into(), cpu_millis: 1000, memory_mb: 1024, attributes: BTreeMap::new(), up }
    }

    fn job(name: &str, replicas: u32, cpu: u64) -> JobSpec {
        JobSpec {
            revision: 0,
            name: name.into(),
            version: "v1".into(),
            replicas,
            resources: Resources { cpu_millis: cpu, memory_mb: 64 },
            constraints: vec![],
            strategy: Strategy::Spread,
            anti_affinity: false,
        }
    }

    fn allocation(id: &str, job: &str, node: &str) -> Allocation {
        Allocation {
            revision: 0,
            id: id.into(),
            job: job.into(),
            version: "v1".into(),
            node: node.into(),
            resources: Resources { cpu_millis: 100, memory_mb: 64 },
        }
    }

    #[test]
    fn plans_close_the_gap() {
        let nodes = [node("a", true), node("b", true), node("down", false)];
        // (jobs, allocations, placements, stops, pending count)
        struct Case {
            what: &'static str,
            jobs: Vec<JobSpec>,
            allocations: Vec<Allocation>,
            place: usize,
            stop: Vec<&'static str>,
            pending: u32,
        }
        let cases = [
            Case {
                what: "fresh job",
                jobs: vec![job("web", 3, 100)],
                allocations: vec![],
                place: 3,
                stop: vec![],
                pending: 0,
            },
            Case {
                what: "in balance",
                jobs: vec![job("web", 1, 100)],
                allocations: vec![allocation("web-0", "web", "a")],
                place: 0,
                stop: vec![],
                pending: 0,
            },
            Case {
                what: "scale down stops the newest",
                jobs: vec![job("web", 1, 100)],
                allocations: vec![allocation("web-0", "web", "a"), allocation("web-1", "web", "b")],
                place: 0,
                stop: vec!["web-1"],
                pending: 0,
            },
            Case {
                what: "a down node's instance is replaced",
                jobs: vec![job("web", 2, 100)],
                allocations: vec![allocation("web-0", "web", "a"), allocation("web-1", "web", "down")],
                place: 1,
                stop: vec!["web-1"],
                pending: 0,
            },
            Case {
                what: "a stopped job's instances stop",
                jobs: vec![],
                allocations: vec![allocation("old-0", "old", "a")],
                place: 0,
                stop: vec!["old-0"],
                pending: 0,
            },
            Case {
                what: "over-commit leaves instances pending",
                jobs: vec![job("big", 3, 600)],
                allocations: vec![],
                place: 2,
                stop: vec![],
                pending: 1,
            },
        ];
        for case in cases {
            let plan = reconcile(&case.jobs, &nodes, &case.allocations, 7);
            assert_eq!(plan.place.len(), case.place, "{}: {plan:?}", case.what);
            assert_eq!(plan.stop, case.stop, "{}", case.what);
            let pending: u32 = plan.pending.iter().map(|(_, n, _)| n).sum();
            assert_eq!(pending, case.pending, "{}: {plan:?}", case.what);
            assert!(
                plan.place.iter().all(|a| a.node != "down"),
                "{}: nothing goes to a down node",
                case.what
            );
        }
    }

    #[test]
    fn new_ids_never_reuse_a_stopping_instance_id() {
        let nodes = [node("a", true), node("down", false)];
        let plan = reconcile(&[job("web", 1, 100)], &nodes, &[allocation("web-4", "web", "down")], 1);
        assert_eq!(plan.stop, vec!["web-4"]);
        assert_eq!(plan.place[0].id, "web-5");
    }
}
