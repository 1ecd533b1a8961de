//! The traffic proxies report, about once a second on their discovery
//! streams, kept in memory for a minute: what `meshctl top` and `meshctl
//! stat` show, read from meshd rather than from each proxy, and what the
//! scheduler can decide on without Prometheus.
//!
//! Proxies send counts since they started, so a lost summary loses
//! nothing. meshd keeps, per proxy and row, the last counts and what was
//! added in each recent interval: one-second buckets for the last ten
//! seconds and five-second buckets for the last minute, each bucket a few
//! hundred bytes, so memory per proxy is fixed whatever its traffic. A
//! window sums the buckets it covers, and its rate is over the time those
//! buckets span. Pure: every function takes the time.

use std::collections::{BTreeMap, HashMap};

/// How long summaries are kept: the longest window a query may ask for.
pub const KEEP_MS: u64 = 60_000;

/// A proxy's in-flight counts are believed this long after its last
/// summary; after that it is taken to be gone.
pub const FRESH_MS: u64 = 3_000;

/// The window a query gets when it names none.
pub const DEFAULT_WINDOW_MS: u64 = 10_000;

/// Latency buckets kept per interval; a proxy that sends more has the
/// rest folded into the last.
const LATENCY_BUCKETS: usize = 16;

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
    /// Counts as the wire carries them (status classes as a list).
    pub fn from_wire(
        requests: u64,
        successes: u64,
        status_classes: &[u64],
        mesh_errors: impl IntoIterator<Item = (String, u64)>,
        latency_buckets: Vec<u64>,
    ) -> Counts {
        let mut classes = [0; 5];
        for (class, count) in classes.iter_mut().zip(status_classes) {
            *class = *count;
        }
        let mesh_errors = mesh_errors.into_iter().collect();
        Counts { requests, successes, status_classes: classes, mesh_errors, latency_buckets }
    }

    /// What was added since `base`; None when a count went down (not the
    /// same proxy's counts: they only grow).
    fn since(&self, base: &Counts) -> Option<Counts> {
        if self.requests < base.requests || self.successes < base.successes {
            return None;
        }
        let mut mesh_errors = self.mesh_errors.clone();
        for (reason, count) in &mut mesh_errors {
            *count = count.saturating_sub(base.mesh_errors.get(reason).copied().unwrap_or(0));
        }
        mesh_errors.retain(|_, count| *count > 0);
        Some(Counts {
            requests: self.requests - base.requests,
            successes: self.successes - base.successes,
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
        })
    }

    /// The `q` quantile (seconds), interpolated linearly inside its bucket
    /// as Prometheus' `histogram_quantile` does: what a gate compares with
    /// its threshold. The largest bound for the unbounded bucket; `None`
    /// without requests.
    pub fn quantile_interpolated(&self, q: f64, bounds: &[f64]) -> Option<f64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, count) in self.latency_buckets.iter().enumerate() {
            if *count > 0 && (seen + count) as f64 >= rank {
                let Some(upper) = bounds.get(i) else { return bounds.last().copied() };
                let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                let into = ((rank - seen as f64) / *count as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * into);
            }
            seen += count;
        }
        bounds.last().copied()
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
    pub fn quantile(&self, q: f64, bounds: &[f64]) -> f64 {
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

/// What one row added in one interval: small and fixed in size.
#[derive(Clone, Debug, Default)]
struct Interval {
    /// Which interval (time / its width); 0 for none yet.
    id: u64,
    requests: u32,
    successes: u32,
    status_classes: [u32; 5],
    latency: [u32; LATENCY_BUCKETS],
    /// Rare: only answers the mesh made itself.
    mesh_errors: BTreeMap<String, u32>,
}

impl Interval {
    fn add(&mut self, added: &Counts) {
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        self.requests = self.requests.saturating_add(narrow(added.requests));
        self.successes = self.successes.saturating_add(narrow(added.successes));
        for (mine, theirs) in self.status_classes.iter_mut().zip(added.status_classes) {
            *mine = mine.saturating_add(narrow(theirs));
        }
        for (i, n) in added.latency_buckets.iter().enumerate() {
            let slot = &mut self.latency[i.min(LATENCY_BUCKETS - 1)];
            *slot = slot.saturating_add(narrow(*n));
        }
        for (reason, n) in &added.mesh_errors {
            let count = self.mesh_errors.entry(reason.clone()).or_default();
            *count = count.saturating_add(narrow(*n));
        }
    }

    fn add_into(&self, counts: &mut Counts, latency_buckets: usize) {
        counts.requests += u64::from(self.requests);
        counts.successes += u64::from(self.successes);
        for (mine, theirs) in counts.status_classes.iter_mut().zip(self.status_classes) {
            *mine += u64::from(theirs);
        }
        if counts.latency_buckets.len() < latency_buckets {
            counts.latency_buckets.resize(latency_buckets, 0);
        }
        for (mine, theirs) in counts.latency_buckets.iter_mut().zip(self.latency) {
            *mine += u64::from(theirs);
        }
        for (reason, n) in &self.mesh_errors {
            *counts.mesh_errors.entry(reason.clone()).or_default() += u64::from(*n);
        }
    }
}

/// Intervals of one width, as a ring: slot `id % N` holds interval `id`.
#[derive(Clone, Debug)]
struct Ring<const N: usize> {
    width_ms: u64,
    slots: [Interval; N],
}

impl<const N: usize> Ring<N> {
    fn new(width_ms: u64) -> Self {
        Ring { width_ms, slots: std::array::from_fn(|_| Interval::default()) }
    }

    /// The longest window this ring answers: all but the interval under way.
    fn reach_ms(&self) -> u64 {
        self.width_ms * (N as u64 - 1)
    }

    fn add(&mut self, now_ms: u64, added: &Counts) {
        let id = now_ms / self.width_ms + 1;
        let slot = &mut self.slots[(id % N as u64) as usize];
        if slot.id != id {
            *slot = Interval { id, ..Interval::default() };
        }
        slot.add(added);
    }

    /// What the intervals that start inside the window of `window_ms`
    /// before `now_ms` added (the one under way included), and the time
    /// they span (ms).
    fn sum(&self, now_ms: u64, window_ms: u64, counts: &mut Counts, latency_buckets: usize) -> u64 {
        let last = now_ms / self.width_ms + 1;
        let first = now_ms.saturating_sub(window_ms).div_ceil(self.width_ms) + 1;
        for slot in &self.slots {
            if slot.id >= first && slot.id <= last {
                slot.add_into(counts, latency_buckets);
            }
        }
        now_ms.saturating_sub((first - 1) * self.width_ms)
    }
}

/// One row of one proxy: its last counts and what each recent interval added.
#[derive(Clone, Debug)]
struct Row {
    last: Counts,
    in_flight: i64,
    /// The last ten seconds, by second.
    fine: Ring<11>,
    /// The last minute, by five seconds.
    coarse: Ring<13>,
}

impl Row {
    fn new(counts: Counts, in_flight: i64) -> Row {
        Row { last: counts, in_flight, fine: Ring::new(1_000), coarse: Ring::new(5_000) }
    }

    /// What the row added over `window_ms` before `now_ms`, and over how
    /// long: from the one-second intervals when they reach back far
    /// enough, else the five-second ones.
    fn window(&self, now_ms: u64, window_ms: u64, latency_buckets: usize) -> (Counts, u64) {
        let mut counts = Counts::default();
        let span = if window_ms <= self.fine.reach_ms() {
            self.fine.sum(now_ms, window_ms, &mut counts, latency_buckets)
        } else {
            self.coarse.sum(now_ms, window_ms, &mut counts, latency_buckets)
        };
        (counts, span)
    }
}

/// What is kept of one proxy.
#[derive(Default)]
struct ProxyTraffic {
    rows: HashMap<RowKey, Row>,
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
    /// not change. A row's first counts on this server are its base: what
    /// came before is not counted in any window.
    pub fn record(&mut self, proxy: &str, now_ms: u64, bounds: &[f64], rows: Vec<(RowKey, Counts, i64)>) {
        if !bounds.is_empty() && bounds != self.latency_bounds.as_slice() {
            self.latency_bounds = bounds.iter().copied().take(LATENCY_BUCKETS - 1).collect();
        }
        if now_ms >= self.swept_ms + SWEEP_EVERY_MS {
            self.forget_old(now_ms);
            self.swept_ms = now_ms;
        }
        let traffic = self.proxies.entry(proxy.to_owned()).or_default();
        traffic.last_summary_ms = now_ms;
        for (key, counts, in_flight) in rows {
            match traffic.rows.get_mut(&key) {
                None => {
                    traffic.rows.insert(key, Row::new(counts, in_flight));
                }
                Some(row) => {
                    // Counts that went down start a new base.
                    if let Some(added) = counts.since(&row.last) {
                        row.fine.add(now_ms, &added);
                        row.coarse.add(now_ms, &added);
                    }
                    row.last = counts;
                    row.in_flight = in_flight;
                }
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
    /// `now_ms`, per direction, service and version, for `service` or all,
    /// before success rates and quantiles (`finish`): what another server
    /// adds its own proxies' to.
    pub fn sums(&self, now_ms: u64, window_ms: u64, service: Option<&str>) -> Sums {
        let window_ms = window_ms.clamp(1, KEEP_MS);
        let latency_buckets = self.latency_bounds.len() + 1;
        let mut sums = Sums::new();
        for traffic in self.proxies.values() {
            let fresh = traffic.last_summary_ms + FRESH_MS > now_ms;
            for (key, row) in &traffic.rows {
                if service.is_some_and(|s| s != key.service) {
                    continue;
                }
                let (counts, span_ms) = row.window(now_ms, window_ms, latency_buckets);
                let in_flight = if fresh { row.in_flight } else { 0 };
                if counts.requests == 0 && in_flight == 0 {
                    continue;
                }
                let requests_per_second = counts.requests as f64 * 1000.0 / span_ms.max(1) as f64;
                add(&mut sums, key.clone(), Sum { counts, in_flight, proxies: 1, requests_per_second });
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

    impl Traffic {
        /// A window as `meshctl top` gets it from one server.
        fn query(&self, now_ms: u64, window_ms: u64, service: Option<&str>) -> Vec<Stat> {
            finish(self.sums(now_ms, window_ms, service), &self.latency_bounds)
        }
    }

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

    /// One proxy's row sent each second up to `until` s: `per_second`
    /// requests a second from `from` s on, none before.
    fn steady(traffic: &mut Traffic, proxy: &str, row: &RowKey, from: u64, until: u64, per_second: u64) {
        for second in 0..=until {
            let total = second.saturating_sub(from) * per_second;
            let at = second * 1_000 + 500;
            traffic.record(proxy, at, &BOUNDS, vec![(row.clone(), counts(total, 0, 0), 0)]);
        }
    }

    #[test]
    fn interpolated_quantiles_fall_inside_their_bucket() {
        let counts = |buckets: &[u64]| Counts { latency_buckets: buckets.to_vec(), ..Counts::default() };
        // (buckets over bounds 10 ms, 100 ms, 1 s, +Inf; q) → seconds
        let table: [(&[u64], f64, Option<f64>); 6] = [
            (&[], 0.99, None),
            (&[100, 0, 0, 0], 0.5, Some(0.005)),
            (&[0, 100, 0, 0], 0.99, Some(0.01 + 0.09 * 0.99)),
            (&[90, 10, 0, 0], 0.9, Some(0.01)),
            (&[90, 0, 10, 0], 0.95, Some(0.1 + 0.9 * 0.5)),
            (&[0, 0, 0, 5], 0.99, Some(1.0)),
        ];
        for (buckets, q, expected) in table {
            let got = counts(buckets).quantile_interpolated(q, &BOUNDS);
            match (got, expected) {
                (Some(got), Some(expected)) => {
                    assert!((got - expected).abs() < 1e-9, "{buckets:?} {q}: {got}")
                }
                (got, expected) => assert_eq!(got, expected, "{buckets:?} {q}"),
            }
        }
    }

    #[test]
    fn a_window_counts_what_was_added_in_it() {
        let web = key(true, "web", "v1");
        // 100 requests a second from 20 s on, a summary in the middle of
        // every second until the query. A window counts the summaries that came
        // in the intervals starting inside it, over the time they span: to
        // within one summary of the traffic in it.
        // (now ms, window ms, requests counted, requests per second)
        let table = [
            // Ten one-second intervals, from 81 s: the summaries at 81.5 … 90.5 s.
            (90_600, 10_000, 1_000, 1_000.0 / 9.6),
            (90_900, 10_000, 1_000, 1_000.0 / 9.9),
            (90_900, 3_000, 300, 300.0 / 2.9),
            // Beyond ten seconds, five-second intervals: from 65 s, then from 35 s.
            (90_600, 30_000, 2_600, 2_600.0 / 25.6),
            (90_600, 60_000, 5_600, 5_600.0 / 55.6),
            // A window reaching back before the traffic began (at 20.5 s).
            (30_600, 20_000, 1_000, 1_000.0 / 15.6),
        ];
        for (now, window, requests, rps) in table {
            let mut traffic = Traffic::default();
            steady(&mut traffic, "a", &web, 20, now / 1_000, 100);
            let stats = traffic.query(now, window, None);
            assert_eq!(stats.len(), 1, "{now} {window}");
            assert_eq!(stats[0].counts.requests, requests, "{now} {window}");
            assert!((stats[0].requests_per_second - rps).abs() < 1e-6, "{now} {window}: {stats:?}");
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
        traffic.record("a", 4_000, &BOUNDS, vec![(v1.clone(), counts(100, 0, 0), 3)]);
        traffic.record(
            "b",
            4_000,
            &BOUNDS,
            vec![(v1.clone(), counts(100, 0, 1), 2), (v2.clone(), counts(50, 5, 2), 7)],
        );
        traffic.record("c", 4_000, &BOUNDS, vec![(out.clone(), counts(250, 5, 2), 0)]);
        let stats = traffic.query(4_000, 5_000, Some("web"));
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
        assert!(traffic.query(4_000, 5_000, Some("api")).is_empty());
    }

    #[test]
    fn quiet_rows_gone_proxies_and_restarts() {
        let web = key(true, "web", "v1");
        let mut traffic = Traffic::default();
        traffic.record("a", 0, &BOUNDS, vec![(web.clone(), counts(0, 0, 0), 0)]);
        traffic.record("a", 1_000, &BOUNDS, vec![(web.clone(), counts(500, 0, 0), 4)]);
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
        // A row's first counts on this server are a base, not traffic; counts
        // that went down (another process under the same id) are a new base.
        traffic.record("b", 0, &BOUNDS, vec![(web.clone(), counts(900, 0, 0), 0)]);
        assert!(traffic.query(0, 1_000, None).is_empty());
        traffic.record("b", 1_000, &BOUNDS, vec![(web.clone(), counts(30, 0, 0), 0)]);
        assert!(traffic.query(1_000, 5_000, None).is_empty());
        traffic.record("b", 2_000, &BOUNDS, vec![(web.clone(), counts(70, 0, 0), 0)]);
        assert_eq!(traffic.query(2_000, 5_000, None)[0].counts.requests, 40);
    }

    #[test]
    fn memory_per_row_is_fixed_whatever_the_traffic() {
        let web = key(true, "web", "v1");
        let mut traffic = Traffic::default();
        steady(&mut traffic, "a", &web, 0, 600, 1_000_000);
        let row = &traffic.proxies["a"].rows[&web];
        assert_eq!(row.fine.slots.len() + row.coarse.slots.len(), 24);
        assert!(std::mem::size_of::<Row>() < 4_096, "{} bytes", std::mem::size_of::<Row>());
        // A million a second overflows no interval (56 summaries: from 545 s).
        assert_eq!(traffic.query(600_600, 60_000, None)[0].counts.requests, 56_000_000);
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
