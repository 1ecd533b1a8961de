//! mesh-bench: runs every contender in turn, on loopback, against the same
//! backend with the same load, and writes a Markdown table and an SVG
//! chart. Run it through `bench/run`, which installs the contenders and
//! pins this process (load generator and backend) to the second core.

mod contenders;
mod handshakes;
mod load;
mod mesh_path;

mod report;
mod tools;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::contenders::{free_port, Kind, Mode, Setup};
use crate::load::{open_loop, OpenLoop};
use crate::mesh_path::{Certs, PathKind};
use crate::report::{H2Row, PathRow, Row};
use mesh_bench::procstat;

#[derive(Parser, Debug)]
#[command(name = "mesh-bench", about = "Side-by-side proxy benchmark")]
struct Args {
    /// A few seconds per point: checks that every contender answers.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each point; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Seconds per measured point.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The fixed open-loop request rate.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Where mesh-proxy is.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The Envoy binary.
    #[arg(long)]
    envoy: PathBuf,
    /// Where the table and chart go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The core the proxies are pinned to.
    #[arg(long, default_value = "0")]
    proxy_core: String,
    /// Only these contenders (comma-separated names as in the table).
    #[arg(long)]
    only: Option<String>,
    /// Drop this share (percent) of the packets of the mesh path's second
    /// hop, both ways, TCP and UDP, with iptables on loopback. Run it in a
    /// network namespace of its own (`bench/quic-path` does): the rules
    /// are on that namespace's loopback.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
}

impl Args {
    /// Whether `--only` (if given) names this contender or path.
    fn includes(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|only| only.split(',').any(|o| o.trim() == name))
    }
}

/// A running program in its own process group, killed with it on drop.
struct Running {
    child: Child,
}

impl Running {
    fn start(mut command: Command) -> Running {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Running { child }
    }

    fn pgid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-self.pgid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `port` answers an HTTP request with 200.
fn wait_ready(port: u16, host: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            if stream.write_all(request.as_bytes()).is_ok()
                && stream.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing answered 200 on port {port} within 20 s"))
}

fn run_open_loop(load: OpenLoop) -> Result<load::LoadResult, String> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, open_loop(load))
}

/// One repetition of every point for one contender.
fn measure(kind: Kind, setup: &Setup, args: &Args) -> Result<Row, String> {
    let seconds = Duration::from_secs(if args.quick { 1 } else { args.seconds });
    let host = "backend";
    let (port, running) = start_contender(kind, Mode::Http1, setup);
    wait_ready(port, host)?;
    let target = format!("127.0.0.1:{port}");
    let pgid = running.as_ref().map(Running::pgid);

    // Memory at a moderate load with many connections, from a fresh start.
    let rss_load = OpenLoop {
        target: target.clone(),
        host: host.into(),
        rate: 1000,
        connections: 100,
        duration: seconds.min(Duration::from_secs(5)),
    };
    let rss_run = run_open_loop(rss_load)?;
    let peak_rss_mb = pgid.map(|g| procstat::peak_rss_bytes(g) as f64 / 1e6);

    let cpu_before = pgid.map(procstat::cpu_times);
    let saturation = tools::wrk(&format!("http://{target}/"), host, 32, seconds)?;
    let cpu_used = pgid.zip(cpu_before).map(|(g, before)| {
        let after = procstat::cpu_times(g);
        procstat::CpuTimes { user: after.user - before.user, system: after.system - before.system }
    });
    let per_request = |seconds: f64| seconds * 1e6 / saturation.requests as f64;
    let cpu_us_per_request = cpu_used.map(|used| per_request(used.total()));
    let user_cpu_us_per_request = cpu_used.map(|used| per_request(used.user));

    let cpu_before = pgid.map(procstat::cpu_seconds);
    let at_rate = run_open_loop(OpenLoop {
        target: target.clone(),
        host: host.into(),
        rate: args.rate,
        connections: 32,
        duration: seconds,
    })?;
    let cpu_us_per_request_at_rate = pgid
        .zip(cpu_before)
        .map(|(g, before)| (procstat::cpu_seconds(g) - before) * 1e6 / at_rate.requests.max(1) as f64);

    let sequential = tools::wrk(&format!("http://{target}/"), host, 1, seconds)?;
    let errors = rss_run.errors + saturation.errors + at_rate.errors + sequential.errors;
    if errors > 0 || at_rate.requests == 0 {
        return Err(format!("{}: {errors} failed requests", kind.name()));
    }
    drop(running);
    Ok(Row {
        name: kind.name().to_owned(),
        saturation_rps: saturation.requests_per_second,
        cpu_us_per_request,
        user_cpu_us_per_request,
        cpu_us_per_request_at_rate,
        rate_p50_us: at_rate.p50_us as f64,
        rate_p99_us: at_rate.p99_us as f64,
        rate_p999_us: at_rate.p999_us as f64,
        sequential_p50_us: sequential.p50_us,
        sequential_p99_us: sequential.p99_us,
        peak_rss_mb,
    })
}

fn start_contender(kind: Kind, mode: Mode, setup: &Setup) -> (u16, Option<Running>) {
    let proxy_port = free_port();
    match contenders::command(kind, mode, setup, proxy_port) {
        None => (setup.direct_port(mode), None),
        Some(command) => (proxy_port, Some(Running::start(command))),
    }
}

/// Calls the gRPC backend (mesh-echo) has answered: a call a proxy answers
/// itself (HTTP 200 with a `grpc-status` error) never reaches it.
fn grpc_backend_answered(setup: &Setup) -> Result<u64, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", setup.grpc_backend))
        .map_err(|e| format!("the gRPC backend's stats: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    stream
        .write_all(b"GET /_echo/stats HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    let stats: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("the gRPC backend's stats: {e}: {answer}"))?;
    stats["requests"].as_u64().ok_or_else(|| format!("no request count in {body}"))
}

/// Waits (bounded) until an HTTP/2 prior-knowledge request through `port`
/// succeeds; for gRPC, until the backend itself answered it.
fn wait_ready_h2(
    port: u16,
    authority: &str,
    grpc_body: Option<&std::path::Path>,
    setup: &Setup,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{port}{}", if grpc_body.is_some() { GRPC_PATH } else { "/" });
    loop {
        let mut command = tools::h2load_command(authority, grpc_body);
        command.args(["-n1", "-c1"]);
        let answered_before = grpc_body.map(|_| grpc_backend_answered(setup)).transpose()?;
        let output = command.arg(&url).output().map_err(|e| format!("cannot run h2load: {e}"))?;
        let reached_backend = match answered_before {
            // More than one if a proxy resent it: still the backend answered.
            Some(before) => grpc_backend_answered(setup)? > before,
            None => true,
        };
        if String::from_utf8_lossy(&output.stdout).contains("1 succeeded")
            && tools::parse_h2load(&String::from_utf8_lossy(&output.stdout)).is_some_and(|r| r.failed == 0)
            && reached_backend
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no HTTP/2 answer on port {port} within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const GRPC_PATH: &str = "/mesh.echo.v1.Echo/Unary";

/// One round of the HTTP/2 and gRPC points for one contender.
fn measure_h2(kind: Kind, setup: &Setup, args: &Args) -> Result<H2Row, String> {
    let seconds = Duration::from_secs(if args.quick { 1 } else { args.seconds });
    let grpc_body = setup.work.join("grpc-request.bin");
    // One gRPC message: no compression, length 4, EchoRequest { message: "hi" }.
    std::fs::write(&grpc_body, [0u8, 0, 0, 0, 4, 0x0a, 0x02, b'h', b'i']).map_err(|e| e.to_string())?;
    let mut row = H2Row { name: kind.name().to_owned(), ..H2Row::default() };
    for mode in [Mode::H2, Mode::Grpc] {
        let body = (mode == Mode::Grpc).then_some(grpc_body.as_path());
        let (port, running) = start_contender(kind, mode, setup);
        wait_ready_h2(port, "backend", body, setup)?;
        let pgid = running.as_ref().map(Running::pgid);
        let cpu_before = pgid.map(procstat::cpu_seconds);
        let path = if body.is_some() { GRPC_PATH } else { "/" };
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut result;
        let cpu;
        if mode == Mode::Grpc {
            // gRPC errors come as HTTP 200, which h2load counts as success.
            // A run of a fixed count (sized from the HTTP/2 rate to last about
            // as long) finishes every call it starts, so the backend's count
            // of calls it answered must match: any shortfall is calls the
            // proxy answered itself.
            let count = ((row.h2_rps * seconds.as_secs_f64()) as u64).max(1_000);
            let answered_before = grpc_backend_answered(setup)?;
            result = tools::h2load(&url, "backend", 32, 10, tools::H2loadRun::Requests(count), body)?;
            let answered = grpc_backend_answered(setup)? - answered_before;
            let not_answered = result.succeeded.saturating_sub(answered);
            result.succeeded -= not_answered;
            result.failed += not_answered;
            result.summary.push_str(&format!("the backend answered {answered} of {count} calls\n"));
            cpu = pgid
                .zip(cpu_before)
                .map(|(g, before)| (procstat::cpu_seconds(g) - before) * 1e6 / (count as f64));
        } else {
            result = tools::h2load(&url, "backend", 32, 10, tools::H2loadRun::For(seconds), body)?;
            cpu = pgid.zip(cpu_before).map(|(g, before)| {
                // h2load's warm-up second is not in its count but is in the CPU time.
                let measured = seconds.as_secs_f64();
                (procstat::cpu_seconds(g) - before) * 1e6
                    / (result.requests_per_second * (measured + 1.0)).max(1.0)
            });
        }
        if result.failed > 0 {
            let log = contenders::error_log(kind, mode, setup);
            let report = format!(
                "{} {mode:?}: {} failed requests\n{}{log}",
                kind.name(),
                result.failed,
                result.summary
            );
            // The quick run only checks that every contender answers; a
            // third-party proxy's rare failure on a loaded CI machine is
            // reported but not fatal there. mesh-proxy gets no such slack.
            // nginx's gRPC path has seen bursts of upstream resets from the
            // mesh-echo backend (2 of 7 clean-clone runs, 2-3 % of a one-second
            // run); not yet explained, so the slack is 5 %, not 1 %.
            let tolerated = args.quick && kind != Kind::MeshProxy && result.failed * 20 <= result.succeeded;
            if !tolerated {
                return Err(report);
            }
            eprintln!("mesh-bench: warning (under 5 %, tolerated in --quick): {report}");
        }
        match mode {
            Mode::H2 => (row.h2_rps, row.h2_cpu_us_per_request) = (result.requests_per_second, cpu),
            _ => (row.grpc_rps, row.grpc_cpu_us_per_request) = (result.requests_per_second, cpu),
        }
        drop(running);
    }
    Ok(row)
}

/// Packets of one port dropped at random on loopback (iptables), both
/// ways, TCP and UDP, until dropped.
struct Loss {
    rules: Vec<Vec<String>>,
}

impl Loss {
    fn apply(port: u16, percent: f64) -> Result<Loss, String> {
        let probability = format!("{:.4}", percent / 100.0);
        let mut rules = Vec::new();
        for protocol in ["tcp", "udp"] {
            for direction in ["--dport", "--sport"] {
                let rule: Vec<String> = [
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    protocol,
                    direction,
                    &port.to_string(),
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                iptables("-A", &rule)?;
                rules.push(rule);
            }
        }
        Ok(Loss { rules })
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = iptables("-D", rule);
        }
    }
}

fn iptables(action: &str, rule: &[String]) -> Result<(), String> {
    let output = std::process::Command::new("iptables")
        .arg(action)
        .args(rule)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "iptables {action} {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// One round of the full-path points for one path: CPU of all its
/// proxies per request at saturation, latency at the fixed rate, and the
/// second hop's new-connection handshake rate per core.
fn measure_path(kind: PathKind, setup: &Setup, args: &Args, certs: &Certs) -> Result<PathRow, String> {
    let seconds = Duration::from_secs(if args.quick { 1 } else { args.seconds });
    let started = mesh_path::commands(kind, setup, certs);
    let running: Vec<Running> = started.commands.into_iter().map(Running::start).collect();
    wait_ready(started.entry_port, mesh_path::SERVICE)?;
    let target = format!("127.0.0.1:{}", started.entry_port);
    let _loss = match started.inbound_port {
        Some(port) if args.loss > 0.0 => Some(Loss::apply(port, args.loss)?),
        _ => None,
    };
    let pgids: Vec<i32> = running.iter().map(Running::pgid).collect();
    let cpu = || pgids.iter().map(|g| procstat::cpu_seconds(*g)).sum::<f64>();

    let before = cpu();
    let saturation = tools::wrk(&format!("http://{target}/"), mesh_path::SERVICE, 32, seconds)?;
    let cpu_us_per_request = (cpu() - before) * 1e6 / saturation.requests.max(1) as f64;
    let at_rate = run_open_loop(OpenLoop {
        target: target.clone(),
        host: mesh_path::SERVICE.into(),
        rate: args.rate,
        connections: 32,
        duration: seconds,
    })?;
    let errors = saturation.errors + at_rate.errors;
    if errors > 0 || at_rate.requests == 0 {
        return Err(format!("{}: {errors} failed requests", kind.name()));
    }
    let handshakes_per_core_second = match started.inbound_port.filter(|_| kind.has_mtls()) {
        Some(port) => {
            // The callee's proxy takes the handshakes; it started first.
            let callee = pgids[0];
            let files = mesh_proxy::config::IdentityFiles {
                certificate: certs.client_cert.clone(),
                key: certs.client_key.clone(),
                roots: certs.ca.clone(),
            };
            let identity = mesh_proxy::identity::from_files(&files).map_err(|e| e.to_string())?;
            let tls = Arc::new(
                mesh_proxy::tls::MeshTls::new(&identity, Default::default()).map_err(|e| e.to_string())?,
            );
            let before = procstat::cpu_seconds(callee);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let lossy = args.loss > 0.0;
            let count = if kind == PathKind::MeshQuic {
                runtime.block_on(handshakes::run_quic(port, tls, mesh_path::SERVICE, seconds, 4, lossy))?
            } else {
                runtime.block_on(handshakes::run(port, tls, mesh_path::SERVICE, seconds, 4, lossy))?
            };
            let used = procstat::cpu_seconds(callee) - before;
            Some(count as f64 / used.max(0.01))
        }
        None => None,
    };
    let large = tools::wrk(&format!("http://{target}/1mib"), mesh_path::SERVICE, 4, seconds)?;
    if large.errors > 0 {
        return Err(format!("{}: {} failed 1 MiB requests", kind.name(), large.errors));
    }
    drop(running);
    Ok(PathRow {
        mib_per_second: large.requests_per_second,
        name: kind.name().to_owned(),
        saturation_rps: saturation.requests_per_second,
        cpu_us_per_request,
        rate_p50_us: at_rate.p50_us as f64,
        rate_p99_us: at_rate.p99_us as f64,
        handshakes_per_core_second,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The median of one metric over repetitions.
fn median_of<T>(runs: &[T], metric: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(metric).collect())
}

/// The median of a metric some repetitions lack (the direct baseline has no proxy CPU).
fn median_of_some<T>(runs: &[T], metric: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(metric).collect();
    (!values.is_empty()).then(|| median(values))
}

fn median_path_row(runs: &[PathRow]) -> PathRow {
    PathRow {
        name: runs[0].name.clone(),
        saturation_rps: median_of(runs, |r| r.saturation_rps),
        cpu_us_per_request: median_of(runs, |r| r.cpu_us_per_request),
        rate_p50_us: median_of(runs, |r| r.rate_p50_us),
        rate_p99_us: median_of(runs, |r| r.rate_p99_us),
        handshakes_per_core_second: median_of_some(runs, |r| r.handshakes_per_core_second),
        mib_per_second: median_of(runs, |r| r.mib_per_second),
    }
}

/// The per-metric median over repetitions.
fn median_row(runs: &[Row]) -> Row {
    Row {
        name: runs[0].name.clone(),
        saturation_rps: median_of(runs, |r| r.saturation_rps),
        cpu_us_per_request: median_of_some(runs, |r| r.cpu_us_per_request),
        user_cpu_us_per_request: median_of_some(runs, |r| r.user_cpu_us_per_request),
        cpu_us_per_request_at_rate: median_of_some(runs, |r| r.cpu_us_per_request_at_rate),
        rate_p50_us: median_of(runs, |r| r.rate_p50_us),
        rate_p99_us: median_of(runs, |r| r.rate_p99_us),
        rate_p999_us: median_of(runs, |r| r.rate_p999_us),
        sequential_p50_us: median_of(runs, |r| r.sequential_p50_us),
        sequential_p99_us: median_of(runs, |r| r.sequential_p99_us),
        peak_rss_mb: median_of_some(runs, |r| r.peak_rss_mb),
    }
}

fn median_h2_row(runs: &[H2Row]) -> H2Row {
    H2Row {
        name: runs[0].name.clone(),
        h2_rps: median_of(runs, |r| r.h2_rps),
        h2_cpu_us_per_request: median_of_some(runs, |r| r.h2_cpu_us_per_request),
        grpc_rps: median_of(runs, |r| r.grpc_rps),
        grpc_cpu_us_per_request: median_of_some(runs, |r| r.grpc_cpu_us_per_request),
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(str::trim))
        .unwrap_or("unknown CPU")
        .to_owned();
    // Counted from cpuinfo: this process is pinned, so the scheduler's view is one core.
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let setup = Setup {
        work: work.clone(),
        bin_dir: args.bin_dir.clone(),
        envoy: args.envoy.clone(),
        proxy_core: args.proxy_core.clone(),
        backends: [free_port(), free_port()],
        backend_h2: free_port(),
        grpc_backend: free_port(),
    };
    let backend = Running::start(contenders::backend_command(&setup));
    let grpc_backend = Running::start(contenders::grpc_backend_command(&setup));
    for port in setup.backends {
        if let Err(e) = wait_ready(port, "backend") {
            eprintln!("mesh-bench: the backend did not start: {e}");
            std::process::exit(1);
        }
    }
    let chosen: Vec<Kind> = Kind::ALL.into_iter().filter(|k| args.includes(k.name())).collect();
    let repeat = if args.quick { 1 } else { args.repeat.max(1) };
    let mut runs: Vec<Vec<Row>> = vec![Vec::new(); chosen.len()];
    let mut h2_runs: Vec<Vec<H2Row>> = vec![Vec::new(); chosen.len()];
    let mut failed = Vec::new();
    // Repetitions go round all contenders, so slow drifts of the machine
    // spread over everyone instead of landing on one.
    for round in 0..repeat {
        for (index, kind) in chosen.iter().enumerate() {
            eprintln!("mesh-bench: round {}/{repeat}: {}", round + 1, kind.name());
            match measure(*kind, &setup, &args) {
                Ok(row) => runs[index].push(row),
                Err(e) => {
                    eprintln!("mesh-bench: {e}");
                    failed.push(kind.name());
                }
            }
            if !kind.speaks_h2() {
                continue;
            }
            match measure_h2(*kind, &setup, &args) {
                Ok(row) => h2_runs[index].push(row),
                Err(e) => {
                    eprintln!("mesh-bench: {e}");
                    failed.push(kind.name());
                }
            }
        }
    }
    // The full mesh path, two proxies on the proxy core.
    let certs = mesh_path::write_certs(&work.join("certs")).expect("bench certificates");
    let paths: Vec<PathKind> = PathKind::ALL.into_iter().filter(|k| args.includes(k.name())).collect();
    let mut path_runs: Vec<Vec<PathRow>> = vec![Vec::new(); paths.len()];
    for round in 0..repeat {
        for (index, kind) in paths.iter().enumerate() {
            eprintln!("mesh-bench: round {}/{repeat}: {}", round + 1, kind.name());
            match measure_path(*kind, &setup, &args, &certs) {
                Ok(row) => path_runs[index].push(row),
                Err(e) => {
                    eprintln!("mesh-bench: {e}");
                    failed.push(kind.name());
                }
            }
        }
    }
    drop(backend);
    drop(grpc_backend);
    let h2_rows: Vec<H2Row> = h2_runs.iter().filter(|r| !r.is_empty()).map(|r| median_h2_row(r)).collect();
    let rows: Vec<Row> = runs.iter().filter(|r| !r.is_empty()).map(|r| median_row(r)).collect();
    let table = report::markdown(&rows, args.rate);
    std::fs::create_dir_all(&args.out).expect("results dir");
    let mode = if args.quick { "quick" } else { "full" };
    std::fs::write(args.out.join(format!("http1-{mode}.md")), &table).expect("write table");
    std::fs::write(args.out.join(format!("http1-{mode}.svg")), report::svg(&rows, args.rate))
        .expect("write chart");
    println!("## HTTP/1.1, one hop, one proxy core ({})\n", machine());
    println!("{table}");
    let h2_table = report::markdown_h2(&h2_rows);
    std::fs::write(args.out.join(format!("h2-grpc-{mode}.md")), &h2_table).expect("write table");
    println!("## HTTP/2 and gRPC (h2load, 32 connections × 10 streams), one hop, one proxy core\n");
    println!("{h2_table}");
    let path_rows: Vec<PathRow> =
        path_runs.iter().filter(|r| !r.is_empty()).map(|r| median_path_row(r)).collect();
    if !path_rows.is_empty() {
        let path_table = report::markdown_paths(&path_rows, args.rate);
        std::fs::write(args.out.join(format!("mesh-path-{mode}.md")), &path_table).expect("write table");
        println!("## The full mesh path: app → proxy → proxy → app, both proxies on one core\n");
        println!("{path_table}");
    }
    let _ = std::fs::remove_dir_all(&work);
    if !failed.is_empty() {
        eprintln!("mesh-bench: these contenders failed: {failed:?}");
        std::process::exit(1);
    }
}
