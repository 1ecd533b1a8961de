//! `meshd server`: the control plane's core. Changes are validated by the
//! pure state (`state.rs`), made durable in the store, then published on a
//! watch channel that every proxy's stream reads from. The watch channel
//! holds only the newest publication, so a slow proxy skips versions
//! instead of queueing them: memory per proxy stays bounded.

pub mod access;
pub mod admin;
pub mod discovery;
pub mod forward;
pub mod gather;
pub mod http;
pub mod identity;
pub mod incoming;
pub mod jobs;
pub mod leader;
pub mod liveness;
pub mod logs;
pub mod node_leases;
pub mod nodes;
pub mod prometheus_sd;
mod proxy_records;
pub mod registry;
pub mod replica;
pub mod shared_proxies;
pub mod tls;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use std::collections::BTreeSet;

use tokio::sync::{mpsc, oneshot, watch, Notify};

use mesh_proto::mesh::v1 as pb;

use crate::metrics::ControlMetrics;
use crate::publish::Published;
use crate::state::{Change, ChangeError, MeshDefaults, MeshState, ServiceState};
use crate::store::{Store, StoreError, StoreEvent, Stored, Writer};
use proxy_records::merge_proxies;
pub use window::PublishWindow;

/// The status of a write refused because another server changed what it
/// was decided on; else as `store_failure`.
pub fn write_failure(error: StoreError) -> tonic::Status {
    match error.conflict_at {
        Some(_) => tonic::Status::aborted(error.message),
        None => store_failure(error),
    }
}

/// The status of a request the store could not make durable: nothing of
/// it was applied. meshctl tells it from an unreachable server by the
/// `mesh-failure: store-write` metadata.
pub fn store_failure(error: impl std::fmt::Display) -> tonic::Status {
    let mut status = tonic::Status::unavailable(format!("meshd cannot write its store: {error}"));
    status.metadata_mut().insert("mesh-failure", tonic::metadata::MetadataValue::from_static("store-write"));
    status
}

/// What the control plane knows about one proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyRecord {
    pub service: String,
    /// Where the proxy serves /metrics, as it said in its Hello.
    pub admin_addr: String,
    pub acked_version: u64,
    pub rejected: Option<(u64, String)>,
    pub last_contact: Option<SystemTime>,
    pub connected: bool,
    /// The version last pushed and when, for push-to-ack latency.
    pub pushed: Option<(u64, Instant)>,
    /// Since when a pushed version has waited for its ack, if one has.
    pub unacked_since: Option<Instant>,
    /// Distinguishes reconnections of one proxy id.
    pub stream: u64,
    /// The root that signed the proxy's certificate (serial), "" for none.
    pub certificate_root: String,
    /// The trust bundle version the proxy holds.
    pub bundle_version: u64,
    /// The other server it is connected to; "" for this one.
    pub server: String,
    /// How it reaches the peers of the services it calls over QUIC, as it
    /// last said.
    pub peers: Vec<PeerTransport>,
}

/// How a proxy reaches one peer sidecar (`meshctl status --peers`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerTransport {
    pub service: String,
    pub addr: String,
    pub quic: bool,
    /// Why TCP, when it is: "fallback", "no-quic" or "idle".
    pub reason: String,
}

impl PeerTransport {
    pub fn from_pb(peer: pb::PeerTransport) -> PeerTransport {
        let quic = peer.transport() == pb::Transport::Quic;
        PeerTransport { service: peer.service, addr: peer.addr, quic, reason: peer.reason }
    }

    pub fn to_pb(&self) -> pb::PeerTransport {
        let transport = if self.quic { pb::Transport::Quic } else { pb::Transport::Tcp };
        pb::PeerTransport {
            service: self.service.clone(),
            addr: self.addr.clone(),
            transport: transport.into(),
            reason: self.reason.clone(),
        }
    }
}

/// A connected proxy that has left an update unacknowledged this long is
/// stalled: `--wait` stops waiting for it and reports it instead.
pub const STALL_AFTER: Duration = Duration::from_secs(3);

impl ProxyRecord {
    pub fn stalled(&self) -> bool {
        self.connected && self.unacked_since.is_some_and(|since| since.elapsed() > STALL_AFTER)
    }

    /// Whether convergence waits for this proxy.
    pub fn counts_for_convergence(&self) -> bool {
        self.connected && !self.stalled()
    }
}

pub struct ControlPlane {
    /// The mesh's defaults for services that set none.
    pub defaults: MeshDefaults,
    store: Arc<dyn Store>,
    /// Writers take this lock in turn; readers use `published`.
    state: tokio::sync::Mutex<MeshState>,
    published: watch::Sender<Arc<Published>>,
    proxies: Mutex<HashMap<String, ProxyRecord>>,
    /// Bumped whenever a proxy acks, connects or leaves, to wake waiters.
    acks: watch::Sender<u64>,
    /// Changes go to the single writer task through here.
    writes: mpsc::Sender<PendingChange>,
    /// Told when a committed state waits to be published.
    publish_soon: Notify,
    pub metrics: ControlMetrics,
    /// Serials of the roots in the trust bundle: a proxy whose certificate
    /// is from another root fails every handshake, so its endpoint is not
    /// ready until it renews.
    trusted_roots: std::sync::RwLock<Vec<String>>,
    /// Whether the store is shared with other servers: then a write is
    /// applied from the store's feed, here as everywhere, not where made.
    replicated: bool,
    /// The newest version the state holds.
    applied: watch::Sender<u64>,
    /// Every version the feed applied, for what else follows the store
    /// (jobs, operators, the CA).
    events: tokio::sync::broadcast::Sender<Arc<StoreEvent>>,
    /// The proxies other servers sharing the store have, by server.
    remote_proxies: Mutex<HashMap<String, HashMap<String, ProxyRecord>>>,
    /// Set when a proxy of this server's changed, for sharing them.
    pub(crate) local_changed: std::sync::atomic::AtomicBool,
    /// With a shared store: routing changes applied since the last publication.
    unpublished: std::sync::atomic::AtomicU64,
    /// The traffic summaries of this server's proxies, for a minute.
    pub traffic: Mutex<crate::traffic::Traffic>,
}

#[derive(Debug)]
pub enum ChangeFailure {
    Refused(ChangeError),
    Store(StoreError),
}

/// A change waiting for the writer, and where its answer goes.
struct PendingChange {
    change: Change,
    writer: Writer,
    reply: oneshot::Sender<Result<u64, ChangeFailure>>,
}

/// How long a batch refused for conflicts with other servers' writes is
/// validated again on the newer state before it fails. Under contention
/// some server wins every round, so a batch loses many rounds in a row
/// only rarely; the bound is on time, and on rounds.
const CONFLICT_PATIENCE: Duration = Duration::from_secs(10);
const CONFLICT_ATTEMPTS: usize = 100;

/// How long a write waits to come back through the store's feed.
const FEED_WAIT: Duration = Duration::from_secs(10);

/// Changes committed together in one store transaction at most.
const MAX_BATCH: usize = 256;

impl ControlPlane {
    /// Loads the stored state and starts the writer task.
    pub fn new(store: Arc<dyn Store>) -> Result<Arc<ControlPlane>, StoreError> {
        ControlPlane::with_window(store, PUBLISH_WINDOW)
    }

    /// A control plane that publishes changes made within `window` of a
    /// publication together, at the window's end.
    pub fn with_window(
        store: Arc<dyn Store>,
        window: PublishWindow,
    ) -> Result<Arc<ControlPlane>, StoreError> {
        ControlPlane::with_defaults(store, window, MeshDefaults::default())
    }

    /// A control plane with the mesh's defaults for services that set none.
    pub fn with_defaults(
        store: Arc<dyn Store>,
        window: PublishWindow,
        defaults: MeshDefaults,
    ) -> Result<Arc<ControlPlane>, StoreError> {
        let state = store.load()?;
        let feed = store.follow(state.version);
        let version = state.version;
        let published = Published::build(&state, &Published::default(), &defaults);
        let metrics = ControlMetrics::default();
        metrics.set_version(state.version);
        metrics.set_publish_window(window.base);
        let (writes, pending) = mpsc::channel(MAX_BATCH * 4);
        let control = Arc::new(ControlPlane {
            defaults,
            store,
            state: tokio::sync::Mutex::new(state),
            published: watch::channel(Arc::new(published)).0,
            proxies: Mutex::new(HashMap::new()),
            acks: watch::channel(0).0,
            writes,
            publish_soon: Notify::new(),
            metrics,
            trusted_roots: Default::default(),
            replicated: feed.is_some(),
            applied: watch::channel(version).0,
            events: tokio::sync::broadcast::channel(1024).0,
            remote_proxies: Mutex::new(HashMap::new()),
            traffic: {
                // Traffic windows are measured from meshd's start.
                monotonic_ms();
                Mutex::new(Default::default())
            },
            local_changed: Default::default(),
            unpublished: Default::default(),
        });
        if let Some(feed) = feed {
            tokio::spawn(apply_feed(Arc::downgrade(&control), feed));
        }
        tokio::spawn(write_loop(control.clone(), pending));
        tokio::spawn(publish_loop(control.clone(), window));
        Ok(control)
    }

    /// Validates, persists and publishes one change; returns the version
    /// that contains it. A refused change touches neither store nor
    /// proxies. Changes that arrive together are committed together (group
    /// commit): one durable write for the batch, each change still
    /// validated and answered on its own.
    pub async fn change(&self, change: Change) -> Result<u64, ChangeFailure> {
        self.change_as(change, Writer::Any).await
    }

    /// A change only the leader may make (the scheduler's): with a shared
    /// store it fails once this server has lost its lease.
    pub async fn change_as_leader(&self, change: Change) -> Result<u64, ChangeFailure> {
        self.change_as(change, Writer::Leader).await
    }

    async fn change_as(&self, change: Change, writer: Writer) -> Result<u64, ChangeFailure> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ChangeFailure::Store(StoreError::new("the control plane's writer has stopped"));
        self.writes.send(PendingChange { change, writer, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Every version applied from the shared store's feed, from now on.
    pub fn store_events(&self) -> tokio::sync::broadcast::Receiver<Arc<StoreEvent>> {
        self.events.subscribe()
    }

    /// Whether other servers share the store.
    pub fn replicated(&self) -> bool {
        self.replicated
    }

    /// Waits until the state holds `version` (a write coming back through
    /// the feed); false if it did not within the feed's wait.
    pub async fn wait_applied(&self, version: u64) -> bool {
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(FEED_WAIT, applied.wait_for(|applied| *applied >= version)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// A batch for a shared store: validated on the state as this server
    /// has it, written only if no service it touches changed since (else
    /// validated again on the newer state), and applied from the feed.
    async fn commit_replicated(&self, batch: Vec<PendingChange>) {
        let writer = batch[0].writer;
        let mut results = Vec::new();
        let patience = Instant::now() + CONFLICT_PATIENCE;
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let (tried, services, based_on) = {
                let state = self.state.lock().await;
                let (next, tried, touched) = apply_batch(&state, &batch);
                let services: Vec<(String, Option<Arc<ServiceState>>)> =
                    touched.iter().map(|name| (name.clone(), next.services.get(name).cloned())).collect();
                (tried, services, state.version)
            };
            results = tried;
            if services.is_empty() {
                break;
            }
            let saved = self
                .durably(move |store| {
                    let services: Vec<(&str, Option<&ServiceState>)> =
                        services.iter().map(|(name, service)| (name.as_str(), service.as_deref())).collect();
                    store.save_services(&services, 0, based_on, writer)
                })
                .await;
            match saved {
                Ok(version) => {
                    if !self.wait_applied(version).await {
                        tracing::warn!(version, "a write did not come back through the store's feed in time");
                    }
                    for result in results.iter_mut().flatten() {
                        *result = version;
                    }
                    break;
                }
                Err(StoreError { conflict_at: Some(newer), .. })
                    if attempt < CONFLICT_ATTEMPTS && Instant::now() < patience =>
                {
                    self.metrics.count_write_conflict();
                    self.wait_applied(newer).await;
                    // Servers that lost together should not race again in step.
                    let pause = rand::random_range(0..=2 * attempt.min(10) as u64);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(error) => {
                    tracing::error!(%error, "store write failed; the batch is not applied");
                    for result in &mut results {
                        if result.is_ok() {
                            *result = Err(ChangeFailure::Store(StoreError::new(error.message.clone())));
                        }
                    }
                    break;
                }
            }
        }
        for (pending, result) in batch.into_iter().zip(results) {
            let _ = pending.reply.send(result);
        }
    }

    async fn commit(&self, batch: Vec<PendingChange>) {
        if self.replicated {
            return self.commit_replicated(batch).await;
        }
        let mut state = self.state.lock().await;
        let (next, mut results, touched) = apply_batch(&state, &batch);
        if !touched.is_empty() {
            let services: Vec<(String, Option<Arc<ServiceState>>)> =
                touched.iter().map(|name| (name.clone(), next.services.get(name).cloned())).collect();
            let version = next.version;
            let saved = self
                .durably(move |store| {
                    let services: Vec<(&str, Option<&ServiceState>)> =
                        services.iter().map(|(name, service)| (name.as_str(), service.as_deref())).collect();
                    store.save_services(&services, version, version - 1, Writer::Any)
                })
                .await;
            if let Err(error) = saved {
                // Nothing was applied: every accepted change fails with the store's error.
                tracing::error!(%error, "store write failed; the batch is not applied");
                for result in &mut results {
                    if result.is_ok() {
                        *result = Err(ChangeFailure::Store(StoreError::new(error.message.clone())));
                    }
                }
            } else {
                *state = next;
                self.metrics.set_version(state.version);
                self.publish_soon.notify_one();
            }
        }
        drop(state);
        for (pending, result) in batch.into_iter().zip(results) {
            let _ = pending.reply.send(result);
        }
    }

    /// Publishes a new trust bundle in a version of its own, so that a
    /// proxy's ack of that version proves it holds the bundle. Returns the
    /// version.
    pub async fn publish_bundle(&self, bundle: pb::Bundle) -> Result<u64, StoreError> {
        if self.replicated {
            // Every publication from the new version on carries the bundle.
            self.set_bundle(bundle);
            let based_on = self.current_version();
            let version =
                self.durably(move |store| store.save_services(&[], 0, based_on, Writer::Any)).await?;
            self.wait_applied(version).await;
            return Ok(version);
        }
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        next.version += 1;
        // Versions only grow, across restarts too.
        let version = next.version;
        self.durably(move |store| store.save_services(&[], version, version - 1, Writer::Any)).await?;
        let mut published = Published::build(&next, &self.published.borrow(), &self.defaults);
        published.bundle = Some(Arc::new(bundle));
        *state = next;
        self.metrics.set_version(state.version);
        self.published.send_replace(Arc::new(published));
        Ok(state.version)
    }

    /// The bundle proxies get from the start, in the current version.
    pub fn set_bundle(&self, bundle: pb::Bundle) {
        self.published.send_modify(|published| Arc::make_mut(published).bundle = Some(Arc::new(bundle)));
    }

    pub async fn state(&self) -> MeshState {
        self.state.lock().await.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    pub fn set_trusted_roots(&self, serials: Vec<String>) {
        *self.trusted_roots.write().expect("roots lock") = serials;
    }

    /// Proxies (by id) whose certificate comes from a root the bundle no
    /// longer holds: they missed a rotation and have not renewed yet.
    pub fn proxies_behind(&self) -> std::collections::HashSet<String> {
        let roots = self.trusted_roots.read().expect("roots lock").clone();
        let proxies = self.proxies.lock().expect("proxies lock");
        proxies
            .iter()
            .filter(|(_, p)| {
                !roots.is_empty() && !p.certificate_root.is_empty() && !roots.contains(&p.certificate_root)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Runs a durable write on the blocking pool: an fsync must not hold
    /// an async worker, nor run under a lock that async tasks wait on.
    pub async fn durably<T, E>(
        &self,
        write: impl FnOnce(&dyn Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || write(&*store)).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::new(format!("the store's write task failed: {e}")).into()),
        }
    }

    /// The store, for reads and for start-up, before any request is served.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The newest version the state holds (published or about to be).
    pub fn applied_version(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn current_version(&self) -> u64 {
        self.published.borrow().version
    }

    /// Every proxy, this server's and (with a shared store) the other
    /// servers', by id.
    pub fn proxies(&self) -> Vec<(String, ProxyRecord)> {
        let local = self.proxies.lock().expect("proxies lock");
        let remote = self.remote_proxies.lock().expect("remote proxies lock");
        let mut list: Vec<(String, ProxyRecord)> =
            merge_proxies(&local, &remote).into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    /// This server's own proxies, for sharing with the others.
    pub fn local_proxies(&self) -> Vec<(String, ProxyRecord)> {
        let proxies = self.proxies.lock().expect("proxies lock");
        proxies.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The proxies another server has now (`None`: it is gone).
    /// The other servers sharing the store that have shared their proxies.
    pub fn other_servers(&self) -> Vec<String> {
        self.remote_proxies.lock().expect("remote proxies lock").keys().cloned().collect()
    }

    pub fn set_remote_proxies(&self, server: &str, proxies: Option<HashMap<String, ProxyRecord>>) {
        let mut remote = self.remote_proxies.lock().expect("remote proxies lock");
        match proxies {
            Some(proxies) => remote.insert(server.to_owned(), proxies),
            None => remote.remove(server),
        };
        drop(remote);
        self.acks.send_modify(|n| *n += 1);
    }

    pub fn update_proxy(&self, id: &str, update: impl FnOnce(&mut ProxyRecord)) {
        self.edit_proxy(id, update);
        self.acks.send_modify(|n| *n += 1);
    }

    /// Records that `version` was pushed to a proxy. Nobody waiting for
    /// acks is woken: a push changes no proxy's acked version.
    pub fn note_push(&self, id: &str, version: u64) {
        self.edit_proxy(id, |record| {
            let now = Instant::now();
            record.pushed = Some((version, now));
            record.unacked_since.get_or_insert(now);
        });
    }

    /// Edits a proxy's record in O(1): this runs for every push and ack.
    fn edit_proxy(&self, id: &str, update: impl FnOnce(&mut ProxyRecord)) {
        let mut proxies = self.proxies.lock().expect("proxies lock");
        if !proxies.contains_key(id) {
            proxies.insert(id.to_owned(), ProxyRecord::default());
        }
        let record = proxies.get_mut(id).expect("inserted above");
        let was_connected = record.connected;
        update(record);
        self.local_changed.store(true, std::sync::atomic::Ordering::Relaxed);
        if record.connected != was_connected {
            self.metrics.count_connected(record.connected);
        }
    }

    /// Waits until every connected proxy that is not stalled has applied
    /// `version` or newer, or `timeout` passes. Returns whether it
    /// converged and the proxies.
    pub async fn wait_converged(
        &self,
        version: u64,
        timeout: Duration,
    ) -> (bool, Vec<(String, ProxyRecord)>) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_for_proxies(deadline, |proxies| converged(proxies.values(), version)).await
    }

    /// Waits until `done` holds for the proxies or `deadline` passes;
    /// returns whether it held and the proxies as last seen.
    pub async fn wait_for_proxies(
        &self,
        deadline: tokio::time::Instant,
        mut done: impl FnMut(&HashMap<String, ProxyRecord>) -> bool,
    ) -> (bool, Vec<(String, ProxyRecord)>) {
        let mut changes = self.acks.subscribe();
        loop {
            // Checked in place: a copy of every record on every ack would
            // cost O(proxies²) for one change to reach them all.
            let shared = !self.remote_proxies.lock().expect("remote proxies lock").is_empty();
            let finished = if shared {
                let local = self.proxies.lock().expect("proxies lock");
                let remote = self.remote_proxies.lock().expect("remote proxies lock");
                let merged: HashMap<String, ProxyRecord> =
                    merge_proxies(&local, &remote).into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                done(&merged)
            } else {
                done(&self.proxies.lock().expect("proxies lock"))
            };
            if finished || tokio::time::Instant::now() >= deadline {
                return (finished, self.proxies());
            }
            // Wake on any ack, and now and then, since a proxy can become
            // stalled without sending anything.
            let tick = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            let _ = tokio::time::timeout_at(tick, changes.changed()).await;
            if shared {
                // Merging costs O(proxies): acks arriving together are checked once.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Applies a batch's changes in order to a copy of `state`: the new state,
/// each change's result and the services that changed.
fn apply_batch(
    state: &MeshState,
    batch: &[PendingChange],
) -> (MeshState, Vec<Result<u64, ChangeFailure>>, BTreeSet<String>) {
    let mut next = state.clone();
    let mut touched = BTreeSet::new();
    let mut results = Vec::with_capacity(batch.len());
    for pending in batch {
        match next.apply(&pending.change) {
            Ok(applied) => {
                if applied.version != next.version {
                    touched.extend(pending.change.services().into_iter().map(str::to_owned));
                }
                next = applied;
                results.push(Ok(next.version));
            }
            Err(refused) => results.push(Err(ChangeFailure::Refused(refused))),
        }
    }
    (next, results, touched)
}

/// Applies every version the shared store's feed delivers, in order, and
/// passes it on to what else follows the store.
async fn apply_feed(control: std::sync::Weak<ControlPlane>, mut feed: mpsc::Receiver<StoreEvent>) {
    while let Some(event) = feed.recv().await {
        let Some(control) = control.upgrade() else { return };
        // A version of the routing state: services changed, or none did
        // (a bump that carries a new trust bundle). Jobs, operators and the
        // CA alone make no new routing version.
        let routing =
            event.changes.is_empty() || event.changes.iter().any(|c| matches!(c, Stored::Service(..)));
        if routing {
            let mut state = control.state.lock().await;
            for change in &event.changes {
                if let Stored::Service(name, service) = change {
                    match service {
                        Some(service) => state.services.insert(name.clone(), Arc::new(service.clone())),
                        None => state.services.remove(name),
                    };
                }
            }
            state.version = state.version.max(event.version);
            control.metrics.set_version(state.version);
            control.unpublished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(state);
            control.publish_soon.notify_one();
        }
        control.applied.send_replace(event.version);
        let _ = control.events.send(Arc::new(event));
    }
}

/// Whether every proxy that counts has applied `version`.
pub fn converged<'a>(proxies: impl IntoIterator<Item = &'a ProxyRecord>, version: u64) -> bool {
    proxies.into_iter().filter(|p| p.counts_for_convergence()).all(|p| p.acked_version >= version)
}

/// How long after a publication further changes wait, to go out together:
/// 50 ms, growing to 400 ms under fast churn (see `window.rs`). A
/// change after a quiet spell is published at once; under churn every
/// proxy gets at most one update per window, whatever the change rate.
pub const PUBLISH_WINDOW: PublishWindow =
    PublishWindow { base: Duration::from_millis(50), max: Duration::from_millis(400) };

/// After a burst of publications, how long without one before freed heap
/// is handed back to the kernel.
const TRIM_AFTER_QUIET: Duration = Duration::from_secs(1);

/// Publishes the committed state: at once after a quiet spell, then at
/// most once per `window`. Once a burst is over, the memory its updates
/// passed through (every stream's send buffers) is handed back.
async fn publish_loop(control: Arc<ControlPlane>, window: PublishWindow) {
    let mut burst = false;
    let mut pause = window.base;
    let mut last_publication = tokio::time::Instant::now();
    loop {
        if burst {
            let quiet =
                tokio::time::timeout(TRIM_AFTER_QUIET, control.publish_soon.notified()).await.is_err();
            if quiet {
                burst = false;
                // malloc_trim walks the heap: not on an async worker.
                tokio::task::spawn_blocking(mesh_common::heap::give_back_freed_memory);
                continue;
            }
        } else {
            control.publish_soon.notified().await;
        }
        {
            let state = control.state.lock().await;
            let before = control.published.borrow().version;
            if state.version != before {
                let published = Published::build(&state, &control.published.borrow(), &control.defaults);
                control.published.send_replace(Arc::new(published));
                burst = true;
                // Versions count changes here, but not with a shared store,
                // whose revisions also count other servers' bookkeeping.
                let changes = match control.replicated {
                    true => control.unpublished.swap(0, std::sync::atomic::Ordering::Relaxed).max(1),
                    false => state.version.saturating_sub(before),
                };
                pause = window.next(pause, changes, last_publication.elapsed());
                last_publication = tokio::time::Instant::now();
                control.metrics.set_publish_window(pause);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// The single writer: takes what is waiting, up to a batch, and commits
/// it. A batch holds one kind of writer: a leader's write that fails for a
/// lost lease takes no operator's change with it.
async fn write_loop(control: Arc<ControlPlane>, mut pending: mpsc::Receiver<PendingChange>) {
    let mut carried: Option<PendingChange> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match pending.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let writer = first.writer;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match pending.try_recv() {
                Ok(next) if next.writer == writer => batch.push(next),
                Ok(next) => {
                    carried = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        control.commit(batch).await;
    }
}

#[cfg(test)]
mod group_commit_tests;
#[cfg(test)]
mod publish_window_tests;

/// Milliseconds on a clock that only goes forward (since this process
/// first asked): what traffic windows are measured on.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}
