//! The retry loop end to end, counted at the app: what may be sent again
//! (idempotent requests with a body the proxy kept), how often (attempts,
//! the request's whole deadline), whose budget pays for it (each service
//! its own), and answers cut between their headers and their body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// What the endpoint below does after the headers.
#[derive(Clone, Copy)]
enum Then {
    /// Closes the connection after a pause: an app or a peer sidecar that
    /// died between an answer's headers and its body.
    Close(Duration),
    /// Sends the body after a pause.
    Body(Duration),
}

/// An endpoint that answers every request with headers promising five bytes,
/// then does what `then` says.
struct CutAfterHeaders {
    addr: String,
    cut: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutAfterHeaders {
    async fn start(then: Then) -> CutAfterHeaders {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicU64::new(0));
        let counter = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let promise = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
                    if stream.write_all(promise).await.is_err() || stream.flush().await.is_err() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    match then {
                        Then::Close(pause) => tokio::time::sleep(pause).await,
                        Then::Body(pause) => {
                            tokio::time::sleep(pause).await;
                            let _ = stream.write_all(b"hello").await;
                            let _ = stream.shutdown().await;
                        }
                    }
                });
            }
        });
        CutAfterHeaders { addr, cut, task }
    }

    fn cut(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for CutAfterHeaders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_after_its_headers_goes_again_when_it_may() {
    // Cut at once (the proxy may see the break with the headers) and after
    // 50 ms (it sees the headers alone first, and waits for the body). The
    // echo answers more slowly, so that the balancer, which favours the
    // fastest endpoint, keeps trying the cutter first.
    for (pause, latency) in [(Duration::ZERO, "5ms"), (Duration::from_millis(50), "80ms")] {
        cut_answers_go_again_when_they_may(Then::Close(pause), latency).await;
    }
}

async fn cut_answers_go_again_when_they_may(then: Then, echo_latency: &str) {
    let dir = TempDir::new("retry-cut");
    let cutter = CutAfterHeaders::start(then).await;
    let echo = Echo::start("v1", &["--latency", echo_latency]);
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("echo")
        .line("retry = { attempts = 3, on = [\"connect-failure\"], budget_min_per_second = 1000 }")
        .line("breaker = { consecutive_failures = 60000 }")
        .endpoint(&cutter.addr, "v1")
        .endpoint(&echo.addr, "v1");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let client = http1();
    let request = |method: &str| {
        Request::builder()
            .method(method)
            .uri(format!("http://{}/cut", proxy.outbound()))
            .header("host", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // GET may go again: every answer arrives whole, from the echo, however
    // many the cutter cut.
    let mut sent = 0;
    while cutter.cut() < 5 && sent < 400 {
        let answer = send(&client, request("GET")).await;
        let answer = answer.unwrap_or_else(|e| panic!("GET {sent} after {} cut answers: {e}", cutter.cut()));
        assert_eq!(answer.status, 200, "GET {sent}: {:?}", answer.header("x-mesh-error"));
        assert!(!answer.body.is_empty(), "GET {sent} came back without the echo's body");
        sent += 1;
    }
    assert!(
        cutter.cut() >= 5,
        "the balancer sent only {} of {sent} GETs to the cutting endpoint",
        cutter.cut()
    );

    // POST may not (the app may have acted on it): its cut answer reaches
    // the caller as a broken body, never as a whole one.
    let before = cutter.cut();
    let mut broken = 0;
    for _ in 0..400 {
        match send(&client, request("POST")).await {
            Ok(answer) => {
                assert_eq!(answer.status, 200, "a POST answer: {:?}", answer.header("x-mesh-error"))
            }
            Err(_) => broken += 1,
        }
        if cutter.cut() > before {
            break;
        }
    }
    assert!(cutter.cut() > before, "no POST reached the cutting endpoint in 400");
    assert_eq!(broken, 1, "the one POST the cutter answered came back broken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_slow_to_begin_its_body_still_streams_whole() {
    let dir = TempDir::new("retry-slow-body");
    // The body begins well after the proxy stops holding the headers for it.
    let slow = CutAfterHeaders::start(Then::Body(Duration::from_secs(1))).await;
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("slow")
        .line("retry = { attempts = 3, on = [\"connect-failure\"], budget_min_per_second = 1000 }")
        .endpoint(&slow.addr, "v1");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let answer = call(&proxy, "GET", "slow", 0).await;
    assert_eq!(answer.status, 200, "{:?}", answer.header("x-mesh-error"));
    assert_eq!(&answer.body[..], b"hello");
    assert_eq!(slow.cut(), 1, "sent once: nothing broke, so nothing went again");
}
