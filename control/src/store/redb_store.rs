//! The embedded store: one redb file under the data dir.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError, StoredJob};
use crate::auth::users::StoredUser;
use crate::identity::rotation::{Stage, StoredTrust};
use crate::state::{MeshState, ServiceState};

const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const CA: TableDefinition<&str, &str> = TableDefinition::new("ca");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";

/// The file that says a data dir has held a mesh (its store had a CA).
/// With it present, a missing or empty store is damage, not a first start.
const LIFE_MARKER: &str = "meshd.id";

pub struct RedbStore {
    path: PathBuf,
    marker: PathBuf,
    /// `None` after a failed write until the file could be opened again.
    db: RwLock<Option<Database>>,
    /// Set by a failed write, cleared by the next one that succeeds.
    failing: AtomicBool,
}

fn error(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(e.to_string())
}

/// Runs `f`, turning a panic inside it (redb asserts on some damage) into
/// an error. Used only while opening, on the main thread, before serving.
fn without_panics<T>(f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(quiet);
    result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned());
        Err(error(what))
    })
}

/// Sets `path`'s mode (owner only).
fn private(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| error(format!("{}: {e}", path.display())))
}

impl RedbStore {
    /// Opens the store under `data_dir`. A damaged, empty or missing store
    /// in a data dir that held a mesh is an error naming the file, unless
    /// `reinitialize` (then a damaged file is moved aside, not deleted).
    pub fn open(data_dir: &Path, reinitialize: bool) -> Result<RedbStore, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| error(format!("{}: {e}", data_dir.display())))?;
        // The store holds the CA's key: only meshd's user may read it, even
        // in a data dir made before (the mode above applies to new ones).
        private(data_dir, 0o700)?;
        let path = data_dir.join("meshd.redb");
        let marker = data_dir.join(LIFE_MARKER);
        let lived = marker.exists();
        let advice = "restore a snapshot (meshd snapshot restore), or start with --reinitialize to begin a new, empty mesh whose new CA no existing sidecar trusts";
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() == 0 && !reinitialize => {
                return Err(error(format!("the store {} is empty (0 bytes): {advice}", path.display())))
            }
            Err(_) if lived && !reinitialize => {
                return Err(error(format!(
                    "the store {} is missing, but this data dir has held a mesh ({} is there): {advice}",
                    path.display(),
                    marker.display()
                )))
            }
            _ => {}
        }
        if reinitialize {
            set_aside(&path)?;
            let _ = std::fs::remove_file(&marker);
        }
        let store = without_panics(|| {
            let db = Database::create(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError {
                    conflict_at: None,
                    message: format!("{} is in use by another process (a running meshd?)", path.display()),
                    in_use: true,
                },
                other => error(other),
            })?;
            private(&path, 0o600)?;
            let store = RedbStore {
                path: path.clone(),
                marker: marker.clone(),
                db: RwLock::new(Some(db)),
                failing: AtomicBool::new(false),
            };
            store.create_tables()?;
            // Read everything once: damage shows now, not while serving.
            store.load()?;
            store.load_jobs()?;
            let trust = store.load_trust()?;
            Ok((store, trust))
        });
        let (store, trust) = store.map_err(|e| match e.in_use {
            true => e,
            false => error(format!("the store {} is damaged ({}): {advice}", path.display(), e.message)),
        })?;
        match trust {
            Some(_) => store.mark_life(),
            None if lived && !reinitialize => {
                return Err(error(format!(
                    "the store {} holds no CA, but this data dir has held a mesh ({} is there): {advice}",
                    path.display(),
                    marker.display()
                )))
            }
            None => {}
        }
        Ok(store)
    }

    /// Every entry of a table of JSON values, by name.
    fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        what: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(error)?;
            let table = read.open_table(table).map_err(error)?;
            let mut entries = Vec::new();
            for entry in table.iter().map_err(error)? {
                let (name, value) = entry.map_err(error)?;
                let value: T = serde_json::from_slice(value.value())
                    .map_err(|e| error(format!("{what} {:?} is unreadable: {e}", name.value())))?;
                entries.push((name.value().to_owned(), value));
            }
            Ok(entries)
        })
    }

    /// Writes (or with `None` deletes) one JSON value durably.
    fn save_json<T: serde::Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        self.write(|db| {
            let write = db.begin_write().map_err(error)?;
            {
                let mut table = write.open_table(table).map_err(error)?;
                match value {
                    Some(value) => {
                        let bytes = serde_json::to_vec(value).map_err(error)?;
                        table.insert(name, bytes.as_slice()).map_err(error)?;
                    }
                    None => {
                        table.remove(name).map_err(error)?;
                    }
                }
            }
            write.commit().map_err(error)
        })
    }

    fn create_tables(&self) -> Result<(), StoreError> {
        self.write(|db| {
            let write = db.begin_write().map_err(error)?;
            write.open_table(SERVICES).map_err(error)?;
            write.open_table(META).map_err(error)?;
            write.open_table(JOBS).map_err(error)?;
            write.open_table(CA).map_err(error)?;
            write.open_table(USERS).map_err(error)?;
            write.commit().map_err(error)
        })
    }

    /// Notes in the data dir that it holds a mesh, so that losing the store
    /// later is noticed instead of starting over with a new CA.
    fn mark_life(&self) {
        if !self.marker.exists() {
            if let Err(e) = std::fs::write(&self.marker, "this data dir holds a mesh's store\n") {
                tracing::warn!(marker = %self.marker.display(), %e, "cannot write the life marker");
            }
        }
    }

    /// Runs a read on the open database.
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let guard = self.db.read().expect("store lock");
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(error(format!("{} is closed after a failed write", self.path.display()))),
        }
    }

    /// Runs a write. After a failed one, redb refuses every later write
    /// until the file is opened again: that is done here, at once and before
    /// the next write, so a full disk that gets space back heals by itself.
    fn write<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.failing.load(Ordering::Acquire) {
            self.reopen();
        }
        let result = self.read(f);
        match &result {
            Ok(_) => self.failing.store(false, Ordering::Release),
            Err(e) => {
                tracing::error!(store = %self.path.display(), error = %e, "a store write failed");
                self.failing.store(true, Ordering::Release);
                self.reopen();
            }
        }
        result.map_err(|e| error(format!("writing {}: {}", self.path.display(), e.message)))
    }

    fn reopen(&self) {
        let mut guard = self.db.write().expect("store lock");
        // The old handle holds the file's lock: it goes first.
        guard.take();
        match Database::create(&self.path) {
            Ok(db) => *guard = Some(db),
            Err(e) => tracing::error!(store = %self.path.display(), %e, "cannot open the store again"),
        }
    }
}

/// Moves a store file out of the way, keeping it for inspection.
fn set_aside(path: &Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Ok(());
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside = path.with_extension(format!("redb.old-{stamp}"));
    std::fs::rename(path, &aside).map_err(|e| error(format!("moving {} aside: {e}", path.display())))?;
    tracing::warn!(old = %aside.display(), "--reinitialize: the old store is kept aside; starting empty");
    Ok(())
}

impl Store for RedbStore {
    fn load(&self) -> Result<MeshState, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(error)?;
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
        })
    }

    fn save_services(
        &self,
        services: &[(&str, Option<&ServiceState>)],
        version: u64,
        _based_on: u64,
        _writer: super::Writer,
    ) -> Result<u64, StoreError> {
        self.write(|db| {
            let write = db.begin_write().map_err(error)?;
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
        })?;
        Ok(version)
    }

    fn load_jobs(&self) -> Result<Vec<(String, StoredJob)>, StoreError> {
        self.load_json(JOBS, "job")
    }

    fn load_users(&self) -> Result<Vec<(String, StoredUser)>, StoreError> {
        self.load_json(USERS, "user")
    }

    fn save_user(&self, name: &str, user: Option<&StoredUser>) -> Result<(), StoreError> {
        self.save_json(USERS, name, user)
    }

    fn load_trust(&self) -> Result<Option<StoredTrust>, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(error)?;
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
                retired: Vec::new(),
            }))
        })
    }

    fn save_trust(&self, trust: &StoredTrust) -> Result<(), StoreError> {
        let json = serde_json::to_string(trust).map_err(error)?;
        self.write(|db| {
            let write = db.begin_write().map_err(error)?;
            {
                let mut table = write.open_table(CA).map_err(error)?;
                table.insert("trust", json.as_str()).map_err(error)?;
                table.remove("cert").map_err(error)?;
                table.remove("key").map_err(error)?;
            }
            write.commit().map_err(error)
        })?;
        self.mark_life();
        Ok(())
    }

    fn save_job(&self, name: &str, job: Option<&StoredJob>) -> Result<(), StoreError> {
        self.save_json(JOBS, name, job)
    }

    fn writable(&self) -> bool {
        if !self.failing.load(Ordering::Acquire) {
            return true;
        }
        // Probe with a small write: it succeeds once space is back.
        let probe = self.write(|db| {
            let write = db.begin_write().map_err(error)?;
            {
                let mut meta = write.open_table(META).map_err(error)?;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                meta.insert("last_probe", now.map_or(0, |d| d.as_secs())).map_err(error)?;
            }
            write.commit().map_err(error)
        });
        probe.is_ok()
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
            quic: false,
            plaintext_ok: false,
        };
        let state = MeshState::default().apply(&change).unwrap();
        {
            let store = RedbStore::open(&dir, false).unwrap();
            let services = [("web", state.services.get("web").map(|s| &**s)), ("gone", None)];
            store.save_services(&services, state.version, 0, super::super::Writer::Any).unwrap();
        }
        let job = StoredJob { text: "name = \"web\"".into(), dir: "/srv".into() };
        RedbStore::open(&dir, false).unwrap().save_job("web", Some(&job)).unwrap();
        let reopened = RedbStore::open(&dir, false).unwrap();
        assert_eq!(reopened.load().unwrap(), state);
        assert_eq!(reopened.load_jobs().unwrap(), vec![("web".to_owned(), job)]);
        reopened.save_job("web", None).unwrap();
        assert!(reopened.load_jobs().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
