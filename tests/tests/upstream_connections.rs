//! Connections to endpoints: kept for reuse while busy, closed once idle
//! for `--upstream-idle-timeout`, and opened again on the next request.

use std::time::Duration;

use mesh_tests::client::{get, http1};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, TempDir};

async fn idle_http1(admin: &str) -> f64 {
    scrape(admin).await.sum("mesh_upstream_connections", &[("protocol", "http1"), ("state", "idle")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_is_closed_and_the_next_request_opens_another() {
    let dir = TempDir::new("idle-upstream");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start_args(&path, &["--upstream-idle-timeout", "3s"]);
    let (outbound, admin) = (proxy.outbound(), proxy.admin());
    let client = http1();
    for _ in 0..3 {
        let answer = get(&client, &outbound, "echo", "/").await.expect("an answer");
        assert_eq!(answer.status, 200);
    }
    // Sequential requests shared one connection, pooled now.
    assert_eq!(idle_http1(&admin).await, 1.0);
    // Unused for the idle time: closed (checked every second).
    eventually("the idle connection is closed", Duration::from_secs(15), || {
        let admin = admin.clone();
        async move { (idle_http1(&admin).await == 0.0).then_some(()) }
    })
    .await;
    let answer = get(&client, &outbound, "echo", "/").await.expect("an answer after the close");
    assert_eq!(answer.status, 200);
    assert_eq!(idle_http1(&admin).await, 1.0, "a new connection, pooled again");
    assert_eq!(echo.requests_seen().await, 4);
}
