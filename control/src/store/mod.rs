//! Durable state behind a narrow interface: the whole state is loaded
//! once at start, and each change writes only the service it touched plus
//! the version, in one transaction. redb is the embedded backend for one
//! server; etcd is the replicated one that several servers share. With
//! etcd a write is not applied where it is made: every server, the writer
//! included, applies it from the store's feed, in the store's order.

pub mod etcd;
mod memory;
mod redb_store;
pub mod snapshot;

use std::fmt;

pub use etcd::EtcdStore;
pub use memory::MemoryStore;
pub use redb_store::RedbStore;

use crate::auth::users::StoredUser;
use crate::identity::rotation::StoredTrust;
use crate::state::{MeshState, ServiceState};

/// A job as submitted: the file's text and the directory it came from
/// (commands resolve relative to it). Parsed again on load, so the file
/// stays the one source of truth.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredJob {
    pub text: String,
    pub dir: String,
}

/// A store that cannot be read or written, and why.
#[derive(Debug)]
pub struct StoreError {
    pub message: String,
    /// Another process (a running meshd) holds the store: nothing is
    /// wrong with it, and waiting for that process is the remedy.
    pub in_use: bool,
    /// A replicated store refused the write because another server changed
    /// what it was based on, by this version: apply that, then try again.
    pub conflict_at: Option<u64>,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError { message: message.into(), in_use: false, conflict_at: None }
    }
}

/// One version of a replicated store, as its feed delivers it.
#[derive(Debug, Clone)]
pub struct StoreEvent {
    pub version: u64,
    pub changes: Vec<Stored>,
}

/// One key's new value in a [`StoreEvent`]; `None`: deleted.
#[derive(Debug, Clone)]
pub enum Stored {
    Service(String, Option<ServiceState>),
    Job(String, Option<StoredJob>),
    User(String, Option<StoredUser>),
    Trust(Option<StoredTrust>),
}

/// Who may write what: scheduler decisions are fenced to the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Anyone: an operator's change, made on whichever server took it.
    Any,
    /// Only the current leader: the write fails if this server lost its lease.
    Leader,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

pub trait Store: Send + Sync + 'static {
    /// Everything stored, as the state to serve.
    fn load(&self) -> Result<MeshState, StoreError>;

    /// Writes the new state of some services (`None`: gone) in one
    /// transaction, durably, before returning; returns the version that
    /// holds it. `version` is the version to write for a local store;
    /// a replicated one chooses its own, and refuses the write if one of
    /// the services changed after `based_on`.
    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        version: u64,
        based_on: u64,
        writer: Writer,
    ) -> Result<u64, StoreError>;

    /// Every stored job, by name.
    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError>;

    /// Writes (or with `None` deletes) one job durably before returning.
    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError>;

    /// `save_job` for a change decided on the jobs as of `based_on`: a
    /// shared store refuses it (`conflict_at`) if another server changed
    /// the job after that version.
    fn save_job_checked(&self, name: &str, job: Option<&StoredJob>, based_on: u64) -> Result<(), StoreError> {
        let _ = based_on;
        self.save_job(name, job)
    }

    /// Every operator, by name.
    fn load_users(&self) -> Result<Vec<(String, StoredUser)>, StoreError>;

    /// Writes (or with `None` deletes) one operator durably before returning.
    fn save_user(&self, name: &str, user: Option<&StoredUser>) -> Result<(), StoreError>;

    /// `save_user` if the operator is still `previous` (`None`: absent): a
    /// shared store refuses it when another server changed them meanwhile.
    fn swap_user(
        &self,
        name: &str,
        previous: Option<&StoredUser>,
        user: Option<&StoredUser>,
    ) -> Result<(), StoreError> {
        let _ = previous;
        self.save_user(name, user)
    }

    /// The trust state (the signing CA and, during a root rotation, the
    /// other root), if one was saved.
    fn load_trust(&self) -> Result<Option<StoredTrust>, StoreError>;

    /// Saves the trust state durably. CA keys live only here.
    fn save_trust(&self, trust: &StoredTrust) -> Result<(), StoreError>;

    /// Whether writes succeed now; after a failed one, tries again first.
    /// meshd is not ready while this is false.
    fn writable(&self) -> bool {
        true
    }

    /// For a replicated store, every version after `after`, in order, for
    /// as long as the receiver is kept. `None`: writes apply where they are
    /// made, and nothing changes the store behind this server's back.
    fn follow(&self, _after: u64) -> Option<tokio::sync::mpsc::Receiver<StoreEvent>> {
        None
    }
}
