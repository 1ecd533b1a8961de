//! A snapshot of the store: everything meshd keeps (routing state, jobs,
//! the CA), as one JSON file an operator can keep and restore. Taken and
//! restored with meshd stopped (`meshd snapshot save|restore`): the store
//! file is locked while meshd runs, and proxies keep serving meanwhile.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, StoredJob};
use crate::auth::users::StoredUser;
use crate::identity::rotation::StoredTrust;
use crate::state::ServiceState;

/// Bumped when the layout changes; a restore refuses formats it does not know.
const FORMAT: u32 = 1;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub version: u64,
    pub services: BTreeMap<String, ServiceState>,
    pub jobs: BTreeMap<String, StoredJob>,
    pub trust: Option<StoredTrust>,
    /// Operators and their current credentials (absent in older snapshots).
    #[serde(default)]
    pub users: BTreeMap<String, StoredUser>,
}

/// Reads everything in `store`.
pub fn take(store: &dyn Store) -> Result<Snapshot, StoreError> {
    let state = store.load()?;
    Ok(Snapshot {
        format: FORMAT,
        version: state.version,
        services: state.services.into_iter().map(|(name, service)| (name, (*service).clone())).collect(),
        jobs: store.load_jobs()?.into_iter().collect(),
        trust: store.load_trust()?,
        users: store.load_users()?.into_iter().collect(),
    })
}

/// Writes everything in `snapshot` into `store` (an empty one).
pub fn restore(store: &dyn Store, snapshot: &Snapshot) -> Result<(), StoreError> {
    if snapshot.format != FORMAT {
        return Err(StoreError::new(format!(
            "snapshot format {} is not one this meshd reads ({FORMAT})",
            snapshot.format
        )));
    }
    let services: Vec<(&str, Option<&ServiceState>)> =
        snapshot.services.iter().map(|(name, service)| (name.as_str(), Some(service))).collect();
    store.save_services(&services, snapshot.version, 0, super::Writer::Any)?;
    for (name, job) in &snapshot.jobs {
        store.save_job(name, Some(job))?;
    }
    for (name, user) in &snapshot.users {
        store.save_user(name, Some(user))?;
    }
    if let Some(trust) = &snapshot.trust {
        store.save_trust(trust)?;
    }
    Ok(())
}
