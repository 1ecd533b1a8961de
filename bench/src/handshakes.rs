//! New mTLS connections as fast as a few callers can open them: the
//! handshake rate of the second hop's inbound listener, over TCP or QUIC. Each caller
//! verifies the server as a mesh sidecar does (mesh-proxy's own client
//! configuration), sends one HTTP/2 request, and counts the connection only
//! once that request succeeded: with TLS 1.3 the client's side of the
//! handshake completes before the server has checked the client's
//! certificate, so a handshake the server refuses would otherwise count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::tls::MeshTls;

/// Connections (handshake and one successful request each) completed
/// against `port` in `duration` by `callers`, over TCP; an error if any
/// failed (see `count_connections` for a lossy link).
pub async fn run(
    port: u16,
    tls: Arc<MeshTls>,
    service: &str,
    duration: Duration,
    callers: usize,
    lossy: bool,
) -> Result<u64, String> {
    let name = mesh_proxy::tls::server_name(service).ok_or("not a service name")?;
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    let service = service.to_owned();
    let open = move || {
        let (connector, name, service) = (connector.clone(), name.clone(), service.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let stream = connector.connect(name, tcp).await.map_err(|e| format!("handshake failed: {e}"))?;
            one_request(stream, &service).await
        }
    };
    count_connections(duration, callers, lossy, open).await
}

/// Runs `callers` loops until `duration` is over, each opening one
/// connection after another with `open`, and counts those that succeeded.
/// On a lossy link (`lossy`) a connection that takes over 5 s (its
/// handshake packets lost again and again) is given up and not counted;
/// on a clean one it is an error, as is any failure.
async fn count_connections<F, Fut>(
    duration: Duration,
    callers: usize,
    lossy: bool,
    open: F,
) -> Result<u64, String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (open, done) = (open.clone(), done.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(5), open()).await {
                    Ok(result) => result?,
                    Err(_) if lossy => continue,
                    Err(_) => return Err("no answer within 5 s on a new connection".to_owned()),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| e.to_string())??;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// One HTTP/2 request on a fresh connection, answered 2xx; then the
/// connection is closed and its end awaited.
async fn one_request<S>(stream: S, service: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 on a new connection: {e}"))?;
    let driver = tokio::spawn(connection);
    let request =
        Request::get(format!("http://{service}/")).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let response =
        sender.send_request(request).await.map_err(|e| format!("request on a new connection: {e}"))?;
    let status = response.status();
    response.into_body().collect().await.map_err(|e| format!("answer on a new connection: {e}"))?;
    if !status.is_success() {
        return Err(format!("a new connection's request was answered {status}"));
    }
    drop(sender);
    let _ = driver.await;
    Ok(())
}

/// As `run`, over QUIC: each new connection carries one HTTP/3 request.
pub async fn run_quic(
    port: u16,
    tls: Arc<MeshTls>,
    service: &str,
    duration: Duration,
    callers: usize,
    lossy: bool,
) -> Result<u64, String> {
    let config = tls.quic_client.clone().ok_or("no QUIC client configuration")?;
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(config);
    let (name, service) = (format!("{service}.mesh"), service.to_owned());
    let client = endpoint.clone();
    let open = move || {
        let (endpoint, name, service) = (client.clone(), name.clone(), service.clone());
        async move {
            let connecting =
                endpoint.connect(([127, 0, 0, 1], port).into(), &name).map_err(|e| e.to_string())?;
            let connection = connecting.await.map_err(|e| format!("QUIC handshake failed: {e}"))?;
            one_h3_request(connection.clone(), &service).await?;
            connection.close(0u32.into(), b"done");
            Ok(())
        }
    };
    let count = count_connections(duration, callers, lossy, open).await;
    endpoint.wait_idle().await;
    count
}

/// One HTTP/3 request on a fresh connection, answered 2xx.
async fn one_h3_request(connection: quinn::Connection, service: &str) -> Result<(), String> {
    let (mut driver, mut sender) = h3::client::new(h3_quinn::Connection::new(connection))
        .await
        .map_err(|e| format!("HTTP/3 on a new connection: {e}"))?;
    let driving = tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let request = Request::get(format!("https://{service}/")).body(()).map_err(|e| e.to_string())?;
    let mut stream = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    stream.finish().await.map_err(|e| format!("request: {e}"))?;
    let response = stream.recv_response().await.map_err(|e| format!("answer: {e}"))?;
    while stream.recv_data().await.map_err(|e| format!("answer: {e}"))?.is_some() {}
    if !response.status().is_success() {
        return Err(format!("a new connection's request was answered {}", response.status()));
    }
    drop((stream, sender));
    driving.abort();
    Ok(())
}
