//! The scheduler's I/O side in process, on a paused clock: jobs submitted
//! through `Scheduler::submit`, one node that runs what it is assigned and
//! reports back, rounds of the real loop, and an in-memory store. What a
//! rollout decides (pure) is tested in `mesh-scheduler`; here, what the
//! server does with it: bookkeeping, status and the stored job.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::job::parse_job;

use super::Scheduler;
use crate::server::liveness::NodeRegistry;
use crate::server::ControlPlane;
use crate::store::{MemoryStore, Store, StoredJob};

fn web(version: &str) -> String {
    format!(
        "name = \"web\"\nversion = \"{version}\"\nreplicas = 2\n[task]\ncommand = \"web\"\n\
         [update]\nmax_parallel = 1\nmin_healthy = \"1s\"\nhealthy_deadline = \"5s\"\nauto_revert = true\n"
    )
}

struct Cluster {
    store: Arc<MemoryStore>,
    nodes: Arc<NodeRegistry>,
    scheduler: Arc<Scheduler>,
    /// What the node was last told to run.
    assigned: Vec<pb::Assignment>,
}

impl Cluster {
    fn start() -> Cluster {
        let store = Arc::new(MemoryStore::default());
        let control = ControlPlane::new(store.clone()).unwrap();
        let nodes = Arc::new(NodeRegistry::new(Duration::from_millis(500), Duration::from_secs(3)));
        let leader = crate::server::leader::Leader::sole("127.0.0.1:7400");
        let scheduler = Scheduler::start(control, nodes.clone(), leader).unwrap();
        let cluster = Cluster { store, nodes, scheduler, assigned: Vec::new() };
        cluster.join();
        cluster
    }

    fn join(&self) {
        let info = pb::NodeInfo {
            name: "a".into(),
            advertise_ip: "127.0.0.2".into(),
            cpu_millis: 4000,
            memory_mb: 4096,
            ..Default::default()
        };
        self.nodes.joined(info);
    }

    async fn submit(&self, text: &str) -> bool {
        let stored = StoredJob { text: text.to_owned(), dir: String::new() };
        self.scheduler.submit(stored, parse_job(text).unwrap()).await.unwrap()
    }

    /// Half a second of the node's life: it reports every instance it was
    /// assigned, running and ready when its version is in `healthy`, still
    /// starting otherwise, and gets its new assignments.
    async fn beat(&mut self, healthy: &[&str]) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.join();
        let reports = self
            .assigned
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let ready = healthy.contains(&a.version.as_str());
                let state = if ready { pb::InstanceState::Running } else { pb::InstanceState::Starting };
                pb::InstanceReport {
                    id: a.id.clone(),
                    job: a.job.clone(),
                    version: a.version.clone(),
                    state: state as i32,
                    ready,
                    addr: format!("127.0.0.2:{}", 20000 + i),
                    ..Default::default()
                }
            })
            .collect();
        self.assigned = self.scheduler.heartbeat("a", reports);
    }

    /// Beats until `done` holds, at most `beats` times (half a second of
    /// the paused clock each); returns the versions run after each beat.
    async fn beat_until(
        &mut self,
        healthy: &[&str],
        beats: usize,
        done: impl Fn(&Cluster) -> bool,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..beats {
            self.beat(healthy).await;
            seen.push(self.versions().join(","));
            if done(self) {
                return seen;
            }
        }
        panic!("not done after {beats} beats; versions run: {seen:?}");
    }

    fn versions(&self) -> Vec<&str> {
        let mut versions: Vec<&str> = self.assigned.iter().map(|a| a.version.as_str()).collect();
        versions.sort();
        versions
    }

    fn status(&self) -> pb::JobStatus {
        self.scheduler.job_status(&self.scheduler.lock(), "web").expect("job web")
    }

    fn stored_version(&self) -> String {
        let jobs = self.store.load_jobs().unwrap();
        let (_, stored) = jobs.iter().find(|(name, _)| name == "web").expect("web stored");
        parse_job(&stored.text).unwrap().version
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_replaces_instances_one_by_one_once_the_new_ones_stay_healthy() {
    let mut cluster = Cluster::start();
    assert!(cluster.submit(&web("v1")).await);
    cluster.beat_until(&["v1"], 20, |c| c.status().state() == pb::JobState::Running).await;
    assert_eq!(cluster.versions(), ["v1", "v1"]);
    assert!(!cluster.submit(&web("v1")).await, "the same file again is no change");

    assert!(cluster.submit(&web("v2")).await);
    // The versions the node runs, half a second apart, until only v2 runs.
    let seen = cluster.beat_until(&["v1", "v2"], 40, |c| c.versions() == ["v2", "v2"]).await;
    // Never fewer than two ready, never more than one extra (max_parallel).
    assert!(seen.iter().all(|v| v.split(',').count() >= 2 && v.split(',').count() <= 3), "{seen:?}");
    assert!(seen.iter().any(|v| v == "v1,v1,v2"), "a surge of one: {seen:?}");
    let status = cluster.status();
    assert!(status.deployment.contains("updated from v1 to v2"), "{}", status.deployment);
    assert_eq!(cluster.stored_version(), "v2");
}

#[tokio::test(start_paused = true)]
async fn a_new_version_never_healthy_is_rolled_back_and_the_old_one_stored_again() {
    let mut cluster = Cluster::start();
    cluster.submit(&web("v1")).await;
    cluster.beat_until(&["v1"], 20, |c| c.status().state() == pb::JobState::Running).await;
    cluster.submit(&web("v2")).await;
    assert_eq!(cluster.stored_version(), "v2", "stored before it is acted on");
    // v2's instances never get ready; the deadline is five seconds.
    let rolled_back = |c: &Cluster| c.status().deployment.starts_with("rolled back");
    cluster.beat_until(&["v1"], 40, rolled_back).await;
    let status = cluster.status();
    assert!(status.deployment.starts_with("rolled back to v1"), "{}", status.deployment);
    assert_eq!(status.version, "v1");
    assert_eq!(cluster.stored_version(), "v1", "the rolled-back job is what a restart loads");
    cluster.beat_until(&["v1"], 20, |c| c.versions() == ["v1", "v1"]).await;
}
