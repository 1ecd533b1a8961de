//! Resource limits for an instance's app through cgroups: v1 (a hierarchy
//! per controller, what these machines offer) or v2 (one unified tree, on
//! modern hosts). The app joins its group between fork and exec, so
//! nothing it starts escapes the limits.
//!
//! Groups live under `meshd/<node>/<instance>` in each hierarchy.

use std::io;
use std::path::{Path, PathBuf};

/// CFS period for CPU quotas: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// Separate mounts per controller.
    V1 { memory: PathBuf, cpu: PathBuf },
    /// The unified hierarchy.
    V2 { root: PathBuf },
}

/// Which cgroup hierarchy the host has, if a usable one.
pub fn detect(mount: &Path) -> Option<Hierarchy> {
    if mount.join("cgroup.controllers").is_file() {
        return Some(Hierarchy::V2 { root: mount.to_owned() });
    }
    let (memory, cpu) = (mount.join("memory"), mount.join("cpu"));
    (memory.join("memory.limit_in_bytes").is_file() && cpu.join("cpu.cfs_quota_us").is_file())
        .then_some(Hierarchy::V1 { memory, cpu })
}

/// The files to write for the limits, relative to the group's folder in
/// each hierarchy: (hierarchy root, file, content). Pure.
pub fn limit_files(
    hierarchy: &Hierarchy,
    memory_mb: u64,
    cpu_millis: u64,
) -> Vec<(PathBuf, &'static str, String)> {
    let bytes = memory_mb * 1024 * 1024;
    // A thousand CPU millis is one core: a full period of runtime per period.
    let quota = (cpu_millis * CPU_PERIOD_US / 1000).max(1000);
    match hierarchy {
        Hierarchy::V1 { memory, cpu } => vec![
            (memory.clone(), "memory.limit_in_bytes", bytes.to_string()),
            (cpu.clone(), "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            (cpu.clone(), "cpu.cfs_quota_us", quota.to_string()),
        ],
        Hierarchy::V2 { root } => vec![
            (root.clone(), "memory.max", bytes.to_string()),
            (root.clone(), "cpu.max", format!("{quota} {CPU_PERIOD_US}")),
        ],
    }
}

/// The files that keep a group's memory out of swap, so that going over
/// the limit kills rather than slowly swaps: (hierarchy root, file,
/// content). Hosts without swap accounting lack them; they are written
/// when present. Pure.
pub fn no_swap_files(hierarchy: &Hierarchy, memory_mb: u64) -> Vec<(PathBuf, &'static str, String)> {
    match hierarchy {
        // Memory and swap together may not exceed the memory limit.
        Hierarchy::V1 { memory, .. } => vec![
            (memory.clone(), "memory.memsw.limit_in_bytes", (memory_mb * 1024 * 1024).to_string()),
            (memory.clone(), "memory.swappiness", "0".to_owned()),
        ],
        Hierarchy::V2 { root } => vec![(root.clone(), "memory.swap.max", "0".to_owned())],
    }
}

/// An instance's group, made with its limits; removed when dropped (the
/// kernel refuses while processes remain, which is harmless).
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    pub fn create(hierarchy: &Hierarchy, name: &str, memory_mb: u64, cpu_millis: u64) -> io::Result<Cgroup> {
        let roots: Vec<PathBuf> = match hierarchy {
            Hierarchy::V1 { memory, cpu } => vec![memory.clone(), cpu.clone()],
            Hierarchy::V2 { root } => {
                enable_v2_controllers(root, name)?;
                vec![root.clone()]
            }
        };
        let dirs: Vec<PathBuf> = roots.iter().map(|root| root.join(name)).collect();
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
        }
        let group = Cgroup { dirs };
        for (root, file, content) in limit_files(hierarchy, memory_mb, cpu_millis) {
            let path = root.join(name).join(file);
            std::fs::write(&path, content)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        for (root, file, content) in no_swap_files(hierarchy, memory_mb) {
            let path = root.join(name).join(file);
            if path.exists() {
                std::fs::write(&path, content)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            }
        }
        Ok(group)
    }

    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|dir| dir.join("cgroup.procs")).collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// In v2, a group's controllers must be enabled in every parent's
/// `cgroup.subtree_control` on the way down.
fn enable_v2_controllers(root: &Path, name: &str) -> io::Result<()> {
    let mut dir = root.to_owned();
    let parents: Vec<&str> = name.split('/').collect();
    for part in &parents[..parents.len().saturating_sub(1)] {
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")?;
        dir = dir.join(part);
        std::fs::create_dir_all(&dir)?;
    }
    std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_the_files_each_version_reads() {
        let v1 = Hierarchy::V1 { memory: "/cg/memory".into(), cpu: "/cg/cpu".into() };
        let v2 = Hierarchy::V2 { root: "/cg".into() };
        // (hierarchy, MB, CPU millis, expected files)
        type Case<'a> = (Hierarchy, u64, u64, Vec<(&'a str, &'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                v1.clone(),
                64,
                250,
                vec![
                    ("/cg/memory", "memory.limit_in_bytes", "67108864"),
                    ("/cg/cpu", "cpu.cfs_period_us", "100000"),
                    ("/cg/cpu", "cpu.cfs_quota_us", "25000"),
                ],
            ),
            (
                v2.clone(),
                1,
                2000,
                vec![("/cg", "memory.max", "1048576"), ("/cg", "cpu.max", "200000 100000")],
            ),
            // The kernel's smallest quota is 1 ms.
            (v2, 128, 1, vec![("/cg", "memory.max", "134217728"), ("/cg", "cpu.max", "1000 100000")]),
        ];
        for (hierarchy, memory, cpu, expected) in cases {
            let files = limit_files(&hierarchy, memory, cpu);
            let got: Vec<(&str, &str, &str)> = files
                .iter()
                .map(|(root, file, content)| (root.to_str().unwrap(), *file, content.as_str()))
                .collect();
            assert_eq!(got, expected, "{hierarchy:?}");
        }
    }

    #[test]
    fn memory_stays_out_of_swap_in_each_version() {
        let v1 = Hierarchy::V1 { memory: "/cg/memory".into(), cpu: "/cg/cpu".into() };
        let v2 = Hierarchy::V2 { root: "/cg".into() };
        let cases = [
            (
                v1,
                vec![
                    ("/cg/memory", "memory.memsw.limit_in_bytes", "67108864"),
                    ("/cg/memory", "memory.swappiness", "0"),
                ],
            ),
            (v2, vec![("/cg", "memory.swap.max", "0")]),
        ];
        for (hierarchy, expected) in cases {
            let files = no_swap_files(&hierarchy, 64);
            let got: Vec<(&str, &str, &str)> = files
                .iter()
                .map(|(root, file, content)| (root.to_str().unwrap(), *file, content.as_str()))
                .collect();
            assert_eq!(got, expected, "{hierarchy:?}");
        }
    }

    #[test]
    fn detection_reads_the_mount() {
        let dir = std::env::temp_dir().join(format!("mesh-cgroup-detect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(detect(&dir), None);
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        std::fs::create_dir_all(dir.join("cpu")).unwrap();
        std::fs::write(dir.join("memory/memory.limit_in_bytes"), "").unwrap();
        std::fs::write(dir.join("cpu/cpu.cfs_quota_us"), "").unwrap();
        assert_eq!(detect(&dir), Some(Hierarchy::V1 { memory: dir.join("memory"), cpu: dir.join("cpu") }));
        std::fs::write(dir.join("cgroup.controllers"), "").unwrap();
        assert_eq!(detect(&dir), Some(Hierarchy::V2 { root: dir.clone() }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
