//! `meshctl top`: requests per second, success rate and latency per service
//! and version, from two scrapes of every connected proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use serde_json::{json, Value};

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::scrape::scrape;
use crate::session::Session;

pub async fn run(session: &Session, interval: Duration, output: Output) -> Result<(), Failure> {
    let mut admin = AdminClient::new(session.channel.clone());
    let proxies = admin.list_proxies(pb::Empty {}).await?.into_inner().proxies;
    let addrs: Vec<String> = proxies
        .into_iter()
        .filter(|p| p.connected && !p.admin_addr.is_empty())
        .map(|p| p.admin_addr)
        .collect();
    let before = scrape_all(&addrs).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(interval).await;
    let after = scrape_all(&addrs).await;
    let rows = crate::top::rows(&before, &after, started.elapsed().as_secs_f64());
    let rows: Rows = rows.iter().map(top_row).collect();
    print_rows(output, &rows);
    Ok(())
}

/// Every proxy's metrics, summed; a proxy that does not answer within two
/// seconds is skipped. One after another: scrapes are small and local.
async fn scrape_all(addrs: &[String]) -> BTreeMap<crate::top::Key, crate::top::Counts> {
    let mut counts = BTreeMap::new();
    for addr in addrs {
        if let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(2), scrape(addr)).await {
            crate::top::add_scrape(&mut counts, &text);
        }
    }
    counts
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
