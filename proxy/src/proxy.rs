//! What every listener of a running proxy shares: the routing table in use
//! and the state that outlives tables.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::ProxyConfig;
use crate::identity::{Identity, TrustBundle};
use crate::snapshot::{Change, LongLived, Snapshot};

/// A routing table to publish: a whole config (a file), or a change to the
/// services of the table in force (the control plane).
pub enum Update {
    Whole(Box<ProxyConfig>),
    Services(Change),
}

pub struct Proxy {
    /// The routing table in use. Requests `load` it; a reload `store`s a
    /// whole new one. In-flight requests keep the `Arc` they started with.
    pub table: ArcSwap<Snapshot>,
    /// Held while a table is built and stored, so no build starts from a
    /// table another is about to replace. Never taken by requests.
    publishing: std::sync::Mutex<()>,
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
    pub identity: arc_swap::ArcSwapOption<Identity>,
    /// The newest trust bundle from the control plane's stream.
    bundle: arc_swap::ArcSwapOption<TrustBundle>,
    /// Wakes the renewal loop before its time: the signing root changed.
    pub renew_now: tokio::sync::Notify,
    /// Counts certificate changes, so the control stream can report them.
    pub identity_changes: tokio::sync::watch::Sender<u64>,
    /// The version of each table stored: what a request held for an
    /// endpoint waits on.
    pub table_changes: tokio::sync::watch::Sender<u64>,
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
            publishing: std::sync::Mutex::new(()),
            long_lived,
            draining: AtomicBool::new(false),
            has_table: AtomicBool::new(false),
            control_version: AtomicU64::new(0),
            needs_identity: AtomicBool::new(false),
            identity: arc_swap::ArcSwapOption::empty(),
            bundle: arc_swap::ArcSwapOption::empty(),
            renew_now: tokio::sync::Notify::new(),
            identity_changes: tokio::sync::watch::channel(0).0,
            table_changes: tokio::sync::watch::channel(0).0,
        })
    }

    /// Builds and publishes the table for a validated config; returns its
    /// version. Only the services that differ from the table in force are
    /// built.
    pub fn apply(&self, config: ProxyConfig) -> u64 {
        self.publish(Update::Whole(Box::new(config)), None)
    }

    /// Publishes `update` as the control plane's `version`.
    pub fn apply_control(&self, update: Update, version: u64) {
        self.publish(update, Some(version));
        self.control_version.store(version, Ordering::Release);
    }

    /// `apply` (no `control_version`) or `apply_control`, run on the
    /// blocking pool: building services takes time, and the threads serving
    /// requests must not wait for it. Returns the version published.
    pub async fn apply_off_thread(self: &Arc<Self>, update: Update, control_version: Option<u64>) -> u64 {
        let proxy = self.clone();
        let build = move || {
            let version = match control_version {
                Some(version) => {
                    proxy.apply_control(update, version);
                    version
                }
                None => proxy.publish(update, None),
            };
            // The replaced services and the update's parse are garbage now.
            mesh_common::heap::give_back_freed_memory();
            version
        };
        match tokio::task::spawn_blocking(build).await {
            Ok(version) => version,
            // A panic in the build is a bug; it goes on as such.
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// Whether the local app's service takes plaintext from outside the mesh.
    pub fn local_service_permissive(&self) -> bool {
        let table = self.table.load();
        table.services.get(table.settings.local_service.as_str()).is_some_and(|s| s.config.permissive)
    }

    /// Why `caller` (its SPIFFE ID; `None` for plaintext) may not call the
    /// local app under the policy in force, or `None` when it may.
    pub fn refuse_caller(&self, caller: Option<&str>) -> Option<String> {
        let table = self.table.load();
        let service = table.services.get(table.settings.local_service.as_str())?;
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

    /// Makes `identity` the one new connections use (open connections keep
    /// theirs), trusting the newest bundle known. A certificate from a root
    /// that no longer signs is renewed at once.
    pub fn install_identity(&self, identity: Identity) -> Result<(), crate::identity::IdentityError> {
        let bundle = self.bundle.load_full();
        let identity = match bundle.as_deref() {
            Some(bundle) if bundle.version > identity.bundle_version => identity.with_bundle(bundle),
            _ => identity,
        };
        let counters = self.long_lived.metrics.tls_handshakes.clone();
        let tls = crate::tls::MeshTls::new(&identity, counters)?;
        self.long_lived
            .metrics
            .identity_expiry_unix_secs
            .store(identity.expires_unix_ms / 1000, Ordering::Relaxed);
        let stale = bundle
            .is_some_and(|b| !b.signer_serial.is_empty() && b.signer_serial != identity.certificate_root);
        self.long_lived.tls.store(Some(Arc::new(tls)));
        self.identity.store(Some(Arc::new(identity)));
        self.identity_changes.send_modify(|n| *n += 1);
        if stale {
            self.renew_now.notify_one();
        }
        Ok(())
    }

    /// Takes a trust bundle from the control plane: new connections trust
    /// its roots from now on.
    pub fn apply_bundle(&self, bundle: TrustBundle) -> Result<(), crate::identity::IdentityError> {
        if bundle.version <= self.bundle_version() {
            return Ok(());
        }
        let bundle = Arc::new(bundle);
        let previous = self.bundle.swap(Some(bundle.clone()));
        let Some(identity) = self.identity.load_full() else { return Ok(()) };
        let result = self.install_identity(identity.with_bundle(&bundle));
        if result.is_err() {
            // The bundle in force stays; the control plane hears why.
            self.bundle.store(previous);
        }
        result
    }

    pub fn bundle_version(&self) -> u64 {
        self.bundle.load().as_ref().map_or(0, |b| b.version)
    }

    /// The root that signed this proxy's certificate (serial), "" for none.
    pub fn certificate_root(&self) -> String {
        self.identity.load().as_ref().map(|i| i.certificate_root.clone()).unwrap_or_default()
    }

    pub fn control_version(&self) -> u64 {
        self.control_version.load(Ordering::Acquire)
    }

    fn publish(&self, update: Update, version: Option<u64>) -> u64 {
        // One build at a time, each from the table the one before published.
        let _writer = self.publishing.lock().expect("publish lock");
        let started = std::time::Instant::now();
        let previous = self.table.load_full();
        let (settings, change) = match update {
            Update::Whole(config) => {
                let (settings, services) = (*config).into_parts();
                (Arc::new(settings), Change::between(&previous, services))
            }
            Update::Services(change) => (previous.settings.clone(), change),
        };
        let snapshot = self.long_lived.next(Some(&previous), settings, change, version);
        drop(previous);
        let version = snapshot.version;
        self.table.store(Arc::new(snapshot));
        self.table_changes.send_replace(version);
        let metrics = &self.long_lived.metrics;
        metrics.reload_duration.record(started.elapsed());
        metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.has_table.store(true, Ordering::Release);
        version
    }
}
