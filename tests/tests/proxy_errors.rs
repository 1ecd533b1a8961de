//! The answers the proxy makes itself, exactly as `docs/contract.md` lists them:
//! status, `x-mesh-error`, the `error` metric label, and `grpc-status` for
//! gRPC callers.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{get, h2_prior_knowledge, http1};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::TempDir;

/// A port nothing listens on: bound, then released.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_made_error_has_its_status_header_and_label() {
    let dir = TempDir::new("errors");
    let hanging = Echo::start("v1", &["--hang"]);
    let failing = Echo::start("v1", &["--fail-rate", "1"]);
    let dead = closed_port();
    let services = [
        ServiceSpec::new("nothing-ready").not_ready_endpoint(&hanging.addr, "v1"),
        ServiceSpec::new("dead").line("retry = { attempts = 2 }").endpoint(&dead, "v1"),
        ServiceSpec::new("slow").line("timeout = \"300ms\"").endpoint(&hanging.addr, "v1"),
        ServiceSpec::new("broken")
            .line("breaker = { consecutive_failures = 1, base_ejection = \"60s\", max_ejection = \"60s\" }")
            .endpoint(&failing.addr, "v1"),
    ];
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&services, &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let client = http1();
    // Trip the breaker of "broken": its one failure passes through as a 500.
    assert_eq!(get(&client, &proxy.outbound(), "broken", "/").await.unwrap().status, 500);

    // (service, status, reason)
    let table = [
        ("no-such-service", 404, "unknown-service"),
        ("nothing-ready", 503, "no-endpoints"),
        ("dead", 502, "connect-failed"),
        ("slow", 504, "timeout"),
        ("broken", 503, "breaker-open"),
    ];
    for (service, status, reason) in table {
        let answer = get(&client, &proxy.outbound(), service, "/").await.unwrap();
        assert_eq!(answer.status, status, "{service}");
        assert_eq!(answer.header("x-mesh-error"), Some(reason), "{service}");
        let body = String::from_utf8_lossy(&answer.body);
        assert!(body.starts_with(reason), "the body names the cause: {body}");
    }
    let metrics = scrape(&proxy.admin()).await;
    for (service, status, reason) in table {
        let labels = [("code", &*status.to_string()), ("error", reason)];
        assert_eq!(metrics.sum("mesh_http_requests_total", &labels), 1.0, "{service} {reason}");
    }
    assert!(
        metrics.sum("mesh_http_retries_total", &[("service", "dead"), ("reason", "connect-failure")]) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_a_grpc_status_instead() {
    let dir = TempDir::new("grpc-errors");
    let hanging = Echo::start("v1", &["--hang"]);
    let services = [
        ServiceSpec::new("nothing-ready").protocol("grpc").not_ready_endpoint(&hanging.addr, "v1"),
        ServiceSpec::new("slow").protocol("grpc").line("timeout = \"300ms\"").endpoint(&hanging.addr, "v1"),
    ];
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&services, &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    // (service, grpc-status, reason): UNIMPLEMENTED, UNAVAILABLE, DEADLINE_EXCEEDED
    let table = [
        ("missing", "12", "unknown-service"),
        ("nothing-ready", "14", "no-endpoints"),
        ("slow", "4", "timeout"),
    ];
    for (service, grpc_status, reason) in table {
        let request = Request::post(format!("http://{service}/mesh.echo.v1.Echo/Unary"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), h2_prior_knowledge(&proxy.outbound(), request))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(answer.status, 200, "gRPC errors travel in grpc-status, not the HTTP status ({service})");
        assert_eq!(answer.header("grpc-status"), Some(grpc_status), "{service}");
        assert_eq!(answer.header("x-mesh-error"), Some(reason), "{service}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_gets_a_4xx_and_harms_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("garbage");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    // (what, bytes sent)
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: echo\r\n\r\n", "a".repeat(1024 * 1024));
    let table: [(&str, &[u8], &str); 5] = [
        ("not HTTP at all", b"\x00\x01\x02garbage garbage\r\n\r\n", "HTTP/1.1 400"),
        ("a 1 MB URI (RFC 9110, 15.5.15)", long_uri.as_bytes(), "HTTP/1.1 414"),
        (
            "two Host headers (RFC 9112, 3.2)",
            b"GET / HTTP/1.1\r\nHost: echo\r\nHost: other\r\n\r\n",
            "HTTP/1.1 400",
        ),
        ("a request line with a bad version", b"GET / HTTP/9.9\r\nHost: echo\r\n\r\n", "HTTP/1.1 400"),
        (
            "a TLS client hello to a plaintext port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (what, bytes, status) in table {
        let mut stream = tokio::net::TcpStream::connect(proxy.outbound()).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{what}: the proxy must answer or close, not hang");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(status), "{what}: {}", &answer[..answer.len().min(200)]);
    }
    // And the proxy still serves.
    assert_eq!(get(&http1(), &proxy.outbound(), "echo", "/").await.unwrap().status, 200);
}

/// Sends `bytes` on a new connection to `addr`, closing at once if
/// `abort`, and returns whatever answer comes (bounded in time).
async fn raw_exchange(addr: &str, bytes: &[u8], abort: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if abort {
        return String::new();
    }
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
    let n = read.expect("the proxy answers or closes, and does not hang").unwrap_or(0);
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_the_callers_fault_and_ejects_no_endpoint() {
    let dir = TempDir::new("bad-bodies");
    let echoes = [Echo::start("v1", &[]), Echo::start("v1", &[])];
    let breaker = "breaker = { consecutive_failures = 3, base_ejection = \"60s\", max_ejection = \"60s\" }";
    let service =
        ServiceSpec::new("web").line(breaker).endpoint(&echoes[0].addr, "v1").endpoint(&echoes[1].addr, "v1");
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let head = "POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n";
    let long_extension = format!("{head}5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(64 * 1024));
    // (what, bytes, the caller hangs up mid-upload)
    let table: [(&str, String, bool); 3] = [
        ("a bad chunk size", format!("{head}5\r\nhello\r\nZZZ\r\nmore\r\n0\r\n\r\n"), false),
        ("an oversized chunk extension", long_extension, false),
        (
            "a caller that closes mid-upload",
            "POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\npartial".to_owned(),
            true,
        ),
    ];
    for (what, bytes, abort) in &table {
        for _ in 0..10 {
            let answer = raw_exchange(&proxy.outbound(), bytes.as_bytes(), *abort).await;
            if !abort {
                assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
                assert!(answer.contains("x-mesh-error: bad-request"), "{what}: {answer}");
            }
        }
    }
    // Every endpoint still serves: nothing was held against them.
    let client = http1();
    for _ in 0..20 {
        let answer = get(&client, &proxy.outbound(), "web", "/").await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.header("x-mesh-error"));
    }
    let metrics = scrape(&proxy.admin()).await;
    assert_eq!(metrics.present("mesh_endpoint_ejections_total", &[("service", "web")]), 0.0, "no ejection");
    assert!(metrics.sum("mesh_http_requests_total", &[("error", "bad-request")]) >= 20.0);
    assert_eq!(metrics.sum("mesh_http_requests_total", &[("error", "connect-failed")]), 0.0);
}

/// Resident memory of a process, in kB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_loop_is_cut_and_memory_comes_back() {
    use mesh_tests::free_port;
    let dir = TempDir::new("loops");
    let (a_port, b_port) = (free_port(), free_port());
    let config = |own: u16, peer: u16| {
        let text = render(
            &[
                // Each proxy's "loop" points at the other's outbound; "self" at its own.
                ServiceSpec::new("loop").endpoint(&format!("127.0.0.1:{peer}"), "v1"),
                ServiceSpec::new("self").endpoint(&format!("127.0.0.1:{own}"), "v1"),
            ],
            &[],
            None,
        );
        text.replacen("outbound = \"127.0.0.1:0\"", &format!("outbound = \"127.0.0.1:{own}\""), 1)
    };
    std::fs::write(dir.path("a.toml"), config(a_port, b_port)).unwrap();
    std::fs::write(dir.path("b.toml"), config(b_port, a_port)).unwrap();
    let a = Proxy::start(&dir.path("a.toml"));
    let b = Proxy::start(&dir.path("b.toml"));
    let before = [rss_kb(a.process.pid()), rss_kb(b.process.pid())];

    let client = http1();
    let answer = get(&client, &a.outbound(), "loop", "/").await.unwrap();
    assert_eq!(answer.status, 508, "a loop between two proxies is cut");
    assert_eq!(answer.header("x-mesh-error"), Some("loop-detected"));
    // An endpoint that is the proxy's own listener never gets a request.
    let answer = get(&client, &a.outbound(), "self", "/").await.unwrap();
    assert_eq!(answer.header("x-mesh-error"), Some("no-endpoints"), "{}", answer.status);

    // Bursts of looping requests cost bounded memory, and leave none behind.
    for _ in 0..20 {
        let burst: Vec<_> = (0..10)
            .map(|_| {
                let (client, outbound) = (client.clone(), a.outbound());
                tokio::spawn(async move {
                    let answer = get(&client, &outbound, "loop", "/").await;
                    answer.map(|a| (a.status.as_u16(), a.header("x-mesh-error").map(str::to_owned)))
                })
            })
            .collect();
        for request in burst {
            assert_eq!(request.await.unwrap(), Ok((508, Some("loop-detected".to_owned()))));
        }
    }
    for (proxy, before) in [(&a, before[0]), (&b, before[1])] {
        let after = rss_kb(proxy.process.pid());
        assert!(after < before + 32 * 1024, "RSS grew from {before} kB to {after} kB");
    }
    let metrics = scrape(&a.admin()).await;
    assert!(metrics.sum("mesh_http_requests_total", &[("error", "loop-detected"), ("code", "508")]) >= 1.0);
}

/// Whether the peer has closed `stream`, waiting up to `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(within, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_a_full_listener_refuses_more() {
    let dir = TempDir::new("idle-conns");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(
        &path,
        render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], Some(&echo.addr)),
    )
    .unwrap();
    let proxy = Proxy::start_args(&path, &["--max-connections", "20", "--first-byte-timeout", "3s"]);
    let mut idle = Vec::new();
    for _ in 0..25 {
        idle.push(tokio::net::TcpStream::connect(proxy.inbound()).await.unwrap());
    }
    // The five beyond the cap are closed at once, and counted.
    mesh_tests::eventually("five connections refused", Duration::from_secs(2), || async {
        let refused = scrape(&proxy.admin()).await.sum("mesh_connections_refused_total", &[]);
        (refused == 5.0).then_some(())
    })
    .await;
    // The twenty that never send a byte are closed after the first-byte timeout.
    for (i, stream) in idle.iter_mut().enumerate() {
        assert!(closed_within(stream, Duration::from_secs(10)).await, "idle connection {i} is still open");
    }
    // Their slots are free again: a caller that speaks is served.
    let answer = get(&http1(), &proxy.inbound(), "echo", "/").await.unwrap();
    assert_eq!(answer.status, 200);
}
