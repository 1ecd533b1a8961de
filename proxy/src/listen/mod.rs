//! The proxy's listeners: each accepts connections and hands requests to
//! the request path, and stops accepting when shutdown begins.

pub mod admin;
pub mod drain;
pub mod http;
pub mod quic;
pub mod request_line;
pub mod tcp;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// What a listener allows the connections it accepts.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once on one listener; more are closed at accept,
    /// so that a flood cannot take every file descriptor.
    pub max_connections: usize,
    /// A peer's connection that sends no byte within this is closed (the
    /// header timeout only starts at the first byte).
    pub first_byte_within: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 10_000, first_byte_within: Duration::from_secs(10) }
    }
}

/// The connection slots of one listener.
pub struct Slots(Arc<Semaphore>);

impl Slots {
    pub fn new(limits: &ConnectionLimits) -> Slots {
        Slots(Arc::new(Semaphore::new(limits.max_connections)))
    }

    /// A slot for a new connection, held until it closes; `None` when the
    /// listener is full (the connection is then dropped, and counted).
    pub fn take(&self, metrics: &crate::metrics::Metrics) -> Option<OwnedSemaphorePermit> {
        let slot = self.0.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics.connections_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        slot
    }
}

/// Turns true once, when the proxy starts shutting down.
pub type ShutdownSignal = watch::Receiver<bool>;

pub async fn shutdown_started(signal: &mut ShutdownSignal) {
    // An error means the sender is gone, which also means shutdown.
    let _ = signal.wait_for(|down| *down).await;
}

/// The listener's next connection, or None once shutdown has started. A
/// failed accept (out of file descriptors) pauses and tries again: it must
/// not end the listener. Cancel-safe, as `accept` is.
pub async fn next_connection(listener: &TcpListener, shutdown: &mut ShutdownSignal) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = shutdown_started(shutdown) => return None,
        }
    }
}
