//! CPU time and memory of a contender's processes, read from /proc. A
//! contender runs in its own process group, so nginx's and HAProxy's
//! workers are counted with their master.

use std::fs;

/// Clock ticks per second for /proc/<pid>/stat times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The pids whose process group is `pgid`.
pub fn group_pids(pgid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat_fields(*pid).and_then(|f| f.get(2)?.parse::<i32>().ok()) == Some(pgid))
        .collect()
}

/// Fields of /proc/<pid>/stat after the command name; index 0 is the state.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &text[text.rfind(')')? + 2..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds used so far by every process in a group.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

pub fn cpu_times(pgid: i32) -> CpuTimes {
    let (user, system) = group_pids(pgid)
        .into_iter()
        .filter_map(|pid| {
            let fields = stat_fields(pid)?;
            // utime and stime are fields 14 and 15 of stat, 11 and 12 here.
            Some((fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?))
        })
        .fold((0, 0), |(u, s), (user, system)| (u + user, s + system));
    CpuTimes { user: user as f64 / ticks_per_second(), system: system as f64 / ticks_per_second() }
}

/// User + system CPU seconds used so far by every process in the group.
pub fn cpu_seconds(pgid: i32) -> f64 {
    cpu_times(pgid).total()
}

/// Bytes written through write-like system calls (files and sockets alike)
/// so far by every process in a group (`wchar` of /proc/<pid>/io).
pub fn written_bytes(pgid: i32) -> u64 {
    group_pids(pgid)
        .into_iter()
        .filter_map(|pid| {
            let io = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
            io.lines().find_map(|line| line.strip_prefix("wchar:")?.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Peak resident memory (VmHWM) summed over the group, in bytes.
pub fn peak_rss_bytes(pgid: i32) -> u64 {
    group_pids(pgid)
        .into_iter()
        .filter_map(|pid| {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .sum()
}
