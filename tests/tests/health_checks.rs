//! The agent's health probes against a real mesh-echo: HTTP, TCP, gRPC
//! health and exec, each passing and failing for the reason a user would
//! expect.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use mesh_agent::health::probe;
use mesh_scheduler::job::Probe;
use mesh_tests::client::{http1, send};
use mesh_tests::process::Echo;

const TIMEOUT: Duration = Duration::from_secs(2);

async fn set_ready(echo: &Echo, ready: bool) {
    let body = format!("{{\"not_ready\":{}}}", !ready);
    let request = http::Request::post(format!("http://{}/_echo/config", echo.addr))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    assert!(send(&http1(), request).await.unwrap().status.is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_follow_the_instance() {
    let echo = Echo::start("v1", &[]);
    let addr: SocketAddr = echo.addr.parse().unwrap();
    let closed: SocketAddr = format!("127.0.0.1:{}", mesh_tests::free_port()).parse().unwrap();

    for check in [Probe::Http("/ready".into()), Probe::Tcp, Probe::Grpc] {
        assert_eq!(probe(&check, addr, TIMEOUT).await, Ok(()), "{check:?} on a ready echo");
        let error = probe(&check, closed, TIMEOUT).await.expect_err("nothing listens");
        assert!(error.contains("connect") || error.contains("grpc"), "{check:?}: {error}");
    }

    set_ready(&echo, false).await;
    let http = probe(&Probe::Http("/ready".into()), addr, TIMEOUT).await.unwrap_err();
    assert!(http.contains("503"), "{http}");
    let grpc = probe(&Probe::Grpc, addr, TIMEOUT).await.unwrap_err();
    assert!(grpc.contains("NOT_SERVING"), "{grpc}");
    // Liveness stays fine while readiness fails.
    assert_eq!(probe(&Probe::Http("/live".into()), addr, TIMEOUT).await, Ok(()));

    assert_eq!(probe(&Probe::Exec(vec!["true".into()]), addr, TIMEOUT).await, Ok(()));
    let exec = probe(&Probe::Exec(vec!["false".into()]), addr, TIMEOUT).await.unwrap_err();
    assert!(exec.contains("exit status: 1"), "{exec}");
    let slow = probe(&Probe::Exec(vec!["sleep".into(), "5".into()]), addr, Duration::from_millis(200)).await;
    assert!(slow.unwrap_err().contains("no answer within"));
}
