//! The scheduler's pure core under load: placing 10 000 instances onto
//! 1 000 nodes (placements per second, per strategy), and reconciling that
//! cluster after it loses one node. No I/O: this times the decisions only.
//!
//! `mesh-scheduler-bench [--repeat N] [--quick]` prints a Markdown table;
//! `--quick` (for the test suite) uses a tenth of the cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_scheduler::reconcile::reconcile;
use mesh_scheduler::{JobSpec, Node, Resources, Strategy};

const REPLICAS: u32 = 100;

fn nodes(count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| Node {
            name: format!("node-{i:04}"),
            cpu_millis: 16_000,
            memory_mb: 65_536,
            attributes: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 3))]),
            up: true,
        })
        .collect()
}

fn jobs(count: usize, strategy: Strategy) -> Vec<JobSpec> {
    (0..count)
        .map(|i| JobSpec {
            revision: 0,
            name: format!("job-{i:03}"),
            version: "v1".into(),
            replicas: REPLICAS,
            resources: Resources { cpu_millis: 100 + (i as u64 % 4) * 50, memory_mb: 128 },
            constraints: vec![],
            strategy,
            anti_affinity: i % 10 == 0,
        })
        .collect()
}

fn usage() -> ! {
    eprintln!("usage: mesh-scheduler-bench [--repeat N] [--quick]");
    std::process::exit(2);
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let mut repeat = 3;
    let mut scale = 10;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => (repeat, scale) = (1, 1),
            "--repeat" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => repeat = n,
                None => usage(),
            },
            _ => usage(),
        }
    }
    // 1 000 nodes and 100 jobs of 100 replicas at full scale.
    let (node_count, job_count) = (100 * scale, 10 * scale);
    let total = job_count * REPLICAS as usize;
    println!("| measure | value |");
    println!("|---|---:|");
    for (strategy, name) in [(Strategy::BinPack, "bin-pack"), (Strategy::Spread, "spread")] {
        let nodes = nodes(node_count);
        let jobs = jobs(job_count, strategy);
        let mut times = Vec::new();
        let mut plan = None;
        for round in 0..repeat.max(1) {
            let started = Instant::now();
            let placed = reconcile(&jobs, &nodes, &[], round as u64);
            times.push(started.elapsed());
            plan = Some(placed);
        }
        let plan = plan.expect("at least one round");
        assert_eq!(plan.place.len(), total, "every instance fits: {:?}", plan.pending.first());
        let time = median(times);
        println!(
            "| {name}: place {total} instances on {node_count} nodes | {:.1} ms ({:.0} placements/s) |",
            time.as_secs_f64() * 1e3,
            total as f64 / time.as_secs_f64()
        );
        // The busiest node dies: its instances stop and are placed elsewhere.
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for allocation in &plan.place {
            *per_node.entry(allocation.node.as_str()).or_default() += 1;
        }
        let (busiest, on_lost) = per_node.into_iter().max_by_key(|(_, n)| *n).expect("placements");
        let mut lost = nodes.clone();
        lost.iter_mut().filter(|n| n.name == busiest).for_each(|n| n.up = false);
        let mut times = Vec::new();
        for round in 0..repeat.max(1) {
            let started = Instant::now();
            let again = reconcile(&jobs, &lost, &plan.place, round as u64);
            times.push(started.elapsed());
            // Anti-affinity jobs as wide as the cluster lose a place with the node.
            let unplaced: u32 = again.pending.iter().map(|(_, n, _)| n).sum();
            assert_eq!((again.stop.len(), again.place.len() + unplaced as usize), (on_lost, on_lost));
        }
        println!(
            "| {name}: reconcile {node_count} nodes, {total} instances, after losing its busiest node ({on_lost} instances on it) | {:.1} ms |",
            median(times).as_secs_f64() * 1e3
        );
    }
}
