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

/// What every simulated proxy received, summed; and whether they send
/// traffic summaries.
#[derive(Default)]
pub struct Received {
    pub bytes: AtomicU64,
    pub updates: AtomicU64,
    /// Set: each proxy sends a traffic summary every second, as sidecars do.
    pub summaries: std::sync::atomic::AtomicBool,
}

/// The rows a busy sidecar's summary carries: its own service's inbound
/// and three services it calls, each moving every second.
const SUMMARY_ROWS: [(bool, &str, &str); 4] =
    [(true, "sim", "v1"), (false, "echo", "v1"), (false, "echo", "v2"), (false, "api", "v1")];

/// The `seconds`-th summary of a proxy serving and calling 50 requests a
/// second per row, 1 % of them failing.
fn summary(seconds: u64) -> pb::TrafficSummary {
    let requests = seconds * 50;
    let rows = SUMMARY_ROWS
        .iter()
        .map(|(inbound, service, version)| {
            let mut latency_buckets = vec![0; 15];
            latency_buckets[2] = requests * 9 / 10;
            latency_buckets[5] = requests - requests * 9 / 10;
            pb::TrafficRow {
                inbound: *inbound,
                service: (*service).to_owned(),
                version: (*version).to_owned(),
                requests,
                successes: requests - requests / 100,
                status_classes: vec![0, requests - requests / 100, 0, 0, requests / 100],
                mesh_errors: Default::default(),
                latency_buckets,
                in_flight: 3,
            }
        })
        .collect();
    let bounds = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    pb::TrafficSummary { latency_bounds_seconds: bounds, rows, peers: None }
}

/// Sends a summary each second while `received.summaries` is set, until
/// the stream is gone.
async fn send_summaries(tx: mpsc::Sender<pb::SubscribeRequest>, received: Arc<Received>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seconds = 0;
    loop {
        tick.tick().await;
        if !received.summaries.load(Ordering::Relaxed) {
            continue;
        }
        seconds += 1;
        let message = Some(Message::Traffic(summary(seconds)));
        if tx.send(pb::SubscribeRequest { message }).await.is_err() {
            return;
        }
    }
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
    let summaries = tokio::spawn(send_summaries(tx.clone(), received.clone()));
    let _stop_summaries = AbortOnDrop(summaries);
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

/// Ends a task when the stream it serves ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
