//! The scheduler's pure core: the job model and job files, then state in,
//! plan out. No I/O, no clocks, no async runtime (the crate does not
//! depend on one); the only randomness is seeded by the caller, so a run
//! repeats exactly.
//!
//! The pipeline follows Nomad's: reconcile (what is missing or extra) →
//! feasibility (which nodes could take an instance) → rank (which node is
//! best) → plan (the placements and stops to carry out).

pub mod autoscale;
pub mod canary;
pub mod job;
pub mod placement;
pub mod reconcile;
pub mod rollout;

use std::collections::BTreeMap;

/// A machine that runs instances, as its agent registered it.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub attributes: BTreeMap<String, String>,
    /// False once the node missed its heartbeats.
    pub up: bool,
}

/// What one instance of a job asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

/// How to choose among feasible nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Fill the fullest node that fits first, leaving whole nodes free.
    #[default]
    BinPack,
    /// Prefer the emptiest node, spreading load and failure.
    Spread,
}

/// A node attribute an instance requires, e.g. `zone = "a"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    pub attribute: String,
    pub value: String,
}

/// The part of a job the scheduler needs.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub version: String,
    /// Which task of this version: it grows when a job file changes what
    /// runs (command, args, env, resources, checks, ...) but not the version.
    pub revision: u64,
    pub replicas: u32,
    pub resources: Resources,
    pub constraints: Vec<Constraint>,
    pub strategy: Strategy,
    /// Never two instances of this job on one node (a feasibility rule,
    /// like Nomad's `distinct_hosts`).
    pub anti_affinity: bool,
}

/// An instance placed on a node (running or about to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub id: String,
    pub job: String,
    pub version: String,
    /// The task revision it runs (see `JobSpec::revision`).
    pub revision: u64,
    pub node: String,
    pub resources: Resources,
}
