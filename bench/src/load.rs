//! An open-loop HTTP/1.1 load generator: requests are scheduled at a fixed
//! rate and each latency is measured from its scheduled time, not from
//! when a connection happened to be free, so a stalled server shows up in
//! the tail instead of silently slowing the load (no coordinated omission).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct OpenLoop {
    pub target: String,
    pub host: String,
    pub rate: u32,
    pub connections: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Runs the load on the current thread and returns what it measured.
pub async fn open_loop(load: OpenLoop) -> Result<LoadResult, String> {
    let total = u64::from(load.rate) * load.duration.as_millis() as u64 / 1000;
    let interval = Duration::from_secs(1) / load.rate;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..load.connections {
        let stream =
            TcpStream::connect(&load.target).await.map_err(|e| format!("connect {}: {e}", load.target))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::task::spawn_local(connection);
        workers.push(tokio::task::spawn_local(worker(sender, rx.clone(), load.host.clone())));
    }
    // The schedule runs on its own thread: tokio's timer has a 1 ms grain,
    // which at 2000 requests/s would bunch requests in pairs and add up to
    // a millisecond to every latency.
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(10);
        for i in 0..total {
            let scheduled = start + interval * i as u32;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send(scheduled).is_err() {
                break;
            }
        }
    });
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut errors = 0;
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    for worker in workers {
        let (h, e) = worker.await.map_err(|e| e.to_string())?;
        histogram.add(h).map_err(|e| e.to_string())?;
        errors += e;
    }
    Ok(LoadResult {
        requests: histogram.len(),
        errors,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
    })
}

async fn worker(
    mut sender: http1::SendRequest<Empty<Bytes>>,
    schedule: Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
    host: String,
) -> (Histogram<u64>, u64) {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut errors = 0;
    loop {
        let Some(scheduled) = schedule.lock().await.recv().await else { break };
        let request = Request::get("/").header("host", &host).body(Empty::new()).expect("valid request");
        let ok = match sender.send_request(request).await {
            Ok(response) => response.status().is_success() && response.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            let _ = histogram.record(scheduled.elapsed().as_micros().max(1) as u64);
        } else {
            errors += 1;
            if sender.ready().await.is_err() {
                break;
            }
        }
    }
    (histogram, errors)
}
