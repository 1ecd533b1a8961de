//! Request timeouts without a new timer per request.
//!
//! A timer registered and removed for every request costs about a
//! thousand instructions (the timer wheel's lock twice, and the runtime's
//! park has one more entry to look at). A downstream HTTP/1 connection has
//! one request in flight at a time, so it keeps one timer and moves its
//! deadline forward for each request: a later deadline only updates the
//! entry in place; the wheel sees it again once the old deadline passes.

use std::pin::Pin;

use crossbeam_queue::ArrayQueue;
use tokio::time::{Instant, Sleep};

/// The timers of one downstream connection that no request holds.
pub struct ConnectionTimers {
    idle: ArrayQueue<Pin<Box<Sleep>>>,
}

/// Timers kept per connection. HTTP/1 needs one; an HTTP/2 connection's
/// concurrent streams beyond this get a timer of their own.
const KEPT: usize = 4;

impl Default for ConnectionTimers {
    fn default() -> Self {
        ConnectionTimers { idle: ArrayQueue::new(KEPT) }
    }
}

impl ConnectionTimers {
    /// A timer that fires at `deadline`: a kept one moved to it, or a new one.
    pub fn arm(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        match self.idle.pop() {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Keeps a timer for the connection's next request.
    pub fn disarm(&self, sleep: Pin<Box<Sleep>>) {
        // A full queue drops the timer.
        let _ = self.idle.push(sleep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_fires_at_its_new_deadline() {
        let timers = ConnectionTimers::default();
        let start = Instant::now();
        // (deadline after start, in ms): later, earlier and equal deadlines in turn.
        for offset_ms in [100u64, 50, 50, 300] {
            let deadline = start + Duration::from_millis(offset_ms);
            let sleep = timers.arm(deadline);
            assert_eq!(sleep.deadline(), deadline);
            timers.disarm(sleep);
        }
        let sleep = timers.arm(start + Duration::from_millis(400));
        sleep.await;
        assert_eq!(Instant::now(), start + Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_get_timers_of_their_own() {
        let timers = ConnectionTimers::default();
        let deadline = Instant::now() + Duration::from_secs(1);
        let held: Vec<_> = (0..KEPT + 2).map(|_| timers.arm(deadline)).collect();
        for sleep in held {
            timers.disarm(sleep);
        }
        assert_eq!(timers.idle.len(), KEPT);
    }
}
