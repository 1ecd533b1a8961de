//! A store in memory: for in-process tests of what sits above the store
//! (the writer, the scheduler). It keeps what it is given, as the real one
//! would, and can be told to fail its writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Store, StoreError, StoredJob};
use crate::auth::users::StoredUser;
use crate::identity::rotation::StoredTrust;
use crate::state::{MeshState, ServiceState};

#[derive(Default)]
pub struct MemoryStore {
    saved: Mutex<Saved>,
    /// While true, every write fails and changes nothing.
    pub failing: AtomicBool,
    /// Writes of the routing state that succeeded (transactions, not services).
    pub service_writes: AtomicU64,
}

#[derive(Default)]
struct Saved {
    services: BTreeMap<String, ServiceState>,
    version: u64,
    jobs: BTreeMap<String, StoredJob>,
    users: BTreeMap<String, StoredUser>,
    trust: Option<StoredTrust>,
}

impl MemoryStore {
    fn write(&self, change: impl FnOnce(&mut Saved)) -> Result<(), StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::new("the memory store was told to fail"));
        }
        change(&mut self.saved.lock().expect("memory store lock"));
        Ok(())
    }

    fn read<T>(&self, look: impl FnOnce(&Saved) -> T) -> T {
        look(&self.saved.lock().expect("memory store lock"))
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<MeshState, StoreError> {
        Ok(self.read(|saved| {
            let mut state = MeshState { version: saved.version, ..MeshState::default() };
            for (name, service) in &saved.services {
                state.services.insert(name.clone(), std::sync::Arc::new(service.clone()));
            }
            state
        }))
    }

    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        version: u64,
        _based_on: u64,
        _writer: super::Writer,
    ) -> Result<u64, StoreError> {
        self.write(|saved| {
            for (name, service) in services {
                match service {
                    Some(service) => saved.services.insert((*name).to_owned(), (*service).clone()),
                    None => saved.services.remove(*name),
                };
            }
            saved.version = version;
        })?;
        self.service_writes.fetch_add(1, Ordering::Relaxed);
        Ok(version)
    }

    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError> {
        Ok(self.read(|saved| saved.jobs.iter().map(|(n, j)| (n.clone(), j.clone())).collect()))
    }

    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError> {
        self.write(|saved| match job {
            Some(job) => {
                saved.jobs.insert(name.to_owned(), job.clone());
            }
            None => {
                saved.jobs.remove(name);
            }
        })
    }

    fn load_users(&self) -> Result<Vec<(String, StoredUser)>, StoreError> {
        Ok(self.read(|saved| saved.users.iter().map(|(n, u)| (n.clone(), u.clone())).collect()))
    }

    fn save_user(&self, name: &str, user: Option<&StoredUser>) -> Result<(), StoreError> {
        self.write(|saved| match user {
            Some(user) => {
                saved.users.insert(name.to_owned(), user.clone());
            }
            None => {
                saved.users.remove(name);
            }
        })
    }

    fn load_trust(&self) -> Result<Option<StoredTrust>, StoreError> {
        Ok(self.read(|saved| saved.trust.clone()))
    }

    fn save_trust(&self, trust: &StoredTrust) -> Result<(), StoreError> {
        self.write(|saved| saved.trust = Some(trust.clone()))
    }
}
