//! The publish window in process, on a paused clock: a change after a
//! quiet spell goes out at once; changes that follow within the window go
//! out together at its end, as one publication.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ControlPlane;
use crate::state::Change;
use crate::store::MemoryStore;

fn register(port: u16) -> Change {
    Change::ready_endpoint("web", "v1", &format!("127.0.0.2:{port}"))
}

#[tokio::test(start_paused = true)]
async fn a_quiet_change_goes_out_at_once_and_a_burst_together_at_the_window_end() {
    let window = Duration::from_millis(50);
    let control = ControlPlane::with_window(Arc::new(MemoryStore::default()), window).unwrap();
    let mut publications = control.subscribe();

    let started = Instant::now();
    let first = control.change(register(1000)).await.unwrap();
    publications.wait_for(|published| published.version >= first).await.unwrap();
    assert!(started.elapsed() < window, "a change after a quiet spell waits for no window");

    // A burst right after it: three changes, one publication.
    let mut last = first;
    for port in 1001..=1003 {
        last = control.change(register(port)).await.unwrap();
    }
    publications.changed().await.unwrap();
    let published = publications.borrow_and_update().clone();
    assert_eq!(published.version, last, "the burst goes out as one publication");
    assert_eq!(published.delta.changed, ["web"]);
    assert!(started.elapsed() >= window, "at the window's end: {:?}", started.elapsed());
    assert!(!publications.has_changed().unwrap(), "and only once");

    // Quiet again: the next change goes out at once.
    tokio::time::sleep(window * 4).await;
    let quiet = Instant::now();
    let next = control.change(register(1004)).await.unwrap();
    publications.wait_for(|published| published.version >= next).await.unwrap();
    assert!(quiet.elapsed() < window, "{:?}", quiet.elapsed());
}
