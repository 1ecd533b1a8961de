//! The agent's files, handled as a root process must: its data dir is its
//! own and private, files in it are opened without following symlinks, and
//! a process group named in a pid record is signalled only if it is still
//! the process this agent started (pids are reused after a reboot).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where an agent keeps its files when not told: a root-owned path for
/// root, the user's state folder otherwise. Never a shared temp dir, where
/// anyone could prepare it first.
pub fn default_data_dir(node: &str) -> PathBuf {
    default_state_dir(&format!("agent-{node}"))
}

/// Where meshd keeps `leaf`'s state by default: under /var/lib/meshd for
/// root, ~/.local/state/meshd for a user.
pub fn default_state_dir(leaf: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/var/lib/meshd").join(leaf);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/meshd").join(leaf),
        None => std::env::temp_dir().join(format!("meshd-{leaf}-{uid}")),
    }
}

/// Makes `dir` (and its parents) if needed and insists that it is a real
/// folder owned by this process's user, readable by nobody else (0700).
pub fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("data dir {}: {e}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("data dir {}: {e}", dir.display()))?;
    if !meta.file_type().is_dir() {
        return Err(format!("data dir {} is not a folder (a symlink?): refusing it", dir.display()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "data dir {} belongs to uid {}, not to this agent's uid {me}: refusing it, since anything in it could have been planted",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("data dir {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Opens `path` for appending, creating it private, without following a
/// symlink in its last component.
pub fn append_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Opens `path` for reading without following a symlink in its last component.
pub fn read_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// A process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`): with the pid, what identifies one process for good.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; field 22 is the 20th after it.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// One line of a pid record: the group leader's pid and start time.
pub fn pid_record(pid: i32) -> Option<String> {
    Some(format!("{pid} {}", start_time(pid)?))
}

/// The groups of a pid record that are still the processes recorded:
/// lines whose pid now runs with the recorded start time. Lines without a
/// start time (or with garbage) name nothing for certain and are skipped.
pub fn still_ours(record: &str, start_time_of: impl Fn(i32) -> Option<u64>) -> Vec<i32> {
    record
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let pid: i32 = words.next()?.parse().ok()?;
            let started: u64 = words.next()?.parse().ok()?;
            (pid > 1 && start_time_of(pid) == Some(started)).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_are_read_after_the_command_name() {
        let fields = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        // (stat line, start time)
        let table = [
            (format!("77 (sleep) {fields}"), Some(424242)),
            (format!("77 (a) b) (c) {fields}"), Some(424242)),
            ("77 (short) S 1 2".to_owned(), None),
            ("garbage".to_owned(), None),
        ];
        for (stat, expected) in table {
            assert_eq!(parse_start_time(&stat), expected, "{stat}");
        }
    }

    #[test]
    fn only_groups_that_are_still_the_recorded_processes_are_ours() {
        let now = |pid: i32| match pid {
            100 => Some(5000),
            200 => Some(9999),
            _ => None,
        };
        // (record, pids still ours)
        let table: [(&str, &[i32]); 6] = [
            ("100 5000", &[100]),
            ("200 5000", &[]),
            ("300 5000", &[]),
            ("100", &[]),
            ("1 0\n100 5000\nx y", &[100]),
            ("100 5000\n200 9999", &[100, 200]),
        ];
        for (record, expected) in table {
            assert_eq!(still_ours(record, now), expected, "{record:?}");
        }
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id() as i32).is_some());
    }
}
