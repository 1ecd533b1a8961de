//! Simulated proxies for the control-plane benchmarks: each a real gRPC
//! discovery stream on its own TLS connection, acking every update at
//! once; and the measurements the benchmarks share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::mesh::v1 as pb;

/// What every control-plane benchmark takes.
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Where meshd (and for the HA benchmark mesh-proxy) is.
    #[arg(long)]
    pub bin_dir: std::path::PathBuf,
    /// Small numbers: checks that the benchmark works.
    #[arg(long)]
    pub quick: bool,
    /// Simulated proxies.
    #[arg(long, default_value_t = 1000)]
    pub proxies: u32,
    /// Split changes timed from the API call to the last ack.
    #[arg(long, default_value_t = 50)]
    pub changes: u32,
}
use pb::admin_client::AdminClient;
use pb::discovery_client::DiscoveryClient;
use pb::subscribe_request::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// What every simulated proxy received, summed.
#[derive(Default)]
pub struct Received {
    pub bytes: AtomicU64,
    pub updates: AtomicU64,
}

/// One simulated proxy: its own TLS connection with a client certificate,
/// as a sidecar has; subscribes and acks every update at once.
pub async fn simulated_proxy(
    server: String,
    tls: mesh_client::ClientTls,
    id: u32,
    received: Arc<Received>,
) -> Result<(), String> {
    let channel = mesh_client::connect(&server, &tls, Duration::from_secs(10)).await?;
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello { proxy_id: format!("sim-{id}"), service: "sim".into(), ..Default::default() };
    let _ = tx.send(pb::SubscribeRequest { message: Some(Message::Hello(hello)) }).await;
    let mut updates = DiscoveryClient::new(channel)
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    while let Some(update) = updates.message().await.map_err(|e| e.to_string())? {
        received.bytes.fetch_add(prost::Message::encoded_len(&update) as u64, Ordering::Relaxed);
        // A large update comes in parts; a proxy acks it after the last.
        if update.more {
            continue;
        }
        received.updates.fetch_add(1, Ordering::Relaxed);
        let ack = pb::Ack { version: update.version, applied: true, ..Default::default() };
        if tx.send(pb::SubscribeRequest { message: Some(Message::Ack(ack)) }).await.is_err() {
            break;
        }
    }
    Ok(())
}

pub fn rss_mb(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits until `proxies` proxies are connected and have acked `version`.
pub async fn wait_all_acked(admin: &mut AdminClient<Channel>, version: u64, proxies: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = admin.status(pb::Empty {}).await.expect("status").into_inner();
        let current = status.proxies.iter().filter(|p| p.connected && p.acked_version >= version).count();
        if current as u32 == proxies {
            return;
        }
        assert!(Instant::now() < deadline, "only {current} of {proxies} proxies acked version {version}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
