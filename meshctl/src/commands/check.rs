//! `meshctl check`: identity health of the CA, meshd, nodes and proxies;
//! exits 4 when something needs attention.

use std::time::{Duration, SystemTime};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use serde_json::json;

use crate::cli::Output;
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::Session;
use mesh_proto::mesh::v1::jobs_client::JobsClient;

pub async fn run(session: &Session, warn_within: Duration, output: Output) -> Result<(), Failure> {
    let bundle = IdentityClient::new(session.channel.clone()).trust_bundle(pb::Empty {}).await?.into_inner();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut rows: Rows = Vec::new();
    let mut warnings = 0;
    let mut row = |what: &str,
                   name: String,
                   root: String,
                   bundle_version: u64,
                   expires: Option<u64>,
                   within: Duration,
                   problem: Option<String>| {
        let left = expires.map(|e| e.saturating_sub(now));
        let status = match (problem, left) {
            (Some(why), _) => why,
            (None, None) => "no certificate".to_owned(),
            (None, Some(left)) if left <= within.as_secs() => "WARN: expires soon".to_owned(),
            (None, Some(_)) => "ok".to_owned(),
        };
        warnings += usize::from(status != "ok");
        rows.push(vec![
            ("what", json!(what)),
            ("name", json!(name)),
            ("root", json!(root)),
            ("bundle_version", json!(bundle_version)),
            ("expires_unix", json!(expires)),
            (
                "expires_in",
                json!(left.map(|l| humantime::format_duration(Duration::from_secs(l)).to_string())),
            ),
            ("status", json!(status)),
        ]);
    };
    let roots = mesh_client::pem::certificate_summaries(&bundle.roots_pem);
    let trusted: Vec<String> = roots.iter().map(|r| r.serial.clone()).collect();
    for root in roots {
        // The root that signs; another is only trusted (a rotation is under way).
        let signs = if root.serial == bundle.signer_serial { " (signs)" } else { " (trusted)" };
        row(
            "ca",
            root.subject,
            format!("{}{signs}", root.serial),
            bundle.version,
            Some(root.expires_unix),
            warn_within * 10,
            None,
        );
    }
    // meshd's own certificate, as a new connection meets it.
    let tls = session.credentials.tls()?;
    match mesh_client::channel::server_certificate(&session.server, &tls, Duration::from_secs(3)).await {
        Ok(der) => {
            let (root, expires) = issued_by(&der, &bundle.roots_pem);
            row("server", session.server.clone(), root, bundle.version, expires, warn_within, None);
        }
        Err(error) => row(
            "server",
            session.server.clone(),
            String::new(),
            0,
            None,
            warn_within,
            Some(format!("FAILED: {error}")),
        ),
    }
    let nodes = AdminClient::new(session.channel.clone()).list_nodes(pb::Empty {}).await?.into_inner().nodes;
    for node in &nodes {
        let name = node.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let expires =
            (node.certificate_expires_unix_ms > 0).then_some(node.certificate_expires_unix_ms / 1000);
        let root = node.certificate_root.clone();
        let problem = if !node.up {
            Some("DOWN: no heartbeat within the TTL".to_owned())
        } else if !root.is_empty() && !trusted.contains(&root) {
            Some(format!("BEHIND: its certificate is from root {root}, which the bundle no longer holds"))
        } else {
            None
        };
        row("node", name, root, node.bundle_version, expires, warn_within, problem);
    }
    let proxies =
        AdminClient::new(session.channel.clone()).list_proxies(pb::Empty {}).await?.into_inner().proxies;
    // meshd gathers every proxy's metrics (through each node's agent).
    let scrapes = JobsClient::new(session.channel.clone()).scrape_proxies(pb::Empty {}).await?.into_inner();
    let metrics: std::collections::HashMap<String, String> =
        scrapes.proxies.into_iter().map(|s| (s.proxy_id, s.metrics)).collect();
    for proxy in proxies.iter().filter(|p| p.connected && !p.admin_addr.is_empty()) {
        let expires = metrics.get(&proxy.proxy_id).and_then(|text| {
            text.lines().find_map(|line| {
                let value = line.strip_prefix("mesh_identity_cert_expiry_timestamp_seconds ")?;
                value.trim().parse::<f64>().ok().map(|v| v as u64)
            })
        });
        let (id, root) = (proxy.proxy_id.clone(), proxy.certificate_root.clone());
        // A proxy whose certificate no trusted root vouches for fails
        // every handshake until it renews; a stalled one may be next.
        let behind = if !root.is_empty() && !trusted.contains(&root) {
            Some(format!("BEHIND: its certificate is from root {root}, which the bundle no longer holds"))
        } else if proxy.stalled {
            Some("BEHIND: stalled: it has not acked the latest update".to_owned())
        } else {
            None
        };
        row("proxy", id, root, proxy.bundle_version, expires, warn_within, behind);
    }
    print_rows(output, &rows);
    if warnings > 0 {
        return Err(Failure(format!("{warnings} certificate(s) need attention"), 4));
    }
    Ok(())
}

/// The serial of the root among `roots_pem` that signed `der`, and its
/// expiry (Unix seconds).
fn issued_by(der: &[u8], roots_pem: &str) -> (String, Option<u64>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return (String::new(), None) };
    let expires = Some(cert.validity().not_after.timestamp().max(0) as u64);
    let root = mesh_client::pem::signing_root(&cert, roots_pem).unwrap_or_default();
    (root, expires)
}
