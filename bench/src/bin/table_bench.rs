//! Memory of one mesh-proxy with a large routing table: idle RSS with
//! SERVICES × ENDPOINTS endpoints, the cost of each upstream connection
//! once every endpoint has been called, and RSS once those connections
//! have sat idle past `--upstream-idle-timeout` and been closed; then the
//! size of a scrape, the time from a config file's change to its table
//! served, and request latency under load with and without reloads.
//!
//! Every endpoint is a distinct loopback address (127.1.x.y) on one port,
//! served by one backend in this process bound to 0.0.0.0, so the proxy
//! opens one connection per endpoint while all traffic stays on loopback.
//!
//! `mesh-table-bench --bin-dir target/release [--services 1000] [--endpoints 10] [--idle-timeout 5s]`

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};

struct Args {
    bin_dir: std::path::PathBuf,
    services: usize,
    endpoints: usize,
    /// Passed to the proxy as `--upstream-idle-timeout`; without it (for
    /// a binary older than the flag) the proxy's default holds and the
    /// bench waits 15 s for closes.
    idle_timeout: Option<Duration>,
}

fn parse_args() -> Args {
    let mut args =
        Args { bin_dir: "target/release".into(), services: 1000, endpoints: 10, idle_timeout: None };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = || {
            value.parse::<usize>().unwrap_or_else(|_| usage(&format!("{flag}: `{value}` is not a number")))
        };
        match flag.as_str() {
            "--bin-dir" => args.bin_dir = value.clone().into(),
            "--services" => args.services = number(),
            "--endpoints" => args.endpoints = number(),
            "--idle-timeout" => {
                args.idle_timeout = Some(
                    humantime::parse_duration(&value)
                        .unwrap_or_else(|e| usage(&format!("--idle-timeout: {e}"))),
                )
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if args.services * args.endpoints > 60_000 {
        usage("at most 60 000 endpoints (one loopback address each)");
    }
    args
}

fn usage(why: &str) -> ! {
    eprintln!("mesh-table-bench: {why}\nusage: mesh-table-bench --bin-dir DIR [--services N] [--endpoints N] [--idle-timeout DURATION]");
    std::process::exit(2);
}

/// The address of endpoint `index` (from 0): 127.1.x.y, all on one port.
fn endpoint_addr(index: usize, port: u16) -> SocketAddr {
    let n = index + 1;
    SocketAddr::from((Ipv4Addr::new(127, 1, (n >> 8) as u8, (n & 0xff) as u8), port))
}

/// Connections the backend has open now, and has accepted in all.
#[derive(Default)]
struct Backend {
    open: AtomicUsize,
    accepted: AtomicUsize,
}

async fn serve_backend(listener: TcpListener, backend: Arc<Backend>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        backend.accepted.fetch_add(1, Ordering::Relaxed);
        backend.open.fetch_add(1, Ordering::Relaxed);
        let backend = backend.clone();
        tokio::spawn(async move {
            let hello = service_fn(|_| async {
                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(b"hello\n"))))
            });
            let _ = server::Builder::new().serve_connection(TokioIo::new(stream), hello).await;
            backend.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A running proxy: its addresses, and a count of the reloads it has
/// logged as served. Reading its log costs the proxy nothing, where asking
/// its admin port for the table's version would make it serialize the
/// whole table, again and again, while it is being timed.
struct Started {
    child: Child,
    outbound: SocketAddr,
    admin: SocketAddr,
    reloads: tokio::sync::watch::Receiver<u64>,
}

/// Starts the proxy on `config`.
async fn start_proxy(args: &Args, config: &std::path::Path) -> Started {
    let mut command = Command::new(args.bin_dir.join("mesh-proxy"));
    command.arg("--config").arg(config).args(["--threads", "1"]);
    if let Some(timeout) = args.idle_timeout {
        command.arg("--upstream-idle-timeout").arg(humantime::format_duration(timeout).to_string());
    }
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
            usage(&format!("cannot start mesh-proxy from {}: {e}", args.bin_dir.display()))
        });
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().expect("stdout")).expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("mesh-proxy ready ") {
                let bound = |name: &str| {
                    let prefix = format!("{name}=");
                    rest.split_whitespace().find_map(|b| b.strip_prefix(prefix.as_str())?.parse().ok())
                };
                return bound("outbound").zip(bound("admin"));
            }
        }
        None
    })
    .await;
    let Ok(Some((outbound, admin))) = ready else {
        let _ = child.kill();
        usage("mesh-proxy did not say it was ready within 60 s");
    };
    let stderr = tokio::process::ChildStderr::from_std(child.stderr.take().expect("stderr")).expect("stderr");
    let (counter, reloads) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("routing table reloaded") {
                counter.send_modify(|n| *n += 1);
            }
        }
    });
    Started { child, outbound, admin, reloads }
}

/// The body of a GET of `path` on the proxy's admin port.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<Bytes> {
    let stream = TcpStream::connect(admin).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    let request =
        hyper::Request::builder().uri(path).header("host", "admin").body(Empty::<Bytes>::new()).ok()?;
    Some(sender.send_request(request).await.ok()?.into_body().collect().await.ok()?.to_bytes())
}

/// The table builds the proxy reports so far
/// (`mesh_config_reload_duration_seconds`): their count and total seconds.
async fn builds_so_far(admin: SocketAddr) -> Option<(f64, f64)> {
    let metrics = String::from_utf8(admin_get(admin, "/metrics").await?.to_vec()).ok()?;
    let value = |name: &str| -> Option<f64> {
        metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        value("mesh_config_reload_duration_seconds_count")?,
        value("mesh_config_reload_duration_seconds_sum")?,
    ))
}

/// The mean build between two readings of `builds_so_far`.
fn mean_build(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<Duration> {
    let ((count_before, sum_before), (count_after, sum_after)) = (before?, after?);
    let count = count_after - count_before;
    (count > 0.0).then(|| Duration::from_secs_f64((sum_after - sum_before) / count))
}

/// How many tables the proxy has loaded (`mesh_config_reloads_total{result="ok"}`).
async fn reloads_applied(admin: SocketAddr) -> Option<f64> {
    let metrics = String::from_utf8(admin_get(admin, "/metrics").await?.to_vec()).ok()?;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("mesh_config_reloads_total{result=\"ok\"} ")?.parse().ok())
}

/// The config file's text: every service with its endpoints; `moved`
/// replaces the first service's last endpoint with another address.
fn config_text(args: &Args, port: u16, moved: Option<usize>) -> String {
    let mut config = String::from("[listen]\noutbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n");
    for service in 0..args.services {
        config.push_str(&format!(
            "\n[[services]]\nname = \"svc-{service}\"\nretry = {{ attempts = 1 }}\nendpoints = [\n"
        ));
        for endpoint in 0..args.endpoints {
            let mut index = service * args.endpoints + endpoint;
            if service == 0 && endpoint == args.endpoints - 1 {
                index = moved.unwrap_or(index);
            }
            config.push_str(&format!("  {{ addr = \"{}\" }},\n", endpoint_addr(index, port)));
        }
        config.push_str("]\n");
    }
    config
}

/// Times `count` reloads that each move one endpoint: from the file's write
/// (and a SIGHUP) to the proxy serving the new table. Returns the times.
async fn time_reloads(
    args: &Args,
    port: u16,
    path: &std::path::Path,
    pid: u32,
    reloaded: &mut tokio::sync::watch::Receiver<u64>,
    count: usize,
    first: usize,
) -> Vec<Duration> {
    let total = args.services * args.endpoints;
    let mut times = Vec::new();
    for reload in first..first + count {
        let before = *reloaded.borrow_and_update();
        let aside = path.with_extension("next");
        std::fs::write(&aside, config_text(args, port, Some(total + reload))).expect("write the config");
        let started = Instant::now();
        std::fs::rename(&aside, path).expect("replace the config");
        // SAFETY: kill(2) on the proxy this bench started.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        let served = tokio::time::timeout(Duration::from_secs(60), reloaded.wait_for(|n| *n > before)).await;
        if !matches!(served, Ok(Ok(_))) {
            usage("mesh-proxy did not log the reload within 60 s");
        }
        times.push(started.elapsed());
    }
    times
}

/// Sends `per_service` requests to every service through `outbound`, over
/// a few kept-alive connections; returns the failures.
async fn call_every_service(outbound: SocketAddr, services: usize, per_service: usize) -> usize {
    const CALLERS: usize = 8;
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(outbound).await.expect("connect to the proxy");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(connection);
            let mut failed = 0;
            for service in (caller..services).step_by(CALLERS) {
                for _ in 0..per_service {
                    let request = hyper::Request::builder()
                        .uri("/")
                        .header("host", format!("svc-{service}"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let ok = match sender.send_request(request).await {
                        Ok(response) => {
                            response.status().is_success() && response.into_body().collect().await.is_ok()
                        }
                        Err(_) => false,
                    };
                    failed += usize::from(!ok);
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await.expect("caller");
    }
    failed
}

/// Latency under a steady load: 8 callers, each on its own kept-alive
/// connection, each sending a request every 2 ms (4 000 requests/s in
/// all) to the next service, for `seconds`. A caller waits for its answer
/// before its next request, so a stall delays the requests behind it
/// rather than adding them (the figures understate a stall's tail).
async fn latencies_under_load(
    outbound: SocketAddr,
    services: usize,
    seconds: u64,
) -> hdrhistogram::Histogram<u64> {
    const CALLERS: usize = 8;
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        tasks.push(tokio::spawn(async move {
            let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let stream = TcpStream::connect(outbound).await.expect("connect to the proxy");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
            tokio::spawn(connection);
            let mut ticks = tokio::time::interval(Duration::from_millis(2));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut service = caller;
            while Instant::now() < deadline {
                ticks.tick().await;
                service = (service + 7919) % services;
                let request = hyper::Request::builder()
                    .uri("/")
                    .header("host", format!("svc-{service}"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let started = Instant::now();
                if let Ok(response) = sender.send_request(request).await {
                    let _ = response.into_body().collect().await;
                }
                histogram.saturating_record(started.elapsed().as_micros() as u64);
            }
            histogram
        }));
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        all.add(task.await.expect("caller")).expect("same bounds");
    }
    all
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await.expect("bind the backend");
    let port = listener.local_addr().expect("backend address").port();
    let backend = Arc::new(Backend::default());
    tokio::spawn(serve_backend(listener, backend.clone()));

    let dir = std::env::temp_dir().join(format!("mesh-table-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let config = config_text(&args, port, None);
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, config).expect("write the config");

    let Started { child: mut proxy, outbound, admin, reloads: mut reloaded } =
        start_proxy(&args, &config_path).await;
    let pid = proxy.id();
    let total = args.services * args.endpoints;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kb(pid);

    // Enough calls per service that every endpoint is almost surely chosen
    // (P2C picks among the endpoints at random), then count what was opened.
    let started = Instant::now();
    let failed = call_every_service(outbound, args.services, 6 * args.endpoints).await;
    let calls_took = started.elapsed();
    let connections = backend.open.load(Ordering::Relaxed);
    let busy = rss_kb(pid);
    // Every service has had traffic: the largest scrape.
    let scrape_default = admin_get(admin, "/metrics").await.unwrap_or_default();
    let scrape_full = admin_get(admin, "/metrics?detail=full").await.unwrap_or_default();

    // Idle past the timeout (bounded wait): the proxy closes them all.
    let waited = args.idle_timeout.map_or(Duration::from_secs(15), |t| t + Duration::from_secs(10));
    let deadline = Instant::now() + waited;
    while backend.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left_open = backend.open.load(Ordering::Relaxed);
    // The proxy hands freed heap back on the sweep tick (1 s) after the one
    // that closed the connections.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_idle = rss_kb(pid);
    // The first table's build is not one of these.
    let builds_before = builds_so_far(admin).await;
    let reloads = time_reloads(&args, port, &config_path, pid, &mut reloaded, 5, 0).await;
    let build = mean_build(builds_before, builds_so_far(admin).await);
    // p99 under load, quiet and with three reloads (one endpoint moved each
    // time) 2 s apart, alternating so the machine's noise falls on both.
    let _warm_up = latencies_under_load(outbound, args.services, 3).await;
    let mut quiet = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut reloading = quiet.clone();
    for round in 0..2 {
        quiet.add(latencies_under_load(outbound, args.services, 8).await).expect("same bounds");
        let load = latencies_under_load(outbound, args.services, 8);
        // The files are written before the load and put in place on a
        // blocking thread, and nothing polls the proxy: the bench's own
        // work must not land in the latencies it measures.
        let texts: Vec<String> =
            (0..3).map(|i| config_text(&args, port, Some(total + 10 + round * 3 + i))).collect();
        let reload = async {
            for text in texts {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let path = config_path.clone();
                tokio::task::spawn_blocking(move || {
                    let aside = path.with_extension("next");
                    std::fs::write(&aside, text).expect("write the config");
                    std::fs::rename(&aside, &path).expect("replace the config");
                    // SAFETY: kill(2) on the proxy this bench started.
                    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                })
                .await
                .expect("reload");
            }
        };
        let (load, ()) = tokio::join!(load, reload);
        reloading.add(load).expect("same bounds");
    }
    let applied = reloads_applied(admin).await.unwrap_or(0.0);

    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let per_connection = (busy.saturating_sub(idle)) as f64 / connections.max(1) as f64;
    println!("| table | idle RSS MB | upstream connections | RSS with them MB | per connection KB | open after {} idle | RSS after MB | failed calls |", humantime::format_duration(waited));
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} services × {} endpoints ({total}) | {:.1} | {connections} | {:.1} | {per_connection:.1} | {left_open} | {:.1} | {failed} |",
        args.services,
        args.endpoints,
        idle as f64 / 1024.0,
        busy as f64 / 1024.0,
        after_idle as f64 / 1024.0,
    );
    let mean = reloads.iter().sum::<Duration>() / reloads.len().max(1) as u32;
    let slowest = reloads.iter().max().copied().unwrap_or_default();
    let lines = |body: &Bytes| body.iter().filter(|b| **b == b'\n').count();
    println!(
        "\n/metrics with traffic to every service: {:.2} MB, {} lines; /metrics?detail=full: {:.2} MB, {} lines",
        scrape_default.len() as f64 / 1e6,
        lines(&scrape_default),
        scrape_full.len() as f64 / 1e6,
        lines(&scrape_full)
    );
    println!("\nOne endpoint moved, file written to new table served (5 reloads): mean {mean:.1?}, slowest {slowest:.1?}");
    if let Some(build) = build {
        println!(
            "of which the table build (mesh_config_reload_duration_seconds, mean of these 5): {build:.2?}"
        );
    }
    println!("\nReloads the proxy applied in all: {applied}");
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "\nUnder 4 000 requests/s (2 × 8 s each): quiet p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} requests); \
         with a reload every 2 s p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} requests): p99 {:+.0} %",
        ms(&quiet, 0.5),
        ms(&quiet, 0.99),
        quiet.max() as f64 / 1e3,
        quiet.len(),
        ms(&reloading, 0.5),
        ms(&reloading, 0.99),
        reloading.max() as f64 / 1e3,
        reloading.len(),
        (ms(&reloading, 0.99) / ms(&quiet, 0.99) - 1.0) * 100.0
    );
    eprintln!(
        "calls took {calls_took:?}; connections accepted in all: {}",
        backend.accepted.load(Ordering::Relaxed)
    );
}
