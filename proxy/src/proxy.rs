//! What every listener of a running proxy shares: the routing table in use
//! and the state that outlives tables.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ProxyConfig;
use crate::snapshot::{LongLived, Snapshot};

pub struct Proxy {
    /// The routing table in use. Requests `load` it; a reload `store`s a
    /// whole new one. In-flight requests keep the `Arc` they started with.
    pub table: ArcSwap<Snapshot>,
    pub long_lived: LongLived,
    pub draining: AtomicBool,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Proxy> {
        let long_lived = LongLived::default();
        let snapshot = long_lived.build(config);
        long_lived.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        Arc::new(Proxy {
            table: ArcSwap::from_pointee(snapshot),
            long_lived,
            draining: AtomicBool::new(false),
        })
    }

    /// Builds and publishes the table for a validated config; returns its version.
    pub fn apply(&self, config: ProxyConfig) -> u64 {
        let snapshot = self.long_lived.build(config);
        let version = snapshot.version;
        self.table.store(Arc::new(snapshot));
        self.long_lived.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        version
    }
}
