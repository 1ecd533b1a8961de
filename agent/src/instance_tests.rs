//! An instance's life in-process: `instance::run` on a paused clock with a
//! scripted host, whose processes exit when the script or the test says.
//! Restart backoff, crash loops, a sidecar's restart, a failed start and
//! draining are checked at their exact times, with no process started.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_scheduler::job::Probe;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::host::{BoxFuture, Host, Process, SidecarReady};
use crate::instance::{run, Context, SharedReport};
use crate::process::Launch;
use crate::users::RunAs;

/// A process start the host saw.
#[derive(Clone, Debug)]
struct Start {
    name: String,
    pid: i32,
    at: Duration,
}

#[derive(Default)]
struct Script {
    /// Each app exits with this code this long after it starts; None: runs on.
    app_exits_after: Option<(Duration, i32)>,
    /// The sidecar never becomes ready.
    sidecar_never_ready: bool,
}

struct ScriptedHost {
    script: Script,
    born: Instant,
    next_pid: AtomicI32,
    starts: Mutex<Vec<Start>>,
    /// Sets a process's exit code: it has exited.
    exits: Mutex<HashMap<i32, watch::Sender<Option<i32>>>>,
    stopped: Arc<Mutex<Vec<i32>>>,
    drains: AtomicUsize,
}

impl ScriptedHost {
    fn new(script: Script) -> Arc<ScriptedHost> {
        Arc::new(ScriptedHost {
            script,
            born: Instant::now(),
            next_pid: AtomicI32::new(100),
            starts: Mutex::default(),
            exits: Mutex::default(),
            stopped: Arc::default(),
            drains: AtomicUsize::new(0),
        })
    }

    fn starts(&self, name: &str) -> Vec<Start> {
        self.starts.lock().unwrap().iter().filter(|s| s.name == name).cloned().collect()
    }

    /// The process `pid` exits with `code`, as if it died.
    fn exit(&self, pid: i32, code: i32) {
        let _ = self.exits.lock().unwrap()[&pid].send(Some(code));
    }
}

struct ScriptedProcess {
    pid: i32,
    exit: watch::Receiver<Option<i32>>,
    ender: watch::Sender<Option<i32>>,
    stopped: Arc<Mutex<Vec<i32>>>,
}

fn status(code: i32) -> ExitStatus {
    ExitStatus::from_raw(code << 8)
}

impl Process for ScriptedProcess {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        Ok(self.exit.borrow().map(status))
    }

    fn wait(&mut self) -> BoxFuture<'_, io::Result<ExitStatus>> {
        Box::pin(async move {
            let code = self.exit.wait_for(Option::is_some).await.map_err(io::Error::other)?.unwrap_or(0);
            Ok(status(code))
        })
    }

    fn stop(&mut self, _grace: Duration) -> BoxFuture<'_, io::Result<ExitStatus>> {
        self.stopped.lock().unwrap().push(self.pid);
        let _ = self.ender.send(Some(143));
        Box::pin(async { Ok(status(143)) })
    }
}

impl Host for ScriptedHost {
    fn start(&self, launch: &Launch) -> io::Result<Box<dyn Process>> {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let at = self.born.elapsed();
        self.starts.lock().unwrap().push(Start { name: launch.name.clone(), pid, at });
        let (ender, exit) = watch::channel(None);
        self.exits.lock().unwrap().insert(pid, ender.clone());
        if let (Some((after, code)), "app") = (self.script.app_exits_after, launch.name.as_str()) {
            let ender = ender.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = ender.send(Some(code));
            });
        }
        Ok(Box::new(ScriptedProcess { pid, exit, ender, stopped: self.stopped.clone() }))
    }

    fn identity_token<'a>(
        &'a self,
        _node: &'a str,
        instance: &'a str,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { Ok(format!("token-for-{instance}")) })
    }

    fn sidecar_ready(&self, _admin: SocketAddr) -> BoxFuture<'_, Option<SidecarReady>> {
        Box::pin(async move { (!self.script.sidecar_never_ready).then_some(SidecarReady { quic: true }) })
    }

    fn probe<'a>(
        &'a self,
        _probe: &'a Probe,
        _addr: SocketAddr,
        _timeout: Duration,
        _user: Option<RunAs>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn drain(&self, _within: Duration) -> BoxFuture<'_, ()> {
        self.drains.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {})
    }
}

const JOB: &str = r#"
name = "web"
service = "web"
version = "v1"
replicas = 1
kind = "KIND"

[task]
command = "/bin/true"
"#;

/// A running instance of `kind` under a scripted host, with a way to stop it.
struct Harness {
    host: Arc<ScriptedHost>,
    report: SharedReport,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    dir: std::path::PathBuf,
}

fn start(kind: &str, script: Script) -> Harness {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mesh-agent-lifecycle-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::SeqCst)
    ));
    let host = ScriptedHost::new(script);
    let context = Context {
        host: host.clone(),
        control: "https://127.0.0.1:1".into(),
        control_roots: dir.join("roots.pem"),
        advertise_ip: [127, 0, 0, 1].into(),
        data_dir: dir.clone(),
        proxy_program: "/bin/true".into(),
        shim_program: None,
        bin_dir: None,
        node: "node-1".into(),
        default_user: "nobody".into(),
        cgroup_parent: "meshd/test".into(),
        cgroups: None,
    };
    let assignment = pb::Assignment {
        id: "web-1".into(),
        job: "web".into(),
        version: "v1".into(),
        service: "web".into(),
        job_text: JOB.replace("KIND", kind),
        job_dir: "/".into(),
    };
    let report = SharedReport::new(
        pb::InstanceReport { id: "web-1".into(), ..Default::default() },
        Arc::new(Notify::new()),
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(Arc::new(context), assignment, report.clone(), stopped));
    Harness { host, report, stop, task, dir }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Harness {
    /// Waits on the paused clock (bounded) until the report shows `what`.
    async fn until(&self, what: &str, holds: impl Fn(&pb::InstanceReport) -> bool) -> pb::InstanceReport {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let report = self.report.get();
            if holds(&report) {
                return report;
            }
            assert!(Instant::now() < deadline, "never {what}: {report:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn gaps(starts: &[Start]) -> Vec<Duration> {
    starts.windows(2).map(|pair| pair[1].at - pair[0].at).collect()
}

/// Within the harness's polling step of `expected`.
fn about(actual: Duration, expected: Duration) -> bool {
    actual >= expected && actual < expected + Duration::from_millis(100)
}

#[tokio::test(start_paused = true)]
async fn an_app_that_keeps_exiting_restarts_with_backoff_and_is_named_a_crash_loop() {
    let mut instance = start(
        "service",
        Script { app_exits_after: Some((Duration::from_millis(100), 1)), ..Script::default() },
    );
    let report = instance.until("four restarts", |r| r.restarts >= 4).await;
    assert!(report.message.contains("crash loop"), "{report:?}");
    assert!(report.message.contains("exited: exit status: 1"), "{report:?}");
    let apps = instance.host.starts("app");
    // Each start runs 100 ms, then waits 250 ms, 500 ms, 1 s, 2 s.
    let expected = [350, 600, 1100, 2100].map(Duration::from_millis);
    for (gap, expected) in gaps(&apps).iter().zip(expected) {
        assert!(about(*gap, expected), "gaps between starts {:?}", gaps(&apps));
    }
    // The sidecar ran on throughout: started once.
    assert_eq!(instance.host.starts("proxy").len(), 1);
    assert_eq!(report.state(), pb::InstanceState::Starting);
    instance.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), &mut instance.task).await.expect("stops").unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dead_sidecar_is_started_again_and_the_app_runs_on() {
    let mut instance = start("service", Script::default());
    let report =
        instance.until("running and ready", |r| r.state() == pb::InstanceState::Running && r.ready).await;
    let (app, proxy) = (report.pid, report.proxy_pid);
    instance.host.exit(proxy, 1);
    let report =
        instance.until("a new sidecar", |r| r.proxy_pid != proxy && r.proxy_pid != 0 && r.ready).await;
    assert_eq!(report.proxy_restarts, 1, "{report:?}");
    assert_eq!(report.pid, app, "the app was not restarted");
    assert_eq!(report.restarts, 0);
    assert_eq!(instance.host.starts("app").len(), 1);
    instance.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), &mut instance.task).await.expect("stops").unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stop_drains_before_it_stops_the_app_and_its_sidecar() {
    let mut instance = start("service", Script::default());
    let report = instance.until("running", |r| r.state() == pb::InstanceState::Running).await;
    instance.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), &mut instance.task).await.expect("stops").unwrap();
    assert_eq!(instance.host.drains.load(Ordering::SeqCst), 1);
    assert_eq!(
        *instance.host.stopped.lock().unwrap(),
        vec![report.pid, report.proxy_pid],
        "app first, then sidecar"
    );
    let report = instance.report.get();
    assert_eq!(report.state(), pb::InstanceState::Draining);
    assert!(!report.ready);
}

#[tokio::test(start_paused = true)]
async fn a_batch_job_that_exits_0_completes_and_is_not_restarted() {
    let mut instance =
        start("batch", Script { app_exits_after: Some((Duration::from_secs(3), 0)), ..Script::default() });
    tokio::time::timeout(Duration::from_secs(60), &mut instance.task).await.expect("completes").unwrap();
    let report = instance.report.get();
    assert_eq!(report.state(), pb::InstanceState::Complete, "{report:?}");
    assert_eq!(report.restarts, 0);
    assert_eq!(instance.host.starts("app").len(), 1);
    assert_eq!(*instance.host.stopped.lock().unwrap(), vec![report_proxy_pid(&instance.host)]);
}

fn report_proxy_pid(host: &ScriptedHost) -> i32 {
    host.starts("proxy")[0].pid
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_never_ready_fails_the_start_says_why_and_tries_again() {
    let mut instance = start("service", Script { sidecar_never_ready: true, ..Script::default() });
    let report = instance.until("failed", |r| r.state() == pb::InstanceState::Failed).await;
    assert!(report.message.contains("not ready within 15s; trying again in 250ms"), "{report:?}");
    assert!(instance.host.starts("app").is_empty(), "no app without its sidecar");
    let proxies = instance.host.starts("proxy");
    assert!(about(proxies[0].at, Duration::ZERO));
    // The sidecar that never got ready was stopped.
    assert_eq!(*instance.host.stopped.lock().unwrap(), vec![proxies[0].pid]);
    let report = instance.until("a second try", |r| r.restarts >= 2).await;
    let proxies = instance.host.starts("proxy");
    // 15 s of waiting, then 250 ms of backoff.
    assert!(about(proxies[1].at - proxies[0].at, Duration::from_millis(15_250)), "{proxies:?} {report:?}");
    instance.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), &mut instance.task).await.expect("stops").unwrap();
}
