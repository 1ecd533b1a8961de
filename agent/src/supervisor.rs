//! The agent's side of reconciliation: start the instances the scheduler
//! assigns to this node, stop the ones it no longer does, and report what
//! runs. Each instance lives in its own task (`instance.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mesh_proto::mesh::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::instance::{self, Context, SharedReport};

struct Handle {
    report: SharedReport,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Supervisor {
    context: Arc<Context>,
    instances: Mutex<HashMap<String, Handle>>,
    /// Woken when any instance's report changes.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Supervisor {
    pub fn new(context: Context) -> Supervisor {
        Supervisor {
            context: Arc::new(context),
            instances: Mutex::new(HashMap::new()),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Brings the instances in line with the scheduler's assignments.
    pub fn apply(&self, assignments: &[pb::Assignment]) {
        let mut instances = self.instances.lock().expect("instances lock");
        for assignment in assignments {
            if instances.contains_key(&assignment.id) {
                continue;
            }
            tracing::info!(instance = %assignment.id, job = %assignment.job, "starting instance");
            let report = SharedReport::new(
                pb::InstanceReport {
                    id: assignment.id.clone(),
                    job: assignment.job.clone(),
                    version: assignment.version.clone(),
                    state: pb::InstanceState::Starting as i32,
                    ..Default::default()
                },
                self.changed.clone(),
            );
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(instance::run(
                self.context.clone(),
                assignment.clone(),
                report.clone(),
                stopped,
            ));
            instances.insert(assignment.id.clone(), Handle { report, stop, task });
        }
        for (id, handle) in instances.iter() {
            if !assignments.iter().any(|a| &a.id == id) && !*handle.stop.borrow() {
                tracing::info!(instance = %id, "stopping instance");
                let _ = handle.stop.send(true);
            }
        }
    }

    /// What runs now. Instances that were stopped and have finished are
    /// reported no more.
    pub fn reports(&self) -> Vec<pb::InstanceReport> {
        let mut instances = self.instances.lock().expect("instances lock");
        instances.retain(|_, handle| !(*handle.stop.borrow() && handle.task.is_finished()));
        instances.values().map(|handle| handle.report.get()).collect()
    }

    /// Stops every instance (the agent is shutting down) and waits for them.
    pub async fn stop_all(&self) {
        let handles: Vec<Handle> =
            self.instances.lock().expect("instances lock").drain().map(|(_, h)| h).collect();
        for handle in &handles {
            let _ = handle.stop.send(true);
        }
        for handle in handles {
            let _ = handle.task.await;
        }
    }
}
