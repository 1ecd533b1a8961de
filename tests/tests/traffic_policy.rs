//! Traffic policy on a real proxy with real apps: routes by every kind of
//! match (and a gRPC method) to their own backends with their own
//! timeout, mirroring within binomial bounds and with a hanging mirror
//! costing the primary nothing, and injected faults at their rate with
//! their reason. The control-plane side (`meshctl apply`, rate limits by
//! caller identity) is in `traffic_policy_mesh.rs`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_proto::echo::v1::echo_client::EchoClient;
use mesh_proto::echo::v1::EchoRequest;
use mesh_tests::client::{closed_loop_path, get, http1, send, split_tolerance};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, TempDir};

/// Starts a proxy on the rendered services plus `routes` (TOML tables).
fn proxy(dir: &TempDir, services: &[ServiceSpec], upstreams: &[&str], routes: &str) -> Proxy {
    let path = dir.path("proxy.toml");
    std::fs::write(&path, format!("{}\n{routes}", render(services, upstreams, None))).unwrap();
    Proxy::start(&path)
}

/// `GET path` to `echo` with `headers`, through the proxy's outbound.
async fn request(
    outbound: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> mesh_tests::client::Answer {
    let mut builder =
        Request::builder().method(method).uri(format!("http://{outbound}{path}")).header("host", "echo");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(&http1(), builder.body(Full::new(Bytes::new())).unwrap()).await.unwrap()
}

const ROUTES: &str = r#"
[[routes]]
service = "echo"
name = "canary-by-header"
match = { headers = { "x-canary" = "1" } }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "exact"
match = { path = "/exact" }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "api-writes"
match = { path_prefix = "/api", method = "POST" }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "users"
match = { path_regex = "/users/[0-9]+" }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "admins"
match = { headers_regex = { "x-user" = "admin-.*" } }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "debug"
match = { headers_present = ["x-debug"] }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "gold"
match = { query = { tier = "gold" } }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "elsewhere"
match = { path_prefix = "/other" }
backends = { service = "other" }

[[routes]]
service = "echo"
name = "slow"
match = { path_prefix = "/slow" }
backends = { slow = 100 }
timeout = "300ms"

[[routes]]
service = "grpc-echo"
name = "streams"
match = { grpc_method = "mesh.echo.v1.Echo/ServerStream" }
backends = { v2 = 100 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_match_sends_its_requests_to_its_backends() {
    let dir = TempDir::new("routes");
    let (v1, v2, v3) = (Echo::start("v1", &[]), Echo::start("v2", &[]), Echo::start("v3", &[]));
    let slow = Echo::start("slow", &["--latency", "2s"]);
    let services = [
        ServiceSpec::new("echo")
            .line("split = { v1 = 100 }")
            .endpoint(&v1.addr, "v1")
            .endpoint(&v2.addr, "v2")
            .endpoint(&slow.addr, "slow"),
        ServiceSpec::new("other").endpoint(&v3.addr, "v3"),
        ServiceSpec::new("grpc-echo")
            .protocol("grpc")
            .line("split = { v1 = 100 }")
            .endpoint(&v1.addr, "v1")
            .endpoint(&v2.addr, "v2"),
    ];
    let proxy = proxy(&dir, &services, &["grpc-echo"], ROUTES);
    let outbound = proxy.outbound();

    // (route, method, path, headers, version that answers): each route's
    // match, and a near miss that falls through to the service's split (v1).
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let table: &[Case] = &[
        ("canary-by-header", "GET", "/", &[("x-canary", "1")], "v2"),
        ("(none)", "GET", "/", &[("x-canary", "0")], "v1"),
        ("exact", "GET", "/exact", &[], "v2"),
        ("(none)", "GET", "/exact/more", &[], "v1"),
        ("api-writes", "POST", "/api/orders", &[], "v2"),
        ("(none)", "GET", "/api/orders", &[], "v1"),
        ("(none)", "POST", "/apiary", &[], "v1"),
        ("users", "GET", "/users/42", &[], "v2"),
        ("(none)", "GET", "/users/me", &[], "v1"),
        ("admins", "GET", "/", &[("x-user", "admin-7")], "v2"),
        ("(none)", "GET", "/", &[("x-user", "guest")], "v1"),
        ("debug", "GET", "/", &[("x-debug", "")], "v2"),
        ("gold", "GET", "/p?tier=gold", &[], "v2"),
        ("(none)", "GET", "/p?tier=silver", &[], "v1"),
        ("elsewhere", "GET", "/other/x", &[], "v3"),
    ];
    for (route, method, path, headers, version) in table {
        for _ in 0..10 {
            let answer = request(&outbound, method, path, headers).await;
            assert_eq!(answer.status, 200, "{route}: {method} {path} {headers:?}: {answer:?}");
            assert_eq!(answer.header("x-version"), Some(*version), "{route}: {method} {path} {headers:?}");
        }
    }

    // The slow route's own timeout (300 ms), not the service's (10 s).
    let started = Instant::now();
    let answer = request(&outbound, "GET", "/slow", &[]).await;
    assert_eq!((answer.status.as_u16(), answer.header("x-mesh-error")), (504, Some("timeout")), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the route's timeout applied: {:?}",
        started.elapsed()
    );

    // A gRPC method routed apart: streams go to v2, unary calls to v1.
    let mut client = EchoClient::connect(format!("http://{}", proxy.upstream("grpc-echo"))).await.unwrap();
    for _ in 0..5 {
        let unary = client.unary(EchoRequest { message: "u".into(), ..Default::default() }).await.unwrap();
        assert_eq!(unary.get_ref().version, "v1");
        let mut stream = client
            .server_stream(EchoRequest { message: "s".into(), count: 2, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        while let Some(reply) = stream.message().await.unwrap() {
            assert_eq!(reply.version, "v2", "a stream's every message comes from v2");
        }
    }

    // Each route counts what it took.
    let metrics = scrape(&proxy.admin()).await;
    for (route, want) in
        [("canary-by-header", 10.0), ("api-writes", 10.0), ("elsewhere", 10.0), ("streams", 5.0)]
    {
        let got = metrics.sum("mesh_route_requests_total", &[("route", route)]);
        assert_eq!(got, want, "mesh_route_requests_total for {route}");
    }
    mesh_tests::metrics::promtool_check(&mesh_tests::metrics::text(&proxy.admin()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_sees_its_share_and_a_hanging_one_costs_the_primary_nothing() {
    let dir = TempDir::new("mirror");
    let (v1, v2) = (Echo::start("v1", &[]), Echo::start("v2", &[]));
    let hung = Echo::start("hung", &["--hang"]);
    let services = [
        ServiceSpec::new("echo")
            .line("split = { v1 = 100 }")
            .endpoint(&v1.addr, "v1")
            .endpoint(&v2.addr, "v2"),
        // The copies' timeout is the service's: 60 s, longer than the test.
        ServiceSpec::new("hung").line("timeout = \"60s\"").endpoint(&hung.addr, "v1"),
    ];
    let routes = r#"
[[routes]]
service = "echo"
name = "shadow"
match = { path_prefix = "/shadow" }
backends = { v1 = 100 }
mirror = { version = "v2", percent = 20 }

[[routes]]
service = "echo"
name = "to-the-void"
match = { path_prefix = "/void" }
backends = { v1 = 100 }
mirror = { service = "hung", percent = 100, max_in_flight = 50 }
"#;
    let proxy = proxy(&dir, &services, &[], routes);
    let outbound = proxy.outbound();
    let before = v2.requests_seen().await;

    // 20 % of 2 000 requests copied to v2; every answer is v1's.
    const N: u64 = 2_000;
    let tally = closed_loop_path(&outbound, "echo", "/shadow", N, 8).await;
    assert_eq!((tally.ok, tally.share("v1")), (N, 100.0), "{tally:?}");
    let sent = scrape(&proxy.admin())
        .await
        .sum("mesh_mirror_requests_total", &[("route", "shadow"), ("result", "sent")]);
    let share = 100.0 * sent / N as f64;
    let tolerance = split_tolerance(N, 20.0);
    assert!((share - 20.0).abs() <= tolerance, "{share:.2} % mirrored, want 20 ± {tolerance:.2}");
    // The copies arrive (they run on their own tasks; the stats call is one more request).
    eventually("v2 sees every copy", Duration::from_secs(10), || async {
        let seen = v2.requests_seen().await - before;
        (seen >= sent as u64).then_some(())
    })
    .await;
    eprintln!("mirrored {sent} of {N} ({share:.2} %)");

    // A mirror that never answers: 50 copies hang, the rest are dropped as
    // busy, and every primary request is answered by v1 all the same.
    let tally = closed_loop_path(&outbound, "echo", "/void", 500, 8).await;
    assert_eq!((tally.ok, tally.failed()), (500, 0), "{tally:?}");
    let metrics = scrape(&proxy.admin()).await;
    let void =
        |result| metrics.sum("mesh_mirror_requests_total", &[("route", "to-the-void"), ("result", result)]);
    assert_eq!((void("sent"), void("busy")), (50.0, 450.0), "the cap holds the copies in flight to 50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_their_share_and_say_so() {
    let dir = TempDir::new("faults");
    let v1 = Echo::start("v1", &[]);
    let services = [
        ServiceSpec::new("echo").endpoint(&v1.addr, "v1"),
        ServiceSpec::new("grpc-echo").protocol("grpc").endpoint(&v1.addr, "v1"),
    ];
    let routes = r#"
[[routes]]
service = "echo"
name = "flaky"
match = { path_prefix = "/flaky" }
backends = { v1 = 100 }
fault = { abort = { status = 503, percent = 10 } }

[[routes]]
service = "echo"
name = "sluggish"
match = { path_prefix = "/sluggish" }
backends = { v1 = 100 }
fault = { delay = { duration = "300ms", percent = 50 } }

[[routes]]
service = "grpc-echo"
name = "exhausted"
match = { grpc_method = "mesh.echo.v1.Echo/Unary" }
backends = { v1 = 100 }
fault = { abort = { grpc_status = 8, percent = 100 } }
"#;
    let proxy = proxy(&dir, &services, &["grpc-echo"], routes);
    let outbound = proxy.outbound();

    // 10 % aborts of 2 000: within binomial bounds, each marked, each counted.
    const N: u64 = 2_000;
    let tally = closed_loop_path(&outbound, "echo", "/flaky", N, 8).await;
    let aborted = tally.failures.get("503 Service Unavailable injected-fault").copied().unwrap_or(0);
    assert_eq!(tally.ok + aborted, N, "only injected aborts fail: {tally:?}");
    let share = 100.0 * aborted as f64 / N as f64;
    let tolerance = split_tolerance(N, 10.0);
    assert!((share - 10.0).abs() <= tolerance, "{share:.2} % aborted, want 10 ± {tolerance:.2}");
    let metrics = scrape(&proxy.admin()).await;
    assert_eq!(
        metrics.sum("mesh_faults_injected_total", &[("route", "flaky"), ("kind", "abort")]),
        aborted as f64
    );
    let labelled =
        metrics.sum("mesh_http_requests_total", &[("service", "echo"), ("error", "injected-fault")]);
    assert_eq!(labelled, aborted as f64, "aborts count under error=\"injected-fault\"");
    let answer = loop {
        let answer = request(&outbound, "GET", "/flaky", &[]).await;
        if answer.status == 503 {
            break answer;
        }
    };
    let body = String::from_utf8_lossy(&answer.body);
    assert!(body.contains("route \"flaky\" aborts 10 % of its requests"), "{body}");

    // Delays: half the requests take 300 ms more, and the latency shows it.
    let client = http1();
    let (mut slow, mut marked, n) = (0u64, 0u64, 60u64);
    for _ in 0..n {
        let started = Instant::now();
        let answer = get(&client, &outbound, "echo", "/sluggish").await.unwrap();
        assert_eq!(answer.status, 200);
        if answer.header("x-mesh-fault") == Some("delay") {
            marked += 1;
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "a delayed answer took {:?}",
                started.elapsed()
            );
        }
        if started.elapsed() >= Duration::from_millis(300) {
            slow += 1;
        }
    }
    let delayed = scrape(&proxy.admin())
        .await
        .sum("mesh_faults_injected_total", &[("route", "sluggish"), ("kind", "delay")]);
    assert!(
        slow as f64 >= delayed,
        "every delayed request took 300 ms or more: {slow} slow, {delayed} delayed"
    );
    assert_eq!(marked as f64, delayed, "every delayed answer is marked x-mesh-fault: delay");
    let tolerance = split_tolerance(n, 50.0);
    assert!((100.0 * delayed / n as f64 - 50.0).abs() <= tolerance, "{delayed} of {n} delayed");

    // A gRPC caller gets the route's gRPC status.
    let mut grpc = EchoClient::connect(format!("http://{}", proxy.upstream("grpc-echo"))).await.unwrap();
    let error = grpc.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error:?}");
    assert!(error.message().contains("injected-fault"), "{error:?}");
}
