//! mesh-proxy: the mesh's sidecar. `mesh-proxy --config FILE` runs it on a
//! static routing table that reloads on SIGHUP and when the file changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mesh_proxy::listen::{self, http::Role};
use mesh_proxy::proxy::Proxy;
use mesh_proxy::reload;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(name = "mesh-proxy", version, about = "The mesh's sidecar proxy")]
struct Args {
    /// Static routing-table file (TOML); reloaded on SIGHUP and on change.
    #[arg(long)]
    config: PathBuf,
    /// Worker threads; the sidecar is meant to be small.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How long requests in flight may take to finish after SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread needs no work stealing: the current-thread scheduler avoids
    // its cross-thread wake-ups and atomics.
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(args.threads));
        builder
    };
    let runtime = builder.enable_all().build().expect("can start the async runtime");
    runtime.block_on(run(args))
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))
}

async fn run(args: Args) -> ExitCode {
    let (text, config) = match reload::read_config(&args.config).await {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("mesh-proxy: config rejected: {error}");
            return ExitCode::from(2);
        }
    };
    let listen = config.listen.clone();
    let upstreams = config.upstreams.clone();
    let protocols: Vec<_> = upstreams
        .iter()
        .map(|u| config.services.iter().find(|s| s.name == u.service).map(|s| s.protocol))
        .collect();
    let proxy = Proxy::new(config);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut serving = tokio::task::JoinSet::new();
    let mut bound = Vec::new();

    let result: Result<(), String> = async {
        if let Some(addr) = listen.outbound {
            let listener = bind("outbound", addr).await?;
            bound.push(format!("outbound={}", listener.local_addr().map_err(|e| e.to_string())?));
            serving.spawn(listen::http::serve(listener, proxy.clone(), Role::Outbound, shutdown_rx.clone()));
        }
        if let Some(addr) = listen.inbound {
            let listener = bind("inbound", addr).await?;
            bound.push(format!("inbound={}", listener.local_addr().map_err(|e| e.to_string())?));
            serving.spawn(listen::http::serve(listener, proxy.clone(), Role::Inbound, shutdown_rx.clone()));
        }
        for (upstream, protocol) in upstreams.iter().zip(protocols) {
            let listener = bind(&format!("upstream {}", upstream.service), upstream.listen).await?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            bound.push(format!("upstream.{}={local}", upstream.service));
            let name: Arc<str> = Arc::from(upstream.service.as_str());
            if protocol == Some(mesh_proxy::config::Protocol::Tcp) {
                serving.spawn(listen::tcp::serve(listener, proxy.clone(), name, shutdown_rx.clone()));
            } else {
                serving.spawn(listen::http::serve(
                    listener,
                    proxy.clone(),
                    Role::Upstream(name),
                    shutdown_rx.clone(),
                ));
            }
        }
        if let Some(addr) = listen.admin {
            let listener = bind("admin", addr).await?;
            bound.push(format!("admin={}", listener.local_addr().map_err(|e| e.to_string())?));
            tokio::spawn(listen::admin::serve(listener, proxy.clone()));
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        eprintln!("mesh-proxy: {error}");
        return ExitCode::from(1);
    }
    tokio::spawn(reload::watch(args.config.clone(), proxy.clone(), text, shutdown_rx.clone()));
    // Tests and scripts read this line to learn the bound ports.
    println!("mesh-proxy ready {}", bound.join(" "));
    tracing::info!(listeners = %bound.join(" "), version = proxy.table.load().version, "mesh-proxy ready");

    let mut terminate = signal(SignalKind::terminate()).expect("can watch SIGTERM");
    let mut interrupt = signal(SignalKind::interrupt()).expect("can watch SIGINT");
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
    tracing::info!(deadline = ?args.drain_timeout, "shutting down: no new connections, draining requests in flight");
    proxy.draining.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    let drained =
        tokio::time::timeout(args.drain_timeout, async { while serving.join_next().await.is_some() {} })
            .await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("drain deadline passed; exiting with requests still in flight"),
    }
    ExitCode::SUCCESS
}
