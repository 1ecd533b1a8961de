//! Peak-EWMA latency, the load measure of the balancer (tower's algorithm):
//! a slower answer than the estimate replaces it at once, a faster one
//! pulls it down gradually, so an endpoint that turns slow is avoided
//! quickly and trusted again slowly.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How fast old observations fade.
pub const DECAY_NANOS: f64 = 10e9;
/// The estimate for an endpoint that has not answered yet.
pub const DEFAULT_RTT_NANOS: f64 = 30e6;

/// Latency estimate and in-flight count of one endpoint. Updates race
/// benignly: a lost update only makes the estimate slightly older.
#[derive(Debug)]
pub struct PeakEwma {
    estimate_nanos: AtomicU64,
    updated_at_nanos: AtomicU64,
    pending: AtomicU32,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma {
            estimate_nanos: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            updated_at_nanos: AtomicU64::new(0),
            pending: AtomicU32::new(0),
        }
    }
}

/// The estimate after `elapsed` nanoseconds without news decays toward 0,
/// so an endpoint that has not been tried for a while gets tried again.
pub fn decayed(estimate: f64, elapsed_nanos: u64) -> f64 {
    estimate * (-(elapsed_nanos as f64) / DECAY_NANOS).exp()
}

/// The new estimate after observing `rtt`.
pub fn observe(estimate: f64, elapsed_nanos: u64, rtt: f64) -> f64 {
    if rtt > estimate {
        rtt
    } else {
        let weight = (-(elapsed_nanos as f64) / DECAY_NANOS).exp();
        estimate * weight + rtt * (1.0 - weight)
    }
}

impl PeakEwma {
    /// The balancer's cost: the latency estimate times the requests in flight + 1.
    pub fn cost(&self, now_nanos: u64) -> f64 {
        let estimate = f64::from_bits(self.estimate_nanos.load(Ordering::Relaxed));
        let elapsed = now_nanos.saturating_sub(self.updated_at_nanos.load(Ordering::Relaxed));
        let pending = self.pending.load(Ordering::Relaxed);
        decayed(estimate, elapsed) * f64::from(pending + 1)
    }

    /// Counts a request in flight until the returned guard is dropped, so a
    /// request cancelled by a timeout or a departed caller is not counted
    /// forever.
    pub fn start(&self, now_nanos: u64) -> Pending<'_> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending { ewma: self, started_nanos: now_nanos }
    }

    fn observe(&self, started_nanos: u64, now_nanos: u64) {
        let rtt = now_nanos.saturating_sub(started_nanos) as f64;
        let estimate = f64::from_bits(self.estimate_nanos.load(Ordering::Relaxed));
        let elapsed = now_nanos.saturating_sub(self.updated_at_nanos.swap(now_nanos, Ordering::Relaxed));
        self.estimate_nanos.store(observe(estimate, elapsed, rtt).to_bits(), Ordering::Relaxed);
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// One request in flight to an endpoint.
pub struct Pending<'a> {
    ewma: &'a PeakEwma,
    started_nanos: u64,
}

impl Pending<'_> {
    /// The response headers arrived: feed the latency into the estimate.
    pub fn finish(self, now_nanos: u64) {
        self.ewma.observe(self.started_nanos, now_nanos);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.ewma.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_are_taken_at_once_and_drops_are_smoothed() {
        // (estimate, elapsed since last update, observed rtt, expected low, expected high)
        let ms = 1e6;
        let table = [
            (1.0 * ms, 1_000_000, 50.0 * ms, 50.0 * ms, 50.0 * ms),
            (50.0 * ms, 1_000_000, 1.0 * ms, 49.9 * ms, 50.0 * ms),
            (50.0 * ms, 100_000_000_000, 1.0 * ms, 1.0 * ms, 1.01 * ms),
        ];
        for (estimate, elapsed, rtt, low, high) in table {
            let next = observe(estimate, elapsed, rtt);
            assert!(next >= low && next <= high, "{estimate} {elapsed} {rtt} -> {next}");
        }
    }

    #[test]
    fn cost_counts_requests_in_flight() {
        let ewma = PeakEwma::default();
        let idle = ewma.cost(0);
        let first = ewma.start(0);
        let second = ewma.start(0);
        assert!((ewma.cost(0) - 3.0 * idle).abs() < 1.0);
        // A cancelled request stops counting without touching the estimate.
        drop(first);
        assert_eq!(ewma.pending(), 1);
        second.finish(1_000);
        assert_eq!(ewma.pending(), 0);
        assert!(ewma.cost(1_000) < idle, "a 1 µs answer lowers the estimate");
    }
}
