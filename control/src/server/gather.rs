//! The mesh's traffic as a whole: this server's proxies' summaries plus
//! those every other server sharing the store holds for its own. What
//! `meshctl top` and `stat` show, and what the autoscaler decides on.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;

use super::forward::Peers;
use super::ControlPlane;
use crate::auth::principal::Principal;
use crate::traffic::{Counts, RowKey, Sum, Sums};

/// How long another server has to answer with its proxies' traffic.
const GATHER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Traffic summed over every server that answered.
pub struct Everywhere {
    pub sums: Sums,
    pub bounds: Vec<f64>,
    /// Proxies that sent a summary lately, on every server that answered.
    pub proxies: usize,
    /// The servers that did not answer, and why.
    pub left_out: Vec<String>,
}

/// The last `window_ms` of traffic for `asked.service` (or all), from this
/// server and, unless `asked.local` (or without `peers`: a server alone),
/// from the others in `caller`'s name.
pub async fn traffic(
    control: &ControlPlane,
    peers: Option<&Peers>,
    caller: &Principal,
    window_ms: u64,
    asked: &pb::TrafficRequest,
) -> Everywhere {
    let service = Some(asked.service.as_str()).filter(|s| !s.is_empty());
    let mut everywhere = {
        let now = super::monotonic_ms();
        let traffic = control.traffic.lock().expect("traffic lock");
        Everywhere {
            sums: traffic.sums(now, window_ms, service),
            bounds: traffic.latency_bounds().to_vec(),
            proxies: traffic.live_proxies(now),
            left_out: Vec::new(),
        }
    };
    let Some(peers) = peers.filter(|_| !asked.local) else {
        return everywhere;
    };
    let others = control.other_servers();
    let asked = pb::TrafficRequest { local: true, window_ms, ..asked.clone() };
    for (server, answer) in ask_others(peers, caller, others, asked).await {
        match answer {
            Ok(stats) => {
                everywhere.proxies += stats.proxies as usize;
                if everywhere.bounds.is_empty() {
                    everywhere.bounds = stats.latency_bounds_seconds.clone();
                }
                for row in stats.rows {
                    let (key, sum) = sum_of(row);
                    crate::traffic::add(&mut everywhere.sums, key, sum);
                }
            }
            Err(error) => everywhere.left_out.push(format!("{server}: {error}")),
        }
    }
    everywhere
}

/// A row another server summed, to add to this one's.
fn sum_of(row: pb::TrafficStat) -> (RowKey, Sum) {
    let key = RowKey { inbound: row.inbound, service: row.service, version: row.version };
    let counts = Counts::from_wire(
        row.requests,
        row.successes,
        &row.status_classes,
        row.mesh_errors,
        row.latency_buckets,
    );
    let requests_per_second = row.requests_per_second;
    (key, Sum { counts, in_flight: row.in_flight, proxies: row.proxies, requests_per_second })
}

/// Asks each of `servers` for its own proxies' traffic, all at once, in
/// the name of `caller`.
async fn ask_others(
    peers: &Peers,
    caller: &Principal,
    servers: Vec<String>,
    asked: pb::TrafficRequest,
) -> Vec<(String, Result<pb::TrafficStats, String>)> {
    let mut calls = tokio::task::JoinSet::new();
    for server in servers {
        let Some(channel) = peers.channel_to(&server) else {
            calls.spawn(async move { (server, Err("no channel to it".to_owned())) });
            continue;
        };
        let mut headers = tonic::codegen::http::HeaderMap::new();
        super::forward::name_caller(&mut headers, caller, &peers.trust_domain);
        let mut request = tonic::Request::new(asked.clone());
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
        request.set_timeout(GATHER_WITHIN);
        calls.spawn(async move {
            let answer =
                tokio::time::timeout(GATHER_WITHIN, AdminClient::new(channel).traffic(request)).await;
            let answer = match answer {
                Ok(Ok(reply)) => Ok(reply.into_inner()),
                Ok(Err(status)) => Err(status.message().to_owned()),
                Err(_) => Err(format!("no answer within {}", humantime::format_duration(GATHER_WITHIN))),
            };
            (server, answer)
        });
    }
    calls.join_all().await
}
