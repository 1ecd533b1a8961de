//! What the outbound listener carries: HTTP/1.1 keep-alive, chunked
//! bodies, absolute-form requests, routing by Host, HTTP/2 with prior
//! knowledge, Upgrade passthrough, opaque TCP, and the inbound hop.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{get, h2_prior_knowledge, http1, http2, send};
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_stats(addr: &str) -> serde_json::Value {
    let answer = get(&http1(), addr, addr, "/_echo/stats").await.unwrap();
    serde_json::from_slice(&answer.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_spellings_and_absolute_form_all_reach_the_service() {
    let dir = TempDir::new("hosts");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("web").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let client = http1();
    for host in ["web", "web.mesh", "web:80", "web.mesh:8080"] {
        let answer = get(&client, &proxy.outbound(), host, "/x").await.unwrap();
        assert_eq!(answer.status, 200, "Host: {host}");
        assert_eq!(answer.header("x-version"), Some("v1"));
    }
    // Absolute form, as an HTTP_PROXY client sends it.
    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    stream.write_all(b"GET http://web/abs HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"path\":\"/abs\""), "the app sees the origin-form path: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_endpoints_are_pooled_and_reused() {
    let dir = TempDir::new("pool");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("echo").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let client = http1();
    for _ in 0..200 {
        assert_eq!(get(&client, &proxy.outbound(), "echo", "/").await.unwrap().status, 200);
    }
    let stats = echo_stats(&echo.addr).await;
    assert_eq!(stats["requests"], 200);
    // One sequential caller needs one upstream connection (plus our stats probe).
    assert!(stats["connections"].as_u64().unwrap() <= 3, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_large_bodies_pass_through_whole() {
    let dir = TempDir::new("bodies");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    let service =
        ServiceSpec::new("echo").line("retry = { attempts = 3, on = [\"5xx\"], non_idempotent = true }");
    std::fs::write(&path, render(&[service.endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let client = http1();
    // A chunked body (no content-length), written in ten pieces.
    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    let mut request =
        b"POST /chunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..10 {
        request.extend_from_slice(b"3e8\r\n");
        request.extend_from_slice(&[b'x'; 1000]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_bytes\":10000"), "{answer}");
    // A body over the 64 KiB replay limit is streamed, not buffered, and arrives whole.
    let big = Request::post(format!("http://{}/big", proxy.outbound()))
        .header("host", "echo")
        .body(Full::new(Bytes::from(vec![b'y'; 300_000])))
        .unwrap();
    let answer = send(&client, big).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["body_bytes"], 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_works_both_to_http1_and_h2_services() {
    let dir = TempDir::new("h2");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    let services = [
        ServiceSpec::new("web").endpoint(&echo.addr, "v1"),
        ServiceSpec::new("web2").protocol("h2").endpoint(&echo.addr, "v1"),
    ];
    std::fs::write(&path, render(&services, &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    for service in ["web", "web2"] {
        // `:authority` names the service; the connection goes to the proxy.
        let request = Request::get(format!("http://{service}/h2")).body(Full::new(Bytes::new())).unwrap();
        let answer = h2_prior_knowledge(&proxy.outbound(), request).await.unwrap();
        assert_eq!(answer.status, 200, "{service}");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["path"], "/h2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_passed_through() {
    let dir = TempDir::new("upgrade");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(&[ServiceSpec::new("ws").endpoint(&echo.addr, "v1")], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let mut stream = TcpStream::connect(proxy.outbound()).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    // After the switch, bytes flow both ways untouched.
    for message in ["ping", "some more bytes \u{1F600}"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(buf, message.as_bytes());
    }
}

async fn read_until(stream: &mut TcpStream, end: &[u8]) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(end) && buf.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed early: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_upstream_ports_splice_bytes_and_count_them() {
    let dir = TempDir::new("tcp");
    let echo = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(
        &path,
        render(&[ServiceSpec::new("raw").protocol("tcp").endpoint(&echo.addr, "v1")], &["raw"], None),
    )
    .unwrap();
    let proxy = Proxy::start(&path);
    // Any protocol goes through a TCP port; here plain HTTP bytes.
    let mut stream = TcpStream::connect(proxy.upstream("raw")).await.unwrap();
    stream.write_all(b"GET /over-tcp HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("\"path\":\"/over-tcp\""), "{answer}");
    // Bytes are counted when the spliced connection ends.
    drop(stream);
    let metrics = mesh_tests::eventually("tcp bytes are counted", Duration::from_secs(5), || {
        let admin = proxy.admin();
        async move {
            let m = mesh_tests::metrics::scrape(&admin).await;
            (m.sum("mesh_tcp_bytes_total", &[("service", "raw"), ("flow", "write")]) > 0.0).then_some(m)
        }
    })
    .await;
    assert_eq!(metrics.present("mesh_tcp_connections_open", &[("service", "raw")]), 0.0);
    let read = metrics.sum("mesh_tcp_bytes_total", &[("service", "raw"), ("flow", "read")]);
    assert_eq!(read, 61.0, "the request's bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app_and_counts() {
    let dir = TempDir::new("inbound");
    let app = Echo::start("v7", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(
        &path,
        format!("service = \"api\"\nversion = \"v7\"\n{}", render(&[], &[], Some(&app.addr))),
    )
    .unwrap();
    let proxy = Proxy::start(&path);
    for client in [http1(), http2()] {
        let answer = get(&client, &proxy.inbound(), "api", "/in").await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-version"), Some("v7"));
    }
    let metrics = mesh_tests::metrics::scrape(&proxy.admin()).await;
    let inbound = [("direction", "inbound"), ("service", "api"), ("version", "v7"), ("code", "200")];
    assert_eq!(metrics.sum("mesh_http_requests_total", &inbound), 2.0);
}

/// One HTTP/2 frame: its 9-byte head, then its payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// Sends `cancelled` GET requests each cancelled at once, then one more,
/// all in one write on a new HTTP/2 connection to `addr`; what came back
/// first: the last request's status (as its HPACK byte) or a GOAWAY.
async fn after_cancelled_requests(addr: &str, cancelled: u32) -> String {
    // GET / to `api`, in HPACK with static-table names and no indexing.
    let request = [0x82, 0x86, 0x84, 0x01, 0x03, b'a', b'p', b'i'];
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_STREAM_AND_HEADERS: u8 = 0x5;
    let cancel = 0x8u32.to_be_bytes();
    let mut burst = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    burst.extend(h2_frame(SETTINGS, 0, 0, &[]));
    for stream in (1..).step_by(2).take(cancelled as usize) {
        burst.extend(h2_frame(HEADERS, END_STREAM_AND_HEADERS, stream, &request));
        burst.extend(h2_frame(RST_STREAM, 0, stream, &cancel));
    }
    let last = 2 * cancelled + 1;
    burst.extend(h2_frame(HEADERS, END_STREAM_AND_HEADERS, last, &request));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&burst).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await?;
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match head[3] {
                GOAWAY => return Ok::<_, std::io::Error>(format!("GOAWAY, error code {:?}", &payload[4..8])),
                HEADERS if id == last => return Ok(format!("status byte {:#x}", payload[0])),
                _ => {}
            }
        }
    });
    answer.await.expect("an answer within 10 s").expect("the connection stays open until it answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cancelling_many_http2_requests_at_once_keeps_its_connection() {
    // A sidecar whose caller went away cancels every request it had in
    // flight; on a lossy link the requests and their cancels reach the
    // peer in one burst, before it has taken up any of them.
    let dir = TempDir::new("h2-cancels");
    let app = Echo::start("v1", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, format!("service = \"api\"\n{}", render(&[], &[], Some(&app.addr)))).unwrap();
    let proxy = Proxy::start(&path);
    // As many as the proxy lets one connection have open: answered 200 (0x88).
    let answer = after_cancelled_requests(&proxy.inbound(), 200).await;
    assert_eq!(answer, "status byte 0x88", "the request after 200 cancelled ones");
    // Far more than a caller can have open is still the rapid-reset attack,
    // and the connection is closed: ENHANCE_YOUR_CALM (11).
    let answer = after_cancelled_requests(&proxy.inbound(), 1000).await;
    assert_eq!(answer, "GOAWAY, error code [0, 0, 0, 11]", "after 1 000 cancelled requests");
}
