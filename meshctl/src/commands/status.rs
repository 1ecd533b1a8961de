//! `meshctl status`: the current version and each proxy's place in it.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use serde_json::json;

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{ago, print_rows, Rows};
use crate::session::Session;

pub async fn run(session: &Session, output: Output) -> Result<(), Failure> {
    let status = AdminClient::new(session.channel.clone()).status(pb::Empty {}).await?.into_inner();
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
            ]
        })
        .collect()
}
