//! Child processes that are killed, with their whole process group, when
//! the test ends, however it ends.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct Process {
    pub name: String,
    child: Child,
    /// The first line the process printed on stdout.
    pub first_line: String,
}

impl Process {
    /// Starts a program and waits (bounded) for its first line of output,
    /// which the mesh's binaries print once they listen.
    pub fn start(program: &Path, args: &[&str]) -> Process {
        Process::start_with(Command::new(program).args(args))
    }

    pub fn start_with(command: &mut Command) -> Process {
        Process::spawn(command, true)
    }

    /// Starts a program that prints no ready line; the caller waits for
    /// readiness its own way.
    pub fn start_quiet(command: &mut Command) -> Process {
        Process::spawn(command, false)
    }

    fn spawn(command: &mut Command, wait_for_line: bool) -> Process {
        let name = command.get_program().to_string_lossy().rsplit('/').next().unwrap_or_default().to_owned();
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        // Keep test output readable; a failing test can be rerun with RUST_LOG=debug.
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        // Its own process group, so cleanup reaches anything it started.
        std::os::unix::process::CommandExt::process_group(command, 0);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        if !wait_for_line {
            std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
            return Process { name, child, first_line: String::new() };
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            let _ = tx.send(first);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let first_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if !line.is_empty() => line,
            _ => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("{name} printed no ready line (exit status {status:?})");
            }
        };
        Process { name, child, first_line }
    }

    /// The value of `key=` in the ready line, e.g. `outbound=127.0.0.1:4140`.
    pub fn field(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.first_line
            .split_whitespace()
            .find_map(|word| word.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{} ready line has no {key}: {}", self.name, self.first_line))
            .to_owned()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we own has no memory effects.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a program to completion and returns (exit code, stdout, stderr).
pub fn run(program: &Path, args: &[&str]) -> (i32, String, String) {
    let output =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Runs a program that should exit on its own, for at most `within`:
/// (its exit code, or `None` if it had to be killed; its stderr).
pub fn run_bounded(program: &Path, args: &[&str], within: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    let deadline = std::time::Instant::now() + within;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr);
    (code, stderr)
}

/// A mesh-echo instance.
pub struct Echo {
    pub process: Process,
    pub addr: String,
}

impl Echo {
    pub fn start(version: &str, extra: &[&str]) -> Echo {
        let mut args = vec!["--port", "0", "--version", version];
        args.extend_from_slice(extra);
        let process = Process::start(&crate::bin("mesh-echo"), &args);
        // "mesh-echo listening on ADDR version=V"
        let addr =
            process.first_line.split_whitespace().nth(3).expect("echo ready line has an address").to_owned();
        Echo { process, addr }
    }

    /// The app's own counts (`/_echo/stats`): requests seen, in flight,
    /// connections; None if it does not answer.
    pub async fn stats(&self) -> Option<serde_json::Value> {
        let client = crate::client::http1();
        let answer = crate::client::get(&client, &self.addr, &self.addr, "/_echo/stats").await.ok()?;
        serde_json::from_slice(&answer.body).ok()
    }

    /// Requests the app has seen.
    pub async fn requests_seen(&self) -> u64 {
        let stats = self.stats().await.expect("the app's stats");
        stats["requests"].as_u64().expect("a request count")
    }
}

/// A mesh-proxy on a config file.
pub struct Proxy {
    pub process: Process,
}

impl Proxy {
    pub fn start(config: &Path) -> Proxy {
        Proxy::start_args(config, &[])
    }

    pub fn start_args(config: &Path, extra: &[&str]) -> Proxy {
        let config = config.to_str().expect("utf-8 path");
        let mut args = vec!["--config", config];
        args.extend_from_slice(extra);
        Proxy { process: Process::start(&crate::bin("mesh-proxy"), &args) }
    }

    pub fn outbound(&self) -> String {
        self.process.field("outbound")
    }

    pub fn inbound(&self) -> String {
        self.process.field("inbound")
    }

    pub fn admin(&self) -> String {
        self.process.field("admin")
    }

    pub fn upstream(&self, service: &str) -> String {
        self.process.field(&format!("upstream.{service}"))
    }
}

/// A node agent (`meshd agent`) with 1 GB of memory and the given CPU. It
/// stops gracefully when dropped (its instances drain and their cgroups
/// go), and is killed if that takes too long.
pub struct Agent(pub Process);

impl Agent {
    /// An agent of `meshd`'s mesh; on its first start it joins with a
    /// fresh join token, later starts use the node certificate it kept.
    pub fn start(
        meshd: &Meshd,
        name: &str,
        ip: &str,
        cpu_millis: u32,
        data_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut command = Command::new(crate::bin("meshd"));
        Agent::start_on(&mut command, &meshd.listen, meshd, name, ip, cpu_millis, data_dir, extra)
    }

    /// An agent on `host` (a lab's network namespace), at its address.
    pub fn start_in(
        host: &crate::netns::Host,
        meshd: &Meshd,
        cpu_millis: u32,
        data_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let mut command = host.command(&crate::bin("meshd"));
        let ip = host.ip.to_string();
        Agent::start_on(&mut command, &meshd.listen, meshd, &host.name, &ip, cpu_millis, data_dir, extra)
    }

    /// An agent on `host` given `servers` (one address or several,
    /// comma-separated), joining with a token from `meshd`.
    pub fn start_in_cluster(
        host: &crate::netns::Host,
        servers: &str,
        meshd: &Meshd,
        cpu_millis: u32,
        data_dir: &Path,
    ) -> Agent {
        let mut command = host.command(&crate::bin("meshd"));
        let ip = host.ip.to_string();
        Agent::start_on(&mut command, servers, meshd, &host.name, &ip, cpu_millis, data_dir, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn start_on(
        command: &mut Command,
        server: &str,
        meshd: &Meshd,
        name: &str,
        ip: &str,
        cpu_millis: u32,
        data_dir: &Path,
        extra: &[&str],
    ) -> Agent {
        let cpu = cpu_millis.to_string();
        let joined = data_dir.join("node.credentials.toml").exists();
        let data_dir = data_dir.to_str().expect("utf-8 path");
        let mut args = vec![
            "agent",
            "--server",
            server,
            "--name",
            name,
            "--advertise-ip",
            ip,
            "--cpu-millis",
            &cpu,
            "--memory-mb",
            "1024",
            "--data-dir",
            data_dir,
        ];
        args.extend_from_slice(extra);
        command.args(&args);
        if !joined {
            command.env("MESH_JOIN_TOKEN", meshd.join_token());
        }
        Agent(Process::start_with(command))
    }

    /// SIGKILL, as a node that dies.
    pub fn kill(self) {
        self.0.signal(libc::SIGKILL);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.signal(libc::SIGTERM);
        let _ = self.0.wait_exit(Duration::from_secs(15));
    }
}

/// A `meshd server` on port 0 (or a given address, to restart in place).
pub struct Meshd {
    pub process: Process,
    pub listen: String,
    pub admin: String,
    /// The admin credential meshd wrote into its data dir.
    pub credentials: String,
    /// The network namespace it runs in, when it runs in a lab's host:
    /// meshctl runs there too.
    pub namespace: Option<String>,
}

impl Meshd {
    pub fn start(data_dir: &Path) -> Meshd {
        Meshd::start_on(data_dir, "127.0.0.1:0")
    }

    pub fn start_on(data_dir: &Path, listen: &str) -> Meshd {
        Meshd::start_with(data_dir, listen, &[])
    }

    pub fn start_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Meshd {
        let data_dir = data_dir.to_str().expect("utf-8 path");
        let mut args = vec!["server", "--data-dir", data_dir, "--listen", listen, "--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Meshd::from_process(Process::start(&crate::bin("meshd"), &args))
    }

    /// A `meshd server` on `host` (a lab's network namespace), listening
    /// on the host's address.
    pub fn start_in(host: &crate::netns::Host, data_dir: &Path, extra: &[&str]) -> Meshd {
        let data_dir = data_dir.to_str().expect("utf-8 path");
        let listen = format!("{}:0", host.ip);
        let mut args = vec!["server", "--data-dir", data_dir, "--listen", &listen, "--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut command = host.command(&crate::bin("meshd"));
        command.args(&args);
        let mut meshd = Meshd::from_process(Process::start_with(&mut command));
        meshd.namespace = Some(host.namespace.clone());
        meshd
    }

    pub fn from_process(process: Process) -> Meshd {
        let listen = process.field("listen");
        let admin = process.field("admin");
        let credentials = process.field("credentials");
        Meshd { process, listen, admin, credentials, namespace: None }
    }

    /// A join token for one node.
    pub fn join_token(&self) -> String {
        self.ctl_ok(&["node", "token", "create"]).trim().to_owned()
    }

    /// A gRPC channel to meshd over TLS with the admin credential.
    pub async fn channel(&self) -> tonic::transport::Channel {
        self.channel_as(&self.credentials).await
    }

    /// A gRPC channel to meshd over TLS with the credential in `file`.
    pub async fn channel_as(&self, file: &str) -> tonic::transport::Channel {
        let credentials = mesh_client::Credentials::read(Path::new(file)).expect("a credential");
        let tls = credentials.tls().expect("the credential's TLS");
        mesh_client::connect(&self.listen, &tls, Duration::from_secs(5)).await.expect("meshd answers")
    }

    /// `meshd dev --demo`: the control plane and one node agent running the
    /// demo's jobs, on free ports.
    pub fn start_dev_demo(data_dir: &Path) -> Meshd {
        let data_dir = data_dir.to_str().expect("utf-8 path");
        let args =
            ["dev", "--demo", "--data-dir", data_dir, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        Meshd::from_process(Process::start(&crate::bin("meshd"), &args))
    }

    /// Every instance, as `meshctl get instances -o json` lists them.
    pub fn instances(&self) -> Vec<serde_json::Value> {
        self.ctl_json(&["get", "instances"]).as_array().cloned().unwrap_or_default()
    }

    /// Waits until `count` instances of `job` run and are ready; returns
    /// them. On timeout the failure lists every instance, with its message.
    pub async fn running(&self, job: &str, count: usize, within: Duration) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let all = self.instances();
            let list: Vec<serde_json::Value> = all
                .iter()
                .filter(|i| i["job"] == job && i["state"] == "running" && i["ready"] == true)
                .cloned()
                .collect();
            if list.len() == count {
                return list;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{count} ready instances of {job} within {within:?}; instances: {all:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A meshed client: a scheduled job (`client`) whose app only sleeps,
    /// so that a test can call services through its sidecar, with its
    /// identity and over mTLS. `placement` is extra job-file text (e.g. a
    /// constraint). Returns the sidecar's outbound address (the app's
    /// `MESH_OUTBOUND`).
    pub async fn mesh_client(&self, job_file: &Path, placement: &str) -> String {
        self.mesh_client_named("client", job_file, placement).await
    }

    /// `mesh_client` with another job name, for a second client.
    pub async fn mesh_client_named(&self, name: &str, job_file: &Path, placement: &str) -> String {
        let job = format!(
            "name = \"{name}\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\n\n[resources]\ncpu_millis = 10\nmemory_mb = 16\n\n{placement}"
        );
        std::fs::write(job_file, job).expect("write the client's job file");
        self.ctl_ok(&["job", "run", job_file.to_str().expect("utf-8 path")]);
        let client = self.running(name, 1, Duration::from_secs(30)).await.remove(0);
        let environ =
            std::fs::read(format!("/proc/{}/environ", client["pid"])).expect("the client's environment");
        String::from_utf8_lossy(&environ)
            .split('\0')
            .find_map(|v| v.strip_prefix("MESH_OUTBOUND=").map(str::to_owned))
            .expect("MESH_OUTBOUND in the client's environment")
    }

    /// Runs meshctl against this server: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.ctl_via(&self.listen, args)
    }

    /// Runs meshctl with this server's admin credential against `servers`
    /// (one address or several, comma-separated).
    pub fn ctl_via(&self, servers: &str, args: &[&str]) -> (i32, String, String) {
        let meshctl = crate::bin("meshctl");
        let mut all = vec!["--server", servers, "--credentials", self.credentials.as_str()];
        all.extend_from_slice(args);
        match &self.namespace {
            Some(namespace) => {
                let meshctl = meshctl.to_str().expect("utf-8 path");
                let mut wrapped = vec!["netns", "exec", namespace.as_str(), meshctl];
                wrapped.extend_from_slice(&all);
                run(Path::new("ip"), &wrapped)
            }
            None => run(&meshctl, &all),
        }
    }

    /// Runs meshctl and insists that it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.ctl(args);
        assert_eq!(code, 0, "meshctl {args:?} failed: {stdout}{stderr}");
        stdout
    }

    /// `meshctl ... -o json`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ctl_ok(&all)).expect("meshctl prints JSON")
    }
}

impl Proxy {
    /// A mesh-proxy under the control plane, with an outbound listener and
    /// the given extra flags (such as `--upstream echo=127.0.0.1:0`).
    /// It authenticates with `meshd`'s admin credential, as a proxy run by
    /// hand does with an operator's.
    pub fn start_control(meshd: &Meshd, service: &str, extra: &[&str]) -> Proxy {
        let mut args = vec![
            "--control",
            &meshd.listen,
            "--credentials",
            &meshd.credentials,
            "--service",
            service,
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Proxy { process: Process::start(&crate::bin("mesh-proxy"), &args) }
    }
}

/// Whether the host has the unified cgroup hierarchy (v2).
pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The folder of the cgroup a process is in for `controller` ("memory",
/// "cpu"), on cgroup v1 or v2.
pub fn cgroup_dir(pid: i64, controller: &str) -> Option<std::path::PathBuf> {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    membership.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if cgroup_v2() {
            controllers.is_empty().then(|| format!("/sys/fs/cgroup{path}").into())
        } else {
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| format!("/sys/fs/cgroup/{controller}{path}").into())
        }
    })
}
