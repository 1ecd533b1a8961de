//! The replicated store: an etcd cluster that several meshd servers share.
//!
//! Keys live under `/mesh/state/` (services, jobs, users, the trust
//! state). The state's version is etcd's revision, so a version means the
//! same thing on every server. A write is a transaction that checks that
//! none of the keys it writes changed after the version it was based on,
//! and a leader's write also checks that it still holds the leader key's
//! lease (fencing). Writes are not applied where they are made: every
//! server applies every version from its watch, in revision order.
//!
//! The CA's keys are sealed (AES-256-GCM) with a key file each server is
//! given, so etcd and its backups never hold them in the clear.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp, WatchOptions,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use tokio::sync::mpsc;

use super::{Store, StoreError, StoreEvent, Stored, StoredJob, Writer};
use crate::auth::users::StoredUser;
use crate::identity::rotation::StoredTrust;
use crate::state::{MeshState, ServiceState};

const STATE: &str = "/mesh/state/";
const SERVICES: &str = "/mesh/state/services/";
const JOBS: &str = "/mesh/state/jobs/";
const USERS: &str = "/mesh/state/users/";
const TRUST: &str = "/mesh/state/trust";
/// Written to make a version that changes no service (a new trust bundle).
const BUMP: &str = "/mesh/state/bump";
/// Held, with its lease, by the leader; outside the state, so an election
/// makes no new version of the routing state.
pub const LEADER_KEY: &str = "/mesh/leader";

/// How long one request to etcd may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a starting meshd waits for etcd to answer.
const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// Between two attempts to re-establish the feed.
const FEED_RETRY: Duration = Duration::from_millis(200);

pub struct EtcdStore {
    /// One client per member: etcd-client's balanced channel keeps sending
    /// to a member that died, so failing over is done here, by member.
    clients: Vec<Client>,
    /// The member asked first: the one that answered last.
    current: AtomicUsize,
    /// etcd-client runs on a runtime of its own: the `Store` trait is
    /// synchronous (called on the blocking pool), and the feed and the
    /// election outlive any one request.
    runtime: Option<tokio::runtime::Runtime>,
    sealer: Sealer,
    endpoints: String,
    /// The lease of the leader key while this server holds it; 0 otherwise.
    leader_lease: AtomicI64,
    failing: AtomicBool,
}

fn error(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (host:port, comma-separated)
    /// and checks it answers. `key_file` holds the 32 bytes that seal the CA.
    pub fn open(endpoints: &str, key_file: &std::path::Path) -> Result<EtcdStore, StoreError> {
        let sealer = Sealer::from_file(key_file)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| StoreError::new(format!("cannot start the etcd client's runtime: {e}")))?;
        let list: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| if e.contains("://") { e.to_owned() } else { format!("http://{e}") })
            .collect();
        if list.is_empty() {
            return Err(StoreError::new("--etcd-endpoints names no endpoint"));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut clients = Vec::with_capacity(list.len());
        for endpoint in list {
            // Connections are made at the first request, so a member that
            // is down now does not keep the server from starting.
            let connect = Client::connect([endpoint.clone()], Some(options.clone()));
            clients.push(run_on(&runtime, connect).map_err(|e| error(format!("{endpoint}: {e}")))?);
        }
        let store = EtcdStore {
            clients,
            current: AtomicUsize::new(0),
            runtime: Some(runtime),
            sealer,
            endpoints: endpoints.to_owned(),
            leader_lease: AtomicI64::new(0),
            failing: AtomicBool::new(false),
        };
        // Read once: a wrong key file shows now. A cluster that is not up
        // yet (started together with meshd) is waited for, a while.
        let deadline = std::time::Instant::now() + STARTUP_WAIT;
        loop {
            match store.load() {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e.message, "waiting for etcd");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        store.load_trust()?;
        Ok(store)
    }

    /// Runs `future` on the client's runtime and waits for it, from any thread.
    fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        run_on(self.runtime.as_ref().expect("the runtime lives as long as the store"), future)
    }

    /// A handle to spawn long-lived tasks (the feed, the election) on.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.as_ref().expect("the runtime lives as long as the store").handle().clone()
    }

    /// A client of the member that answered last.
    pub fn client(&self) -> Client {
        self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].clone()
    }

    /// Moves on to the next member, after the current one failed.
    pub fn next_member(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `request` against the members in turn until one answers or
    /// each has failed; a request refused for what it asks is not retried.
    fn request<T, F, Fut>(&self, request: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let mut failures = Vec::new();
        for _ in 0..self.clients.len() {
            match self.run(request(self.client())) {
                Ok(answer) => return Ok(answer),
                Err(e) if member_failed(&e) => {
                    failures.push(e.to_string());
                    self.next_member();
                }
                Err(e) => return Err(error(e)),
            }
        }
        Err(StoreError::new(format!(
            "etcd is unavailable ({}): {}",
            self.endpoints,
            failures.last().map_or("no member answered", String::as_str)
        )))
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Called by the election: the lease a leader's writes are fenced by.
    pub fn set_leader_lease(&self, lease: Option<i64>) {
        self.leader_lease.store(lease.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn get_prefix(&self, prefix: &'static str) -> Result<(u64, Vec<KeyValue>), StoreError> {
        let mut response = self.request(move |mut client| async move {
            client.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let revision = response.take_header().map_or(0, |h| h.revision().max(0) as u64);
        Ok((revision, response.take_kvs()))
    }

    fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &'static str,
        what: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let (_, kvs) = self.get_prefix(prefix)?;
        kvs.iter()
            .map(|kv| {
                let name = name_of(kv.key(), prefix);
                let value = serde_json::from_slice(kv.value())
                    .map_err(|e| error(format!("{what} {name:?} is unreadable: {e}")))?;
                Ok((name, value))
            })
            .collect()
    }

    /// Commits `txn`; a failed write leaves meshd unready until one succeeds.
    fn commit(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let result = self.request(move |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        });
        self.failing.store(result.is_err(), Ordering::Relaxed);
        result
    }

    fn put_json<T: serde::Serialize>(&self, key: String, value: Option<&T>) -> Result<(), StoreError> {
        self.commit(Txn::new().and_then(vec![json_op(key, value)?])).map(|_| ())
    }

    /// Commits `write` if `check` holds; else a conflict saying `why`.
    fn commit_checked(
        &self,
        check: Compare,
        write: TxnOp,
        why: impl FnOnce() -> String,
    ) -> Result<(), StoreError> {
        let mut response = self.commit(Txn::new().when(vec![check]).and_then(vec![write]))?;
        if response.succeeded() {
            return Ok(());
        }
        let mut conflict = StoreError::new(why());
        conflict.conflict_at = response.take_header().map(|h| h.revision().max(0) as u64);
        Err(conflict)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime may not block inside another one.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on `runtime` and waits for it on this thread, which may
/// belong to another runtime (a blocking wait there is the caller's choice).
fn run_on<F>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().expect("the etcd client's runtime runs until the store is dropped")
}

/// Whether `e` says the member (or its link) failed, not the request:
/// then another member may answer.
fn member_failed(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

fn name_of(key: &[u8], prefix: &str) -> String {
    String::from_utf8_lossy(&key[prefix.len().min(key.len())..]).into_owned()
}

/// A put of `value` as JSON under `key`, or with `None` a delete.
fn json_op<T: serde::Serialize>(key: String, value: Option<&T>) -> Result<TxnOp, StoreError> {
    Ok(match value {
        Some(value) => TxnOp::put(key, serde_json::to_vec(value).map_err(error)?, None),
        None => TxnOp::delete(key, None),
    })
}

fn revision_of(kv: &KeyValue) -> u64 {
    kv.mod_revision().max(0) as u64
}

impl Store for EtcdStore {
    fn load(&self) -> Result<MeshState, StoreError> {
        let (revision, kvs) = self.get_prefix(SERVICES)?;
        let mut state = MeshState { version: revision, ..MeshState::default() };
        for kv in &kvs {
            let name = name_of(kv.key(), SERVICES);
            let mut service: ServiceState = serde_json::from_slice(kv.value())
                .map_err(|e| error(format!("service {name:?} is unreadable: {e}")))?;
            service.stamp = revision_of(kv);
            state.services.insert(name, std::sync::Arc::new(service));
        }
        Ok(state)
    }

    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        _version: u64,
        based_on: u64,
        writer: Writer,
    ) -> Result<u64, StoreError> {
        let mut checks = Vec::with_capacity(services.len() + 1);
        let mut writes = Vec::with_capacity(services.len().max(1));
        for (name, service) in services {
            let key = format!("{SERVICES}{name}");
            // Unchanged since the version the change was validated against.
            checks.push(Compare::mod_revision(key.clone(), CompareOp::Less, based_on as i64 + 1));
            writes.push(json_op(key, *service)?);
        }
        if writes.is_empty() {
            writes.push(TxnOp::put(BUMP, Vec::new(), None));
        }
        if writer == Writer::Leader {
            let lease = self.leader_lease.load(Ordering::SeqCst);
            if lease == 0 {
                return Err(StoreError::new("this server is not the leader"));
            }
            checks.push(Compare::lease(LEADER_KEY, CompareOp::Equal, lease));
        }
        let mut response = self.commit(Txn::new().when(checks).and_then(writes))?;
        let revision = response.take_header().map_or(0, |h| h.revision().max(0) as u64);
        if response.succeeded() {
            return Ok(revision);
        }
        if writer == Writer::Leader && !self.holds_leader_key()? {
            self.set_leader_lease(None);
            return Err(StoreError::new("this server lost the leadership; the write was not made"));
        }
        let mut conflict = StoreError::new("another server changed the same service first");
        conflict.conflict_at = Some(revision);
        Err(conflict)
    }

    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError> {
        self.load_json(JOBS, "job")
    }

    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError> {
        self.put_json(format!("{JOBS}{name}"), job)
    }

    fn save_job_checked(&self, name: &str, job: Option<&StoredJob>, based_on: u64) -> Result<(), StoreError> {
        let key = format!("{JOBS}{name}");
        let unchanged = Compare::mod_revision(key.clone(), CompareOp::Less, based_on as i64 + 1);
        self.commit_checked(unchanged, json_op(key, job)?, || {
            format!("job {name:?} was changed on another server meanwhile: look at it again (meshctl job status {name}) and resubmit")
        })
    }

    fn load_users(&self) -> Result<Vec<(String, StoredUser)>, StoreError> {
        self.load_json(USERS, "user")
    }

    fn save_user(&self, name: &str, user: Option<&StoredUser>) -> Result<(), StoreError> {
        self.put_json(format!("{USERS}{name}"), user)
    }

    fn swap_user(
        &self,
        name: &str,
        previous: Option<&StoredUser>,
        user: Option<&StoredUser>,
    ) -> Result<(), StoreError> {
        let key = format!("{USERS}{name}");
        let unchanged = match previous {
            Some(previous) => {
                Compare::value(key.clone(), CompareOp::Equal, serde_json::to_vec(previous).map_err(error)?)
            }
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        self.commit_checked(unchanged, json_op(key, user)?, || {
            format!("user {name:?} was changed on another server meanwhile: try again")
        })
    }

    fn load_trust(&self) -> Result<Option<StoredTrust>, StoreError> {
        let (_, kvs) = self.get_prefix(TRUST)?;
        let Some(kv) = kvs.iter().find(|kv| kv.key() == TRUST.as_bytes()) else { return Ok(None) };
        self.sealer.open_trust(kv.value()).map(Some)
    }

    fn save_trust(&self, trust: &StoredTrust) -> Result<(), StoreError> {
        let sealed = self.sealer.seal(&serde_json::to_vec(trust).map_err(error)?)?;
        self.commit(Txn::new().and_then(vec![TxnOp::put(TRUST, sealed, None)])).map(|_| ())
    }

    fn writable(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    fn follow(&self, after: u64) -> Option<mpsc::Receiver<StoreEvent>> {
        let (tx, rx) = mpsc::channel(1024);
        let feed = Feed {
            clients: self.clients.clone(),
            member: 0,
            sealer: self.sealer.clone(),
            next: after + 1,
            tx,
        };
        self.handle().spawn(feed.run());
        Some(rx)
    }
}

impl EtcdStore {
    /// Creates the trust state unless another server did first; returns
    /// the one in force.
    pub fn create_trust(&self, trust: &StoredTrust) -> Result<StoredTrust, StoreError> {
        let sealed = self.sealer.seal(&serde_json::to_vec(trust).map_err(error)?)?;
        let absent = Compare::create_revision(TRUST, CompareOp::Equal, 0);
        let response =
            self.commit(Txn::new().when(vec![absent]).and_then(vec![TxnOp::put(TRUST, sealed, None)]))?;
        if response.succeeded() {
            return Ok(trust.clone());
        }
        self.load_trust()?.ok_or_else(|| StoreError::new("the trust state vanished while it was created"))
    }

    fn holds_leader_key(&self) -> Result<bool, StoreError> {
        let lease = self.leader_lease.load(Ordering::SeqCst);
        let response = self.request(|mut client| async move { client.get(LEADER_KEY, None).await })?;
        Ok(response.kvs().first().is_some_and(|kv| kv.lease() == lease && lease != 0))
    }
}

/// The watch that delivers every version after `next - 1`, re-established
/// from where it stopped when an etcd member goes away.
struct Feed {
    clients: Vec<Client>,
    /// The member watched; the next one after a failure.
    member: usize,
    sealer: Sealer,
    next: u64,
    tx: mpsc::Sender<StoreEvent>,
}

impl Feed {
    async fn run(mut self) {
        loop {
            match self.watch().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, from = self.next, "the store's feed broke; re-establishing it");
                    self.member += 1;
                    tokio::time::sleep(FEED_RETRY).await;
                }
            }
        }
    }

    /// Watches until the receiver is gone (`Ok`) or the watch fails.
    async fn watch(&mut self) -> Result<(), String> {
        let options = WatchOptions::new().with_prefix().with_start_revision(self.next as i64);
        let mut client = self.clients[self.member % self.clients.len()].clone();
        let mut stream = client.watch(STATE, Some(options)).await.map_err(|e| e.to_string())?;
        loop {
            let Some(response) = stream.message().await.map_err(|e| e.to_string())? else {
                return Err("the watch ended".into());
            };
            if response.canceled() {
                return Err(format!("the watch was cancelled: {}", response.cancel_reason()));
            }
            for event in self.events(response.events())? {
                self.next = event.version + 1;
                if self.tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// Groups a response's events by revision: one transaction, one version.
    fn events(&self, events: &[etcd_client::Event]) -> Result<Vec<StoreEvent>, String> {
        let mut out: Vec<StoreEvent> = Vec::new();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let version = revision_of(kv);
            if version < self.next {
                continue;
            }
            if out.last().is_none_or(|last| last.version != version) {
                out.push(StoreEvent { version, changes: Vec::new() });
            }
            let put = event.event_type() == EventType::Put;
            if let Some(change) = self.decode(kv, put)? {
                out.last_mut().expect("pushed above").changes.push(change);
            }
        }
        Ok(out)
    }

    fn decode(&self, kv: &KeyValue, put: bool) -> Result<Option<Stored>, String> {
        let key = String::from_utf8_lossy(kv.key());
        fn json<T: serde::de::DeserializeOwned>(kv: &KeyValue, put: bool) -> Result<Option<T>, String> {
            match put {
                true => serde_json::from_slice(kv.value())
                    .map(Some)
                    .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(kv.key()))),
                false => Ok(None),
            }
        }
        let change = if let Some(name) = key.strip_prefix(SERVICES) {
            let service = json::<ServiceState>(kv, put)?.map(|mut s| {
                s.stamp = revision_of(kv);
                s
            });
            Stored::Service(name.to_owned(), service)
        } else if let Some(name) = key.strip_prefix(JOBS) {
            Stored::Job(name.to_owned(), json(kv, put)?)
        } else if let Some(name) = key.strip_prefix(USERS) {
            Stored::User(name.to_owned(), json(kv, put)?)
        } else if key == TRUST {
            let trust = match put {
                true => Some(self.sealer.open_trust(kv.value()).map_err(|e| e.message)?),
                false => None,
            };
            Stored::Trust(trust)
        } else {
            return Ok(None);
        };
        Ok(Some(change))
    }
}

/// Seals and opens the CA's keys with the servers' shared key file.
#[derive(Clone)]
struct Sealer {
    key: std::sync::Arc<LessSafeKey>,
}

impl Sealer {
    fn from_file(path: &std::path::Path) -> Result<Sealer, StoreError> {
        let bytes = std::fs::read(path)
            .map_err(|e| StoreError::new(format!("--store-key {}: {e}", path.display())))?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| {
            StoreError::new(format!(
                "--store-key {}: holds {} bytes; it must hold 32 random bytes (head -c 32 /dev/urandom > FILE)",
                path.display(),
                bytes.len()
            ))
        })?;
        Ok(Sealer { key: std::sync::Arc::new(LessSafeKey::new(key)) })
    }

    /// nonce ‖ ciphertext ‖ tag.
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut sealed = plain.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed)
            .map_err(|_| StoreError::new("cannot seal the trust state"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open_trust(&self, sealed: &[u8]) -> Result<StoredTrust, StoreError> {
        let refused = || {
            StoreError::new(
                "the stored CA cannot be opened with --store-key: every server must be given the same key file",
            )
        };
        if sealed.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::empty(), &mut body).map_err(|_| refused())?;
        serde_json::from_slice(plain)
            .map_err(|e| StoreError::new(format!("the stored CA is unreadable: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        let key = UnboundKey::new(&AES_256_GCM, &[byte; 32]).unwrap();
        Sealer { key: std::sync::Arc::new(LessSafeKey::new(key)) }
    }

    #[test]
    fn the_ca_is_sealed_and_only_the_same_key_opens_it() {
        let trust = StoredTrust {
            cert_pem: "CERT".into(),
            key_pem: "-----BEGIN PRIVATE KEY----- secret".into(),
            stage: crate::identity::rotation::Stage::Steady,
            other_cert_pem: None,
            other_key_pem: None,
            bundle_version: 3,
            retired: Vec::new(),
        };
        let sealed = sealer(1).seal(&serde_json::to_vec(&trust).unwrap()).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("secret"), "the key is not in the clear");
        assert_eq!(sealer(1).open_trust(&sealed).unwrap(), trust);
        let refused = sealer(2).open_trust(&sealed).unwrap_err();
        assert!(refused.message.contains("same key file"), "{}", refused.message);
        assert!(sealer(1).open_trust(&sealed[..5]).is_err(), "a truncated value is refused");
    }
}
