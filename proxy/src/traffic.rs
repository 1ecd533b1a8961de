//! The traffic summary a proxy sends meshd about once a second on its
//! discovery stream: per direction, service and version, the counts since
//! the proxy started (a lost summary loses nothing) and the requests in
//! flight. A row whose request count and in-flight count did not move is
//! left out, so a quiet proxy sends next to nothing; reading a row that
//! did not move costs its histogram's fifteen loads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use mesh_proto::mesh::v1 as pb;

use mesh_common::policy::Transport;

use crate::endpoint::pool::QuicState;
use crate::metrics::{Direction, HttpKey, Metrics, BUCKETS};
use crate::snapshot::Snapshot;

/// What the last summary on this stream said of each row, and of the peers.
#[derive(Default)]
pub struct Summarizer {
    sent: BTreeMap<HttpKey, (u64, i64)>,
    peers: Option<Vec<pb::PeerTransport>>,
}

/// At most this many peers are reported, so a summary stays small.
pub const MAX_PEERS_REPORTED: usize = 1000;

/// How this proxy reaches each peer sidecar of the services it calls over
/// QUIC, in a stable order.
pub fn peer_transports(table: &Snapshot, now_ms: u64) -> Vec<pb::PeerTransport> {
    let mut peers = Vec::new();
    for service in table.services.values().filter(|s| s.config.transport == Transport::Quic) {
        for endpoint in service.groups.iter().flat_map(|g| &g.endpoints).filter(|e| e.meshed) {
            let (transport, reason) = match endpoint.state.pool.quic_state(now_ms) {
                _ if !endpoint.quic => (pb::Transport::Tcp, "no-quic"),
                QuicState::Open => (pb::Transport::Quic, ""),
                QuicState::Failed => (pb::Transport::Tcp, "fallback"),
                QuicState::Closed => (pb::Transport::Tcp, "idle"),
            };
            peers.push(pb::PeerTransport {
                service: service.config.name.clone(),
                addr: endpoint.addr.to_string(),
                transport: transport.into(),
                reason: reason.to_owned(),
            });
        }
    }
    peers.sort_by(|a, b| (&a.service, &a.addr).cmp(&(&b.service, &b.addr)));
    peers.truncate(MAX_PEERS_REPORTED);
    peers
}

impl Summarizer {
    /// The rows that moved since the last summary (all of them the first
    /// time), and the peers' transports if they changed.
    pub fn next(&mut self, metrics: &Metrics, table: &Snapshot) -> pb::TrafficSummary {
        let peers = peer_transports(table, crate::clock::now_millis());
        let peers = if self.peers.as_ref() != Some(&peers) {
            self.peers = Some(peers.clone());
            Some(pb::PeerTransports { peers })
        } else {
            None
        };
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
        pb::TrafficSummary { latency_bounds_seconds: BUCKETS.to_vec(), rows, peers }
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
        let table = crate::snapshot::LongLived::default()
            .build(crate::config::parse_config("[listen]\n").unwrap(), None);

        // (what happens before the summary, rows it sends)
        let first = summarizer.next(&metrics, &table);
        assert_eq!(first.latency_bounds_seconds.len() + 1, first.rows[0].latency_buckets.len());
        let rows: Vec<_> = first.rows.iter().map(|r| (r.inbound, r.service.as_str(), r.requests)).collect();
        assert_eq!(rows, [(true, "web", 4), (false, "api", 0)]);
        let row = &first.rows[0];
        assert_eq!(row.successes, 2, "200 and 404; not 500, not the mesh's 503");
        assert_eq!(row.status_classes, [0, 1, 0, 1, 2]);
        assert_eq!(row.mesh_errors.get("connect-failed"), Some(&1), "{:?}", row.mesh_errors);
        assert_eq!(row.latency_buckets.iter().sum::<u64>(), 4);

        // Nothing moved: nothing sent.
        assert!(summarizer.next(&metrics, &table).rows.is_empty());
        // A request in flight moves its row; one more request moves the other.
        let guard = InFlight::start(&web.in_flight);
        api.record(200, None, Duration::from_millis(2));
        let rows: Vec<_> = summarizer
            .next(&metrics, &table)
            .rows
            .iter()
            .map(|r| (r.service.clone(), r.in_flight, r.requests))
            .collect();
        assert_eq!(rows, [("web".to_owned(), 1, 4), ("api".to_owned(), 0, 1)]);
        drop(guard);
        assert_eq!(summarizer.next(&metrics, &table).rows[0].in_flight, 0);
    }

    #[test]
    fn peers_of_quic_services_are_reported_with_their_transport_when_it_changes() {
        let text = "[listen]\n[identity]\ncertificate = \"c.pem\"\nkey = \"k.pem\"\nroots = \"r.pem\"\n\
            [[services]]\nname = \"api\"\ntransport = \"quic\"\nendpoints = [\n\
            { addr = \"127.0.0.1:3\", meshed = true, quic = true },\n\
            { addr = \"127.0.0.1:1\", meshed = true, quic = true },\n\
            { addr = \"127.0.0.1:2\", meshed = true },\n\
            { addr = \"127.0.0.1:4\" },\n]\n\
            [[services]]\nname = \"web\"\nendpoints = [ { addr = \"127.0.0.1:5\", meshed = true, quic = true } ]\n";
        let table =
            crate::snapshot::LongLived::default().build(crate::config::parse_config(text).unwrap(), None);
        let api = &table.services["api"];
        let endpoint =
            |port: u16| api.groups[0].endpoints.iter().find(|e| e.addr.port() == port).expect("an endpoint");
        let seen = |peers: &[pb::PeerTransport]| {
            peers.iter().map(|p| (p.addr.clone(), p.transport(), p.reason.clone())).collect::<Vec<_>>()
        };
        let row =
            |port: u16, transport, reason: &str| (format!("127.0.0.1:{port}"), transport, reason.to_owned());
        let (metrics, mut summarizer) = (Metrics::default(), Summarizer::default());

        // Only the meshed peers of the QUIC service, in address order; no connection yet.
        let first = summarizer.next(&metrics, &table).peers.expect("the first summary has the peers");
        assert_eq!(
            seen(&first.peers),
            [
                row(1, pb::Transport::Tcp, "idle"),
                row(2, pb::Transport::Tcp, "no-quic"),
                row(3, pb::Transport::Tcp, "idle")
            ]
        );
        assert!(first.peers.iter().all(|p| p.service == "api"));
        assert_eq!(summarizer.next(&metrics, &table).peers, None, "unchanged: not sent again");

        // QUIC to one peer failed: it is reached over TCP for a while.
        endpoint(3).state.pool.quic_failed();
        let peers = summarizer.next(&metrics, &table).peers.expect("a change is sent");
        assert_eq!(seen(&peers.peers)[2], row(3, pb::Transport::Tcp, "fallback"));
    }
}
