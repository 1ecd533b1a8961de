//! Routes and rate limits: `meshctl apply -f FILE`, `meshctl get routes
//! [SERVICE]`, `meshctl delete route|rate-limit`. A file is checked here
//! first (line and field of the first mistake), then by meshd, which
//! applies all of it or none.

use mesh_common::traffic_policy::file::parse_traffic_policy;
use mesh_common::traffic_policy::{percent_text, Bucket, MirrorTarget, RateLimitSpec, RouteSpec};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use mesh_proto::traffic_policy::{rate_limit_from_pb, route_from_pb};
use serde_json::{json, Value};

use crate::cli::{DeleteCommand, Output, Wait};
use crate::commands::traffic::wait_for;
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;

/// The file's text once it reads and checks; an error names the file,
/// the line and the field.
pub fn read_file(file: &std::path::Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(file).map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
    parse_traffic_policy(&text).map_err(|e| Failure(format!("{}: {e}", file.display()), 2))?;
    Ok(text)
}

pub async fn apply(session: &Session, file: &std::path::Path, wait: Wait) -> Result<(), Failure> {
    let text = read_file(file)?;
    let summary = parse_traffic_policy(&text).map_err(|e| Failure(e.to_string(), 2))?;
    let mut admin = AdminClient::new(session.channel.clone());
    let version = admin.apply_traffic_policy(pb::TrafficPolicyText { text }).await?.into_inner().version;
    for (service, routes) in &summary.routes {
        println!("service {service}: {} route(s) applied", routes.len());
    }
    for service in summary.rate_limits.keys() {
        println!("service {service}: rate limit applied");
    }
    println!("version {version}");
    wait_for(&mut admin, version, &wait).await
}

pub async fn delete(session: &Session, what: DeleteCommand) -> Result<(), Failure> {
    let mut admin = AdminClient::new(session.channel.clone());
    let (version, wait) = match what {
        DeleteCommand::Route { service, name, wait } => {
            let request = pb::RouteName { service: service.clone(), name: name.clone() };
            let version = admin.delete_route(request).await?.into_inner().version;
            println!("route {name} of {service} deleted");
            (version, wait)
        }
        DeleteCommand::RateLimit { service, wait } => {
            let version = admin
                .delete_rate_limit(pb::ServiceName { service: service.clone() })
                .await?
                .into_inner()
                .version;
            println!("rate limit of {service} deleted");
            (version, wait)
        }
    };
    wait_for(&mut admin, version, &wait).await
}

pub async fn list(session: &Session, service: Option<String>, output: Output) -> Result<(), Failure> {
    let mut admin = AdminClient::new(session.channel.clone());
    let request = pb::ServiceName { service: service.unwrap_or_default() };
    let list = admin.list_traffic_policy(request).await?.into_inner();
    let mut rows: Rows = Vec::new();
    for entry in &list.services {
        for route in &entry.routes {
            let route = route_from_pb(route).map_err(|e| Failure(e, 1))?;
            rows.push(route_row(&entry.service, &route, output));
        }
        if let Some(limit) = &entry.rate_limit {
            rows.extend(limit_rows(&entry.service, &rate_limit_from_pb(limit), output));
        }
    }
    print_rows(output, &rows);
    Ok(())
}

fn route_row(service: &str, route: &RouteSpec, output: Output) -> Vec<(&'static str, Value)> {
    if output == Output::Json {
        return vec![("service", json!(service)), ("kind", json!("route")), ("route", json!(route))];
    }
    let timeout = route.timeout_ms.map(|ms| format!("{ms}ms")).unwrap_or_default();
    let retry = route.retry.as_ref().map_or_else(String::new, |retry| {
        let on: Vec<&str> = retry.on.iter().map(|c| c.as_str()).collect();
        format!("{}× on {}", retry.attempts, on.join(","))
    });
    let mirror = route.mirror.as_ref().map_or_else(String::new, |mirror| {
        let target = match &mirror.target {
            MirrorTarget::Version(v) => v.clone(),
            MirrorTarget::Service(s) => format!("service {s}"),
        };
        format!("{} % to {target}, ≤{} in flight", percent_text(mirror.per_million), mirror.max_in_flight)
    });
    let mut faults = Vec::new();
    if let Some(fault) = &route.fault {
        if let Some(delay) = &fault.delay {
            faults.push(format!("delay {}ms {} %", delay.duration_ms, percent_text(delay.per_million)));
        }
        if let Some(abort) = &fault.abort {
            let status = match abort.grpc_status {
                Some(code) => format!("{} (grpc {code})", abort.status),
                None => abort.status.to_string(),
            };
            faults.push(format!("abort {status} {} %", percent_text(abort.per_million)));
        }
    }
    vec![
        ("service", json!(service)),
        ("route", json!(route.name)),
        ("match", json!(route.match_text())),
        ("backends", json!(route.backends_text())),
        ("timeout", json!(timeout)),
        ("retry", json!(retry)),
        ("mirror", json!(mirror)),
        ("fault", json!(faults.join(", "))),
    ]
}

/// A rate limit in a table: one row per bucket.
fn limit_rows(service: &str, limit: &RateLimitSpec, output: Output) -> Vec<Vec<(&'static str, Value)>> {
    if output == Output::Json {
        return vec![vec![
            ("service", json!(service)),
            ("kind", json!("rate_limit")),
            ("rate_limit", json!(limit)),
        ]];
    }
    let mut buckets: Vec<(String, Bucket)> = Vec::new();
    buckets.extend(limit.overall.map(|b| ("all callers".to_owned(), b)));
    buckets.extend(limit.per_caller.map(|b| ("each caller".to_owned(), b)));
    buckets.extend(limit.overrides.iter().map(|(caller, b)| (caller.clone(), *b)));
    buckets
        .into_iter()
        .map(|(who, b)| {
            vec![
                ("service", json!(service)),
                ("route", json!("(rate limit)")),
                ("match", json!(who)),
                ("backends", json!("")),
                ("timeout", json!("")),
                ("retry", json!("")),
                ("mirror", json!("")),
                ("fault", json!(format!("{}/s, burst {}", b.requests_per_second, b.burst))),
            ]
        })
        .collect()
}
