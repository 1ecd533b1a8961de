//! `meshctl top`, pure: turns two scrapes of every proxy's `/metrics`
//! into per service and version request rate, success rate and latency
//! quantiles. It reads the callers' side (`direction="outbound"`), which
//! counts what clients saw, retries and proxy-made errors included.

use std::collections::BTreeMap;

/// Totals for one service and version, summed over proxies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: f64,
    pub failed: f64,
    /// Cumulative histogram buckets: upper bound in seconds → count.
    pub buckets: BTreeMap<Bound, f64>,
}

/// A bucket bound that sorts (`+Inf` last).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound(pub f64);

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

pub type Key = (String, String);

/// One line per service and version, as meshctl prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub service: String,
    pub version: String,
    pub requests_per_second: f64,
    /// Share of requests that did not fail (0..=1); `None` without requests.
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Adds one proxy's scrape to `into`.
pub fn add_scrape(into: &mut BTreeMap<Key, Counts>, text: &str) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, labels, value)) = split_sample(line) else { continue };
        if label(labels, "direction") != Some("outbound") {
            continue;
        }
        let (Some(service), Some(version)) = (label(labels, "service"), label(labels, "version")) else {
            continue;
        };
        let counts = into.entry((service.to_owned(), version.to_owned())).or_default();
        match name {
            "mesh_http_requests_total" => {
                counts.requests += value;
                let server_error = label(labels, "code").is_some_and(|c| c.starts_with('5'));
                let proxy_error = label(labels, "error").is_some_and(|e| !e.is_empty());
                if server_error || proxy_error {
                    counts.failed += value;
                }
            }
            "mesh_http_request_duration_seconds_bucket" => {
                let bound = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => match le.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                *counts.buckets.entry(Bound(bound)).or_default() += value;
            }
            _ => {}
        }
    }
}

/// `name{labels} value` → (name, labels, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let (name, labels) = head.split_once('{')?;
    Some((name, labels.strip_suffix('}')?, value.parse().ok()?))
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.trim_matches('"'))
    })
}

/// The rows for what happened between two scrapes `seconds` apart.
/// Traffic the proxy could not route to a version (no service, no
/// endpoints) is listed with an empty version, and only when there was some.
/// A service nobody has ever called (a client's own, say) is left out.
pub fn rows(before: &BTreeMap<Key, Counts>, after: &BTreeMap<Key, Counts>, seconds: f64) -> Vec<Row> {
    after
        .iter()
        .filter(|(_, now)| now.requests > 0.0)
        .map(|(key, now)| {
            let then = before.get(key).cloned().unwrap_or_default();
            // A proxy that restarted between scrapes would make deltas negative.
            let requests = (now.requests - then.requests).max(0.0);
            let failed = (now.failed - then.failed).clamp(0.0, requests);
            let buckets: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|(bound, count)| {
                    (bound.0, (count - then.buckets.get(bound).copied().unwrap_or(0.0)).max(0.0))
                })
                .collect();
            Row {
                service: key.0.clone(),
                version: key.1.clone(),
                requests_per_second: requests / seconds.max(1e-9),
                success: (requests > 0.0).then(|| 1.0 - failed / requests),
                p50_ms: quantile(&buckets, 0.5).map(|s| s * 1000.0),
                p99_ms: quantile(&buckets, 0.99).map(|s| s * 1000.0),
            }
        })
        .filter(|row| !row.version.is_empty() || row.requests_per_second > 0.0)
        .collect()
}

/// The `q` quantile from cumulative buckets, interpolated within the
/// bucket it falls in; the last finite bound when it falls past them.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(previous.0);
            }
            let within = cumulative - previous.1;
            let share = if within > 0.0 { (rank - previous.1) / within } else { 1.0 };
            return Some(previous.0 + (bound - previous.0) * share);
        }
        previous = (bound, cumulative);
    }
    Some(previous.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(v1_ok: u64, v1_failed: u64, v2_ok: u64) -> String {
        format!(
            "# TYPE mesh_http_requests_total counter\n\
             mesh_http_requests_total{{direction=\"outbound\",service=\"echo\",version=\"v1\",code=\"200\",error=\"\"}} {v1_ok}\n\
             mesh_http_requests_total{{direction=\"outbound\",service=\"echo\",version=\"v1\",code=\"502\",error=\"connect-failed\"}} {v1_failed}\n\
             mesh_http_requests_total{{direction=\"outbound\",service=\"echo\",version=\"v2\",code=\"200\",error=\"\"}} {v2_ok}\n\
             mesh_http_requests_total{{direction=\"inbound\",service=\"echo\",version=\"v1\",code=\"200\",error=\"\"}} 999\n\
             mesh_http_request_duration_seconds_bucket{{direction=\"outbound\",service=\"echo\",version=\"v1\",le=\"0.001\"}} {}\n\
             mesh_http_request_duration_seconds_bucket{{direction=\"outbound\",service=\"echo\",version=\"v1\",le=\"0.01\"}} {}\n\
             mesh_http_request_duration_seconds_bucket{{direction=\"outbound\",service=\"echo\",version=\"v1\",le=\"+Inf\"}} {}\n",
            v1_ok / 2,
            v1_ok + v1_failed,
            v1_ok + v1_failed
        )
    }

    #[test]
    fn two_scrapes_give_rates_success_and_quantiles() {
        let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
        add_scrape(&mut before, &scrape(100, 0, 10));
        add_scrape(&mut after, &scrape(300, 0, 30));
        // A second proxy, seen only in the second scrape.
        add_scrape(&mut after, &scrape(0, 10, 0));
        let rows = rows(&before, &after, 2.0);
        assert_eq!(rows.len(), 2);
        let v1 = &rows[0];
        assert_eq!((v1.service.as_str(), v1.version.as_str()), ("echo", "v1"));
        assert_eq!(v1.requests_per_second, 105.0); // (200 + 10) / 2 s; inbound is not counted
        assert!((v1.success.unwrap() - 200.0 / 210.0).abs() < 1e-9);
        let p50 = v1.p50_ms.unwrap();
        assert!(p50 > 1.0 && p50 < 10.0, "{p50}");
        let v2 = &rows[1];
        assert_eq!((v2.requests_per_second, v2.success, v2.p50_ms), (10.0, Some(1.0), None));
    }

    #[test]
    fn a_service_nobody_ever_called_is_left_out() {
        let quiet = "mesh_http_requests_total{direction=\"outbound\",service=\"traffic\",version=\"v1\",code=\"200\",error=\"\"} 0\n";
        let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
        for scrape in [quiet.to_owned(), scrape(100, 0, 10)] {
            add_scrape(&mut before, &scrape);
            add_scrape(&mut after, &scrape);
        }
        let listed: Vec<(String, String)> =
            rows(&before, &after, 2.0).into_iter().map(|r| (r.service, r.version)).collect();
        // echo stays listed while idle (it has had traffic); traffic, never called, does not.
        assert_eq!(listed, [("echo".to_owned(), "v1".to_owned()), ("echo".to_owned(), "v2".to_owned())]);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        // (cumulative buckets, q, expected)
        type Case<'a> = (&'a [(f64, f64)], f64, Option<f64>);
        let table: &[Case] = &[
            (&[(0.01, 50.0), (0.1, 100.0), (f64::INFINITY, 100.0)], 0.5, Some(0.01)),
            (&[(0.01, 0.0), (0.1, 100.0), (f64::INFINITY, 100.0)], 0.5, Some(0.055)),
            (&[(0.01, 0.0), (0.1, 90.0), (f64::INFINITY, 100.0)], 0.99, Some(0.1)),
            (&[(0.01, 0.0), (f64::INFINITY, 0.0)], 0.5, None),
        ];
        for (buckets, q, want) in table {
            let got = quantile(buckets, *q);
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{buckets:?} q={q}: {g} vs {w}"),
                _ => assert_eq!(got, *want, "{buckets:?} q={q}"),
            }
        }
    }
}
