//! How the proxy reaches an endpoint: a plain TCP connection today. This is
//! the one place a later mTLS transport plugs in, so the pool and the
//! request path do not change when the hop between proxies gets encrypted.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Opens a connection to an endpoint, bounded by the connect timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr} timed out")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
