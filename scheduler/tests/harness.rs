//! Scenarios run through the scheduler's pure core with an in-memory
//! cluster, in the manner of Nomad's scheduler harness: the harness holds
//! the nodes and allocations, each evaluation's plan is recorded and
//! applied, and invariants are checked after every one. Time is a number
//! the scenario moves; nothing here sleeps or does I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use mesh_scheduler::job::UpdatePolicy;
use mesh_scheduler::reconcile::{reconcile, Plan};
use mesh_scheduler::rollout::{step, NewInstance, Progress};
use mesh_scheduler::{Allocation, JobSpec, Node, Resources, Strategy};

/// An in-memory cluster that applies the plans it is given.
struct Harness {
    nodes: Vec<Node>,
    allocations: Vec<Allocation>,
    plans: Vec<Plan>,
    /// Every instance id ever placed: ids must never repeat.
    ids: HashSet<String>,
    seed: u64,
}

impl Harness {
    fn new(nodes: &[&str]) -> Harness {
        let nodes = nodes
            .iter()
            .map(|name| Node {
                name: (*name).to_owned(),
                cpu_millis: 1000,
                memory_mb: 1024,
                attributes: BTreeMap::new(),
                up: true,
            })
            .collect();
        Harness { nodes, allocations: Vec::new(), plans: Vec::new(), ids: HashSet::new(), seed: 7 }
    }

    /// One evaluation: the plan for `jobs`, applied, then the invariants.
    fn evaluate(&mut self, jobs: &[JobSpec]) -> Plan {
        let plan = reconcile(jobs, &self.nodes, &self.allocations, self.seed);
        self.seed += 1;
        self.allocations.retain(|a| !plan.stop.contains(&a.id));
        for placed in &plan.place {
            assert!(self.ids.insert(placed.id.clone()), "instance id {} used twice", placed.id);
            self.allocations.push(placed.clone());
        }
        self.check_invariants();
        self.plans.push(plan.clone());
        plan
    }

    fn check_invariants(&self) {
        for node in &self.nodes {
            let on_node: Vec<&Allocation> = self.allocations.iter().filter(|a| a.node == node.name).collect();
            assert!(node.up || on_node.is_empty(), "instances left on down node {}: {on_node:?}", node.name);
            let cpu: u64 = on_node.iter().map(|a| a.resources.cpu_millis).sum();
            let memory: u64 = on_node.iter().map(|a| a.resources.memory_mb).sum();
            assert!(cpu <= node.cpu_millis && memory <= node.memory_mb, "node {} over capacity", node.name);
        }
    }

    fn set_up(&mut self, name: &str, up: bool) {
        self.nodes.iter_mut().filter(|n| n.name == name).for_each(|n| n.up = up);
    }

    fn of_version(&self, version: &str) -> Vec<&Allocation> {
        self.allocations.iter().filter(|a| a.version == version).collect()
    }

    fn per_node(&self) -> BTreeMap<String, usize> {
        let mut count = BTreeMap::new();
        for allocation in &self.allocations {
            *count.entry(allocation.node.clone()).or_default() += 1;
        }
        count
    }
}

fn web(version: &str, replicas: u32, cpu_millis: u64) -> JobSpec {
    JobSpec {
        name: "web".into(),
        version: version.into(),
        revision: 0,
        replicas,
        resources: Resources { cpu_millis, memory_mb: 64 },
        constraints: vec![],
        strategy: Strategy::Spread,
        anti_affinity: false,
    }
}

fn policy() -> UpdatePolicy {
    UpdatePolicy {
        max_parallel: 1,
        min_healthy: Duration::from_secs(2),
        canary: 0,
        auto_revert: true,
        healthy_deadline: Duration::from_secs(30),
        gated: None,
    }
}

#[test]
fn a_lost_node_is_replaced_elsewhere_and_a_full_cluster_says_why() {
    let mut cluster = Harness::new(&["a", "b", "c"]);
    let plan = cluster.evaluate(&[web("v1", 3, 400)]);
    assert_eq!(plan.place.len(), 3);
    assert_eq!(
        cluster.per_node(),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]),
        "spread"
    );

    // c is lost: its instance is stopped and placed again on a node that is up.
    let lost: Vec<String> =
        cluster.allocations.iter().filter(|a| a.node == "c").map(|a| a.id.clone()).collect();
    cluster.set_up("c", false);
    let plan = cluster.evaluate(&[web("v1", 3, 400)]);
    assert_eq!(plan.stop, lost);
    assert_eq!(plan.place.len(), 1);
    assert_eq!(cluster.allocations.len(), 3);

    // Twice the replicas do not fit on two nodes: what fits is placed, the
    // rest waits with a reason.
    let plan = cluster.evaluate(&[web("v1", 6, 400)]);
    assert_eq!(cluster.allocations.len(), 4, "two per node on a and b");
    let (job, waiting, reason) = plan.pending.first().expect("pending instances");
    assert_eq!((job.as_str(), *waiting), ("web", 2));
    assert!(!reason.0.is_empty());

    // c returns: the waiting instances go there, and nothing else moves.
    let before: HashSet<String> = cluster.allocations.iter().map(|a| a.id.clone()).collect();
    cluster.set_up("c", true);
    let plan = cluster.evaluate(&[web("v1", 6, 400)]);
    assert!(plan.stop.is_empty() && plan.pending.is_empty(), "{plan:?}");
    assert!(plan.place.iter().all(|a| a.node == "c"), "{plan:?}");
    assert!(before.iter().all(|id| cluster.allocations.iter().any(|a| &a.id == id)));

    // Steady state: evaluating again changes nothing.
    let plan = cluster.evaluate(&[web("v1", 6, 400)]);
    assert_eq!(plan, Plan::default());
}

/// Drives an update from v1 to v2 one simulated second at a time: each
/// round asks `rollout::step` for the two specs, evaluates them, and marks
/// new instances ready `ready_after` seconds after they were placed (never,
/// when None). Returns the last progress and the round it came in.
fn roll(cluster: &mut Harness, ready_after: Option<u64>, max_rounds: u64) -> (Progress, u64) {
    let (old, new, policy) = (web("v1", 3, 100), web("v2", 3, 100), policy());
    let mut placed_at: HashMap<String, u64> = HashMap::new();
    for now in 0..max_rounds {
        let old_count = cluster.of_version("v1").len();
        let new_instances: Vec<NewInstance> = cluster
            .of_version("v2")
            .iter()
            .map(|a| {
                let ready_at = ready_after.map(|after| placed_at[&a.id] + after);
                let ready_for = ready_at.filter(|at| *at <= now).map(|at| Duration::from_secs(now - at));
                let trouble = ready_after.is_none().then(|| "not ready: GET /ready answered 503".to_owned());
                NewInstance { ready_for, trouble }
            })
            .collect();
        let (old_spec, new_spec, progress) =
            step(&old, &new, &policy, false, &new_instances, old_count, Duration::from_secs(now));
        if matches!(progress, Progress::Done | Progress::Failed(_)) {
            return (progress, now);
        }
        let plan = cluster.evaluate(&[old_spec, new_spec]);
        for placed in &plan.place {
            placed_at.insert(placed.id.clone(), now);
        }
        // Capacity never dips: old instances plus proven new ones cover the replicas.
        let proven =
            new_instances.iter().filter(|i| i.ready_for.is_some_and(|d| d >= policy.min_healthy)).count();
        assert!(
            cluster.of_version("v1").len() + proven >= 3,
            "round {now}: capacity dipped: {:?}",
            cluster.allocations
        );
        // At most max_parallel new instances are unproven at once.
        let unproven = cluster.of_version("v2").len() - proven;
        assert!(unproven <= policy.max_parallel as usize, "round {now}: {unproven} unproven");
    }
    panic!("the update neither finished nor failed within {max_rounds} rounds");
}

#[test]
fn a_rolling_update_replaces_every_instance_without_dropping_below_the_replicas() {
    let mut cluster = Harness::new(&["a", "b", "c"]);
    cluster.evaluate(&[web("v1", 3, 100)]);
    let (progress, round) = roll(&mut cluster, Some(1), 60);
    assert_eq!(progress, Progress::Done);
    assert_eq!(cluster.of_version("v2").len(), 3);
    assert!(cluster.of_version("v1").is_empty());
    // One instance at a time, each ready after 1 s and proven after 2 more.
    assert!((9..=12).contains(&round), "done in round {round}");
}

#[test]
fn a_version_that_never_becomes_healthy_fails_at_its_deadline_and_reverts() {
    let mut cluster = Harness::new(&["a", "b", "c"]);
    cluster.evaluate(&[web("v1", 3, 100)]);
    let old_ids: HashSet<String> = cluster.allocations.iter().map(|a| a.id.clone()).collect();
    let (progress, round) = roll(&mut cluster, None, 60);
    assert_eq!(round, 30, "fails at the healthy deadline");
    let Progress::Failed(why) = progress else { panic!("{progress:?}") };
    assert!(why.contains("v2 not healthy within 30s: not ready: GET /ready answered 503"), "{why}");
    // No old instance was stopped, and only one new one was tried.
    let now: HashSet<String> = cluster.of_version("v1").iter().map(|a| a.id.clone()).collect();
    assert_eq!(now, old_ids);
    assert_eq!(cluster.of_version("v2").len(), 1);
    // Auto-revert: the job goes back to v1 alone; the v2 instance stops and
    // the old ones stay as they are.
    let plan = cluster.evaluate(&[web("v1", 3, 100)]);
    assert_eq!(plan.stop.len(), 1);
    assert!(plan.place.is_empty());
    let now: HashSet<String> = cluster.allocations.iter().map(|a| a.id.clone()).collect();
    assert_eq!(now, old_ids);
}
