//! The control plane's benchmark: many proxy subscriptions (simulated in
//! this process, each a real gRPC stream on its own connection) against a
//! real `meshd server`, measuring how fast a change reaches the last proxy,
//! what an endpoint flap costs (pushes, bytes and meshd CPU, per flap and
//! per push, at a stated flap rate), and meshd's memory per connected
//! proxy, with a tiny table and with the large one loaded.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_bench::procstat;
use mesh_bench::simulated::{percentile, rss_mb, simulated_proxy, wait_all_acked, Received};
use mesh_proto::mesh::v1 as pb;
use pb::admin_client::AdminClient;
use pb::registry_client::RegistryClient;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "mesh-control-bench", about = "Control-plane convergence, churn and memory")]
struct Args {
    #[command(flatten)]
    common: mesh_bench::simulated::CommonArgs,
    /// Services and endpoints per service for the churn test.
    #[arg(long, default_value_t = 100)]
    services: u32,
    #[arg(long, default_value_t = 100)]
    endpoints_per_service: u32,
    /// The core meshd is pinned to.
    #[arg(long, default_value = "0")]
    server_core: String,
    /// The pause between two flaps in the paced flap run (the other run
    /// flaps faster, every --churn-interval-ms).
    #[arg(long, default_value_t = 100)]
    flap_interval_ms: u64,
    /// The interval between two flaps in the churn run.
    #[arg(long, default_value_t = 10)]
    churn_interval_ms: u64,
    /// meshd's --publish-window (meshd's default when not given).
    #[arg(long)]
    publish_window: Option<String>,
    /// meshd's --publish-window-max (meshd's default when not given).
    #[arg(long)]
    publish_window_max: Option<String>,
}

/// meshd in its own process group, killed on drop.
struct Meshd {
    child: std::process::Child,
    listen: String,
    data_dir: std::path::PathBuf,
    /// TLS with meshd's admin credential, as every client of meshd speaks.
    tls: mesh_client::ClientTls,
}

impl Meshd {
    async fn channel(&self) -> Channel {
        mesh_client::connect(&self.listen, &self.tls, Duration::from_secs(5)).await.expect("connect to meshd")
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn start_meshd(args: &Args, name: &str) -> Meshd {
    use std::io::BufRead;
    let data_dir = std::env::temp_dir().join(format!("mesh-control-bench-{}-{name}", std::process::id()));
    let mut command = std::process::Command::new("taskset");
    command
        .args(["-c", &args.server_core])
        .arg(args.common.bin_dir.join("meshd"))
        .args([
            "server",
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(args.publish_window.iter().flat_map(|window| ["--publish-window", window]))
        .args(args.publish_window_max.iter().flat_map(|max| ["--publish-window-max", max]))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().expect("start meshd");
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).expect("meshd ready line");
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("meshd printed no {key}: {line}"))
            .to_owned()
    };
    let listen = field("listen");
    let credentials = mesh_client::Credentials::read(std::path::Path::new(&field("credentials")))
        .expect("meshd's admin credential");
    let tls = credentials.tls().expect("the credential's TLS");
    Meshd { child, listen, data_dir, tls }
}

/// Lets this process and meshd hold a connection per simulated proxy.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn register(
    registry: &mut RegistryClient<Channel>,
    service: &str,
    version: &str,
    addr: &str,
    ready: bool,
) -> u64 {
    let endpoint = pb::Endpoint {
        service: service.into(),
        version: version.into(),
        addr: addr.into(),
        ready,
        meshed: false,
        quic: false,
    };
    registry
        .register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false })
        .await
        .expect("register")
        .into_inner()
        .version
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = Args::parse();
    if args.common.quick {
        (args.common.proxies, args.common.changes, args.services, args.endpoints_per_service) =
            (20, 5, 5, 10);
    }
    raise_fd_limit();
    let meshd = start_meshd(&args, "measured");
    let pid = meshd.child.id() as i32;
    let channel = meshd.channel().await;
    let mut registry = RegistryClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    for (version, addr) in [("v1", "127.0.0.8:1"), ("v2", "127.0.0.8:2")] {
        register(&mut registry, "echo", version, addr, true).await;
    }
    let rss_before = rss_mb(pid);

    let received = Arc::new(Received::default());
    let mut simulated = tokio::task::JoinSet::new();
    for id in 0..args.common.proxies {
        let (server, received, tls) = (meshd.listen.clone(), received.clone(), meshd.tls.clone());
        // A real proxy reconnects when its stream fails; so does this one (bounded).
        simulated.spawn(async move {
            for _ in 0..50 {
                match simulated_proxy(server.clone(), tls.clone(), id, received.clone()).await {
                    Err(error) => eprintln!("simulated proxy {id}: {error}; reconnecting"),
                    Ok(()) => eprintln!("simulated proxy {id}: meshd ended the stream; reconnecting"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let initial = admin.status(pb::Empty {}).await.expect("status").into_inner().version;
    wait_all_acked(&mut admin, initial, args.common.proxies).await;
    let rss_connected = rss_mb(pid);

    // Convergence: API call to the last ack.
    let mut latencies = Vec::new();
    for i in 0..args.common.changes {
        let v2 = if i % 2 == 0 { 10 } else { 20 };
        let weights = [("v1".to_owned(), 100 - v2), ("v2".to_owned(), v2)].into_iter().collect();
        let started = Instant::now();
        let version = admin
            .set_split(pb::SetSplitRequest { service: "echo".into(), weights })
            .await
            .expect("split")
            .into_inner()
            .version;
        let wait = pb::WaitRequest { version, timeout_ms: 30_000 };
        let convergence = admin.wait_converged(wait).await.expect("wait").into_inner();
        assert!(convergence.converged, "change {i} did not converge");
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));

    // Churn: a large table, then one endpoint flapping. Services register
    // in parallel, as many agents would; the server commits them in groups,
    // and every registration reaches every proxy.
    let proxies = f64::from(args.common.proxies);
    let (setup_started, setup_cpu) = (Instant::now(), procstat::cpu_seconds(pid));
    let (updates_before, bytes_before) =
        (received.updates.load(Ordering::Relaxed), received.bytes.load(Ordering::Relaxed));
    let written_before = procstat::written_bytes(pid);
    let settle = register_table(&meshd, &args).await;
    let setup_written = procstat::written_bytes(pid).saturating_sub(written_before) as f64;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let setup_cpu = procstat::cpu_seconds(pid) - setup_cpu;
    let setup_updates = (received.updates.load(Ordering::Relaxed) - updates_before) as f64 / proxies;
    let setup_bytes = (received.bytes.load(Ordering::Relaxed) - bytes_before) as f64 / proxies;
    let table = admin.list_endpoints(pb::Empty {}).await.expect("endpoints").into_inner();
    let table_bytes = prost::Message::encoded_len(&table) as f64;
    // Every proxy, not only those convergence counts: one the server
    // deems stalled would still be taking the table during the flaps.
    wait_all_acked(&mut admin, settle, args.common.proxies).await;
    let rss_loaded = rss_mb(pid);
    let mut flapping =
        Flapping { registry: &mut registry, admin: &mut admin, received: &received, pid, ready: true };
    let churn = flapping.run(args.common.changes, Duration::from_millis(args.churn_interval_ms)).await;
    let paced = flapping.run(args.common.changes, Duration::from_millis(args.flap_interval_ms)).await;
    let traffic = traffic_summaries(&mut admin, &received, pid, &args).await;
    simulated.abort_all();
    drop(meshd);

    // The same table in a meshd no proxy connects to: what the table alone costs.
    let alone = start_meshd(&args, "alone");
    let channel = alone.channel().await;
    let registry = RegistryClient::new(channel);
    for (version, addr) in [("v1", "127.0.0.8:1"), ("v2", "127.0.0.8:2")] {
        register(&mut registry.clone(), "echo", version, addr, true).await;
    }
    let alone_started = Instant::now();
    register_table(&alone, &args).await;
    let alone_seconds = alone_started.elapsed().as_secs_f64();
    let rss_loaded_alone = rss_mb(alone.child.id() as i32);
    drop(alone);

    println!("| measure | value |");
    println!("|---|---:|");
    println!("| simulated proxies (one gRPC stream and connection each) | {} |", args.common.proxies);
    let window = args.publish_window.as_deref().unwrap_or("meshd's default");
    println!("| meshd --publish-window (changes within it of an update go out together) | {window} |");
    let max = args.publish_window_max.as_deref().unwrap_or("meshd's default");
    println!("| meshd --publish-window-max (the window under fast churn) | {max} |");
    println!("| split change → last ack, p50 | {:.1} ms |", percentile(&latencies, 0.5));
    println!("| split change → last ack, p99 | {:.1} ms |", percentile(&latencies, 0.99));
    println!("| changes timed | {} |", latencies.len());
    println!(
        "| table: services × endpoints | {} × {} ({:.0} KB as a full listing) |",
        args.services,
        args.endpoints_per_service,
        table_bytes / 1e3
    );
    println!(
        "| registering the churn table ({} endpoints, {} clients in parallel, each pushed to every proxy) | {setup_seconds:.1} s (meshd CPU {setup_cpu:.1} s) |",
        args.services * args.endpoints_per_service,
        args.services
    );
    println!(
        "| while registering: updates and bytes each proxy received; meshd's writes (TLS and store) | {setup_updates:.1} updates, {:.2} MB; {:.0} MB |",
        setup_bytes / 1e6,
        setup_written / 1e6
    );
    println!("| registering the same table in a meshd no proxy is connected to | {alone_seconds:.1} s |");
    for (label, run) in [("churn", &churn), ("paced", &paced)] {
        let pushes = run.updates as f64 / proxies;
        let flaps = f64::from(run.flaps);
        println!(
            "| endpoint flaps {label}: flaps, rate, pushes to each proxy | {} at {:.0}/s → {pushes:.1} pushes |",
            run.flaps,
            flaps / run.seconds.max(1e-9)
        );
        println!(
            "| bytes per proxy per endpoint flap ({label}) | {:.0} B per flap, {:.0} B per push |",
            run.bytes as f64 / proxies / flaps,
            run.bytes as f64 / proxies / pushes.max(1.0)
        );
        println!(
            "| meshd CPU per endpoint flap ({label}, pushing to every proxy) | {:.1} ms per flap, {:.1} ms per push |",
            run.cpu_seconds * 1e3 / flaps,
            run.cpu_seconds * 1e3 / pushes.max(1.0)
        );
    }
    println!(
        "| traffic summaries (4 moving rows per proxy each second): meshd CPU per proxy-second, beyond quiet | {:.1} µs |",
        traffic.cpu_micros_per_proxy_second
    );
    println!(
        "| traffic summaries: meshd memory per proxy with a full minute kept | {:.1} KB |",
        traffic.kb_per_proxy
    );
    println!(
        "| `Admin.Traffic` over 10 s of every proxy ({} rows) | {:.1} ms |",
        traffic.rows, traffic.query_ms
    );
    println!(
        "| meshd memory per connected proxy, 2-endpoint table | {:.1} KB |",
        (rss_connected - rss_before) * 1024.0 / proxies
    );
    println!(
        "| meshd memory per connected proxy, {}-endpoint table loaded | {:.1} KB ({:.0} MB with proxies, {:.0} MB without) |",
        args.services * args.endpoints_per_service,
        (rss_loaded - rss_loaded_alone) * 1024.0 / proxies,
        rss_loaded,
        rss_loaded_alone
    );
}

/// What the proxies' traffic summaries cost meshd.
struct TrafficCost {
    /// meshd's CPU per proxy per second of summaries, less its CPU with
    /// the same proxies quiet.
    cpu_micros_per_proxy_second: f64,
    /// RSS growth once a full minute of summaries is kept, per proxy.
    kb_per_proxy: f64,
    /// `Admin.Traffic` over a 10 s window of every proxy.
    query_ms: f64,
    rows: usize,
}

/// Measures meshd quiet, then with every proxy sending a summary each
/// second (four rows that move), once the minute meshd keeps is full.
async fn traffic_summaries(
    admin: &mut AdminClient<Channel>,
    received: &Received,
    pid: i32,
    args: &Args,
) -> TrafficCost {
    let measure = Duration::from_secs(if args.common.quick { 2 } else { 10 });
    let fill = Duration::from_secs(if args.common.quick { 3 } else { 62 });
    let cpu_over = |seconds: Duration| async move {
        let before = procstat::cpu_seconds(pid);
        tokio::time::sleep(seconds).await;
        procstat::cpu_seconds(pid) - before
    };
    let quiet = cpu_over(measure).await;
    let rss_quiet = rss_mb(pid);
    received.summaries.store(true, Ordering::Relaxed);
    tokio::time::sleep(fill).await;
    let busy = cpu_over(measure).await;
    let rss_full = rss_mb(pid);
    let started = Instant::now();
    let mut rows = 0;
    for _ in 0..10 {
        let request = pb::TrafficRequest { window_ms: 10_000, ..Default::default() };
        rows = admin.traffic(request).await.expect("traffic").into_inner().rows.len();
    }
    let query_ms = started.elapsed().as_secs_f64() * 1e3 / 10.0;
    received.summaries.store(false, Ordering::Relaxed);
    let proxy_seconds = f64::from(args.common.proxies) * measure.as_secs_f64();
    TrafficCost {
        cpu_micros_per_proxy_second: (busy - quiet).max(0.0) * 1e6 / proxy_seconds,
        kb_per_proxy: (rss_full - rss_quiet) * 1024.0 / f64::from(args.common.proxies),
        query_ms,
        rows,
    }
}

/// Registers the churn table: `services` × `endpoints_per_service`, one
/// client per service in parallel, on a thread of their own: agents run on
/// other hosts than the proxies, and on this thread's runtime a thousand
/// simulated proxies would starve a hundred registering clients.
async fn register_table(meshd: &Meshd, args: &Args) -> u64 {
    let (server, tls) = (meshd.listen.clone(), meshd.tls.clone());
    let (services, per_service) = (args.services, args.endpoints_per_service);
    let registering = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let channel = mesh_client::connect(&server, &tls, Duration::from_secs(5)).await.expect("connect");
            let registry = RegistryClient::new(channel);
            let mut registering = tokio::task::JoinSet::new();
            for s in 0..services {
                let mut registry = registry.clone();
                registering.spawn(async move {
                    let mut version = 0;
                    for e in 0..per_service {
                        let addr = format!("127.1.{}.{}:{}", s % 250, e % 250, 10_000 + e);
                        version = register(&mut registry, &format!("svc-{s}"), "v1", &addr, true).await;
                    }
                    version
                });
            }
            let mut version = 0;
            while let Some(last) = registering.join_next().await {
                version = version.max(last.expect("a registering client"));
            }
            version
        })
    });
    tokio::task::spawn_blocking(move || registering.join().expect("the registering thread"))
        .await
        .expect("joined")
}

/// What a run of endpoint flaps cost, summed over every proxy.
struct FlapRun {
    flaps: u32,
    seconds: f64,
    updates: u64,
    bytes: u64,
    cpu_seconds: f64,
}

/// One endpoint of svc-0 turning ready and not ready, with what meshd
/// pushes for it counted at the simulated proxies.
struct Flapping<'a> {
    registry: &'a mut RegistryClient<Channel>,
    admin: &'a mut AdminClient<Channel>,
    received: &'a Received,
    pid: i32,
    /// The endpoint's state now.
    ready: bool,
}

impl Flapping<'_> {
    /// Flaps `flaps` times, one every `interval` (not waiting for meshd's
    /// replies, as health checks on many hosts do not), and waits until
    /// every proxy has the last state.
    async fn run(&mut self, flaps: u32, interval: Duration) -> FlapRun {
        let received = self.received;
        let (updates_before, bytes_before) =
            (received.updates.load(Ordering::Relaxed), received.bytes.load(Ordering::Relaxed));
        let cpu_before = procstat::cpu_seconds(self.pid);
        let started = Instant::now();
        let mut ticks = tokio::time::interval(interval);
        let mut replies = tokio::task::JoinSet::new();
        for _ in 0..flaps {
            ticks.tick().await;
            self.ready = !self.ready;
            let (mut registry, ready) = (self.registry.clone(), self.ready);
            // The reply's version, not a status call: listing 1000 proxies
            // per flap would be counted as the flap's cost.
            replies
                .spawn(async move { register(&mut registry, "svc-0", "v1", "127.1.0.0:10000", ready).await });
        }
        let mut version = 0;
        while let Some(reply) = replies.join_next().await {
            version = version.max(reply.expect("a flap"));
        }
        let seconds = started.elapsed().as_secs_f64();
        let wait = pb::WaitRequest { version, timeout_ms: 60_000 };
        self.admin.wait_converged(wait).await.expect("wait");
        FlapRun {
            flaps,
            seconds,
            updates: received.updates.load(Ordering::Relaxed) - updates_before,
            bytes: received.bytes.load(Ordering::Relaxed) - bytes_before,
            cpu_seconds: procstat::cpu_seconds(self.pid) - cpu_before,
        }
    }
}
