//! The proxy's listeners: each accepts connections and hands requests to
//! the request path, and stops accepting when shutdown begins.

pub mod admin;
pub mod drain;
pub mod http;
pub mod tcp;

use tokio::sync::watch;

/// Turns true once, when the proxy starts shutting down.
pub type ShutdownSignal = watch::Receiver<bool>;

pub async fn shutdown_started(signal: &mut ShutdownSignal) {
    // An error means the sender is gone, which also means shutdown.
    let _ = signal.wait_for(|down| *down).await;
}
