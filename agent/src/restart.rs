//! When to restart an instance that exited, and when to call it a crash
//! loop: pure functions of the exits so far.

use std::time::Duration;

/// Delay before restart number `restarts_in_a_row + 1`: base × 2^n, capped.
pub use mesh_common::backoff::doubled as restart_delay;

/// An instance is crash-looping when it exited `threshold` times or more
/// within the last `window`. `exits` are times in milliseconds, any order.
pub fn crash_looping(exits_ms: &[u64], now_ms: u64, window: Duration, threshold: usize) -> bool {
    let since = now_ms.saturating_sub(window.as_millis() as u64);
    exits_ms.iter().filter(|t| **t >= since && **t <= now_ms).count() >= threshold
}

/// An instance that ran this long before exiting is healthy again: its
/// restart count starts over.
pub fn resets_backoff(ran_for: Duration, stable_after: Duration) -> bool {
    ran_for >= stable_after
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loops_are_exits_crowded_in_a_window() {
        let window = Duration::from_secs(60);
        // (exit times, now, crash-looping?)
        let table: &[(&[u64], u64, bool)] = &[
            (&[], 100_000, false),
            (&[10_000, 20_000, 30_000], 60_000, false),
            (&[10_000, 20_000, 30_000, 40_000, 50_000], 60_000, true),
            (&[1_000, 2_000, 3_000, 4_000, 5_000], 200_000, false),
        ];
        for (exits, now, want) in table {
            assert_eq!(crash_looping(exits, *now, window, 5), *want, "{exits:?} at {now}");
        }
        assert!(resets_backoff(Duration::from_secs(30), Duration::from_secs(10)));
        assert!(!resets_backoff(Duration::from_secs(3), Duration::from_secs(10)));
    }
}
