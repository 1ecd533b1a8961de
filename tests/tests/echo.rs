//! mesh-echo, the workload every other test leans on: its answers, its
//! run-time knobs, and its gRPC service (directly and through the proxy).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_proto::echo::v1::echo_client::EchoClient;
use mesh_proto::echo::v1::EchoRequest;
use mesh_tests::client::{get, http1, send, HttpClient};
use mesh_tests::process::{Echo, Process, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{bin, TempDir};

async fn configure(client: &HttpClient, addr: &str, json: &str) -> mesh_tests::client::Answer {
    let request = Request::post(format!("http://{addr}/_echo/config"))
        .body(Full::new(Bytes::from(json.to_owned())))
        .unwrap();
    send(client, request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_version_instance_and_an_echo_of_the_request() {
    let echo = Echo::start("v3", &["--message", "hi there"]);
    let answer = get(&http1(), &echo.addr, "anything", "/some/path?q=1").await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-version"), Some("v3"));
    assert_eq!(answer.header("x-instance"), Some(echo.addr.as_str()));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/some/path");
    assert_eq!(body["headers"]["host"], "anything");
    assert_eq!(body["message"], "hi there");
}

#[test]
fn the_port_comes_from_the_environment_when_no_flag_is_given() {
    let port = mesh_tests::free_port();
    let process =
        Process::start_with(std::process::Command::new(bin("mesh-echo")).env("PORT", port.to_string()));
    assert!(process.first_line.contains(&format!("127.0.0.1:{port}")), "{}", process.first_line);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knobs_change_at_run_time_and_bad_updates_change_nothing() {
    let echo = Echo::start("v1", &[]);
    let client = http1();
    let status = |path: &'static str| {
        let (client, addr) = (client.clone(), echo.addr.clone());
        async move { get(&client, &addr, "echo", path).await.unwrap().status.as_u16() }
    };
    assert_eq!((status("/ready").await, status("/live").await), (200, 200));
    assert_eq!(configure(&client, &echo.addr, r#"{"not_ready":true}"#).await.status, 200);
    assert_eq!((status("/ready").await, status("/live").await), (503, 200));
    assert_eq!(configure(&client, &echo.addr, r#"{"not_live":true,"not_ready":false}"#).await.status, 200);
    assert_eq!((status("/ready").await, status("/live").await), (200, 503));

    assert_eq!(configure(&client, &echo.addr, r#"{"fail_rate":1}"#).await.status, 200);
    assert_eq!(status("/x").await, 500);
    let rejected = configure(&client, &echo.addr, r#"{"fail_rate":0,"latency":"soon"}"#).await;
    assert_eq!(rejected.status, 400);
    assert!(String::from_utf8_lossy(&rejected.body).contains("latency"), "the error names the field");
    assert_eq!(status("/x").await, 500, "a rejected update changes nothing, not even its valid fields");

    assert_eq!(configure(&client, &echo.addr, r#"{"fail_rate":0,"latency":"150ms"}"#).await.status, 200);
    let started = Instant::now();
    assert_eq!(status("/x").await, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    assert_eq!(configure(&client, &echo.addr, r#"{"latency":"0s","hang":true}"#).await.status, 200);
    let hung = tokio::time::timeout(Duration::from_millis(500), get(&client, &echo.addr, "echo", "/x")).await;
    assert!(hung.is_err(), "a hanging echo never answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_errors_directly_and_through_the_proxy() {
    let dir = TempDir::new("echo-grpc");
    let echo = Echo::start("v2", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(
        &path,
        render(&[ServiceSpec::new("echo").protocol("grpc").endpoint(&echo.addr, "v2")], &["echo"], None),
    )
    .unwrap();
    let proxy = Proxy::start(&path);
    for target in [echo.addr.clone(), proxy.upstream("echo")] {
        let mut client = EchoClient::connect(format!("http://{target}")).await.unwrap();
        let reply = client.unary(EchoRequest { message: "ping".into(), ..Default::default() }).await.unwrap();
        assert_eq!(reply.get_ref().message, "ping");
        assert_eq!(reply.get_ref().version, "v2");
        let mut stream = client
            .server_stream(EchoRequest { message: "tick".into(), count: 4, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let mut sequences = Vec::new();
        while let Some(reply) = stream.message().await.unwrap() {
            sequences.push(reply.sequence);
        }
        assert_eq!(sequences, vec![0, 1, 2, 3], "via {target}");
        let error = client.unary(EchoRequest { fail_with_code: 5, ..Default::default() }).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::NotFound, "via {target}");
    }
}
