//! `meshctl top` and `meshctl stat`: traffic per service and version over
//! a recent window, from the summaries every proxy sends meshd each
//! second, so they answer at once and work across hosts.

use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use serde_json::{json, Value};

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;

/// The callers' view (outbound) of every service and version, with the
/// requests in flight at its instances (inbound).
pub async fn top(session: &Session, window: Duration, output: Output) -> Result<(), Failure> {
    let stats = traffic(session, window, "").await?;
    let in_flight = |service: &str, version: &str| -> i64 {
        stats
            .rows
            .iter()
            .filter(|r| r.inbound && r.service == service && r.version == version)
            .map(|r| r.in_flight)
            .sum()
    };
    let rows: Rows = stats
        .rows
        .iter()
        .filter(|r| !r.inbound)
        .map(|r| {
            let mut row = measured(r);
            row.insert(0, ("service", json!(r.service)));
            row.insert(1, ("version", json!(r.version)));
            row.push(("in_flight", json!(in_flight(&r.service, &r.version))));
            row
        })
        .collect();
    print_rows(output, &rows);
    Ok(())
}

/// Both directions of `service` (or of every service), by version, with
/// status classes and the mesh's own errors.
pub async fn stat(
    session: &Session,
    service: Option<String>,
    window: Duration,
    output: Output,
) -> Result<(), Failure> {
    let service = service.unwrap_or_default();
    let stats = traffic(session, window, &service).await?;
    if stats.rows.is_empty() && !service.is_empty() && output == Output::Table {
        eprintln!(
            "meshctl: no traffic to or from {service:?} in the last {}",
            humantime::format_duration(window)
        );
    }
    let rows: Rows = stats
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![
                ("service", json!(r.service)),
                ("version", json!(r.version)),
                ("direction", json!(if r.inbound { "inbound" } else { "outbound" })),
            ];
            row.extend(measured(r));
            row.push(("in_flight", json!(r.in_flight)));
            row.push(("status_classes", json!(classes(&r.status_classes))));
            let errors: Vec<String> =
                r.mesh_errors.iter().map(|(reason, n)| format!("{reason}={n}")).collect();
            row.push(("mesh_errors", json!(errors.join(","))));
            row.push(("proxies", json!(r.proxies)));
            row
        })
        .collect();
    print_rows(output, &rows);
    Ok(())
}

async fn traffic(session: &Session, window: Duration, service: &str) -> Result<pb::TrafficStats, Failure> {
    let request = pb::TrafficRequest {
        window_ms: window.as_millis() as u64,
        service: service.to_owned(),
        local: false,
    };
    let stats = AdminClient::new(session.channel.clone()).traffic(request).await?.into_inner();
    for server in &stats.left_out {
        eprintln!("meshctl: the traffic of proxies connected to {server} is left out");
    }
    Ok(stats)
}

/// The columns both commands show of a row.
fn measured(row: &pb::TrafficStat) -> Vec<(&'static str, Value)> {
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    let some = row.requests > 0;
    vec![
        ("requests", json!(row.requests)),
        ("requests_per_second", json!(round(row.requests_per_second, 1))),
        ("success_rate", json!(some.then(|| round(row.success_rate * 100.0, 2)))),
        ("p50_ms", json!(some.then(|| round(row.p50_seconds * 1000.0, 2)))),
        ("p99_ms", json!(some.then(|| round(row.p99_seconds * 1000.0, 2)))),
    ]
}

/// "2xx=120,5xx=3": the classes that had requests.
fn classes(counts: &[u64]) -> String {
    let named = counts.iter().enumerate().filter(|(_, n)| **n > 0);
    named.map(|(i, n)| format!("{}xx={n}", i + 1)).collect::<Vec<_>>().join(",")
}
