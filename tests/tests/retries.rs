//! The retry loop end to end, counted at the app: what may be sent again
//! (idempotent requests with a body the proxy kept), how often (attempts,
//! the request's whole deadline), and whose budget pays for it (each
//! service its own).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{http1, send, Answer};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::TempDir;

async fn call(proxy: &Proxy, method: &str, host: &str, body: usize) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{}/retry", proxy.outbound()))
        .header("host", host)
        .body(Full::new(Bytes::from(vec![b'x'; body])))
        .unwrap();
    send(&http1(), request).await.expect("an answer")
}

/// How many requests the app saw for one call.
async fn attempts_for(proxy: &Proxy, echo: &Echo, method: &str, body: usize) -> u64 {
    let before = echo.requests_seen().await;
    let answer = call(proxy, method, "echo", body).await;
    assert_eq!(answer.status, 500, "the app's own failure comes back once retries are spent");
    echo.requests_seen().await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_with_a_kept_body_are_sent_again() {
    let dir = TempDir::new("retries");
    let failing = Echo::start("v1", &["--fail-rate", "1"]);
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("echo")
        .line("retry = { attempts = 3, on = [\"5xx\"], budget_min_per_second = 1000 }")
        .line("breaker = { consecutive_failures = 60000 }")
        .endpoint(&failing.addr, "v1");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);

    // (method, body bytes, attempts the app sees)
    let cases = [
        ("GET", 0, 3),
        ("PUT", 10 * 1024, 3),
        // POST is not idempotent: the app may have acted on it.
        ("POST", 0, 1),
        ("POST", 10 * 1024, 1),
        ("PATCH", 0, 1),
        // Over 64 KiB the proxy streams the body and keeps no copy to replay.
        ("PUT", 100 * 1024, 1),
    ];
    for (method, body, expected) in cases {
        let attempts = attempts_for(&proxy, &failing, method, body).await;
        assert_eq!(attempts, expected, "{method} with {body} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_requests_deadline() {
    let dir = TempDir::new("retry-deadline");
    // Each attempt takes 300 ms and fails; ten are allowed, one second is.
    let slow = Echo::start("v1", &["--fail-rate", "1", "--latency", "300ms"]);
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("echo")
        .line("timeout = \"1s\"")
        .line("retry = { attempts = 10, on = [\"5xx\"], budget_min_per_second = 1000 }")
        .line("breaker = { consecutive_failures = 60000 }")
        .endpoint(&slow.addr, "v1");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let before = slow.requests_seen().await;
    let started = Instant::now();
    let answer = call(&proxy, "GET", "echo", 0).await;
    let took = started.elapsed();
    let attempts = slow.requests_seen().await - before;
    assert_eq!(answer.status, 504, "the deadline ends the request: {:?}", answer.header("x-mesh-error"));
    assert_eq!(answer.header("x-mesh-error"), Some("timeout"));
    assert!((2..=4).contains(&attempts), "attempts within one second of 300 ms each: {attempts}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "answered at the deadline: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_pays_for_its_own_retries() {
    let dir = TempDir::new("retry-budgets");
    let a = Echo::start("v1", &["--fail-rate", "1"]);
    let b = Echo::start("v1", &["--fail-rate", "1"]);
    let path = dir.path("proxy.toml");
    let spec = |name: &str, echo: &Echo| {
        ServiceSpec::new(name)
            .line("retry = { attempts = 3, on = [\"5xx\"], budget_ratio = 0.1, budget_min_per_second = 5 }")
            .line("breaker = { consecutive_failures = 60000 }")
            .endpoint(&echo.addr, "v1")
    };
    std::fs::write(&path, render(&[spec("alpha", &a), spec("beta", &b)], &[], None)).unwrap();
    let proxy = Proxy::start(&path);

    // alpha spends its budget: 200 failing calls may retry about 20 + 5/s.
    let mut exhausted = 0;
    for _ in 0..200 {
        let answer = call(&proxy, "GET", "alpha", 0).await;
        exhausted += u64::from(answer.header("x-mesh-error") == Some("retry-budget-exhausted"));
    }
    assert!(exhausted > 100, "alpha ran out of retries: {exhausted} of 200 calls were refused one");
    // beta's budget is untouched: its first calls still get both retries.
    let before = b.requests_seen().await;
    for _ in 0..3 {
        let answer = call(&proxy, "GET", "beta", 0).await;
        assert_ne!(answer.header("x-mesh-error"), Some("retry-budget-exhausted"), "beta has its own budget");
    }
    assert_eq!(b.requests_seen().await - before, 9, "three calls to beta, three attempts each");
    let metrics = scrape(&proxy.admin()).await;
    assert_eq!(metrics.present("mesh_http_retries_total", &[("service", "beta"), ("reason", "5xx")]), 6.0);
}
