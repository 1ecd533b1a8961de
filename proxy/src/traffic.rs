//! The traffic summary a proxy sends meshd about once a second on its
//! discovery stream: per direction, service and version, the counts since
//! the proxy started (a lost summary loses nothing) and the requests in
//! flight. A row whose request count and in-flight count did not move is
//! left out, so a quiet proxy sends next to nothing; reading a row that
//! did not move costs its histogram's fifteen loads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use mesh_proto::mesh::v1 as pb;

use crate::metrics::{Direction, HttpKey, Metrics, BUCKETS};

/// What the last summary on this stream said of each row.
#[derive(Default)]
pub struct Summarizer {
    sent: BTreeMap<HttpKey, (u64, i64)>,
}

impl Summarizer {
    /// The rows that moved since the last summary (all of them the first time).
    pub fn next(&mut self, metrics: &Metrics) -> pb::TrafficSummary {
        let mut rows = Vec::new();
        for (key, http) in metrics.http_rows() {
            let (direction, service, version) = &key;
            // Requests no service was named for (a bad Host) are not a service's traffic.
            if service.is_empty() {
                continue;
            }
            let moved = (http.requests(), http.in_flight.load(Ordering::Relaxed));
            if self.sent.get(&key) == Some(&moved) {
                continue;
            }
            let totals = http.totals();
            rows.push(pb::TrafficRow {
                inbound: *direction == Direction::Inbound,
                service: service.clone(),
                version: version.clone(),
                requests: totals.requests,
                successes: totals.successes,
                status_classes: totals.status_classes.to_vec(),
                mesh_errors: totals
                    .mesh_errors
                    .into_iter()
                    .map(|(reason, n)| (reason.to_owned(), n))
                    .collect(),
                latency_buckets: totals.latency_buckets,
                in_flight: moved.1,
            });
            self.sent.insert(key, moved);
        }
        pb::TrafficSummary { latency_bounds_seconds: BUCKETS.to_vec(), rows }
    }
}

/// Counts a request in flight until dropped (answered, or abandoned).
pub struct InFlight<'a>(&'a std::sync::atomic::AtomicI64);

impl<'a> InFlight<'a> {
    pub fn start(counter: &'a std::sync::atomic::AtomicI64) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::ProxyError;
    use std::time::Duration;

    #[test]
    fn a_summary_sends_the_rows_that_moved_with_their_totals() {
        let metrics = Metrics::default();
        let web = metrics.http(Direction::Inbound, "web", "v1");
        let api = metrics.http(Direction::Outbound, "api", "v2");
        web.record(200, None, Duration::from_millis(3));
        web.record(503, Some(ProxyError::ConnectFailed), Duration::from_millis(700));
        web.record(404, None, Duration::from_millis(1));
        web.record(500, None, Duration::from_millis(20));
        let mut summarizer = Summarizer::default();

        // (what happens before the summary, rows it sends)
        let first = summarizer.next(&metrics);
        assert_eq!(first.latency_bounds_seconds.len() + 1, first.rows[0].latency_buckets.len());
        let rows: Vec<_> = first.rows.iter().map(|r| (r.inbound, r.service.as_str(), r.requests)).collect();
        assert_eq!(rows, [(true, "web", 4), (false, "api", 0)]);
        let row = &first.rows[0];
        assert_eq!(row.successes, 2, "200 and 404; not 500, not the mesh's 503");
        assert_eq!(row.status_classes, [0, 1, 0, 1, 2]);
        assert_eq!(row.mesh_errors.get("connect-failed"), Some(&1), "{:?}", row.mesh_errors);
        assert_eq!(row.latency_buckets.iter().sum::<u64>(), 4);

        // Nothing moved: nothing sent.
        assert!(summarizer.next(&metrics).rows.is_empty());
        // A request in flight moves its row; one more request moves the other.
        let guard = InFlight::start(&web.in_flight);
        api.record(200, None, Duration::from_millis(2));
        let rows: Vec<_> = summarizer
            .next(&metrics)
            .rows
            .iter()
            .map(|r| (r.service.clone(), r.in_flight, r.requests))
            .collect();
        assert_eq!(rows, [("web".to_owned(), 1, 4), ("api".to_owned(), 0, 1)]);
        drop(guard);
        assert_eq!(summarizer.next(&metrics).rows[0].in_flight, 0);
    }
}
