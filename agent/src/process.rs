//! Running an instance: a child process in its own process group, with its
//! environment, its output appended to per-instance log files, and a stop
//! that reaches every process it started.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// What to run for one instance.
#[derive(Clone, Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `<log_dir>/<name>.stdout.log` and `.stderr.log` receive the output.
    pub log_dir: PathBuf,
    pub name: String,
    /// `cgroup.procs` files the process joins before it runs (limits).
    pub cgroup_procs: Vec<PathBuf>,
    /// The `meshd` binary, to run the program under `meshd shim` (apps:
    /// nothing they start outlives them, see `shim.rs`); `None` runs it
    /// directly (the sidecar).
    pub shim: Option<PathBuf>,
    /// The working directory; `None` keeps the agent's.
    pub cwd: Option<PathBuf>,
    /// The user it runs as (the working directory is made theirs); `None`:
    /// the agent's.
    pub user: Option<super::users::RunAs>,
}

pub struct Running {
    child: Child,
    pid: i32,
}

/// Finds a job's command: a path with a slash is taken relative to the job
/// file's folder, a bare name is looked up on PATH.
pub fn resolve_command(command: &str, job_dir: &Path, path_var: Option<&str>) -> Option<PathBuf> {
    if command.contains('/') {
        let candidate = job_dir.join(command);
        return candidate.is_file().then_some(candidate);
    }
    let found = path_var?.split(':').map(|dir| Path::new(dir).join(command)).find(|p| p.is_file())?;
    // The app starts in its own working directory: a relative PATH entry
    // (`target/release`) means the agent's, so the path is made absolute.
    std::path::absolute(&found).ok()
}

impl Running {
    pub fn start(launch: &Launch) -> io::Result<Running> {
        std::fs::create_dir_all(&launch.log_dir)?;
        let log = |suffix: &str| {
            let path = launch.log_dir.join(format!("{}.{suffix}.log", launch.name));
            super::files::append_no_follow(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let mut command = match &launch.shim {
            Some(meshd) => {
                let mut command = Command::new(meshd);
                command.arg("shim").arg("--").arg(&launch.program);
                command
            }
            None => Command::new(&launch.program),
        };
        // A shim hears of the agent's death (SIGTERM) and cleans up; a bare
        // process is simply killed with it.
        let death_signal = if launch.shim.is_some() { libc::SIGTERM } else { libc::SIGKILL };
        // SAFETY: getpid has no preconditions.
        let agent = unsafe { libc::getpid() };
        if let Some(cwd) = &launch.cwd {
            std::fs::create_dir_all(cwd)?;
            if let Some(user) = launch.user {
                std::os::unix::fs::chown(cwd, Some(user.uid), Some(user.gid))?;
            }
            command.current_dir(cwd);
        }
        let user = launch.user;
        command
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log("stdout")?)
            .stderr(log("stderr")?)
            // Its own group, so that a stop reaches whatever it started.
            .process_group(0)
            .kill_on_drop(false);
        let cgroup_procs: Vec<std::ffi::CString> = launch
            .cgroup_procs
            .iter()
            .map(|path| std::ffi::CString::new(path.as_os_str().as_encoded_bytes()))
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        // SAFETY: only async-signal-safe calls (prctl, open, write, close,
        // setgroups, setgid, setuid) run in the child between fork and exec, on
        // memory prepared before the fork. An agent that dies takes its
        // instances with it, as a node that dies would: nothing is left running
        // that no agent watches. Joining the cgroups here means nothing the app
        // starts escapes its limits; it happens before the user switch, which
        // would take away the right to join them.
        unsafe {
            command.pre_exec(move || {
                for procs in &cgroup_procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0" is the writing process itself.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(user) = user {
                    // Groups first: after setuid the process may no longer change them.
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(user.gid) != 0
                        || libc::setuid(user.uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Armed after the user switch, which clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The agent died before the signal was armed: nobody would send it.
                if libc::getppid() != agent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        let pid = child.id().map(|p| p as i32).ok_or_else(|| io::Error::other("the child exited at once"))?;
        Ok(Running { child, pid })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the instance to exit on its own.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM to the whole group, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        signal_group(self.pid, libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                // Children that outlived the leader go too.
                signal_group(self.pid, libc::SIGKILL);
                status
            }
            Err(_) => {
                signal_group(self.pid, libc::SIGKILL);
                self.child.wait().await
            }
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) on a process group this agent created.
    unsafe { libc::kill(-pgid, signal) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn output_goes_to_log_files_and_env_reaches_the_app() {
        let dir = temp("logs");
        let launch = Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "echo out $MESH_INSTANCE; echo err >&2".into()],
            env: vec![("MESH_INSTANCE".into(), "web-0".into())],
            log_dir: dir.clone(),
            name: "web-0".into(),
            cgroup_procs: vec![],
            shim: None,
            cwd: None,
            user: None,
        };
        let mut running = Running::start(&launch).unwrap();
        assert!(running.wait().await.unwrap().success());
        assert_eq!(std::fs::read_to_string(dir.join("web-0.stdout.log")).unwrap(), "out web-0\n");
        assert_eq!(std::fs::read_to_string(dir.join("web-0.stderr.log")).unwrap(), "err\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stop_reaches_the_whole_group_even_when_term_is_ignored() {
        let dir = temp("group");
        // The leader ignores SIGTERM and starts a grandchild that sleeps.
        let pid_file = dir.join("child.pid");
        let script = format!("trap '' TERM; sleep 300 & echo $! > {}; wait", pid_file.display());
        let launch = Launch {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script],
            env: vec![],
            log_dir: dir.clone(),
            name: "stubborn".into(),
            cgroup_procs: vec![],
            shim: None,
            cwd: None,
            user: None,
        };
        let mut running = Running::start(&launch).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pid_file.exists() || std::fs::read_to_string(&pid_file).unwrap().trim().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the grandchild did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let grandchild: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let status = running.stop(Duration::from_millis(300)).await.unwrap();
        assert!(!status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(grandchild) {
            assert!(std::time::Instant::now() < deadline, "the grandchild {grandchild} survived the stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Running, and not a zombie waiting to be reaped.
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    }

    #[test]
    fn commands_resolve_on_path_or_next_to_the_job_file() {
        let dir = temp("resolve");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/app"), "").unwrap();
        assert_eq!(resolve_command("./bin/app", &dir, None), Some(dir.join("./bin/app")));
        assert_eq!(resolve_command("sh", &dir, Some("/nonexistent:/bin")), Some(PathBuf::from("/bin/sh")));
        assert_eq!(resolve_command("no-such-program", &dir, Some("/bin")), None);
        // A relative PATH entry is the agent's directory, not the app's.
        let here = std::env::current_dir().unwrap();
        assert_eq!(resolve_command("Cargo.toml", &dir, Some(".")), Some(here.join("./Cargo.toml")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
