//! Durable state behind a narrow interface: the whole state is loaded
//! once at start, and each change writes only the service it touched plus
//! the version, in one transaction. redb is the embedded backend; an etcd
//! backend for a multi-server control plane fits the same trait.

mod memory;
mod redb_store;
pub mod snapshot;

use std::fmt;

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
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError { message: message.into(), in_use: false }
    }
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

    /// Writes the new state of some services (`None`: gone) and the state's
    /// version in one transaction, durably, before returning.
    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        version: u64,
    ) -> Result<(), StoreError>;

    /// Every stored job, by name.
    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError>;

    /// Writes (or with `None` deletes) one job durably before returning.
    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError>;

    /// Every operator, by name.
    fn load_users(&self) -> Result<Vec<(String, StoredUser)>, StoreError>;

    /// Writes (or with `None` deletes) one operator durably before returning.
    fn save_user(&self, name: &str, user: Option<&StoredUser>) -> Result<(), StoreError>;

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
}
