//! SIGTERM: the proxy stops accepting, lets every accepted request finish,
//! and exits 0.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{get, h2_prior_knowledge, http1};
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, TempDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_accepted_request_finish() {
    let dir = TempDir::new("shutdown");
    let echo = Echo::start("v1", &["--latency", "3s"]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let mut proxy = Proxy::start(&path);
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
    let echo_addr = echo.addr.clone();
    eventually("all 40 requests reach the app", Duration::from_secs(10), || {
        let echo_addr = echo_addr.clone();
        async move {
            let answer = get(&http1(), &echo_addr, &echo_addr, "/_echo/stats").await.ok()?;
            let stats: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
            (stats["in_flight"] == 40).then_some(())
        }
    })
    .await;
    proxy.process.signal(libc::SIGTERM);
    let admin = proxy.admin();
    eventually("/ready turns 503 while draining", Duration::from_secs(2), || {
        let admin = admin.clone();
        async move { (get(&http1(), &admin, &admin, "/ready").await.ok()?.status == 503).then_some(()) }
    })
    .await;
    for request in in_flight {
        let answer = request.await.unwrap().expect("an accepted request must not fail");
        assert_eq!(answer.status, 200);
    }
    let status = proxy.process.wait_exit(Duration::from_secs(15)).expect("the proxy exits after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(tokio::net::TcpStream::connect(&outbound).await.is_err(), "no longer accepting");
}
