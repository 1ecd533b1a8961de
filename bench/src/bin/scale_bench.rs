//! How fast the mesh's autoscaler follows a load step: `meshd dev` (server
//! and one agent) runs a scaled job; a meshed client's sidecar carries a
//! closed-loop load; the load doubles, and the benchmark times, from the
//! step, the scale decision (the job wants more instances) and the new
//! instances ready. Then the load halves again and the job shrinks back
//! after its stabilization window, and the next trial starts.
//!
//! The reference is what Kubernetes' HPA would take by its documented
//! defaults, not a run of it: it decides every 15 s
//! (`--horizontal-pod-autoscaler-sync-period`) on metrics-server figures
//! refreshed every 15 s (`--metric-resolution`), so a step waits 0–15 s for
//! a sync plus up to 15 s of metric age. Everything listens on loopback.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_bench::simulated::percentile;

#[derive(Parser, Debug)]
#[command(name = "mesh-scale-bench", about = "The autoscaler's delay from a 2x load step")]
struct Args {
    /// Where meshd, meshctl, mesh-proxy and mesh-echo are.
    #[arg(long)]
    bin_dir: std::path::PathBuf,
    /// Load steps timed.
    #[arg(long, default_value_t = 5)]
    trials: u32,
    /// Callers before the step (each keeps one request in flight); the step doubles them.
    #[arg(long, default_value_t = 6)]
    callers: u32,
}

/// Two instances carry up to 6 requests in flight at the target of 3: the
/// base load (about 4.5 in flight at the instances) needs two, its double
/// clearly more, well past the 10 % tolerance.
const JOB: &str = r#"
name = "web"
version = "v1"
replicas = 2

[task]
command = "mesh-echo"
args = ["--latency", "20ms"]

[resources]
cpu_millis = 100
memory_mb = 32

[health]
readiness = { http = "/", interval = "100ms" }

[scale]
min = 2
max = 8
target = { in_flight_per_instance = 3 }
scale_down_after = "5s"
"#;

const CLIENT: &str = r#"
name = "client"
version = "v1"

[task]
command = "/bin/sleep"
args = ["3600"]

[resources]
cpu_millis = 10
memory_mb = 16
"#;

/// `meshd dev`, killed with its process group (its instances) on drop.
struct Dev {
    child: std::process::Child,
    listen: String,
    credentials: String,
}

impl Dev {
    fn start(args: &Args, dir: &std::path::Path) -> Dev {
        let mut command = std::process::Command::new(args.bin_dir.join("meshd"));
        command.arg("dev").arg("--data-dir").arg(dir);
        command.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--cpu-millis", "4000"]);
        command.env("RUST_LOG", "warn").stdout(std::process::Stdio::piped());
        // Instances are found beside meshd.
        let path = format!("{}:{}", args.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        command.env("PATH", path);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("start meshd dev");
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("meshd's ready line");
        std::thread::spawn(move || for _ in reader.lines() {});
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {line}"))
                .to_owned()
        };
        Dev { listen: field("listen"), credentials: field("credentials"), child }
    }

    fn ctl(&self, args: &Args, command: &[&str]) -> String {
        let out = std::process::Command::new(args.bin_dir.join("meshctl"))
            .args(["--server", &self.listen, "--credentials", &self.credentials])
            .args(command)
            .output()
            .expect("run meshctl");
        assert!(out.status.success(), "meshctl {command:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &Args, command: &[&str]) -> serde_json::Value {
        let mut all = command.to_vec();
        all.extend(["-o", "json"]);
        let value: serde_json::Value = serde_json::from_str(&self.ctl(args, &all)).expect("JSON");
        value.as_array().and_then(|rows| rows.first()).cloned().unwrap_or(value)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Closed-loop callers through the client's sidecar, each stopped by its flag.
struct Load {
    stops: Vec<Arc<AtomicBool>>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Load {
    fn add(&mut self, outbound: &str, callers: u32) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        for _ in 0..callers {
            let stop = Arc::new(AtomicBool::new(false));
            self.stops.push(stop.clone());
            let (client, uri, ok, failed) =
                (client.clone(), format!("http://{outbound}/"), self.ok.clone(), self.failed.clone());
            tokio::spawn(async move {
                // Bounded: no caller outlives the benchmark by much.
                let deadline = Instant::now() + Duration::from_secs(1800);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let request = http::Request::get(&uri).header("host", "web").body(Empty::new()).unwrap();
                    let answer = client.request(request).await;
                    let why = match answer {
                        Ok(response) => {
                            let status = response.status();
                            let reason = response.headers().get("x-mesh-error").cloned();
                            let _ = response.into_body().collect().await;
                            (!status.is_success()).then(|| format!("{status} {reason:?}"))
                        }
                        Err(error) => Some(format!("{error:?}")),
                    };
                    match why {
                        None => ok.fetch_add(1, Ordering::Relaxed),
                        Some(why) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("failed: {why}");
                            }
                            0
                        }
                    };
                }
            });
        }
    }

    fn remove(&mut self, callers: u32) {
        for _ in 0..callers {
            if let Some(stop) = self.stops.pop() {
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Polls `check` every 50 ms until it holds; the time it took, or None after `within`.
fn until(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn main() {
    let args = Args::parse();
    // The load runs on the runtime's threads; this one polls meshctl.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let _entered = runtime.enter();
    let dir = std::env::temp_dir().join(format!("mesh-scale-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a data dir");
    let dev = Dev::start(&args, &dir.join("data"));
    for (name, text) in [("client", CLIENT), ("web", JOB)] {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).expect("write a job file");
        dev.ctl(&args, &["job", "run", file.to_str().expect("utf-8")]);
    }
    let ready = |job: &str, count: u64| {
        let status = dev.json(&args, &["job", "status", job]);
        status["ready"].as_u64() >= Some(count)
    };
    if until(Duration::from_secs(60), || ready("client", 1) && ready("web", 2)).is_none() {
        panic!("the jobs did not start: {}", dev.ctl(&args, &["get", "instances", "-o", "json"]));
    }
    let instances = dev.ctl(&args, &["get", "instances", "-o", "json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&instances).expect("instances");
    let pid = list.iter().find(|i| i["job"] == "client").expect("the client")["pid"].clone();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the client's environment");
    let outbound = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|v| v.strip_prefix("MESH_OUTBOUND=").map(str::to_owned))
        .expect("MESH_OUTBOUND");

    // Ready in meshd is not yet in the client's table: wait for one answer through its sidecar.
    let probe = format!("http://{outbound}/");
    let answered = until(Duration::from_secs(30), || {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "host: web", &probe])
            .output();
        out.is_ok_and(|out| out.stdout == b"200")
    });
    answered.expect("web answers through the client's sidecar");
    let mut load = Load { stops: Vec::new(), ok: Arc::default(), failed: Arc::default() };
    load.add(&outbound, args.callers);
    let replicas = || dev.json(&args, &["job", "status", "web"])["replicas"].as_u64().unwrap_or(0);
    let (mut decided, mut placed) = (Vec::new(), Vec::new());
    for trial in 1..=args.trials {
        // Steady first: the job at its minimum with the base load on.
        until(Duration::from_secs(60), || replicas() == 2).expect("back at 2 instances");
        std::thread::sleep(Duration::from_secs(3));
        let stepped = Instant::now();
        load.add(&outbound, args.callers);
        let decision = until(Duration::from_secs(30), || replicas() > 2).expect("a scale decision");
        let wanted = replicas();
        until(Duration::from_secs(30), || ready("web", wanted)).expect("the new instances ready");
        let ready_after = stepped.elapsed();
        let status = dev.json(&args, &["job", "status", "web"]);
        let why = status["scale_decisions"].as_array().and_then(|d| d.first().cloned()).unwrap_or_default();
        println!(
            "trial {trial}: decided after {decision:.2?}, {wanted} ready after {ready_after:.2?}: {why}"
        );
        decided.push(decision.as_secs_f64());
        placed.push(ready_after.as_secs_f64());
        load.remove(args.callers);
    }
    load.remove(args.callers);
    let (ok, failed) = (load.ok.load(Ordering::Relaxed), load.failed.load(Ordering::Relaxed));
    decided.sort_by(f64::total_cmp);
    placed.sort_by(f64::total_cmp);
    println!();
    println!("| measure | median | max |");
    println!("|---|---|---|");
    println!(
        "| 2× load step → scale decision | {:.2} s | {:.2} s |",
        percentile(&decided, 0.5),
        percentile(&decided, 1.0)
    );
    println!(
        "| 2× load step → new instances ready | {:.2} s | {:.2} s |",
        percentile(&placed, 0.5),
        percentile(&placed, 1.0)
    );
    println!("| HPA defaults (reference): 15 s sync + up to 15 s metric age → decision | 7.5–22.5 s (mean) | 30 s |");
    println!();
    println!("requests during the run: {ok} ok, {failed} failed");
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}
