//! Durable state behind a narrow interface: the whole state is loaded
//! once at start, and each change writes only the service it touched plus
//! the version, in one transaction. redb is the embedded backend; an etcd
//! backend for a multi-server control plane fits the same trait.

mod redb_store;

use std::fmt;

pub use redb_store::RedbStore;

use crate::state::{MeshState, ServiceState};

#[derive(Debug)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: {}", self.0)
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
}
