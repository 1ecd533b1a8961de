//! The writer in process: changes that arrive together are validated and
//! answered one by one but made durable in one write; a failed write
//! applies nothing and loses no version.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{ChangeFailure, ControlPlane};
use crate::state::Change;
use crate::store::MemoryStore;

fn register(service: &str, port: u16) -> Change {
    Change::ready_endpoint(service, "v1", &format!("127.0.0.2:{port}"))
}

/// Sends every change at once and waits for all the answers.
async fn all_at_once(control: &Arc<ControlPlane>, changes: Vec<Change>) -> Vec<Result<u64, ChangeFailure>> {
    let tasks: Vec<_> = changes
        .into_iter()
        .map(|change| {
            let control = control.clone();
            tokio::spawn(async move { control.change(change).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn changes_that_arrive_together_are_one_write_and_each_its_own_answer() {
    let store = Arc::new(MemoryStore::default());
    let control = ControlPlane::new(store.clone()).unwrap();
    let mut changes: Vec<Change> = (0..50).map(|i| register("web", 1000 + i)).collect();
    // A bad one among them is refused on its own; it spoils nothing.
    changes.insert(25, register("Bad Name", 1));
    let answers = all_at_once(&control, changes).await;

    let refused = answers.iter().filter(|a| matches!(a, Err(ChangeFailure::Refused(_)))).count();
    let mut versions: Vec<u64> = answers.iter().filter_map(|a| a.as_ref().ok().copied()).collect();
    versions.sort();
    versions.dedup();
    assert_eq!((refused, versions.len()), (1, 50), "every good change its own version");
    let writes = store.service_writes.load(Ordering::Relaxed);
    assert!(writes < 10, "50 changes sent together took {writes} durable writes");
    let state = control.state().await;
    assert_eq!(state.services["web"].endpoints.len(), 50);
    assert_eq!(state.version, *versions.last().unwrap());
}

#[tokio::test]
async fn a_failed_write_applies_nothing_and_loses_no_version() {
    let store = Arc::new(MemoryStore::default());
    let control = ControlPlane::new(store.clone()).unwrap();
    let before = control.change(register("web", 1000)).await.unwrap();

    store.failing.store(true, Ordering::Relaxed);
    let answers = all_at_once(&control, (1..=5).map(|i| register("web", 1000 + i)).collect()).await;
    assert!(answers.iter().all(|a| matches!(a, Err(ChangeFailure::Store(_)))), "{answers:?}");
    let state = control.state().await;
    assert_eq!((state.version, state.services["web"].endpoints.len()), (before, 1), "nothing applied");

    store.failing.store(false, Ordering::Relaxed);
    let after = control.change(register("web", 2000)).await.unwrap();
    assert_eq!(after, before + 1, "the next version follows the last durable one");
}
