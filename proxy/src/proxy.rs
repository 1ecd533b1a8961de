//! What every listener of a running proxy shares: the routing table in use
//! and the state that outlives tables.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// False until a routing table has been applied (under the control
    /// plane, until the first update); `/ready` says so.
    pub has_table: AtomicBool,
    /// The control plane's version of the table in force, 0 for none.
    control_version: AtomicU64,
    /// True when the proxy was given a bootstrap token: it is not ready
    /// until it holds a certificate.
    pub needs_identity: AtomicBool,
    pub identity: arc_swap::ArcSwapOption<crate::identity::Identity>,
}

impl Proxy {
    /// A proxy serving `config` from the start.
    pub fn new(config: ProxyConfig) -> Arc<Proxy> {
        let proxy = Proxy::waiting(config);
        proxy.long_lived.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        proxy.has_table.store(true, Ordering::Release);
        proxy
    }

    /// A proxy with listeners but no routes yet, waiting for the control plane.
    pub fn waiting(config: ProxyConfig) -> Arc<Proxy> {
        let long_lived = LongLived::default();
        let snapshot = long_lived.build(config, None);
        Arc::new(Proxy {
            table: ArcSwap::from_pointee(snapshot),
            long_lived,
            draining: AtomicBool::new(false),
            has_table: AtomicBool::new(false),
            control_version: AtomicU64::new(0),
            needs_identity: AtomicBool::new(false),
            identity: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// Builds and publishes the table for a validated config; returns its version.
    pub fn apply(&self, config: ProxyConfig) -> u64 {
        self.publish(config, None)
    }

    /// Publishes a table the control plane sent as `version`.
    pub fn apply_control(&self, config: ProxyConfig, version: u64) {
        self.publish(config, Some(version));
        self.control_version.store(version, Ordering::Release);
    }

    /// Whether the local app's service takes plaintext from outside the mesh.
    pub fn local_service_permissive(&self) -> bool {
        let table = self.table.load();
        table.services.get(&table.config.local_service).is_some_and(|s| s.config.permissive)
    }

    /// Why `caller` (its SPIFFE ID; `None` for plaintext) may not call the
    /// local app under the policy in force, or `None` when it may.
    pub fn refuse_caller(&self, caller: Option<&str>) -> Option<String> {
        let table = self.table.load();
        let service = table.services.get(&table.config.local_service)?;
        let tls = self.long_lived.tls.load();
        let trust_domain = tls.as_ref().map_or("", |tls| tls.trust_domain.as_str());
        if crate::authz::allowed(&service.config.allow_from, caller, trust_domain) {
            return None;
        }
        Some(format!(
            "{} may not call {} (allowed: {})",
            caller.unwrap_or("a plaintext caller"),
            service.config.name,
            service.config.allow_from.join(", ")
        ))
    }

    pub fn control_version(&self) -> u64 {
        self.control_version.load(Ordering::Acquire)
    }

    fn publish(&self, config: ProxyConfig, version: Option<u64>) -> u64 {
        let snapshot = self.long_lived.build(config, version);
        let version = snapshot.version;
        self.table.store(Arc::new(snapshot));
        self.long_lived.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.has_table.store(true, Ordering::Release);
        version
    }
}
