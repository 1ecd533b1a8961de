//! Feasibility and ranking: which node takes the next instance of a job,
//! or why none can.

use std::collections::{HashMap, HashSet};
use std::fmt;

use rand::rngs::StdRng;
use rand::Rng;

use super::{Allocation, JobSpec, Node, Resources, Strategy};

/// Why an instance cannot be placed; shown as the instance's pending reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaceable(pub String);

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is already placed, indexed for placement: resources in use per
/// node, and which nodes run an instance of which job. Built once per plan
/// and updated as instances are placed, so choosing a node costs the
/// number of nodes, not of allocations.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    used: HashMap<String, Resources>,
    job_nodes: HashSet<(String, String)>,
}

impl Usage {
    pub fn of(allocations: &[Allocation]) -> Usage {
        let mut usage = Usage::default();
        for allocation in allocations {
            usage.add(allocation);
        }
        usage
    }

    pub fn add(&mut self, allocation: &Allocation) {
        let used = self.used.entry(allocation.node.clone()).or_default();
        used.cpu_millis += allocation.resources.cpu_millis;
        used.memory_mb += allocation.resources.memory_mb;
        self.job_nodes.insert((allocation.job.clone(), allocation.node.clone()));
    }

    /// What a node has left.
    fn free(&self, node: &Node) -> Resources {
        let used = self.used.get(&node.name).copied().unwrap_or_default();
        Resources {
            cpu_millis: node.cpu_millis.saturating_sub(used.cpu_millis),
            memory_mb: node.memory_mb.saturating_sub(used.memory_mb),
        }
    }

    fn runs(&self, job: &str, node: &str) -> bool {
        self.job_nodes.contains(&(job.to_owned(), node.to_owned()))
    }
}

/// Chooses the node for one more instance of `job`, given what is already
/// allocated (including instances placed earlier in the same plan).
/// Feasibility filters run in the order that gives the most useful reason:
/// down nodes, constraints, anti-affinity, then resources.
pub fn choose_node<'n>(
    job: &JobSpec,
    nodes: &'n [Node],
    usage: &Usage,
    rng: &mut StdRng,
) -> Result<&'n Node, Unplaceable> {
    let up: Vec<&Node> = nodes.iter().filter(|n| n.up).collect();
    if up.is_empty() {
        return Err(Unplaceable("no node is up".into()));
    }
    let matching: Vec<&Node> = up
        .into_iter()
        .filter(|n| job.constraints.iter().all(|c| n.attributes.get(&c.attribute) == Some(&c.value)))
        .collect();
    if matching.is_empty() {
        let wanted: Vec<String> =
            job.constraints.iter().map(|c| format!("{} = {:?}", c.attribute, c.value)).collect();
        return Err(Unplaceable(format!("no node that is up has {}", wanted.join(" and "))));
    }
    let allowed: Vec<&Node> =
        matching.into_iter().filter(|n| !job.anti_affinity || !usage.runs(&job.name, &n.name)).collect();
    if allowed.is_empty() {
        return Err(Unplaceable(
            "every eligible node already runs an instance of this job (anti-affinity)".into(),
        ));
    }
    let need = job.resources;
    let fitting: Vec<(&Node, Resources)> = allowed
        .iter()
        .map(|n| (*n, usage.free(n)))
        .filter(|(_, f)| f.cpu_millis >= need.cpu_millis && f.memory_mb >= need.memory_mb)
        .collect();
    if fitting.is_empty() {
        let best =
            allowed.iter().map(|n| (n, usage.free(n))).max_by_key(|(_, f)| (f.cpu_millis, f.memory_mb));
        let detail = best.map_or(String::new(), |(n, f)| {
            format!("; the most free is {} with {} CPU millis and {} MB", n.name, f.cpu_millis, f.memory_mb)
        });
        return Err(Unplaceable(format!(
            "no node has {} CPU millis and {} MB free{detail}",
            need.cpu_millis, need.memory_mb
        )));
    }
    // Score by how full the node would be afterwards, averaged over CPU and
    // memory: bin-pack wants the fullest, spread the emptiest.
    let score = |node: &Node, free: Resources| {
        let cpu = 1.0 - (free.cpu_millis - need.cpu_millis) as f64 / node.cpu_millis.max(1) as f64;
        let memory = 1.0 - (free.memory_mb - need.memory_mb) as f64 / node.memory_mb.max(1) as f64;
        let fullness = (cpu + memory) / 2.0;
        match job.strategy {
            Strategy::BinPack => fullness,
            Strategy::Spread => 1.0 - fullness,
        }
    };
    let scored: Vec<(&Node, f64)> = fitting.iter().map(|(n, f)| (*n, score(n, *f))).collect();
    let best = scored.iter().map(|(_, s)| *s).fold(f64::NEG_INFINITY, f64::max);
    let ties: Vec<&Node> = scored.iter().filter(|(_, s)| (best - s).abs() < 1e-9).map(|(n, _)| *n).collect();
    // Ties are broken by the seeded RNG so that equal nodes share the load
    // and a run with the same seed repeats.
    Ok(ties[rng.random_range(0..ties.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Constraint;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    fn node(name: &str, cpu: u64, memory: u64) -> Node {
        Node { name: name.into(), cpu_millis: cpu, memory_mb: memory, attributes: BTreeMap::new(), up: true }
    }

    fn job(strategy: Strategy, anti_affinity: bool, cpu: u64) -> JobSpec {
        JobSpec {
            revision: 0,
            name: "web".into(),
            version: "v1".into(),
            replicas: 6,
            resources: Resources { cpu_millis: cpu, memory_mb: 64 },
            constraints: vec![],
            strategy,
            anti_affinity,
        }
    }

    /// Places `count` instances one after another, as a plan does.
    fn place_all(job: &JobSpec, nodes: &[Node], count: usize, seed: u64) -> Result<Vec<String>, Unplaceable> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut usage = Usage::default();
        let mut placed = Vec::new();
        for i in 0..count {
            let chosen = choose_node(job, nodes, &usage, &mut rng)?;
            usage.add(&Allocation {
                revision: 0,
                id: format!("web-{i}"),
                job: job.name.clone(),
                version: job.version.clone(),
                node: chosen.name.clone(),
                resources: job.resources,
            });
            placed.push(chosen.name.clone());
        }
        Ok(placed)
    }

    fn per_node(placed: &[String]) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for node in placed {
            *counts.entry(node.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn strategies_place_six_replicas_on_three_nodes_as_they_promise() {
        let nodes = [node("a", 1000, 1024), node("b", 1000, 1024), node("c", 1000, 1024)];
        // (strategy, anti-affinity, cpu per instance, expected instances per used node, sorted)
        let table = [
            // Bin-pack fills one node before starting the next.
            (Strategy::BinPack, false, 100, vec![6]),
            (Strategy::BinPack, false, 300, vec![3, 3]),
            (Strategy::Spread, false, 100, vec![2, 2, 2]),
            (Strategy::Spread, false, 300, vec![2, 2, 2]),
            // Anti-affinity: never two on one node, whatever the strategy.
            (Strategy::BinPack, true, 100, vec![1, 1, 1]),
        ];
        for (strategy, anti_affinity, cpu, expected) in table {
            let job = job(strategy, anti_affinity, cpu);
            let count = expected.iter().sum();
            let placed = place_all(&job, &nodes, count, 1).unwrap();
            let mut counts: Vec<usize> = per_node(&placed).into_values().collect();
            counts.sort_unstable();
            assert_eq!(counts, expected, "{strategy:?} anti-affinity={anti_affinity}");
        }
    }

    #[test]
    fn bin_pack_fills_the_fullest_node_first() {
        // b is already half full: bin-pack puts the next instance there, spread does not.
        let nodes = [node("a", 1000, 1024), node("b", 1000, 1024)];
        let existing = vec![Allocation {
            revision: 0,
            id: "other-0".into(),
            job: "other".into(),
            version: "v1".into(),
            node: "b".into(),
            resources: Resources { cpu_millis: 500, memory_mb: 512 },
        }];
        let mut rng = StdRng::seed_from_u64(3);
        let binpack =
            choose_node(&job(Strategy::BinPack, false, 100), &nodes, &Usage::of(&existing), &mut rng)
                .unwrap();
        assert_eq!(binpack.name, "b");
        let spread =
            choose_node(&job(Strategy::Spread, false, 100), &nodes, &Usage::of(&existing), &mut rng).unwrap();
        assert_eq!(spread.name, "a");
    }

    #[test]
    fn impossible_placements_say_why() {
        let mut down = node("d", 4000, 4096);
        down.up = false;
        let mut zoned = node("z", 1000, 1024);
        zoned.attributes.insert("zone".into(), "b".into());
        let mut constrained = job(Strategy::BinPack, false, 100);
        constrained.constraints = vec![Constraint { attribute: "zone".into(), value: "a".into() }];
        // (nodes, job, instances, words the reason must contain)
        let table: Vec<(Vec<Node>, JobSpec, usize, &str)> = vec![
            (vec![down.clone()], job(Strategy::BinPack, false, 100), 1, "no node is up"),
            (vec![zoned.clone()], constrained, 1, "zone = \"a\""),
            (vec![node("a", 1000, 1024)], job(Strategy::BinPack, true, 100), 2, "anti-affinity"),
            (
                vec![node("a", 1000, 1024), down],
                job(Strategy::BinPack, false, 400),
                3,
                "no node has 400 CPU millis",
            ),
        ];
        for (nodes, job, count, words) in table {
            let error = place_all(&job, &nodes, count, 1).expect_err(words);
            assert!(error.0.contains(words), "{error}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_plan() {
        let nodes = [node("a", 1000, 1024), node("b", 1000, 1024), node("c", 1000, 1024)];
        let job = job(Strategy::Spread, false, 10);
        assert_eq!(place_all(&job, &nodes, 9, 42).unwrap(), place_all(&job, &nodes, 9, 42).unwrap());
    }
}
