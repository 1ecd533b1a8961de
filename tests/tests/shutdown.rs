//! SIGTERM: the proxy stops accepting, asks open connections to finish
//! (HTTP/2 GOAWAY, idle HTTP/1 closed), lets every accepted request finish,
//! and exits 0; past `--drain-timeout` it exits anyway.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{get, h2_prior_knowledge, http1};
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The app's count of requests it is answering.
async fn in_flight_at(echo: &Echo) -> Option<u64> {
    echo.stats().await?["in_flight"].as_u64()
}

/// An HTTP/1.1 connection that has had one answer and now sits idle.
async fn idle_http1(outbound: &str) -> TcpStream {
    let mut stream = TcpStream::connect(outbound).await.unwrap();
    stream.write_all(b"GET /_echo/stats HTTP/1.1\r\nhost: echo\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "the answer's head arrives");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
        })
        .expect("a sized answer");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    stream
}

/// An HTTP/2 connection past its preface and the server's SETTINGS.
async fn open_http2(outbound: &str) -> TcpStream {
    let mut stream = TcpStream::connect(outbound).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let (kind, _, _) = next_frame(&mut stream).await.expect("the server's first frame");
    assert_eq!(kind, 4, "the server opens with SETTINGS");
    stream
}

/// The next frame's type, flags and payload; None once the peer closed.
async fn next_frame(stream: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header[3], header[4], payload))
}

const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// Reads an HTTP/2 connection, answering PINGs as a client must, until the
/// server closes it; returns every GOAWAY payload seen.
async fn follow_until_closed(stream: &mut TcpStream) -> Vec<Vec<u8>> {
    let mut goaways = Vec::new();
    while let Some((kind, flags, payload)) = next_frame(stream).await {
        match kind {
            GOAWAY => goaways.push(payload),
            PING if flags & 1 == 0 => {
                let mut ack = vec![0, 0, 8, PING, 1, 0, 0, 0, 0];
                ack.extend_from_slice(&payload);
                if stream.write_all(&ack).await.is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    goaways
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_closes_idle_ones_and_lets_requests_finish() {
    let dir = TempDir::new("shutdown");
    let echo = Echo::start("v1", &["--latency", "3s"]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let mut proxy = Proxy::start_args(&path, &["--drain-timeout", "60s"]);
    let outbound = proxy.outbound();
    let client = http1();
    let mut in_flight = Vec::new();
    for i in 0..30 {
        let (client, outbound) = (client.clone(), outbound.clone());
        in_flight
            .push(tokio::spawn(async move { get(&client, &outbound, "echo", &format!("/h1/{i}")).await }));
    }
    for i in 0..10 {
        let outbound = outbound.clone();
        in_flight.push(tokio::spawn(async move {
            let request = Request::get(format!("http://echo/h2/{i}")).body(Full::new(Bytes::new())).unwrap();
            h2_prior_knowledge(&outbound, request).await
        }));
    }
    let mut idle = idle_http1(&outbound).await;
    let mut h2 = open_http2(&outbound).await;
    eventually("all 40 requests reach the app", Duration::from_secs(10), || async {
        (in_flight_at(&echo).await? == 40).then_some(())
    })
    .await;
    let terminated = Instant::now();
    proxy.process.signal(libc::SIGTERM);

    // While the 3-second requests are still being answered:
    let admin = proxy.admin();
    eventually("/ready turns 503 while draining", Duration::from_secs(2), || {
        let admin = admin.clone();
        async move { (get(&http1(), &admin, &admin, "/ready").await.ok()?.status == 503).then_some(()) }
    })
    .await;
    eventually("new connections are refused", Duration::from_secs(2), || {
        let outbound = outbound.clone();
        async move { TcpStream::connect(&outbound).await.is_err().then_some(()) }
    })
    .await;
    let goaways = tokio::time::timeout(Duration::from_secs(2), follow_until_closed(&mut h2))
        .await
        .expect("an idle HTTP/2 connection is closed within 2s");
    assert!(!goaways.is_empty(), "an open HTTP/2 connection gets GOAWAY before it closes");
    for goaway in &goaways {
        let error_code = u32::from_be_bytes(goaway[4..8].try_into().unwrap());
        assert_eq!(error_code, 0, "a graceful GOAWAY (NO_ERROR)");
    }
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0))), "an idle HTTP/1 connection is closed at once: {read:?}");
    assert!(terminated.elapsed() < Duration::from_secs(3), "all of this happened during the drain");
    assert_eq!(in_flight_at(&echo).await, Some(40), "the requests in flight are still being answered");

    for request in in_flight {
        let answer = request.await.unwrap().expect("an accepted request must not fail");
        assert_eq!(answer.status, 200);
    }
    // Well before its 60 s drain timeout: nothing is left open.
    let status = proxy.process.wait_exit(Duration::from_secs(20)).expect("the proxy exits once drained");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_timeout_the_proxy_exits_with_requests_still_in_flight() {
    let dir = TempDir::new("drain-timeout");
    let echo = Echo::start("v1", &["--latency", "60s"]);
    let path = dir.path("proxy.toml");
    // The request's own timeout is longer than the app's answer: only the drain timeout ends it.
    let service = ServiceSpec::new("echo").line("timeout = \"120s\"").endpoint(&echo.addr, "v1");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let mut proxy = Proxy::start_args(&path, &["--drain-timeout", "1s"]);
    let outbound = proxy.outbound();
    let stuck = tokio::spawn(async move { get(&http1(), &outbound, "echo", "/slow").await });
    eventually("the request reaches the app", Duration::from_secs(10), || async {
        (in_flight_at(&echo).await? == 1).then_some(())
    })
    .await;
    let terminated = Instant::now();
    proxy.process.signal(libc::SIGTERM);
    // Sooner than the test client's own 20 s limit, which would end the request.
    let status =
        proxy.process.wait_exit(Duration::from_secs(10)).expect("the proxy exits at its drain deadline");
    let waited = terminated.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(10),
        "it waited its drain timeout, not the request's 60s: {waited:?}"
    );
    let answer = stuck.await.unwrap();
    assert!(answer.is_err(), "the unfinished request's connection is closed: {answer:?}");
}
