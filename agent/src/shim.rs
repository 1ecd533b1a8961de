//! The instance shim: `meshd shim -- PROGRAM ARGS...` is what the agent
//! starts in an instance's process group and cgroup, and it starts the app.
//! It exists so that nothing of an instance outlives it, even when the
//! agent is killed with -9:
//!
//! - it is a child subreaper, so whatever the app forks and abandons
//!   becomes its child, not init's;
//! - its parent-death signal is SIGTERM, so it hears when the agent dies,
//!   passes SIGTERM to the app, and after a grace period kills the rest;
//! - when the app exits it kills every descendant left, then exits with the
//!   app's status (or dies of the app's signal), so the agent sees the app's
//!   end as before;
//! - the app's own parent-death signal is SIGKILL, so a shim killed with -9
//!   takes the app with it.
//!
//! Plain blocking code on one thread: signals are taken with `sigtimedwait`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the app has to exit after SIGTERM before everything is killed.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the shim; never returns.
pub fn run(program: OsString, args: Vec<OsString>) -> ! {
    // SAFETY: plain libc calls on this single-threaded process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    let signals = blocked_signals();
    // The child starts with std's default (empty) signal mask. It dies with
    // the shim: a shim killed with -9 (by hand, say) cannot clean up, and
    // must not leave the app running without an agent to watch it.
    let shim = std::process::id() as i32;
    let mut command = Command::new(&program);
    command.args(&args);
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != shim {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let app = match command.spawn() {
        Ok(app) => app.id() as i32,
        Err(error) => {
            eprintln!("meshd shim: cannot start {}: {error}", program.to_string_lossy());
            std::process::exit(127);
        }
    };
    let mut app_status: Option<i32> = None;
    let mut term_deadline: Option<Instant> = None;
    loop {
        // Woken by any signal at once; the timeout only bounds the grace.
        let signal =
            wait_signal(&signals, Duration::from_millis(if term_deadline.is_some() { 100 } else { 1000 }));
        if matches!(signal, Some(libc::SIGTERM | libc::SIGINT | libc::SIGHUP)) && term_deadline.is_none() {
            // The agent stops the instance, or died: the app gets the signal too.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(app, libc::SIGTERM) };
            term_deadline = Some(Instant::now() + GRACE);
        }
        reap(app, &mut app_status);
        if app_status.is_some() || term_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    kill_descendants(app, &mut app_status);
    exit_like(app_status.unwrap_or(libc::SIGKILL << 8))
}

fn blocked_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t, within: Duration) -> Option<i32> {
    let timeout = libc::timespec { tv_sec: within.as_secs() as _, tv_nsec: within.subsec_nanos() as _ };
    // SAFETY: `set` is initialised, `info` may be null.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// Reaps every child that exited; notes the app's wait status.
fn reap(app: i32, app_status: &mut Option<i32>) {
    for _ in 0..10_000 {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if pid == app {
            *app_status = Some(status);
        }
    }
}

/// Kills every process left below the shim: its children (the app, and
/// orphans it adopted as a subreaper), until none is left (bounded).
fn kill_descendants(app: i32, app_status: &mut Option<i32>) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let children = children_of(me);
        if children.is_empty() {
            return;
        }
        for child in children {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
        reap(app, app_status);
    }
}

/// The pids whose parent is `parent`, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .is_some_and(|stat| parent_in_stat(&stat) == Some(parent))
        })
        .collect()
}

/// Field 4 (the parent pid) of a `/proc/PID/stat` line.
fn parent_in_stat(stat: &str) -> Option<i32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Exits as the app did: with its code, or by its signal.
fn exit_like(status: i32) -> ! {
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    let signal = if libc::WIFSIGNALED(status) { libc::WTERMSIG(status) } else { libc::SIGKILL };
    // SAFETY: restoring the default action and raising the app's signal on ourselves.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
    std::process::exit(128 + signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        // (stat line, parent)
        let table = [("7 (sh) S 42 7 7 0", Some(42)), ("7 (a) (b)) S 1 7 7", Some(1)), ("junk", None)];
        for (stat, parent) in table {
            assert_eq!(parent_in_stat(stat), parent, "{stat}");
        }
    }
}
