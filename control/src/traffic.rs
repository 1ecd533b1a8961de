//! The traffic proxies report, about once a second on their discovery
//! streams, kept in memory for a minute: what `meshctl top` and `meshctl
//! stat` show, read from meshd rather than from each proxy, and what the
//! scheduler can decide on without Prometheus.
//!
//! Proxies send counts since they started, so a lost summary loses
//! nothing: the traffic in a window is the newest counts less those at
//! the window's start. Pure: every function takes the time.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// How long summaries are kept: the longest window a query may ask for.
pub const KEEP_MS: u64 = 60_000;

/// A proxy's in-flight counts are believed this long after its last
/// summary; after that it is taken to be gone.
pub const FRESH_MS: u64 = 3_000;

/// How often proxies send a summary.
pub const SUMMARY_INTERVAL_MS: u64 = 1_000;

/// The window a query gets when it names none.
pub const DEFAULT_WINDOW_MS: u64 = 10_000;

/// One direction of one version of a service, as one proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub inbound: bool,
    pub service: String,
    pub version: String,
}

/// Request counts, since a proxy started or over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub successes: u64,
    /// 1xx, 2xx, 3xx, 4xx, 5xx.
    pub status_classes: [u64; 5],
    /// Answers the mesh made itself, by `x-mesh-error` reason.
    pub mesh_errors: BTreeMap<String, u64>,
    /// Requests per latency bucket (the last one has no upper bound).
    pub latency_buckets: Vec<u64>,
}

impl Counts {
    /// What was added since `base` (counts never go down; a row that
    /// did is taken whole, as from a proxy that started again).
    fn since(&self, base: &Counts) -> Counts {
        if self.requests < base.requests {
            return self.clone();
        }
        let mut mesh_errors = self.mesh_errors.clone();
        for (reason, count) in &mut mesh_errors {
            *count = count.saturating_sub(base.mesh_errors.get(reason).copied().unwrap_or(0));
        }
        mesh_errors.retain(|_, count| *count > 0);
        Counts {
            requests: self.requests - base.requests,
            successes: self.successes.saturating_sub(base.successes),
            status_classes: std::array::from_fn(|i| {
                self.status_classes[i].saturating_sub(base.status_classes[i])
            }),
            mesh_errors,
            latency_buckets: self
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(base.latency_buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.successes += other.successes;
        for (mine, theirs) in self.status_classes.iter_mut().zip(other.status_classes) {
            *mine += theirs;
        }
        for (reason, count) in &other.mesh_errors {
            *self.mesh_errors.entry(reason.clone()).or_default() += count;
        }
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *mine += theirs;
        }
    }

    /// The upper bound (seconds) of the bucket the `q` quantile falls in;
    /// the largest bound for the unbounded bucket, 0 without requests.
    fn quantile(&self, q: f64, bounds: &[f64]) -> f64 {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.latency_buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bounds.get(i).or(bounds.last()).copied().unwrap_or(0.0);
            }
        }
        bounds.last().copied().unwrap_or(0.0)
    }
}

/// One row of a proxy's summary at one time.
#[derive(Clone, Debug)]
struct Sample {
    at_ms: u64,
    counts: Counts,
    in_flight: i64,
}

/// What is kept of one proxy: each row's samples, oldest first.
#[derive(Default)]
struct ProxyTraffic {
    rows: HashMap<RowKey, VecDeque<Sample>>,
    /// When its last summary came, empty or not.
    last_summary_ms: u64,
}

/// One direction of one version of a service over a window, summed over
/// the proxies that saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stat {
    pub key: RowKey,
    pub counts: Counts,
    pub requests_per_second: f64,
    /// Successes over requests; 1 without requests.
    pub success_rate: f64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub in_flight: i64,
    pub proxies: u32,
}

/// Every proxy's recent traffic.
#[derive(Default)]
pub struct Traffic {
    proxies: HashMap<String, ProxyTraffic>,
    /// The latency buckets' upper bounds, as the proxies last sent them.
    latency_bounds: Vec<f64>,
    /// When proxies gone for good were last dropped.
    swept_ms: u64,
}

/// How often `record` drops proxies gone for good.
const SWEEP_EVERY_MS: u64 = 10_000;

impl Traffic {
    /// Takes `proxy`'s summary, received at `now_ms`: rows it left out did
    /// not change.
    pub fn record(&mut self, proxy: &str, now_ms: u64, bounds: &[f64], rows: Vec<(RowKey, Counts, i64)>) {
        if !bounds.is_empty() && bounds != self.latency_bounds.as_slice() {
            self.latency_bounds = bounds.to_vec();
        }
        if now_ms >= self.swept_ms + SWEEP_EVERY_MS {
            self.forget_old(now_ms);
            self.swept_ms = now_ms;
        }
        let traffic = self.proxies.entry(proxy.to_owned()).or_default();
        traffic.last_summary_ms = now_ms;
        for (key, counts, in_flight) in rows {
            let series = traffic.rows.entry(key).or_default();
            series.push_back(Sample { at_ms: now_ms, counts, in_flight });
            // One sample at or before the oldest window start is kept: the
            // base of a window over a row that has been quiet since.
            while series.len() > 1 && series[1].at_ms + KEEP_MS <= now_ms {
                series.pop_front();
            }
        }
    }

    /// Drops what no window can reach any more: proxies silent for longer
    /// than is kept.
    pub fn forget_old(&mut self, now_ms: u64) {
        self.proxies.retain(|_, traffic| traffic.last_summary_ms + KEEP_MS > now_ms);
    }

    /// How many proxies have sent a summary within `FRESH_MS`.
    pub fn live_proxies(&self, now_ms: u64) -> usize {
        self.proxies.values().filter(|t| t.last_summary_ms + FRESH_MS > now_ms).count()
    }

    /// The traffic of the last `window_ms` (at most `KEEP_MS`) before
    /// `now_ms`, per direction, service and version, for `service` or all.
    pub fn query(&self, now_ms: u64, window_ms: u64, service: Option<&str>) -> Vec<Stat> {
        let window_ms = window_ms.clamp(1, KEEP_MS);
        finish(self.sums(now_ms, window_ms, service), &self.latency_bounds)
    }

    /// What `query` sums, before rates and quantiles: what another server
    /// adds its own proxies' to.
    pub fn sums(&self, now_ms: u64, window_ms: u64, service: Option<&str>) -> Sums {
        let start = now_ms.saturating_sub(window_ms.clamp(1, KEEP_MS));
        let mut sums = Sums::new();
        for traffic in self.proxies.values() {
            let fresh = traffic.last_summary_ms + FRESH_MS > now_ms;
            for (key, series) in &traffic.rows {
                if service.is_some_and(|s| s != key.service) {
                    continue;
                }
                let Some(latest) = series.back() else { continue };
                // The counts at the window's start: the newest sample at or
                // before it, else the row's first (it began in the window).
                let base = series.iter().rev().find(|s| s.at_ms <= start).unwrap_or(&series[0]);
                let in_window = latest.counts.since(&base.counts);
                let in_flight = if fresh { latest.in_flight } else { 0 };
                if in_window.requests == 0 && in_flight == 0 {
                    continue;
                }
                // The counts hold from the base until the proxy's last
                // summary (a row left out did not change). A base older
                // than a summary interval before the window's start held
                // at that interval too. A row that began in the window
                // had no traffic before it: the window's start.
                let from = if base.at_ms <= start {
                    base.at_ms.max(start.saturating_sub(SUMMARY_INTERVAL_MS))
                } else {
                    start
                };
                let span_ms = traffic.last_summary_ms.saturating_sub(from);
                let requests_per_second =
                    if span_ms == 0 { 0.0 } else { in_window.requests as f64 * 1000.0 / span_ms as f64 };
                let sum = Sum { counts: in_window, in_flight, proxies: 1, requests_per_second };
                add(&mut sums, key.clone(), sum);
            }
        }
        sums
    }

    /// The latency buckets' upper bounds (seconds) the proxies sent.
    pub fn latency_bounds(&self) -> &[f64] {
        &self.latency_bounds
    }
}

/// One row's traffic over a window, summed over proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sum {
    pub counts: Counts,
    pub in_flight: i64,
    pub proxies: u32,
    /// Each proxy's requests over the time its counts span, summed.
    pub requests_per_second: f64,
}

/// Sums by direction, service and version.
pub type Sums = BTreeMap<RowKey, Sum>;

/// Adds `sum` (another proxy's, or another server's) into `sums`.
pub fn add(sums: &mut Sums, key: RowKey, sum: Sum) {
    let into = sums.entry(key).or_default();
    into.counts.add(&sum.counts);
    into.in_flight += sum.in_flight;
    into.proxies += sum.proxies;
    into.requests_per_second += sum.requests_per_second;
}

/// Success rates and quantiles of `sums`.
pub fn finish(sums: Sums, latency_bounds: &[f64]) -> Vec<Stat> {
    sums.into_iter()
        .map(|(key, Sum { counts, in_flight, proxies, requests_per_second })| Stat {
            requests_per_second,
            success_rate: if counts.requests == 0 {
                1.0
            } else {
                counts.successes as f64 / counts.requests as f64
            },
            p50_seconds: counts.quantile(0.5, latency_bounds),
            p99_seconds: counts.quantile(0.99, latency_bounds),
            key,
            counts,
            in_flight,
            proxies,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];

    fn key(inbound: bool, service: &str, version: &str) -> RowKey {
        RowKey { inbound, service: service.into(), version: version.into() }
    }

    /// `requests` of which `failed` were 5xx, with latencies in bucket `bucket`.
    fn counts(requests: u64, failed: u64, bucket: usize) -> Counts {
        let mut latency_buckets = vec![0; BOUNDS.len() + 1];
        latency_buckets[bucket] = requests;
        let mut status_classes = [0; 5];
        status_classes[1] = requests - failed;
        status_classes[4] = failed;
        Counts {
            requests,
            successes: requests - failed,
            status_classes,
            latency_buckets,
            ..Counts::default()
        }
    }

    #[test]
    fn a_window_counts_what_was_added_in_it() {
        let web = key(true, "web", "v1");
        let mut traffic = Traffic::default();
        // One proxy's summaries: (at ms, counts since it started).
        for (at, total) in [(1_000, 100), (2_000, 200), (3_000, 300), (11_000, 1_300)] {
            traffic.record("a", at, &BOUNDS, vec![(web.clone(), counts(total, 0, 0), 0)]);
        }
        // (now, window, requests in it, requests per second)
        let table = [
            (11_000, 10_000, 1_200, 120.0),
            (11_000, 8_000, 1_000, 125.0),
            // A row that began in the window: its first sample is the base,
            // and it had no traffic before (11 s since the clock's start).
            (11_000, 60_000, 1_200, 1_200.0 / 11.0),
        ];
        for (now, window, requests, rps) in table {
            let stats = traffic.query(now, window, None);
            assert_eq!(stats.len(), 1, "{now} {window}");
            assert_eq!(stats[0].counts.requests, requests, "{now} {window}");
            assert!((stats[0].requests_per_second - rps).abs() < 1e-9, "{now} {window}: {stats:?}");
        }
    }

    #[test]
    fn proxies_are_summed_per_version_and_direction() {
        let mut traffic = Traffic::default();
        let (v1, v2, out) = (key(true, "web", "v1"), key(true, "web", "v2"), key(false, "web", "v1"));
        traffic.record("a", 0, &BOUNDS, vec![(v1.clone(), counts(0, 0, 0), 0)]);
        traffic.record(
            "b",
            0,
            &BOUNDS,
            vec![(v1.clone(), counts(0, 0, 0), 0), (v2.clone(), counts(0, 0, 0), 0)],
        );
        traffic.record("c", 0, &BOUNDS, vec![(out.clone(), counts(0, 0, 0), 0)]);
        traffic.record("a", 5_000, &BOUNDS, vec![(v1.clone(), counts(100, 0, 0), 3)]);
        traffic.record(
            "b",
            5_000,
            &BOUNDS,
            vec![(v1.clone(), counts(100, 0, 1), 2), (v2.clone(), counts(50, 5, 2), 7)],
        );
        traffic.record("c", 5_000, &BOUNDS, vec![(out.clone(), counts(250, 5, 2), 0)]);
        let stats = traffic.query(5_000, 5_000, Some("web"));
        // (row, requests, success rate, p50, p99, in flight, proxies)
        let want = [
            (&out, 250, 0.98, 1.0, 1.0, 0, 1),
            (&v1, 200, 1.0, 0.01, 0.1, 5, 2),
            (&v2, 50, 0.9, 1.0, 1.0, 7, 1),
        ];
        assert_eq!(stats.len(), want.len(), "{stats:?}");
        for (stat, (row, requests, success, p50, p99, in_flight, proxies)) in stats.iter().zip(want) {
            assert_eq!(&stat.key, row);
            assert_eq!(stat.counts.requests, requests, "{row:?}");
            assert!((stat.success_rate - success).abs() < 1e-9, "{row:?}: {}", stat.success_rate);
            assert_eq!((stat.p50_seconds, stat.p99_seconds), (p50, p99), "{row:?}");
            assert_eq!((stat.in_flight, stat.proxies), (in_flight, proxies), "{row:?}");
        }
        assert!(traffic.query(5_000, 5_000, Some("api")).is_empty());
    }

    #[test]
    fn quiet_rows_gone_proxies_and_restarts() {
        let web = key(true, "web", "v1");
        let mut traffic = Traffic::default();
        traffic.record("a", 0, &BOUNDS, vec![(web.clone(), counts(500, 0, 0), 4)]);
        // Quiet since: summaries without the row; no traffic in a window
        // after it, and its in-flight count stands while the proxy reports.
        traffic.record("a", 20_000, &BOUNDS, vec![]);
        let stats = traffic.query(20_500, 10_000, None);
        assert_eq!((stats.len(), stats[0].counts.requests, stats[0].in_flight), (1, 0, 4), "{stats:?}");
        // A proxy silent past FRESH_MS counts no requests in flight, and is
        // forgotten once no window reaches it.
        assert!(traffic.query(20_000 + FRESH_MS, 10_000, None).is_empty());
        assert_eq!(traffic.live_proxies(20_000 + FRESH_MS), 0);
        traffic.forget_old(20_000 + KEEP_MS);
        assert!(traffic.proxies.is_empty());
        // Counts that went down are a proxy that started again: taken whole.
        traffic.record("b", 0, &BOUNDS, vec![(web.clone(), counts(900, 0, 0), 0)]);
        traffic.record("b", 1_000, &BOUNDS, vec![(web.clone(), counts(30, 0, 0), 0)]);
        assert_eq!(traffic.query(1_000, 500, None)[0].counts.requests, 30);
    }

    #[test]
    fn samples_older_than_kept_are_dropped_but_one_base_stays() {
        let web = key(true, "web", "v1");
        let mut traffic = Traffic::default();
        for second in 0..=200u64 {
            traffic.record("a", second * 1_000, &BOUNDS, vec![(web.clone(), counts(second * 10, 0, 0), 0)]);
        }
        let series = &traffic.proxies["a"].rows[&web];
        assert!(series.len() <= (KEEP_MS / 1_000) as usize + 1, "{}", series.len());
        let stats = traffic.query(200_000, KEEP_MS, None);
        assert_eq!(stats[0].counts.requests, 600);
    }

    #[test]
    fn sums_from_several_servers_add_up_to_one_view() {
        let web = key(true, "web", "v1");
        // Two servers, each with one proxy of web.
        let (mut here, mut there) = (Traffic::default(), Traffic::default());
        here.record("a", 0, &BOUNDS, vec![(web.clone(), counts(0, 0, 0), 0)]);
        here.record("a", 2_000, &BOUNDS, vec![(web.clone(), counts(99, 0, 0), 2)]);
        there.record("b", 0, &BOUNDS, vec![(web.clone(), counts(0, 0, 0), 0)]);
        there.record("b", 2_000, &BOUNDS, vec![(web.clone(), counts(1, 1, 2), 1)]);
        let mut sums = here.sums(2_000, 2_000, None);
        for (key, sum) in there.sums(2_000, 2_000, None) {
            add(&mut sums, key, sum);
        }
        let stats = finish(sums, here.latency_bounds());
        assert_eq!(stats.len(), 1);
        let stat = &stats[0];
        assert_eq!((stat.counts.requests, stat.in_flight, stat.proxies), (100, 3, 2));
        assert_eq!((stat.requests_per_second, stat.success_rate), (50.0, 0.99));
        assert_eq!((stat.p50_seconds, stat.p99_seconds), (0.01, 0.01));
    }
}
