//! How the proxy reaches an endpoint: a TCP connection, and over it mTLS
//! when the endpoint is a peer sidecar. The pool and the request path do
//! not change with the hop's encryption.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::tls::MeshTls;

#[cfg(test)]
pub mod memory;

/// A connection to an endpoint. In the proxy's own tests it may also be an
/// in-memory pipe, so that a paused clock can drive the request path.
#[cfg(not(test))]
pub type Stream = TcpStream;
#[cfg(test)]
pub type Stream = memory::Stream;

/// Opens a connection to an endpoint, bounded by the connect timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Stream> {
    #[cfg(test)]
    if let Some(pipe) = memory::dial(addr) {
        return pipe.map(memory::Stream::Memory);
    }
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr} timed out")))??;
    stream.set_nodelay(true)?;
    // The same type outside tests; a test build's stream wraps it.
    #[allow(clippy::useless_conversion)]
    Ok(stream.into())
}

/// What a TLS connection to a peer will carry, announced with ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carries {
    /// The shared, multiplexed HTTP/2 connection.
    Http2,
    /// One HTTP/1.1 request that upgrades (WebSocket and the like).
    Http1Upgrade,
}

/// The TLS handshake with a peer sidecar of `service`, which must present
/// that service's identity; bounded by `timeout`.
pub async fn connect_tls(
    stream: Stream,
    tls: &MeshTls,
    service: &str,
    carries: Carries,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<Stream>> {
    let name = crate::tls::server_name(service).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{service:?} is not a service name"))
    })?;
    let config = match carries {
        Carries::Http2 => tls.client.clone(),
        Carries::Http1Upgrade => tls.client_http1.clone(),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake = tokio::time::timeout(timeout, connector.connect(name, stream)).await;
    let result = match handshake {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
    };
    tls.record_handshake(crate::tls::Side::Outbound, result.is_ok());
    result.map_err(|e| io::Error::new(e.kind(), format!("mTLS with {service}: {e}")))
}
