//! `meshctl status`: the current version and each proxy's place in it.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use serde_json::json;

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{ago, print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, output: Output, peers: bool) -> Result<(), Failure> {
    let status = AdminClient::new(session.channel.clone()).status(pb::Empty {}).await?.into_inner();
    if peers {
        print_rows(output, &peer_rows(&status));
        return Ok(());
    }
    if output == Output::Table {
        let state = if status.converged { "converged" } else { "converging" };
        println!("version {} ({state})", status.version);
        if status.leader != status.server {
            let leader = if status.leader.is_empty() { "being elected" } else { status.leader.as_str() };
            println!("server {} (leader: {leader})", status.server);
        }
    }
    print_rows(output, &status_rows(&status));
    Ok(())
}

/// One row per proxy and peer it reaches for a service set to QUIC.
fn peer_rows(status: &pb::Convergence) -> Rows {
    let mut rows = Vec::new();
    for proxy in &status.proxies {
        for peer in &proxy.peers {
            let transport = if peer.transport() == pb::Transport::Quic { "quic" } else { "tcp" };
            rows.push(vec![
                ("proxy_id", json!(proxy.proxy_id)),
                ("service", json!(peer.service)),
                ("peer", json!(peer.addr)),
                ("transport", json!(transport)),
                ("why", json!(peer.reason)),
            ]);
        }
    }
    rows
}

fn status_rows(status: &pb::Convergence) -> Rows {
    status
        .proxies
        .iter()
        .map(|p| {
            vec![
                ("proxy_id", json!(p.proxy_id)),
                ("service", json!(p.service)),
                ("connected", json!(p.connected)),
                ("stalled", json!(p.stalled)),
                ("acked_version", json!(p.acked_version)),
                ("lag", json!(status.version.saturating_sub(p.acked_version))),
                ("last_contact_ms_ago", ago(p.last_contact_unix_ms)),
                ("rejected_version", json!(p.rejected_version)),
                ("rejected_reason", json!(p.rejected_reason)),
                ("server", json!(p.server)),
                ("quic_peers", json!(quic_peers(p))),
            ]
        })
        .collect()
}

/// How many of the proxy's QUIC-service peers it reaches over QUIC now,
/// as "2/3"; "" when it calls no service over QUIC.
fn quic_peers(proxy: &pb::ProxyStatus) -> String {
    if proxy.peers.is_empty() {
        return String::new();
    }
    let over_quic = proxy.peers.iter().filter(|p| p.transport() == pb::Transport::Quic).count();
    format!("{over_quic}/{}", proxy.peers.len())
}
