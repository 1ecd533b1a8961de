//! mesh-echo: the workload used by tests, the demo and benchmarks.
//!
//! It answers every request with 200, `x-version` and `x-instance` headers
//! and a small JSON echo of the request, over HTTP/1.1, h2c and gRPC on one
//! port. Knobs (latency, failure rate, hanging, readiness) are set by flags
//! and changed at run time with `POST /_echo/config`.

mod grpc;
mod http_echo;
mod knobs;
mod traffic;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::knobs::Knobs;

#[derive(Parser, Debug)]
#[command(name = "mesh-echo", about = "Echo workload for the mesh's tests, demo and benchmarks")]
struct Args {
    /// Port to listen on (0 picks a free one); defaults to $PORT.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Sent back in `x-version` on every answer.
    #[arg(long = "version", env = "MESH_VERSION", default_value = "v1")]
    app_version: String,
    /// Sent back in `x-instance`; defaults to the listening address.
    #[arg(long, env = "MESH_INSTANCE")]
    instance: Option<String>,
    /// A message included in every JSON answer.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Delay added to every answer, e.g. `50ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    latency: Duration,
    /// Share of requests (0..=1) answered with 500.
    #[arg(long, value_parser = parse_fail_rate, default_value_t = 0.0)]
    fail_rate: f64,
    /// Accept requests and never answer them.
    #[arg(long)]
    hang: bool,
    /// `/ready` answers 503.
    #[arg(long)]
    not_ready: bool,
    /// `/live` answers 503.
    #[arg(long)]
    not_live: bool,
    /// Also call this service through the sidecar (`$MESH_OUTBOUND`), as a traffic generator.
    #[arg(long, value_name = "SERVICE")]
    traffic: Option<String>,
    /// Requests per second for `--traffic`.
    #[arg(long, default_value_t = 20)]
    traffic_rate: u32,
    /// The sidecar's outbound listener, for `--traffic`.
    #[arg(long, env = "MESH_OUTBOUND", default_value = "127.0.0.1:4140")]
    outbound: String,
}

fn parse_fail_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|e| format!("{e}"))?;
    knobs::check_fail_rate(rate)
}

/// What every connection handler shares.
pub struct Shared {
    pub version: String,
    pub instance: String,
    pub message: String,
    pub knobs: ArcSwap<Knobs>,
    pub stats: Stats,
}

/// Counters that let tests see what reached the app: `GET /_echo/stats`.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let listener = match TcpListener::bind(SocketAddr::new(args.host, args.port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("mesh-echo: cannot listen on {}:{}: {e}", args.host, args.port);
            std::process::exit(1);
        }
    };
    let local = listener.local_addr().expect("bound listener has an address");
    let shared = Arc::new(Shared {
        version: args.app_version,
        instance: args.instance.unwrap_or_else(|| local.to_string()),
        message: args.message,
        knobs: ArcSwap::from_pointee(Knobs {
            latency: args.latency,
            fail_rate: args.fail_rate,
            hang: args.hang,
            not_ready: args.not_ready,
            not_live: args.not_live,
        }),
        stats: Stats::default(),
    });
    // Tests and scripts read this line to learn the port.
    println!("mesh-echo listening on {local} version={}", shared.version);
    let _ = std::io::Write::flush(&mut std::io::stdout());

    if let Some(service) = args.traffic {
        tokio::spawn(traffic::run(args.outbound, service, args.traffic_rate));
    }
    let grpc = grpc::routes(shared.clone());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("mesh-echo: accept failed: {e}");
                    continue;
                }
            },
            _ = terminate.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let grpc = grpc.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                http_echo::handle(shared.clone(), grpc.clone(), request)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
