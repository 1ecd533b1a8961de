//! New mTLS connections as fast as a few callers can open them: the
//! handshake rate of the second hop's inbound listener. Each caller
//! verifies the server as a mesh sidecar does (mesh-proxy's own client
//! configuration), then closes, and waits for the server to close too, so
//! that the server's side of the handshake is done when it is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proxy::tls::MeshTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Handshakes completed against `port` in `duration` by `callers`; an error
/// if any failed.
pub async fn run(
    port: u16,
    tls: Arc<MeshTls>,
    service: &str,
    duration: Duration,
    callers: usize,
) -> Result<u64, String> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let name = mesh_proxy::tls::server_name(service).ok_or("not a service name")?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (tls, done, name) = (tls.clone(), done.clone(), name.clone());
        tasks.spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            while Instant::now() < deadline {
                let tcp =
                    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                let mut stream =
                    tokio::time::timeout(Duration::from_secs(5), connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| "handshake timed out".to_owned())?
                        .map_err(|e| format!("handshake failed: {e}"))?;
                let _ = stream.shutdown().await;
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
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
