//! The embedded store: one redb file under the data dir.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError, StoredJob};
use crate::identity::rotation::{Stage, StoredTrust};
use crate::state::{MeshState, ServiceState};

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const CA: TableDefinition<&str, &str> = TableDefinition::new("ca");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";

pub struct RedbStore {
    db: Database,
}

fn error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl RedbStore {
    pub fn open(data_dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| error(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join("meshd.redb");
        let db = Database::create(&path).map_err(|e| error(format!("{}: {e}", path.display())))?;
        // Create the tables so that a fresh store loads as empty.
        let write = db.begin_write().map_err(error)?;
        write.open_table(SERVICES).map_err(error)?;
        write.open_table(META).map_err(error)?;
        write.open_table(JOBS).map_err(error)?;
        write.open_table(CA).map_err(error)?;
        write.commit().map_err(error)?;
        Ok(RedbStore { db })
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<MeshState, StoreError> {
        let read = self.db.begin_read().map_err(error)?;
        let meta = read.open_table(META).map_err(error)?;
        let version = meta.get(VERSION_KEY).map_err(error)?.map(|v| v.value()).unwrap_or(0);
        let table = read.open_table(SERVICES).map_err(error)?;
        let mut state = MeshState { version, ..MeshState::default() };
        for entry in table.iter().map_err(error)? {
            let (name, value) = entry.map_err(error)?;
            let service: ServiceState = serde_json::from_slice(value.value())
                .map_err(|e| error(format!("service {:?} is unreadable: {e}", name.value())))?;
            state.services.insert(name.value().to_owned(), std::sync::Arc::new(service));
        }
        Ok(state)
    }

    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        version: u64,
    ) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(error)?;
        {
            let mut table = write.open_table(SERVICES).map_err(error)?;
            for (name, service) in services {
                match service {
                    Some(service) => {
                        let bytes = serde_json::to_vec(service).map_err(error)?;
                        table.insert(*name, bytes.as_slice()).map_err(error)?;
                    }
                    None => {
                        table.remove(*name).map_err(error)?;
                    }
                }
            }
            let mut meta = write.open_table(META).map_err(error)?;
            meta.insert(VERSION_KEY, version).map_err(error)?;
        }
        // redb commits durably (fsync) by default.
        write.commit().map_err(error)
    }

    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError> {
        let read = self.db.begin_read().map_err(error)?;
        let table = read.open_table(JOBS).map_err(error)?;
        let mut jobs = Vec::new();
        for entry in table.iter().map_err(error)? {
            let (name, value) = entry.map_err(error)?;
            let job: StoredJob = serde_json::from_slice(value.value())
                .map_err(|e| error(format!("job {:?} is unreadable: {e}", name.value())))?;
            jobs.push((name.value().to_owned(), job));
        }
        Ok(jobs)
    }

    fn load_trust(&self) -> Result<Option<StoredTrust>, StoreError> {
        let read = self.db.begin_read().map_err(error)?;
        let table = read.open_table(CA).map_err(error)?;
        if let Some(stored) = table.get("trust").map_err(error)? {
            let trust = serde_json::from_str(stored.value())
                .map_err(|e| error(format!("the stored trust state is unreadable: {e}")))?;
            return Ok(Some(trust));
        }
        // Written before rotations existed: the signing CA alone.
        let cert = table.get("cert").map_err(error)?.map(|v| v.value().to_owned());
        let key = table.get("key").map_err(error)?.map(|v| v.value().to_owned());
        Ok(cert.zip(key).map(|(cert_pem, key_pem)| StoredTrust {
            cert_pem,
            key_pem,
            stage: Stage::Steady,
            other_cert_pem: None,
            other_key_pem: None,
            bundle_version: 1,
        }))
    }

    fn save_trust(&self, trust: &StoredTrust) -> Result<(), StoreError> {
        let json = serde_json::to_string(trust).map_err(error)?;
        let write = self.db.begin_write().map_err(error)?;
        {
            let mut table = write.open_table(CA).map_err(error)?;
            table.insert("trust", json.as_str()).map_err(error)?;
            table.remove("cert").map_err(error)?;
            table.remove("key").map_err(error)?;
        }
        write.commit().map_err(error)
    }

    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(error)?;
        {
            let mut table = write.open_table(JOBS).map_err(error)?;
            match job {
                Some(job) => {
                    let bytes = serde_json::to_vec(job).map_err(error)?;
                    table.insert(name, bytes.as_slice()).map_err(error)?;
                }
                None => {
                    table.remove(name).map_err(error)?;
                }
            }
        }
        write.commit().map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Change;

    #[test]
    fn what_is_saved_is_loaded_after_reopening() {
        let dir = std::env::temp_dir().join(format!("meshd-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let change = Change::Register {
            service: "web".into(),
            version: "v1".into(),
            addr: "127.0.0.1:1".into(),
            ready: true,
            meshed: false,
        };
        let state = MeshState::default().apply(&change).unwrap();
        {
            let store = RedbStore::open(&dir).unwrap();
            let services = [("web", state.services.get("web").map(|s| &**s)), ("gone", None)];
            store.save_services(&services, state.version).unwrap();
        }
        let job = StoredJob { text: "name = \"web\"".into(), dir: "/srv".into() };
        RedbStore::open(&dir).unwrap().save_job("web", Some(&job)).unwrap();
        let reopened = RedbStore::open(&dir).unwrap();
        assert_eq!(reopened.load().unwrap(), state);
        assert_eq!(reopened.load_jobs().unwrap(), vec![("web".to_owned(), job)]);
        reopened.save_job("web", None).unwrap();
        assert!(reopened.load_jobs().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
