//! Memory of one mesh-proxy with a large routing table: idle RSS with
//! SERVICES × ENDPOINTS endpoints, the cost of each upstream connection
//! once every endpoint has been called, and RSS once those connections
//! have sat idle past `--upstream-idle-timeout` and been closed.
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

/// Starts the proxy on `config` and returns it with its outbound address.
async fn start_proxy(args: &Args, config: &std::path::Path) -> (Child, SocketAddr) {
    let mut command = Command::new(args.bin_dir.join("mesh-proxy"));
    command.arg("--config").arg(config).args(["--threads", "1"]);
    if let Some(timeout) = args.idle_timeout {
        command.arg("--upstream-idle-timeout").arg(humantime::format_duration(timeout).to_string());
    }
    let mut child =
        command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            usage(&format!("cannot start mesh-proxy from {}: {e}", args.bin_dir.display()))
        });
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().expect("stdout")).expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("mesh-proxy ready ") {
                return rest.split_whitespace().find_map(|b| b.strip_prefix("outbound=")?.parse().ok());
            }
        }
        None
    })
    .await;
    let Ok(Some(outbound)) = ready else {
        let _ = child.kill();
        usage("mesh-proxy did not say it was ready within 60 s");
    };
    (child, outbound)
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await.expect("bind the backend");
    let port = listener.local_addr().expect("backend address").port();
    let backend = Arc::new(Backend::default());
    tokio::spawn(serve_backend(listener, backend.clone()));

    let dir = std::env::temp_dir().join(format!("mesh-table-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("work dir");
    let mut config = String::from("[listen]\noutbound = \"127.0.0.1:0\"\n");
    for service in 0..args.services {
        config.push_str(&format!(
            "\n[[services]]\nname = \"svc-{service}\"\nretry = {{ attempts = 1 }}\nendpoints = [\n"
        ));
        for endpoint in 0..args.endpoints {
            let addr = endpoint_addr(service * args.endpoints + endpoint, port);
            config.push_str(&format!("  {{ addr = \"{addr}\" }},\n"));
        }
        config.push_str("]\n");
    }
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, config).expect("write the config");

    let (mut proxy, outbound) = start_proxy(&args, &config_path).await;
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

    // Idle past the timeout (bounded wait): the proxy closes them all.
    let waited = args.idle_timeout.map_or(Duration::from_secs(15), |t| t + Duration::from_secs(10));
    let deadline = Instant::now() + waited;
    while backend.open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left_open = backend.open.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_idle = rss_kb(pid);

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
    eprintln!(
        "calls took {calls_took:?}; connections accepted in all: {}",
        backend.accepted.load(Ordering::Relaxed)
    );
}
