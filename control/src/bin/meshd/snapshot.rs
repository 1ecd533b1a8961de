//! `meshd snapshot save|restore`: the store copied to and from a file.

use super::*;

pub(crate) fn snapshot(command: SnapshotCommand) -> Result<(), Failure> {
    use mesh_control::store::snapshot;
    let locked = |e: mesh_control::store::StoreError| {
        let hint = if e.in_use { " (stop meshd first: it holds the store)" } else { "" };
        format!("{e}{hint}")
    };
    match command {
        SnapshotCommand::Save { data_dir, file } => {
            let store = RedbStore::open(&data_dir, false).map_err(locked)?;
            let taken = snapshot::take(&store).map_err(|e| e.to_string())?;
            let json = serde_json::to_vec_pretty(&taken).map_err(|e| e.to_string())?;
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            out.write_all(&json)
                .and_then(|()| out.sync_all())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!(
                "saved version {} ({} services, {} jobs, CA: {}) to {}",
                taken.version,
                taken.services.len(),
                taken.jobs.len(),
                if taken.trust.is_some() { "yes" } else { "no" },
                file.display()
            );
        }
        SnapshotCommand::Restore { data_dir, file } => {
            let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let taken: snapshot::Snapshot = serde_json::from_slice(&text)
                .map_err(|e| format!("{} is not a meshd snapshot: {e}", file.display()))?;
            let store = RedbStore::open(&data_dir, true).map_err(locked)?;
            snapshot::restore(&store, &taken).map_err(|e| e.to_string())?;
            println!("restored version {} into {}", taken.version, data_dir.display());
        }
    }
    Ok(())
}
