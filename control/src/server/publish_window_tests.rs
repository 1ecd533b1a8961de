//! The publish window in process, on a paused clock: a change after a
//! quiet spell goes out at once; changes that follow within the window go
//! out together at its end, as one publication; while changes come faster
//! than one per base window the window grows to its maximum, and it is
//! back at its base once they come slower.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{ControlPlane, PublishWindow};
use crate::state::Change;
use crate::store::MemoryStore;

fn register(port: u16) -> Change {
    Change::ready_endpoint("web", "v1", &format!("127.0.0.2:{port}"))
}

#[tokio::test(start_paused = true)]
async fn a_quiet_change_goes_out_at_once_and_a_burst_together_at_the_window_end() {
    let window = Duration::from_millis(50);
    let control =
        ControlPlane::with_window(Arc::new(MemoryStore::default()), PublishWindow::fixed(window)).unwrap();
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

#[tokio::test(start_paused = true)]
async fn the_window_grows_under_fast_churn_and_shrinks_when_churn_slows() {
    let ms = Duration::from_millis;
    let window = PublishWindow { base: ms(50), max: ms(400) };
    let control = ControlPlane::with_window(Arc::new(MemoryStore::default()), window).unwrap();
    let mut publications = control.subscribe();
    // A change every 10 ms for 3 s: each publication carries several.
    let churn = {
        let control = control.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for port in 2000..2300 {
                last = control.change(register(port)).await.unwrap();
                tokio::time::sleep(ms(10)).await;
            }
            last
        })
    };
    let mut gaps = Vec::new();
    let mut previous = Instant::now();
    while !churn.is_finished() && gaps.len() < 100 {
        if tokio::time::timeout(ms(1_000), publications.changed()).await.is_err() {
            break;
        }
        publications.borrow_and_update();
        gaps.push(previous.elapsed());
        previous = Instant::now();
    }
    let last = churn.await.unwrap();
    publications.wait_for(|published| published.version >= last).await.unwrap();
    // Skip the first publication (at once) and look at the steady gaps.
    let steady = &gaps[4..gaps.len() - 1];
    assert!(steady.iter().all(|gap| *gap == ms(400)), "gaps under churn: {gaps:?}");
    assert!(gaps[1] < ms(400), "it grows from the base window: {gaps:?}");

    // Right after it, a change every 100 ms, whatever the publications do:
    // slower than one per base window, so the window is back at its base
    // and no change waits longer.
    let slow = {
        let control = control.clone();
        tokio::spawn(async move {
            let mut made = Vec::new();
            for port in 3000..3020 {
                tokio::time::sleep(ms(100)).await;
                made.push((control.change(register(port)).await.unwrap(), Instant::now()));
            }
            made
        })
    };
    let mut published = Vec::new();
    while published.len() < 100 {
        if tokio::time::timeout(ms(1_000), publications.changed()).await.is_err() {
            break;
        }
        published.push((publications.borrow_and_update().version, Instant::now()));
    }
    let made = slow.await.unwrap();
    let waits: Vec<Duration> = made
        .iter()
        .map(|(version, at)| {
            let (_, out) = published.iter().find(|(v, _)| v >= version).expect("published");
            *out - *at
        })
        .collect();
    assert!(waits[4..].iter().all(|wait| *wait <= ms(50)), "waits at 10 changes/s: {waits:?}");
}
