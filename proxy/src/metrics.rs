//! Prometheus metrics with lock-free recording.
//!
//! Handles are looked up once per routing-table build (per service and
//! version) and kept in the snapshot; a request only increments atomics.
//! The registry's lock is taken by table builds and scrapes, never by
//! requests.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mesh_common::histogram::{self, Bounds};

use crate::errors::ProxyError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Upper bounds of the latency histogram, in seconds.
pub const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The bounds a default scrape shows of each service's latency histogram:
/// every few of `BUCKETS`, so that a table of a thousand services scrapes
/// in about a megabyte. Each is exact: the full histogram's cumulative
/// count at that bound. `/metrics?detail=full` shows every bound.
pub const DEFAULT_BUCKETS: [f64; 6] = [0.001, 0.005, 0.025, 0.1, 0.5, 2.5];

/// How much a scrape shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Per-service latency histograms at `DEFAULT_BUCKETS`.
    Default,
    /// Every bound of `BUCKETS`.
    Full,
}

impl Detail {
    /// The detail a scrape's query string asks for (`detail=full`); the
    /// default otherwise.
    pub fn from_query(query: Option<&str>) -> Detail {
        let full = query.is_some_and(|q| q.split('&').any(|pair| pair == "detail=full"));
        if full {
            Detail::Full
        } else {
            Detail::Default
        }
    }

    fn bounds(self) -> &'static [f64] {
        match self {
            Detail::Default => &DEFAULT_BUCKETS,
            Detail::Full => &BUCKETS,
        }
    }
}

const STATUS_CODES: usize = 500; // 100..=599
const ERROR_SLOTS: usize = ProxyError::ALL.len() + 1;

/// Request counts and latency for one (direction, service, version).
#[derive(Default)]
pub struct HttpMetrics {
    counts: [OnceLock<Box<[AtomicU64; STATUS_CODES]>>; ERROR_SLOTS],
    latency: DurationHistogram,
    /// Requests waiting for their answer's head (kept for inbound only).
    pub in_flight: AtomicI64,
}

/// The counts of one `HttpMetrics` since the proxy started, as the traffic
/// summary sends them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpTotals {
    pub requests: u64,
    /// Below 500, and not an answer the mesh made itself.
    pub successes: u64,
    /// 1xx, 2xx, 3xx, 4xx, 5xx.
    pub status_classes: [u64; 5],
    /// By `x-mesh-error` reason.
    pub mesh_errors: BTreeMap<&'static str, u64>,
    /// Per bucket of `BUCKETS`, then the unbounded one.
    pub latency_buckets: Vec<u64>,
}

impl HttpMetrics {
    pub fn record(&self, status: u16, error: Option<ProxyError>, elapsed: Duration) {
        let slot = error.map_or(0, ProxyError::metric_index);
        let code = usize::from(status.clamp(100, 599) - 100);
        let counts = self.counts[slot].get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        counts[code].fetch_add(1, Ordering::Relaxed);
        self.latency.record(elapsed);
    }

    /// How many requests were recorded (cheap: the histogram's buckets).
    pub fn requests(&self) -> u64 {
        self.latency.count()
    }

    /// Everything recorded so far; read off the request path.
    pub fn totals(&self) -> HttpTotals {
        let mut totals = HttpTotals { latency_buckets: self.latency.buckets(), ..HttpTotals::default() };
        for (slot, counts) in self.counts.iter().enumerate() {
            let Some(counts) = counts.get() else { continue };
            for (code, count) in counts.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                totals.requests += count;
                totals.status_classes[(code / 100).min(4)] += count;
                match slot.checked_sub(1).and_then(|i| ProxyError::ALL.get(i)) {
                    Some(error) => *totals.mesh_errors.entry(error.reason()).or_default() += count,
                    None if code + 100 < 500 => totals.successes += count,
                    None => {}
                }
            }
        }
        totals
    }
}

/// Retries of one service by reason.
#[derive(Default)]
pub struct RetryMetrics {
    pub connect_failure: AtomicU64,
    pub server_error: AtomicU64,
    pub unavailable: AtomicU64,
}

/// Opaque TCP traffic of one (direction, service).
#[derive(Default)]
pub struct TcpMetrics {
    pub open: AtomicI64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

/// A gauge row computed at scrape time, such as endpoints per state.
pub struct EndpointCount<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub ready: u64,
    pub ejected: u64,
    pub ejections_total: u64,
}

/// Request and table-build durations, in `BUCKETS`.
pub struct LatencyBounds;

impl Bounds<{ BUCKETS.len() }> for LatencyBounds {
    const BOUNDS: [f64; BUCKETS.len()] = BUCKETS;
}

pub type DurationHistogram = histogram::DurationHistogram<LatencyBounds, { BUCKETS.len() }>;

pub type HttpKey = (Direction, String, String);

#[derive(Default)]
pub struct Metrics {
    http: Mutex<BTreeMap<HttpKey, Arc<HttpMetrics>>>,
    retries: Mutex<BTreeMap<String, Arc<RetryMetrics>>>,
    tcp: Mutex<BTreeMap<(Direction, String), Arc<TcpMetrics>>>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// How long building and publishing each routing table took.
    pub reload_duration: DurationHistogram,
    /// Connections closed at accept because their listener was full.
    pub connections_refused: AtomicU64,
    /// When the proxy's certificate expires (Unix seconds), 0 without one.
    pub identity_expiry_unix_secs: AtomicU64,
    pub tls_handshakes: Arc<crate::tls::HandshakeCounters>,
    routes: Mutex<BTreeMap<(String, String), Arc<crate::policy::routes::RouteMetrics>>>,
    rate_limits: Mutex<BTreeMap<String, Arc<crate::policy::rate_limit::RateLimitMetrics>>>,
    /// Refused callers by identity; touched only when a call is refused.
    authz_denied: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn http(&self, direction: Direction, service: &str, version: &str) -> Arc<HttpMetrics> {
        let mut map = self.http.lock().expect("metrics lock");
        map.entry((direction, service.to_owned(), version.to_owned())).or_default().clone()
    }

    pub fn retries(&self, service: &str) -> Arc<RetryMetrics> {
        self.retries.lock().expect("metrics lock").entry(service.to_owned()).or_default().clone()
    }

    /// Every (direction, service, version) with HTTP metrics, and them.
    pub fn http_rows(&self) -> Vec<(HttpKey, Arc<HttpMetrics>)> {
        let map = self.http.lock().expect("metrics lock");
        map.iter().map(|(key, metrics)| (key.clone(), metrics.clone())).collect()
    }

    pub fn tcp(&self, direction: Direction, service: &str) -> Arc<TcpMetrics> {
        self.tcp.lock().expect("metrics lock").entry((direction, service.to_owned())).or_default().clone()
    }

    pub fn route(&self, service: &str, route: &str) -> Arc<crate::policy::routes::RouteMetrics> {
        let mut map = self.routes.lock().expect("metrics lock");
        map.entry((service.to_owned(), route.to_owned())).or_default().clone()
    }

    pub fn rate_limit(&self, service: &str) -> Arc<crate::policy::rate_limit::RateLimitMetrics> {
        self.rate_limits.lock().expect("metrics lock").entry(service.to_owned()).or_default().clone()
    }

    pub fn record_authz_denied(&self, caller: &str) {
        *self.authz_denied.lock().expect("metrics lock").entry(caller.to_owned()).or_default() += 1;
    }

    /// Renders the Prometheus text format. `endpoints` and `config_version`
    /// come from the routing table in use at scrape time. A service's
    /// request, retry and TCP series appear once it has traffic: a large
    /// table with a few busy services scrapes small.
    pub fn render(
        &self,
        endpoints: &[EndpointCount<'_>],
        config_version: u64,
        upstream: crate::snapshot::UpstreamConnections,
        detail: Detail,
    ) -> String {
        let mut out = String::with_capacity(8192);
        self.render_http(&mut out, detail);
        self.render_retries(&mut out);
        self.render_tcp(&mut out);
        self.render_traffic_policy(&mut out);
        render_quic(&mut out);
        header(
            &mut out,
            "mesh_upstream_connections",
            "gauge",
            "Connections to endpoints held open: idle pooled HTTP/1 ones and shared HTTP/2 ones.",
        );
        let _ = writeln!(
            out,
            "mesh_upstream_connections{{protocol=\"http1\",state=\"idle\"}} {}",
            upstream.idle_http1
        );
        let _ = writeln!(
            out,
            "mesh_upstream_connections{{protocol=\"http2\",state=\"shared\"}} {}",
            upstream.http2
        );
        header(&mut out, "mesh_endpoints", "gauge", "Endpoints of a service version by state.");
        for row in endpoints {
            for (state, value) in [("ready", row.ready), ("ejected", row.ejected)] {
                let _ = writeln!(
                    out,
                    "mesh_endpoints{{service=\"{}\",version=\"{}\",state=\"{state}\"}} {value}",
                    escape(row.service),
                    escape(row.version)
                );
            }
        }
        header(&mut out, "mesh_endpoint_ejections_total", "counter", "Circuit-breaker ejections.");
        for row in endpoints {
            let _ = writeln!(
                out,
                "mesh_endpoint_ejections_total{{service=\"{}\",version=\"{}\"}} {}",
                escape(row.service),
                escape(row.version),
                row.ejections_total
            );
        }
        header(
            &mut out,
            "mesh_authz_denied_total",
            "counter",
            "Calls the local service's policy refused, by caller.",
        );
        for (caller, count) in self.authz_denied.lock().expect("metrics lock").iter() {
            // Callers are SPIFFE IDs or `plaintext`: no quotes or backslashes to escape.
            let _ = writeln!(out, "mesh_authz_denied_total{{caller=\"{caller}\"}} {count}");
        }
        header(&mut out, "mesh_tls_handshakes_total", "counter", "mTLS handshakes with peer proxies.");
        let handshakes = &self.tls_handshakes;
        for (direction, result, counter) in [
            ("inbound", "ok", &handshakes.inbound_ok),
            ("inbound", "failed", &handshakes.inbound_failed),
            ("outbound", "ok", &handshakes.outbound_ok),
            ("outbound", "failed", &handshakes.outbound_failed),
        ] {
            let count = counter.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "mesh_tls_handshakes_total{{direction=\"{direction}\",result=\"{result}\"}} {count}"
            );
        }
        header(
            &mut out,
            "mesh_tls_resumed_total",
            "counter",
            "Inbound mTLS handshakes that resumed an earlier session (TCP and QUIC).",
        );
        let _ =
            writeln!(out, "mesh_tls_resumed_total {}", handshakes.inbound_resumed.load(Ordering::Relaxed));
        let expiry = self.identity_expiry_unix_secs.load(Ordering::Relaxed);
        if expiry > 0 {
            header(
                &mut out,
                "mesh_identity_cert_expiry_timestamp_seconds",
                "gauge",
                "When the proxy's workload certificate expires.",
            );
            let _ = writeln!(out, "mesh_identity_cert_expiry_timestamp_seconds {expiry}");
        }
        header(&mut out, "mesh_config_version", "gauge", "Version of the routing table in use.");
        let _ = writeln!(out, "mesh_config_version {config_version}");
        header(&mut out, "mesh_config_reloads_total", "counter", "Routing-table loads by result.");
        let _ = writeln!(
            out,
            "mesh_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "mesh_config_reloads_total{{result=\"rejected\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "mesh_config_reload_duration_seconds",
            "histogram",
            "Time to build and publish a routing table (file reload or control-plane update).",
        );
        self.reload_duration.render_all(&mut out, "mesh_config_reload_duration_seconds", "");
        header(
            &mut out,
            "mesh_connections_refused_total",
            "counter",
            "Connections closed at accept because the listener had its maximum open.",
        );
        let _ = writeln!(
            out,
            "mesh_connections_refused_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        out
    }

    fn render_http(&self, out: &mut String, detail: Detail) {
        let mut map = self.http.lock().expect("metrics lock").clone();
        map.retain(|_, m| m.latency.count() > 0);
        header(out, "mesh_http_requests_total", "counter", "HTTP requests by outcome.");
        for ((direction, service, version), m) in &map {
            let labels = format!(
                "direction=\"{}\",service=\"{}\",version=\"{}\"",
                direction.as_str(),
                escape(service),
                escape(version)
            );
            for (slot, counts) in m.counts.iter().enumerate() {
                let Some(counts) = counts.get() else { continue };
                let error = if slot == 0 { "" } else { ProxyError::ALL[slot - 1].reason() };
                for (code, count) in counts.iter().enumerate() {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        let _ = writeln!(
                            out,
                            "mesh_http_requests_total{{{labels},code=\"{}\",error=\"{error}\"}} {count}",
                            code + 100
                        );
                    }
                }
            }
        }
        header(out, "mesh_http_request_duration_seconds", "histogram", "Time to response headers.");
        for ((direction, service, version), m) in &map {
            let labels = format!(
                "direction=\"{}\",service=\"{}\",version=\"{}\"",
                direction.as_str(),
                escape(service),
                escape(version)
            );
            m.latency.render(out, "mesh_http_request_duration_seconds", &labels, detail.bounds());
        }
    }

    fn render_retries(&self, out: &mut String) {
        header(out, "mesh_http_retries_total", "counter", "Retries by reason.");
        for (service, m) in self.retries.lock().expect("metrics lock").iter() {
            let counts = [&m.connect_failure, &m.server_error, &m.unavailable];
            if counts.iter().all(|count| count.load(Ordering::Relaxed) == 0) {
                continue;
            }
            for (reason, count) in [
                ("connect-failure", &m.connect_failure),
                ("5xx", &m.server_error),
                ("unavailable", &m.unavailable),
            ] {
                let _ = writeln!(
                    out,
                    "mesh_http_retries_total{{service=\"{}\",reason=\"{reason}\"}} {}",
                    escape(service),
                    count.load(Ordering::Relaxed)
                );
            }
        }
    }

    /// Routes, faults, mirrors and rate limits: series only for what has
    /// counted something.
    fn render_traffic_policy(&self, out: &mut String) {
        let routes = self.routes.lock().expect("metrics lock").clone();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        header(
            out,
            "mesh_route_requests_total",
            "counter",
            "Requests that took a route, by service and route.",
        );
        for ((service, route), m) in &routes {
            if load(&m.requests) > 0 {
                let (service, route) = (escape(service), escape(route));
                let _ = writeln!(
                    out,
                    "mesh_route_requests_total{{service=\"{service}\",route=\"{route}\"}} {}",
                    load(&m.requests)
                );
            }
        }
        header(
            out,
            "mesh_faults_injected_total",
            "counter",
            "Faults a route injected, by kind (delay, abort).",
        );
        for ((service, route), m) in &routes {
            for (kind, count) in [("delay", &m.delayed), ("abort", &m.aborted)] {
                if load(count) > 0 {
                    let (service, route) = (escape(service), escape(route));
                    let _ = writeln!(out, "mesh_faults_injected_total{{service=\"{service}\",route=\"{route}\",kind=\"{kind}\"}} {}", load(count));
                }
            }
        }
        header(out, "mesh_mirror_requests_total", "counter", "Requests a route copied to its mirror (sent), or did not (busy: the mirror's cap was reached; body: streaming or over 64 KiB).");
        for ((service, route), m) in &routes {
            for (result, count) in [("sent", &m.mirrored), ("busy", &m.mirror_busy), ("body", &m.mirror_body)]
            {
                if load(count) > 0 {
                    let (service, route) = (escape(service), escape(route));
                    let _ = writeln!(out, "mesh_mirror_requests_total{{service=\"{service}\",route=\"{route}\",result=\"{result}\"}} {}", load(count));
                }
            }
        }
        header(
            out,
            "mesh_rate_limited_total",
            "counter",
            "Requests a service's inbound rate limit refused, by the limit that did (overall, caller).",
        );
        for (service, m) in self.rate_limits.lock().expect("metrics lock").iter() {
            for (limit, count) in [("overall", &m.overall), ("caller", &m.caller)] {
                if load(count) > 0 {
                    let _ = writeln!(
                        out,
                        "mesh_rate_limited_total{{service=\"{}\",limit=\"{limit}\"}} {}",
                        escape(service),
                        load(count)
                    );
                }
            }
        }
    }

    fn render_tcp(&self, out: &mut String) {
        let mut map = self.tcp.lock().expect("metrics lock").clone();
        map.retain(|_, m| {
            m.open.load(Ordering::Relaxed) != 0
                || m.read_bytes.load(Ordering::Relaxed) != 0
                || m.write_bytes.load(Ordering::Relaxed) != 0
        });
        header(out, "mesh_tcp_connections_open", "gauge", "Open opaque TCP connections.");
        for ((direction, service), m) in &map {
            let _ = writeln!(
                out,
                "mesh_tcp_connections_open{{direction=\"{}\",service=\"{}\"}} {}",
                direction.as_str(),
                escape(service),
                m.open.load(Ordering::Relaxed)
            );
        }
        header(out, "mesh_tcp_bytes_total", "counter", "Opaque TCP bytes.");
        for ((direction, service), m) in &map {
            for (flow, bytes) in [("read", &m.read_bytes), ("write", &m.write_bytes)] {
                let _ = writeln!(
                    out,
                    "mesh_tcp_bytes_total{{direction=\"{}\",service=\"{}\",flow=\"{flow}\"}} {}",
                    direction.as_str(),
                    escape(service),
                    bytes.load(Ordering::Relaxed)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Requests over QUIC, both ways, and tries that went to TCP because a
/// peer could not be reached over QUIC.
fn render_quic(out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let inbound = crate::listen::quic::QUIC_SERVED.load(Relaxed);
    let outbound = crate::http::send::QUIC_SENT.load(Relaxed);
    header(
        out,
        "mesh_quic_requests_total",
        "counter",
        "HTTP/3 requests between sidecars over QUIC, by direction.",
    );
    let _ = writeln!(out, "mesh_quic_requests_total{{direction=\"inbound\"}} {inbound}");
    let _ = writeln!(out, "mesh_quic_requests_total{{direction=\"outbound\"}} {outbound}");
    header(
        out,
        "mesh_quic_fallbacks_total",
        "counter",
        "Tries that went over TCP because QUIC to the peer could not be opened or fell silent.",
    );
    let _ = writeln!(out, "mesh_quic_fallbacks_total {}", crate::http::send::QUIC_FALLBACKS.load(Relaxed));
    header(
        out,
        "mesh_quic_connections_open",
        "gauge",
        "Open QUIC connections with peer sidecars, by direction.",
    );
    let inbound = crate::listen::quic::QUIC_OPEN_INBOUND.load(Relaxed);
    let outbound = crate::endpoint::pool::QUIC_OPEN_OUTBOUND.load(Relaxed);
    let _ = writeln!(out, "mesh_quic_connections_open{{direction=\"inbound\"}} {inbound}");
    let _ = writeln!(out, "mesh_quic_connections_open{{direction=\"outbound\"}} {outbound}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_up_with_their_labels() {
        let metrics = Metrics::default();
        let handle = metrics.http(Direction::Outbound, "echo", "v1");
        handle.record(200, None, Duration::from_millis(3));
        handle.record(200, None, Duration::from_millis(30));
        handle.record(503, Some(ProxyError::BreakerOpen), Duration::from_micros(10));
        let text = metrics.render(&[], 4, Default::default(), Detail::Full);
        assert!(text.contains(
            "mesh_http_requests_total{direction=\"outbound\",service=\"echo\",version=\"v1\",code=\"200\",error=\"\"} 2"
        ));
        assert!(text.contains("code=\"503\",error=\"breaker-open\"} 1"));
        assert!(text.contains("le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 3"));
        assert!(text.contains("mesh_config_version 4"));
    }

    /// The `le` bounds and cumulative counts of one histogram in a scrape.
    fn buckets(text: &str, service: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter(|line| line.starts_with("mesh_http_request_duration_seconds_bucket"))
            .filter(|line| line.contains(&format!("service=\"{service}\"")))
            .map(|line| {
                let le = line.split("le=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
                (le, line.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn a_default_scrape_shows_fewer_bounds_each_exact_and_only_services_with_traffic() {
        let metrics = Metrics::default();
        let busy = metrics.http(Direction::Outbound, "busy", "v1");
        for millis in [0.2, 0.7, 3.0, 7.0, 20.0, 60.0, 300.0, 4000.0, 20000.0] {
            busy.record(200, None, Duration::from_secs_f64(millis / 1e3));
        }
        // Handles made by a table build, never used: nothing to show.
        let _idle = metrics.http(Direction::Outbound, "idle", "v1");
        let _idle_retries = metrics.retries("idle");
        let _idle_tcp = metrics.tcp(Direction::Outbound, "idle");
        metrics.retries("busy").server_error.fetch_add(1, Ordering::Relaxed);

        let full = metrics.render(&[], 1, Default::default(), Detail::Full);
        let default = metrics.render(&[], 1, Default::default(), Detail::Default);
        for text in [&full, &default] {
            assert!(!text.contains("service=\"idle\""), "{text}");
            assert!(text.contains("mesh_http_retries_total{service=\"busy\",reason=\"5xx\"} 1"));
            assert!(text.contains("mesh_http_request_duration_seconds_count{direction=\"outbound\",service=\"busy\",version=\"v1\"} 9"));
        }
        let full = buckets(&full, "busy");
        let default = buckets(&default, "busy");
        assert_eq!(full.len(), BUCKETS.len() + 1);
        assert_eq!(default.len(), DEFAULT_BUCKETS.len() + 1);
        // (bound, cumulative count) expected in the default scrape
        let expected =
            [("0.001", 2), ("0.005", 3), ("0.025", 5), ("0.1", 6), ("0.5", 7), ("2.5", 7), ("+Inf", 9)];
        let expected: Vec<(String, u64)> = expected.iter().map(|(le, n)| (le.to_string(), *n)).collect();
        assert_eq!(default, expected);
        for row in &default {
            assert!(full.contains(row), "{row:?} is the full histogram's count at that bound");
        }
    }

    #[test]
    fn a_scrape_asks_for_full_detail_by_its_query() {
        // (query, detail)
        let cases = [
            (None, Detail::Default),
            (Some(""), Detail::Default),
            (Some("detail=full"), Detail::Full),
            (Some("a=b&detail=full"), Detail::Full),
            (Some("detail=fuller"), Detail::Default),
            (Some("detail=default"), Detail::Default),
        ];
        for (query, detail) in cases {
            assert_eq!(Detail::from_query(query), detail, "{query:?}");
        }
    }
}
