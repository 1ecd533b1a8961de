//! A pooled HTTP client for driving load through a proxy, and a summary of
//! what came back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(HttpConnector::new())
}

pub fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

/// What one request got back.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `GET http://<proxy>/<path>` with `Host: <host>`.
pub async fn get(client: &HttpClient, proxy: &str, host: &str, path: &str) -> Result<Answer, String> {
    let request = Request::get(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    send(client, request).await
}

/// Sends `POST http://<proxy>/order` with a small JSON body.
pub async fn post_once(client: &HttpClient, proxy: &str, host: &str) -> Result<Answer, String> {
    let request = Request::post(format!("http://{proxy}/order"))
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"item":"book","quantity":1}"#)))
        .expect("valid request");
    send(client, request).await
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Result<Answer, String> {
    answer_of(client.request(request)).await
}

/// Waits (bounded) for a response and reads its whole body.
async fn answer_of<E: std::fmt::Debug>(
    response: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, E>>,
) -> Result<Answer, String> {
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .map_err(|_| "no answer within 20s".to_owned())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("body failed: {e}"))?.to_bytes();
    Ok(Answer { status: parts.status, headers: parts.headers, body })
}

/// Tallies of a load run.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub ok: u64,
    /// Status or transport error text -> count.
    pub failures: BTreeMap<String, u64>,
    pub by_version: BTreeMap<String, u64>,
    pub by_instance: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, result: &Result<Answer, String>) {
        match result {
            Ok(answer) if answer.status == StatusCode::OK => {
                self.ok += 1;
                let version = answer.header("x-version").unwrap_or("?").to_owned();
                *self.by_version.entry(version).or_default() += 1;
                let instance = answer.header("x-instance").unwrap_or("?").to_owned();
                *self.by_instance.entry(instance).or_default() += 1;
            }
            Ok(answer) => {
                let key = format!("{} {}", answer.status, answer.header("x-mesh-error").unwrap_or(""));
                *self.failures.entry(key).or_default() += 1;
            }
            Err(error) => *self.failures.entry(error.clone()).or_default() += 1,
        }
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Answers counted by version.
    pub fn answered(&self) -> u64 {
        self.by_version.values().sum()
    }

    pub fn share(&self, version: &str) -> f64 {
        let total: u64 = self.by_version.values().sum();
        100.0 * *self.by_version.get(version).unwrap_or(&0) as f64 / total.max(1) as f64
    }
}

/// Sends `total` GETs with `concurrency` in flight and tallies the answers.
pub async fn closed_loop(proxy: &str, host: &str, total: u64, concurrency: u64) -> Tally {
    closed_loop_path(proxy, host, "/load", total, concurrency).await
}

/// `closed_loop` of GETs to `path`.
pub async fn closed_loop_path(proxy: &str, host: &str, path: &str, total: u64, concurrency: u64) -> Tally {
    let client = http1();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, proxy, host) = (client.clone(), next.clone(), proxy.to_owned(), host.to_owned());
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                tally.add(&get(&client, &proxy, &host, &path).await);
            }
            tally
        }));
    }
    merge(tasks).await
}

/// Sends GETs at a steady `rate` per second for `duration` (open loop: a
/// slow answer does not delay the next request) and tallies the answers.
pub async fn steady_rate(proxy: &str, host: &str, rate: u32, duration: Duration) -> Tally {
    let client = http1();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        ticker.tick().await;
        let (client, proxy, host) = (client.clone(), proxy.to_owned(), host.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            tally.add(&get(&client, &proxy, &host, "/steady").await);
            tally
        }));
    }
    merge(tasks).await
}

async fn merge(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await.expect("load task");
        total.ok += tally.ok;
        for (k, v) in tally.failures {
            *total.failures.entry(k).or_default() += v;
        }
        for (k, v) in tally.by_version {
            *total.by_version.entry(k).or_default() += v;
        }
        for (k, v) in tally.by_instance {
            *total.by_instance.entry(k).or_default() += v;
        }
    }
    total
}

/// Sends one request over a fresh HTTP/2 prior-knowledge connection to
/// `connect_to`, keeping the request's own authority (as gRPC clients do).
pub async fn h2_prior_knowledge(connect_to: &str, request: Request<Full<Bytes>>) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(connect_to).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    answer_of(sender.send_request(request)).await
}

/// Load that runs in the background until stopped, counting every answer.
pub struct Background {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Background {
    /// `concurrency` callers sending GETs back to back, each bounded to
    /// five minutes so that a forgotten load cannot run forever.
    pub fn start(proxy: &str, host: &str, concurrency: u32) -> Background {
        Background::spawn(proxy, host, concurrency, false)
    }

    /// Like `start` with POSTs carrying a body: requests a proxy must not
    /// retry once sent, so a failure the mesh causes cannot hide behind a
    /// retry.
    pub fn posts(proxy: &str, host: &str, concurrency: u32) -> Background {
        Background::spawn(proxy, host, concurrency, true)
    }

    fn spawn(proxy: &str, host: &str, concurrency: u32, post: bool) -> Background {
        let client = http1();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = (0..concurrency)
            .map(|_| {
                let (client, proxy, host, stop, sent) =
                    (client.clone(), proxy.to_owned(), host.to_owned(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                        let answer = if post {
                            post_once(&client, &proxy, &host).await
                        } else {
                            get(&client, &proxy, &host, "/background").await
                        };
                        tally.add(&answer);
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tally
                })
            })
            .collect();
        Background { stop, sent, tasks }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `more` further requests have been answered.
    pub async fn wait_for(&self, more: u64) {
        let target = self.sent() + more;
        crate::eventually("background load makes progress", Duration::from_secs(60), || async move {
            (self.sent() >= target).then_some(())
        })
        .await;
    }

    pub async fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        merge(self.tasks).await
    }
}

/// How far, in percentage points, the observed share of `n` independent
/// weighted picks may stray from `percent`: five standard deviations of the
/// binomial (a correct split fails this about once in two million checks).
/// A weight of 0 or 100 allows no stray pick at all.
pub fn split_tolerance(n: u64, percent: f64) -> f64 {
    let p = percent / 100.0;
    5.0 * 100.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::split_tolerance;

    #[test]
    fn split_tolerance_is_five_binomial_deviations() {
        // (picks, percent, tolerance in points)
        for (n, percent, want) in
            [(4_000, 50.0, 3.95), (4_000, 10.0, 2.37), (100, 10.0, 15.0), (4_000, 0.0, 0.0)]
        {
            let got = split_tolerance(n, percent);
            assert!((got - want).abs() < 0.01, "{n} picks at {percent}%: {got}");
        }
    }
}
