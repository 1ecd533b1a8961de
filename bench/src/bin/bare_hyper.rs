//! The cheapest HTTP/1.1 forwarder hyper allows, as a floor for mesh-proxy:
//! one thread, each downstream connection paired with its own upstream
//! connection (no pool, no routing, no retries, no metrics), bodies
//! streamed through untouched. It tells how much of mesh-proxy's CPU per
//! request is hyper itself and how much is the mesh's features.
//!
//! `bare-hyper-forwarder --listen 127.0.0.1:PORT --backend 127.0.0.1:A --backend 127.0.0.1:B`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut backends: Vec<SocketAddr> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let addr = value.parse().unwrap_or_else(|_| usage(&format!("{flag}: `{value}` is not HOST:PORT")));
        match flag.as_str() {
            "--listen" => listen = Some(addr),
            "--backend" => backends.push(addr),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    let listen = listen.unwrap_or_else(|| usage("--listen is required"));
    if backends.is_empty() {
        usage("at least one --backend is required");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(serve(listen, backends));
}

fn usage(message: &str) -> ! {
    eprintln!("bare-hyper-forwarder: {message}");
    std::process::exit(2);
}

async fn serve(listen: SocketAddr, backends: Vec<SocketAddr>) {
    let listener = TcpListener::bind(listen).await.expect("bind");
    let next = Arc::new(AtomicUsize::new(0));
    let backends = Arc::new(backends);
    loop {
        let Ok((downstream, _)) = listener.accept().await else { continue };
        let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        tokio::spawn(async move {
            if let Err(e) = forward_connection(downstream, backend).await {
                eprintln!("bare-hyper-forwarder: {e}");
            }
        });
    }
}

/// Serves one downstream connection through one upstream connection.
async fn forward_connection(downstream: TcpStream, backend: SocketAddr) -> Result<(), String> {
    downstream.set_nodelay(true).map_err(|e| e.to_string())?;
    let upstream = TcpStream::connect(backend).await.map_err(|e| format!("connect {backend}: {e}"))?;
    upstream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = client::handshake(TokioIo::new(upstream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    // The server side hands over one request at a time, so the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let response = sender.send_request(request);
            drop(sender);
            let response: Response<Incoming> = response.await?;
            Ok::<_, hyper::Error>(response)
        }
    });
    server::Builder::new()
        .serve_connection(TokioIo::new(downstream), service)
        .await
        .map_err(|e| e.to_string())
}
