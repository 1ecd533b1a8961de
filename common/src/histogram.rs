//! Durations counted in fixed buckets without locks (a few atomic adds per
//! observation, for hot paths), rendered in the Prometheus text format at
//! scrape time.

use std::fmt::Write;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The upper bounds (seconds, ascending) of a kind of histogram.
pub trait Bounds<const N: usize> {
    const BOUNDS: [f64; N];
}

/// A histogram over `B`'s bounds.
pub struct DurationHistogram<B, const N: usize> {
    buckets: [AtomicU64; N],
    overflow: AtomicU64,
    sum_nanos: AtomicU64,
    bounds: PhantomData<B>,
}

impl<B: Bounds<N>, const N: usize> Default for DurationHistogram<B, N> {
    fn default() -> Self {
        DurationHistogram {
            buckets: [const { AtomicU64::new(0) }; N],
            overflow: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
            bounds: PhantomData,
        }
    }
}

impl<B: Bounds<N>, const N: usize> DurationHistogram<B, N> {
    pub fn record(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        match B::BOUNDS.iter().position(|bound| seconds <= *bound) {
            Some(bucket) => self.buckets[bucket].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().chain([&self.overflow]).map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The count in each bucket (not cumulative), the unbounded one last.
    pub fn buckets(&self) -> Vec<u64> {
        self.buckets.iter().chain([&self.overflow]).map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// The `_bucket` (cumulative at each of the bounds that `shown` also
    /// holds, then `+Inf`), `_sum` and `_count` lines of `name` with
    /// `labels` (`key="value",...` or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str, shown: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in B::BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            if shown.contains(bound) {
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
            }
        }
        cumulative += self.overflow.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let labels = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {cumulative}");
    }

    /// `render` with every bound shown.
    pub fn render_all(&self, out: &mut String, name: &str, labels: &str) {
        self.render(out, name, labels, &B::BOUNDS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_cumulative_buckets_and_the_rest_in_inf() {
        struct Three;
        impl Bounds<3> for Three {
            const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];
        }
        let histogram = DurationHistogram::<Three, 3>::default();
        for millis in [0.5, 1.0, 5.0, 50.0, 500.0] {
            histogram.record(Duration::from_secs_f64(millis / 1e3));
        }
        let mut all = String::new();
        histogram.render_all(&mut all, "t_seconds", "k=\"v\"");
        let expected = "t_seconds_bucket{k=\"v\",le=\"0.001\"} 2\n\
                        t_seconds_bucket{k=\"v\",le=\"0.01\"} 3\n\
                        t_seconds_bucket{k=\"v\",le=\"0.1\"} 4\n\
                        t_seconds_bucket{k=\"v\",le=\"+Inf\"} 5\n\
                        t_seconds_sum{k=\"v\"} 0.5565\n\
                        t_seconds_count{k=\"v\"} 5\n";
        assert_eq!(all, expected);
        let mut some = String::new();
        histogram.render(&mut some, "t_seconds", "", &[0.01]);
        assert_eq!(some.lines().next(), Some("t_seconds_bucket{le=\"0.01\"} 3"));
        assert_eq!(histogram.count(), 5);
    }
}
