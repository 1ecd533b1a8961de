//! One instance's life on its node: start its sidecar and wait until the
//! proxy is ready, start the app with the mesh environment, run its health
//! checks, restart it with backoff when it exits or fails liveness, and on
//! stop drain it (endpoint gone and acked by the proxies, bounded), then
//! stop the app and the proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use mesh_proto::mesh::v1 as pb;
use tokio::sync::watch;

use super::cgroup::{Cgroup, Hierarchy};
use super::health::Verdict;
use super::host::{Host, Process, SidecarReady};
use super::process::{resolve_command, Launch};
use super::restart::{crash_looping, resets_backoff, restart_delay};
use mesh_scheduler::job::{parse_job, Check, Job, JobKind};

/// What every instance on this node shares.
pub struct Context {
    /// Where processes start and the control plane is asked for tokens
    /// and drains (`host.rs`).
    pub host: Arc<dyn Host>,
    /// The control plane's address and trust roots, for the sidecars.
    pub control: String,
    pub control_roots: PathBuf,
    pub advertise_ip: IpAddr,
    pub data_dir: PathBuf,
    /// The mesh-proxy binary.
    pub proxy_program: PathBuf,
    /// The meshd binary, which apps run under (`meshd shim`); `None` runs
    /// them directly.
    pub shim_program: Option<PathBuf>,
    /// Where the agent's own binaries are: a job's bare command is looked
    /// up there after PATH (so `mesh-echo` works beside `meshd`).
    pub bin_dir: Option<PathBuf>,
    /// The node's name, as the scheduler knows it (for identity tokens).
    pub node: String,
    /// Whom apps run as when their job names no `user` (agent as root only).
    pub default_user: String,
    /// This agent's folder in each cgroup hierarchy, `meshd/<node>-<hash of
    /// data dir>`: two agents on one host never share one.
    pub cgroup_parent: String,
    /// The host's cgroup hierarchy; `None` runs apps without limits.
    pub cgroups: Option<Hierarchy>,
}

/// An instance's report, shared with the heartbeat loop, which it wakes
/// when something changed (so a readiness change travels at once, not at
/// the next heartbeat).
#[derive(Clone)]
pub struct SharedReport {
    report: Arc<Mutex<pb::InstanceReport>>,
    changed: Arc<tokio::sync::Notify>,
}

impl SharedReport {
    pub fn new(report: pb::InstanceReport, changed: Arc<tokio::sync::Notify>) -> SharedReport {
        SharedReport { report: Arc::new(Mutex::new(report)), changed }
    }

    pub fn get(&self) -> pb::InstanceReport {
        self.report.lock().expect("report lock").clone()
    }

    fn update(&self, change: impl FnOnce(&mut pb::InstanceReport)) {
        let mut report = self.report.lock().expect("report lock");
        let before = report.clone();
        change(&mut report);
        if *report != before {
            self.changed.notify_one();
        }
    }
}

const PROXY_READY_WITHIN: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(5);
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// Tries at starting a dead sidecar again before the instance is restarted whole.
const SIDECAR_RESTART_ATTEMPTS: u32 = 5;
const RESTART_BASE: Duration = Duration::from_millis(250);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// This many exits within the window is a crash loop, and status says so.
const CRASH_LOOP_EXITS: usize = 3;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// An app that ran this long before exiting starts its backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Why an instance could not start, by whose it is to fix. Either way the
/// start is tried again with backoff (a job fixed by a new version, or a
/// node that recovers, then starts), and the report carries the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartError {
    /// The job as written cannot run here: its file, command or user.
    Job(String),
    /// This node could not give it what it needs: a folder, ports, a process.
    Node(String),
    /// The control plane issued no identity token for its sidecar.
    Control(String),
    /// The sidecar did not come up: it exited, or was not ready in time.
    Sidecar(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Job(m) | StartError::Node(m) | StartError::Control(m) | StartError::Sidecar(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for StartError {}

/// The instance's folder under the agent's data dir: logs and pid files.
pub fn instance_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("instances").join(id)
}

/// Runs one instance until `stop` turns true (or, for a batch job, until
/// it completes). A start that fails (its sidecar could not bind, say) is
/// reported as `failed` with the reason and tried again with backoff.
pub async fn run(
    context: Arc<Context>,
    assignment: pb::Assignment,
    report: SharedReport,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let Err(message) = run_inner(&context, &assignment, &report, &mut stop).await else { return };
        let delay = restart_delay(failures, RESTART_BASE, RESTART_MAX);
        failures += 1;
        tracing::warn!(instance = %assignment.id, %message, ?delay, "instance failed to start");
        report.update(|r| {
            r.set_state(pb::InstanceState::Failed);
            r.ready = false;
            r.pid = 0;
            r.proxy_pid = 0;
            r.restarts += 1;
            r.message = format!("{message}; trying again in {}", humantime::format_duration(delay));
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn run_inner(
    context: &Context,
    assignment: &pb::Assignment,
    report: &SharedReport,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StartError> {
    let job = parse_job(&assignment.job_text).map_err(|e| StartError::Job(format!("job file: {e}")))?;
    let program = find_program(context, &job, Path::new(&assignment.job_dir))?;
    let run_as = super::users::run_as(job.user.as_deref(), &context.default_user).map_err(StartError::Job)?;
    let dir = instance_dir(&context.data_dir, &assignment.id);
    std::fs::create_dir_all(&dir).map_err(|e| StartError::Node(format!("{}: {e}", dir.display())))?;
    let ports = Ports::choose(context.advertise_ip, job.upstreams.len())?;
    let token = identity_token(context, assignment).await?;
    let mut proxy = start_proxy(context, assignment, &job, &ports, &dir, token)?;
    report.update(|r| {
        r.proxy_pid = proxy.pid();
        r.addr = ports.inbound.to_string();
        r.message = "waiting for the sidecar".into();
    });
    match wait_proxy_ready(context, &mut *proxy, ports.admin).await {
        Ok(sidecar) => report.update(|r| r.quic = sidecar.quic),
        Err(message) => {
            let _ = proxy.stop(STOP_GRACE).await;
            return Err(message);
        }
    }
    let cgroup = limits(context, assignment, &job);
    let cgroup_procs = cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default();
    let mut restarts_in_a_row = 0u32;
    let mut exits_ms: Vec<u64> = Vec::new();
    let born = Instant::now();
    loop {
        let mut launch = app_launch(&program, assignment, &job, &ports, &dir);
        launch.cgroup_procs = cgroup_procs.clone();
        launch.shim = context.shim_program.clone();
        launch.user = run_as;
        let mut app = context
            .host
            .start(&launch)
            .map_err(|e| StartError::Node(format!("cannot start {}: {e}", program.display())))?;
        record_pid(&dir, app.pid());
        let started = Instant::now();
        report.update(|r| {
            r.set_state(pb::InstanceState::Running);
            r.pid = app.pid();
            r.ready = job.readiness.is_none();
            r.message.clear();
        });
        let ended = loop {
            match supervise(context, &job, run_as, &mut *app, &mut *proxy, ports.app, report, stop).await {
                // The app keeps running: only its sidecar starts again.
                Ended::SidecarExited(why) => {
                    match restart_sidecar(context, assignment, &job, &ports, &dir, report, &why).await {
                        Ok(restarted) => proxy = restarted,
                        Err(message) => {
                            let _ = app.stop(STOP_GRACE).await;
                            return Err(message);
                        }
                    }
                }
                other => break other,
            }
        };
        report.update(|r| r.ready = false);
        let why = match ended {
            Ended::Stopped => {
                drain(context, report).await;
                let _ = app.stop(STOP_GRACE).await;
                let _ = proxy.stop(STOP_GRACE).await;
                let _ = std::fs::remove_file(dir.join("pids"));
                return Ok(());
            }
            Ended::Exited(status) if job.kind == JobKind::Batch && status.success() => {
                let _ = proxy.stop(STOP_GRACE).await;
                let _ = std::fs::remove_file(dir.join("pids"));
                report.update(|r| {
                    r.set_state(pb::InstanceState::Complete);
                    r.pid = 0;
                    r.proxy_pid = 0;
                    r.message = "exited 0".into();
                });
                return Ok(());
            }
            Ended::Exited(status) => format!("exited: {status}"),
            Ended::Unlive(reason) => {
                let _ = app.stop(STOP_GRACE).await;
                format!("liveness failed: {reason}")
            }
            Ended::SidecarExited(_) => unreachable!("handled by the loop above"),
        };
        if resets_backoff(started.elapsed(), STABLE_AFTER) {
            restarts_in_a_row = 0;
        }
        let delay = restart_delay(restarts_in_a_row, RESTART_BASE, RESTART_MAX);
        restarts_in_a_row += 1;
        let now_ms = born.elapsed().as_millis() as u64;
        exits_ms.push(now_ms);
        exits_ms.retain(|t| now_ms - t <= CRASH_LOOP_WINDOW.as_millis() as u64);
        let looping = crash_looping(&exits_ms, now_ms, CRASH_LOOP_WINDOW, CRASH_LOOP_EXITS);
        tracing::info!(instance = %assignment.id, %why, ?delay, looping, "restarting the app");
        report.update(|r| {
            r.set_state(pb::InstanceState::Starting);
            r.pid = 0;
            r.restarts += 1;
            let prefix = if looping {
                format!("crash loop ({} exits in {}s): ", exits_ms.len(), CRASH_LOOP_WINDOW.as_secs())
            } else {
                String::new()
            };
            r.message = format!("{prefix}{why}; restarting in {}", humantime::format_duration(delay));
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(stop) => {
                let _ = proxy.stop(STOP_GRACE).await;
                let _ = std::fs::remove_file(dir.join("pids"));
                return Ok(());
            }
        }
    }
}

/// The app's cgroup with the job's CPU and memory as limits. Without a
/// usable hierarchy (or the right to write it) the app runs unlimited,
/// and the agent says so in its log.
fn limits(context: &Context, assignment: &pb::Assignment, job: &Job) -> Option<Cgroup> {
    let hierarchy = context.cgroups.as_ref()?;
    let resources = job.resources;
    if resources.cpu_millis == 0 || resources.memory_mb == 0 {
        return None;
    }
    let name = format!("{}/{}", context.cgroup_parent, assignment.id);
    match Cgroup::create(hierarchy, &name, resources.memory_mb, resources.cpu_millis) {
        Ok(cgroup) => Some(cgroup),
        Err(error) => {
            tracing::warn!(instance = %assignment.id, %error, "no cgroup: the app runs without limits");
            None
        }
    }
}

fn find_program(context: &Context, job: &Job, job_dir: &Path) -> Result<PathBuf, StartError> {
    let path = std::env::var("PATH").ok();
    resolve_command(&job.command, job_dir, path.as_deref())
        .or_else(|| {
            let bin_dir = context.bin_dir.as_ref()?;
            resolve_command(&job.command, job_dir, bin_dir.to_str())
        })
        .ok_or_else(|| {
            StartError::Job(format!("command {:?} is not on PATH nor next to the job file", job.command))
        })
}

/// The ports of one instance: the app's and the sidecar's.
struct Ports {
    app: SocketAddr,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    upstreams: Vec<SocketAddr>,
}

impl Ports {
    fn choose(advertise_ip: IpAddr, upstreams: usize) -> Result<Ports, StartError> {
        let local: IpAddr = [127, 0, 0, 1].into();
        Ok(Ports {
            app: free_addr(local)?,
            outbound: free_addr(local)?,
            inbound: free_addr(advertise_ip)?,
            admin: free_addr(local)?,
            upstreams: (0..upstreams).map(|_| free_addr(local)).collect::<Result<_, _>>()?,
        })
    }
}

/// A port the kernel says is free now on `ip`.
///
/// A port this agent handed out recently is not handed out again: an
/// instance that stopped (or an app between restarts) leaves its ports
/// free, and a sidecar still draining would otherwise forward to a port
/// another instance's listener now holds (answering a caller for the
/// wrong thing).
fn free_addr(ip: IpAddr) -> Result<SocketAddr, StartError> {
    static RECENT: Mutex<RecentPorts> = Mutex::new(RecentPorts::new());
    for _ in 0..64 {
        let addr = std::net::TcpListener::bind((ip, 0))
            .and_then(|listener| listener.local_addr())
            .map_err(|e| StartError::Node(format!("no free port on {ip}: {e}")))?;
        if RECENT.lock().expect("ports lock").take(addr.port()) {
            return Ok(addr);
        }
    }
    Err(StartError::Node(format!("no port on {ip} that this agent has not used recently")))
}

/// The last ports handed out, oldest first: a fixed window, so it is bounded.
struct RecentPorts {
    ports: std::collections::VecDeque<u16>,
}

impl RecentPorts {
    /// How many recent ports are kept out of use: several hundred instance
    /// lifetimes' worth of ports on one node.
    const KEPT: usize = 4096;

    const fn new() -> RecentPorts {
        RecentPorts { ports: std::collections::VecDeque::new() }
    }

    /// Takes `port` if it was not handed out recently; a pure rule.
    fn take(&mut self, port: u16) -> bool {
        if self.ports.contains(&port) {
            return false;
        }
        if self.ports.len() == Self::KEPT {
            self.ports.pop_front();
        }
        self.ports.push_back(port);
        true
    }
}

/// A one-time token for this instance's identity, from the control plane,
/// which checks that it placed this instance on this node.
async fn identity_token(context: &Context, assignment: &pb::Assignment) -> Result<String, StartError> {
    context.host.identity_token(&context.node, &assignment.id).await.map_err(StartError::Control)
}

fn start_proxy(
    context: &Context,
    assignment: &pb::Assignment,
    job: &Job,
    ports: &Ports,
    dir: &Path,
    token: String,
) -> Result<Box<dyn Process>, StartError> {
    let mut args = vec![
        "--control".to_owned(),
        context.control.clone(),
        "--control-ca".to_owned(),
        context.control_roots.display().to_string(),
        "--service".to_owned(),
        assignment.service.clone(),
        "--app-version".to_owned(),
        assignment.version.clone(),
        "--proxy-id".to_owned(),
        assignment.id.clone(),
        "--outbound".to_owned(),
        ports.outbound.to_string(),
        "--inbound".to_owned(),
        ports.inbound.to_string(),
        "--admin".to_owned(),
        ports.admin.to_string(),
        "--app".to_owned(),
        ports.app.to_string(),
    ];
    for (service, addr) in job.upstreams.iter().zip(&ports.upstreams) {
        args.push("--upstream".to_owned());
        args.push(format!("{service}={addr}"));
    }
    let launch = Launch {
        program: context.proxy_program.clone(),
        args,
        // The token goes in the environment, not on the command line `ps` shows.
        env: vec![("RUST_LOG".into(), "info".into()), ("MESH_IDENTITY_TOKEN".into(), token)],
        log_dir: dir.to_owned(),
        name: "proxy".into(),
        cgroup_procs: Vec::new(),
        shim: None,
        cwd: None,
        user: None,
    };
    let proxy = context.host.start(&launch).map_err(|e| {
        StartError::Node(format!("cannot start the sidecar {}: {e}", context.proxy_program.display()))
    })?;
    record_pid(dir, proxy.pid());
    Ok(proxy)
}

/// Waits until the sidecar's `/ready` answers 200 (it has its routing table).
async fn wait_proxy_ready(
    context: &Context,
    proxy: &mut dyn Process,
    admin: SocketAddr,
) -> Result<SidecarReady, StartError> {
    let deadline = Instant::now() + PROXY_READY_WITHIN;
    loop {
        if let Some(ready) = context.host.sidecar_ready(admin).await {
            return Ok(ready);
        }
        if let Ok(Some(status)) = proxy.try_wait() {
            return Err(StartError::Sidecar(format!("the sidecar exited before it was ready: {status}")));
        }
        if Instant::now() > deadline {
            let within = PROXY_READY_WITHIN.as_secs();
            return Err(StartError::Sidecar(format!("the sidecar was not ready within {within}s")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The app's command with the mesh environment (`docs/jobs.md`).
fn app_launch(program: &Path, assignment: &pb::Assignment, job: &Job, ports: &Ports, dir: &Path) -> Launch {
    let mut env: Vec<(String, String)> = job.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let proxy_url = format!("http://{}", ports.outbound);
    env.extend([
        ("PORT".to_owned(), ports.app.port().to_string()),
        ("MESH_OUTBOUND".to_owned(), ports.outbound.to_string()),
        ("HTTP_PROXY".to_owned(), proxy_url.clone()),
        ("http_proxy".to_owned(), proxy_url),
        ("MESH_JOB".to_owned(), assignment.job.clone()),
        ("MESH_INSTANCE".to_owned(), assignment.id.clone()),
        ("MESH_VERSION".to_owned(), assignment.version.clone()),
    ]);
    for (service, addr) in job.upstreams.iter().zip(&ports.upstreams) {
        env.push((upstream_variable(service), addr.to_string()));
    }
    let args = job.args.iter().map(|arg| interpolate(arg, &env)).collect();
    Launch {
        program: program.to_owned(),
        args,
        env,
        log_dir: dir.to_owned(),
        name: "app".into(),
        cgroup_procs: Vec::new(),
        shim: None,
        // Each instance has its own working directory, kept across restarts.
        cwd: Some(dir.join("work")),
        user: None,
    }
}

/// `arg` with every `${NAME}` of the instance's environment replaced by its
/// value (`${PORT}`, `${MESH_INSTANCE}`, ...); other text, and names not in
/// the environment, stay as they are. Pure.
pub fn interpolate(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let value = after
            .find('}')
            .and_then(|end| env.iter().find(|(name, _)| name == &after[..end]).map(|(_, v)| (v, end)));
        match value {
            Some((value, end)) => {
                out.push_str(value);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `MESH_UPSTREAM_<NAME>`: the service name upper-cased, `-` as `_`.
pub fn upstream_variable(service: &str) -> String {
    format!("MESH_UPSTREAM_{}", service.to_ascii_uppercase().replace('-', "_"))
}

/// Remembers a process group this agent started, so that an agent that
/// restarts can stop what the previous run left behind.
fn record_pid(dir: &Path, pid: i32) {
    use std::io::Write;
    let Some(line) = super::files::pid_record(pid) else { return };
    if let Ok(mut file) = super::files::append_no_follow(&dir.join("pids")) {
        let _ = writeln!(file, "{line}");
    }
}

/// Kills whatever is still in the cgroups a previous run of the agent left
/// behind (anything in them is an instance's, even a process that left
/// its group and session), then removes them.
pub fn remove_stale_cgroups(hierarchy: &Hierarchy, parent: &str) {
    let roots = match hierarchy {
        Hierarchy::V1 { memory, cpu } => vec![memory.clone(), cpu.clone()],
        Hierarchy::V2 { root } => vec![root.clone()],
    };
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else { continue };
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            // Bounded: a group whose processes keep forking is given up on.
            for _ in 0..50 {
                let procs = std::fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> =
                    procs.lines().filter_map(|l| l.trim().parse().ok()).filter(|p| *p > 1).collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    // SAFETY: kill(2) on a process inside this agent's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Kills the process groups a previous run of the agent left behind
/// (their instances are placed again by the scheduler), so nothing is
/// orphaned or duplicated. Returns how many groups were signalled.
pub fn reap_leftovers(data_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(data_dir.join("instances")) else { return 0 };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let pids = entry.path().join("pids");
        let Ok(mut file) = super::files::read_no_follow(&pids) else { continue };
        let mut text = String::new();
        if std::io::Read::read_to_string(&mut file, &mut text).is_err() {
            continue;
        }
        // Only groups whose leader is still the process that was recorded:
        // after a reboot the same pids belong to others.
        for pid in super::files::still_ours(&text, super::files::start_time) {
            // SAFETY: kill(2) on a process group an earlier run of this agent created.
            if unsafe { libc::kill(-pid, libc::SIGKILL) } == 0 {
                reaped += 1;
            }
        }
        let _ = std::fs::remove_file(pids);
    }
    reaped
}

enum Ended {
    Stopped,
    Exited(std::process::ExitStatus),
    Unlive(String),
    /// The sidecar died (why); the app is still running.
    SidecarExited(String),
}

/// Starts a new sidecar on the same ports after the last one died, with a
/// fresh identity token; the endpoint is not ready until it is.
async fn restart_sidecar(
    context: &Context,
    assignment: &pb::Assignment,
    job: &Job,
    ports: &Ports,
    dir: &Path,
    report: &SharedReport,
    why: &str,
) -> Result<Box<dyn Process>, StartError> {
    tracing::warn!(instance = %assignment.id, %why, "the sidecar exited; starting it again");
    report.update(|r| {
        r.ready = false;
        r.proxy_pid = 0;
        r.proxy_restarts += 1;
        r.message = format!("sidecar exited ({why}); restarting it");
    });
    let mut last_error = None;
    for attempt in 0..SIDECAR_RESTART_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(restart_delay(attempt - 1, RESTART_BASE, RESTART_MAX)).await;
        }
        let token = match identity_token(context, assignment).await {
            Ok(token) => token,
            Err(error) => {
                last_error = Some(error);
                continue;
            }
        };
        let mut proxy = start_proxy(context, assignment, job, ports, dir, token)?;
        report.update(|r| r.proxy_pid = proxy.pid());
        match wait_proxy_ready(context, &mut *proxy, ports.admin).await {
            Ok(sidecar) => {
                report.update(|r| {
                    r.quic = sidecar.quic;
                    r.ready = job.readiness.is_none();
                    r.message.clear();
                });
                return Ok(proxy);
            }
            Err(error) => {
                let _ = proxy.stop(STOP_GRACE).await;
                last_error = Some(error);
            }
        }
    }
    let why = last_error.map(|e| e.to_string()).unwrap_or_default();
    Err(StartError::Sidecar(format!("the sidecar could not be restarted: {why}")))
}

/// Watches the running app and its sidecar: their exits, the app's health
/// checks, and the stop signal.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    context: &Context,
    job: &Job,
    run_as: Option<super::users::RunAs>,
    app: &mut dyn Process,
    proxy: &mut dyn Process,
    addr: SocketAddr,
    report: &SharedReport,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let mut readiness = job.readiness.as_ref().map(|check| (check, ticker(check), Verdict::initial()));
    // Liveness starts good: a slow start is readiness's business.
    let live_verdict = Verdict { healthy: true, failures_in_a_row: 0 };
    let mut liveness = job.liveness.as_ref().map(|check| (check, ticker(check), live_verdict));
    loop {
        tokio::select! {
            status = app.wait() => {
                return match status {
                    Ok(status) => Ended::Exited(status),
                    Err(e) => Ended::Unlive(format!("wait: {e}")),
                };
            }
            _ = stopped(stop) => return Ended::Stopped,
            status = proxy.wait() => {
                return Ended::SidecarExited(match status {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait: {e}"),
                });
            }
            result = next_probe(context, &mut readiness, addr, run_as) => {
                if let (Some((check, _, verdict)), Some(result)) = (readiness.as_mut(), result) {
                    *verdict = verdict.observe(result.is_ok(), check.failures);
                    let ready = verdict.healthy;
                    let message = result.err().unwrap_or_default();
                    report.update(|r| {
                        r.ready = ready;
                        r.message = if ready { String::new() } else { format!("not ready: {message}") };
                    });
                }
            }
            result = next_probe(context, &mut liveness, addr, run_as) => {
                if let (Some((check, _, verdict)), Some(result)) = (liveness.as_mut(), result) {
                    let reason = result.as_ref().err().cloned().unwrap_or_default();
                    *verdict = verdict.observe(result.is_ok(), check.failures);
                    if !verdict.healthy {
                        return Ended::Unlive(reason);
                    }
                }
            }
        }
    }
}

/// Returns once the agent asked the instance to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard wait_for returns must not live across an await.
    let _ = stop.wait_for(|stopped| *stopped).await.map(|_| ());
}

fn ticker(check: &Check) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(check.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// The next probe's result, or never when there is no such check.
async fn next_probe(
    context: &Context,
    check: &mut Option<(&Check, tokio::time::Interval, Verdict)>,
    addr: SocketAddr,
    run_as: Option<super::users::RunAs>,
) -> Option<Result<(), String>> {
    match check {
        Some((check, interval, _)) => {
            interval.tick().await;
            Some(context.host.probe(&check.probe, addr, check.timeout, run_as).await)
        }
        None => std::future::pending().await,
    }
}

/// Waits (bounded) until every proxy has applied the table without this
/// instance's endpoint, which the control plane removed when it stopped
/// the instance.
async fn drain(context: &Context, report: &SharedReport) {
    report.update(|r| {
        r.set_state(pb::InstanceState::Draining);
        r.ready = false;
    });
    context.host.drain(DRAIN_WAIT).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_not_handed_out_again_while_it_is_recent() {
        let mut recent = RecentPorts::new();
        // (port, taken?)
        for (port, taken) in [(4000, true), (4001, true), (4000, false), (4001, false), (4002, true)] {
            assert_eq!(recent.take(port), taken, "{port}");
        }
        // The window is bounded: the oldest port becomes usable again.
        for port in 10_000..10_000 + RecentPorts::KEPT as u16 {
            recent.take(port);
        }
        assert!(recent.take(4000), "4000 left the window");
        assert!(recent.ports.len() <= RecentPorts::KEPT);
    }

    #[test]
    fn mesh_variables_are_interpolated_in_args() {
        let env =
            vec![("PORT".to_owned(), "4100".to_owned()), ("MESH_INSTANCE".to_owned(), "web-3".to_owned())];
        // (arg, expected)
        for (arg, expected) in [
            ("--port=${PORT}", "--port=4100"),
            ("${MESH_INSTANCE}:${PORT}", "web-3:4100"),
            ("$PORT", "$PORT"),
            ("${UNKNOWN}", "${UNKNOWN}"),
            ("${PORT", "${PORT"),
            ("${}", "${}"),
            ("plain", "plain"),
            ("${${PORT}}", "${4100}"),
        ] {
            assert_eq!(interpolate(arg, &env), expected, "{arg}");
        }
    }

    #[test]
    fn upstream_variables_are_shell_names() {
        for (service, variable) in
            [("api", "MESH_UPSTREAM_API"), ("user-db", "MESH_UPSTREAM_USER_DB"), ("a_b", "MESH_UPSTREAM_A_B")]
        {
            assert_eq!(upstream_variable(service), variable);
        }
    }
}
