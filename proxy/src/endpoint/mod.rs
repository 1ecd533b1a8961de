//! An endpoint's long-lived state: its latency estimate, breaker, ejection
//! count and connection pool (`pool.rs`). It outlives table swaps, so a
//! new table keeps what the old one learned of an endpoint it still has.

pub mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::balance::breaker::BreakerCell;
use crate::balance::ewma::PeakEwma;
use pool::{ConnPool, MeshPeer};

/// Per-endpoint state kept across table swaps.
pub struct EndpointState {
    pub ewma: PeakEwma,
    pub breaker: BreakerCell,
    pub ejections: AtomicU64,
    pub pool: Arc<ConnPool>,
    /// Whether the last table announced it ready.
    announced_ready: AtomicBool,
}

impl EndpointState {
    /// A fresh endpoint at `addr`; `mesh` for a peer sidecar (mTLS).
    pub fn new(addr: SocketAddr, mesh: Option<MeshPeer>) -> EndpointState {
        EndpointState {
            ewma: PeakEwma::default(),
            breaker: BreakerCell::default(),
            ejections: AtomicU64::new(0),
            pool: Arc::new(ConnPool::new(addr, mesh)),
            announced_ready: AtomicBool::new(false),
        }
    }

    /// Records what a new table says of the endpoint. Ready again after not
    /// ready (a restarted process, say): what the breaker learned of the
    /// old one no longer holds.
    pub fn announce(&self, ready: bool) {
        let was_ready = self.announced_ready.swap(ready, Ordering::Relaxed);
        if ready && !was_ready {
            self.breaker.record_success();
        }
    }
}
