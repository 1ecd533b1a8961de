//! `meshctl top`: requests per second, success rate and latency per service
//! and version, from two scrapes of every connected proxy, which meshd
//! gathers (through each node's agent), so it works across hosts.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::jobs_client::JobsClient;
use serde_json::{json, Value};

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, interval: Duration, output: Output) -> Result<(), Failure> {
    let mut jobs = JobsClient::new(session.channel.clone());
    let before = scrape_all(&mut jobs).await?;
    let started = std::time::Instant::now();
    tokio::time::sleep(interval).await;
    let after = scrape_all(&mut jobs).await?;
    let rows = crate::top::rows(&before, &after, started.elapsed().as_secs_f64());
    let rows: Rows = rows.iter().map(top_row).collect();
    print_rows(output, &rows);
    Ok(())
}

/// Every proxy's metrics, summed; a proxy meshd could not scrape is
/// skipped (and said so on stderr).
async fn scrape_all(
    jobs: &mut JobsClient<tonic::transport::Channel>,
) -> Result<BTreeMap<crate::top::Key, crate::top::Counts>, Failure> {
    let scrapes = jobs.scrape_proxies(pb::Empty {}).await?.into_inner().proxies;
    let mut counts = BTreeMap::new();
    for scrape in scrapes {
        match scrape.error.is_empty() {
            true => crate::top::add_scrape(&mut counts, &scrape.metrics),
            false => eprintln!("meshctl: proxy {} left out: {}", scrape.proxy_id, scrape.error),
        }
    }
    Ok(counts)
}

fn top_row(row: &crate::top::Row) -> Vec<(&'static str, Value)> {
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    vec![
        ("service", json!(row.service)),
        ("version", json!(row.version)),
        ("requests_per_second", json!(round(row.requests_per_second, 1))),
        ("success_rate", json!(row.success.map(|s| round(s * 100.0, 2)))),
        ("p50_ms", json!(row.p50_ms.map(|v| round(v, 2)))),
        ("p99_ms", json!(row.p99_ms.map(|v| round(v, 2)))),
    ]
}
