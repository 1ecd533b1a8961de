//! mesh-proxy: the mesh's sidecar. `mesh-proxy --config FILE` runs it on a
//! static routing table that reloads on SIGHUP and when the file changes;
//! `mesh-proxy --control ADDR --service NAME ...` runs it under the
//! control plane.

use mesh_common::backoff::Backoff;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use mesh_proxy::config::{Listen, Protocol, ProxyConfig, UpstreamConfig};
use mesh_proxy::control::{self, ControlOptions};
use mesh_proxy::control_tls::ControlAccess;
use mesh_proxy::listen::{self, http::Role, ConnectionLimits, ShutdownSignal};
use mesh_proxy::proxy::Proxy;
use mesh_proxy::reload;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(name = "mesh-proxy", version, about = "The mesh's sidecar proxy")]
struct Args {
    /// Static routing-table file (TOML); reloaded on SIGHUP and on change.
    #[arg(long, required_unless_present = "control", conflicts_with = "control")]
    config: Option<PathBuf>,
    /// The control plane's gRPC address; routes come from it.
    #[arg(long, requires = "service")]
    control: Option<String>,
    /// The mesh's trust roots (PEM), to verify meshd's certificate; the
    /// agent hands its sidecars this file.
    #[arg(long, env = "MESH_CONTROL_CA")]
    control_ca: Option<PathBuf>,
    /// An operator's credential (`meshctl user create`), for a proxy run by
    /// hand outside the scheduler: its routing stream authenticates with it.
    #[arg(long, env = "MESH_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// The service of the local app (with --control).
    #[arg(long)]
    service: Option<String>,
    /// The version of the local app, for inbound metrics (with --control).
    #[arg(long = "app-version", env = "MESH_VERSION", default_value = "default")]
    app_version: String,
    /// Unique name of this proxy for the control plane; default SERVICE-PID.
    #[arg(long)]
    proxy_id: Option<String>,
    #[arg(long)]
    outbound: Option<SocketAddr>,
    #[arg(long)]
    inbound: Option<SocketAddr>,
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Where inbound requests go: the local app.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// A local port for one upstream service: SERVICE=IP:PORT (repeatable).
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<UpstreamConfig>,
    /// Worker threads; the sidecar is meant to be small.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How long requests in flight may take to finish after SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain_timeout: Duration,
    /// Connections one listener keeps open at once; more are closed at accept.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// A peer's connection to the inbound that sends nothing for this long is closed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    first_byte_timeout: Duration,
    /// Serve peers over TCP alone: no QUIC (UDP) beside the inbound.
    #[arg(long)]
    no_quic_inbound: bool,
    /// A peer whose QUIC could not be opened is reached over TCP alone for
    /// this long, then QUIC is tried again.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    quic_retry_after: Duration,
    /// A connection to an endpoint that carried no request for this long
    /// is closed (checked every second).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    upstream_idle_timeout: Duration,
    /// How often the proxy repeats its ack on a quiet control stream, so
    /// the control plane's "last contact" shows the stream is alive.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    control_keepalive: Duration,
}

fn parse_upstream(text: &str) -> Result<UpstreamConfig, String> {
    let (service, addr) = text.split_once('=').ok_or_else(|| format!("{text:?} is not SERVICE=IP:PORT"))?;
    let listen = addr.parse().map_err(|_| format!("{addr:?} is not IP:PORT"))?;
    Ok(UpstreamConfig { service: service.to_owned(), listen })
}

fn main() -> ExitCode {
    let args = Args::parse();
    mesh_common::logging::init();
    // One thread needs no work stealing: the current-thread scheduler avoids
    // its cross-thread wake-ups and atomics.
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(args.threads));
        builder
    };
    let runtime = builder.enable_all().build().expect("can start the async runtime");
    runtime.block_on(run(args))
}

/// The error says which listener could not be bound, and where.
async fn bind(what: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}")))
}

/// The proxy's listeners, bound, and the addresses they got.
struct Listeners {
    quic_inbound: bool,
    serving: JoinSet<()>,
    bound: Vec<String>,
    limits: ConnectionLimits,
}

impl Listeners {
    async fn start_main(
        &mut self,
        listen: &Listen,
        proxy: &Arc<Proxy>,
        shutdown: &ShutdownSignal,
    ) -> std::io::Result<()> {
        if let Some(addr) = listen.outbound {
            let listener = bind("outbound", addr).await?;
            self.bound.push(format!("outbound={}", local(&listener)?));
            proxy.long_lived.add_own_listener(local(&listener)?);
            self.serving.spawn(listen::http::serve(
                listener,
                proxy.clone(),
                Role::Outbound,
                self.limits,
                shutdown.clone(),
            ));
        }
        if let Some(addr) = listen.inbound {
            let listener = bind("inbound", addr).await?;
            self.bound.push(format!("inbound={}", local(&listener)?));
            proxy.long_lived.add_own_listener(local(&listener)?);
            let limits = self.limits;
            let tcp_addr = local(&listener)?;
            self.serving.spawn(listen::http::serve(
                listener,
                proxy.clone(),
                Role::Inbound,
                limits,
                shutdown.clone(),
            ));
            // HTTP/3 from peers on the same port number over UDP, once the
            // proxy holds a certificate. Without the port, TCP serves alone.
            let quic = if self.quic_inbound { Some(listen::quic::bind_udp(tcp_addr)) } else { None };
            match quic {
                Some(Ok(socket)) => {
                    self.bound.push(format!("quic={}", socket.local_addr()?));
                    self.serving.spawn(listen::quic::serve(socket, proxy.clone(), shutdown.clone()));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, addr = %tcp_addr, "no QUIC inbound: its UDP port cannot be bound")
                }
                None => {}
            }
        }
        if let Some(addr) = listen.admin {
            let listener = bind("admin", addr).await?;
            self.bound.push(format!("admin={}", local(&listener)?));
            proxy.long_lived.add_own_listener(local(&listener)?);
            tokio::spawn(listen::admin::serve(listener, proxy.clone()));
        }
        Ok(())
    }

    /// Upstream ports serve opaque TCP or HTTP by their service's protocol
    /// in the table in force.
    async fn start_upstreams(
        &mut self,
        upstreams: &[UpstreamConfig],
        proxy: &Arc<Proxy>,
        shutdown: &ShutdownSignal,
    ) -> std::io::Result<BTreeMap<String, Protocol>> {
        let mut protocols = BTreeMap::new();
        for upstream in upstreams {
            let protocol = proxy
                .table
                .load()
                .services
                .get(upstream.service.as_str())
                .map_or(Protocol::Http, |s| s.config.protocol);
            protocols.insert(upstream.service.clone(), protocol);
            let listener = bind(&format!("upstream {}", upstream.service), upstream.listen).await?;
            self.bound.push(format!("upstream.{}={}", upstream.service, local(&listener)?));
            proxy.long_lived.add_own_listener(local(&listener)?);
            let name: Arc<str> = Arc::from(upstream.service.as_str());
            if protocol == Protocol::Tcp {
                self.serving.spawn(listen::tcp::serve(listener, proxy.clone(), name, shutdown.clone()));
            } else {
                self.serving.spawn(listen::http::serve(
                    listener,
                    proxy.clone(),
                    Role::Upstream(name),
                    self.limits,
                    shutdown.clone(),
                ));
            }
        }
        Ok(protocols)
    }
}

fn local(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

async fn run(args: Args) -> ExitCode {
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let limits = ConnectionLimits {
        max_connections: args.max_connections as usize,
        first_byte_within: args.first_byte_timeout,
    };
    mesh_proxy::endpoint::pool::set_quic_retry_after(args.quic_retry_after);
    let mut listeners =
        Listeners { quic_inbound: !args.no_quic_inbound, serving: JoinSet::new(), bound: Vec::new(), limits };
    let started = match (&args.config, &args.control) {
        (Some(path), _) => start_from_file(path, &mut listeners, &shutdown_rx).await,
        (None, Some(control)) => start_under_control(control, &args, &mut listeners, &shutdown_rx).await,
        (None, None) => Err((2, "give --config FILE or --control ADDR".to_owned())),
    };
    let proxy = match started {
        Ok(proxy) => proxy,
        Err((code, error)) => {
            eprintln!("mesh-proxy: {error}");
            return ExitCode::from(code);
        }
    };
    tokio::spawn(close_idle_connections(proxy.clone(), args.upstream_idle_timeout));
    // Parsing the first table left garbage behind.
    mesh_common::heap::give_back_freed_memory();
    // Handlers exist before the ready line: a signal sent right after it
    // must drain, not take the default action.
    let mut terminate = signal(SignalKind::terminate()).expect("can watch SIGTERM");
    let mut interrupt = signal(SignalKind::interrupt()).expect("can watch SIGINT");
    // Tests and scripts read this line to learn the bound ports.
    println!("mesh-proxy ready {}", listeners.bound.join(" "));
    tracing::info!(listeners = %listeners.bound.join(" "), version = proxy.table.load().version, "mesh-proxy ready");
    tokio::select! {
        _ = terminate.recv() => {},
        _ = interrupt.recv() => {},
    }
    tracing::info!(deadline = ?args.drain_timeout, "shutting down: no new connections, draining requests in flight");
    proxy.draining.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    let serving = &mut listeners.serving;
    let drained =
        tokio::time::timeout(args.drain_timeout, async { while serving.join_next().await.is_some() {} })
            .await;
    match drained {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => tracing::warn!("drain deadline passed; exiting with requests still in flight"),
    }
    ExitCode::SUCCESS
}

/// Moves the idle clock on every tick and closes the connections to
/// endpoints that have been idle for `timeout`.
async fn close_idle_connections(proxy: Arc<Proxy>, timeout: Duration) {
    use mesh_proxy::endpoint::pool::{advance_idle_clock, IDLE_TICK};
    let ticks = (timeout.as_millis() / IDLE_TICK.as_millis()).clamp(1, u32::MAX as u128) as u32;
    let mut interval = tokio::time::interval(IDLE_TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closed_last_tick = false;
    loop {
        interval.tick().await;
        advance_idle_clock();
        // A closed connection's buffers are freed when its task ends, after
        // the sweep: the heap is handed back on the tick after a sweep that
        // closed some. malloc_trim walks the heap: not on a serving thread.
        if closed_last_tick {
            tokio::task::spawn_blocking(mesh_common::heap::give_back_freed_memory);
        }
        closed_last_tick = proxy.long_lived.close_idle(ticks) > 0;
    }
}

async fn start_from_file(
    path: &PathBuf,
    listeners: &mut Listeners,
    shutdown: &ShutdownSignal,
) -> Result<Arc<Proxy>, (u8, String)> {
    let (text, config) = reload::read_config(path).await.map_err(|e| (2, format!("config rejected: {e}")))?;
    let listen = config.listen.clone();
    let upstreams = config.upstreams.clone();
    let identity = match &config.identity {
        Some(files) => {
            Some(mesh_proxy::identity::from_files(files).map_err(|e| (2, format!("[identity]: {e}")))?)
        }
        None => None,
    };
    let proxy = Proxy::new(config);
    if let Some(identity) = identity {
        tracing::info!(spiffe_id = %identity.spiffe_id, "identity from files; peers are reached and taken over mTLS");
        proxy.install_identity(identity).map_err(|e| (2, format!("[identity]: {e}")))?;
        proxy.needs_identity.store(true, Ordering::Release);
    }
    listeners.start_main(&listen, &proxy, shutdown).await.map_err(|e| (1, e.to_string()))?;
    listeners.start_upstreams(&upstreams, &proxy, shutdown).await.map_err(|e| (1, e.to_string()))?;
    let hangup = signal(SignalKind::hangup()).map_err(|e| (1, format!("cannot watch SIGHUP: {e}")))?;
    tokio::spawn(reload::watch(path.clone(), proxy.clone(), text, hangup, shutdown.clone()));
    Ok(proxy)
}

/// The variable through which an agent hands the proxy its bootstrap token.
const IDENTITY_TOKEN_ENV: &str = "MESH_IDENTITY_TOKEN";

/// Gets the proxy's certificate, retrying with backoff while the control
/// plane is unreachable (a refused token is final: the agent starts the
/// instance again with a new one), then renews it at about 70 % of its
/// life for as long as the proxy runs.
async fn acquire_identity(control: ControlAccess, token: String, proxy: Arc<Proxy>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut identity = None;
    for _ in 0..20 {
        match mesh_proxy::identity::obtain(&control, &proxy, &token).await {
            Ok(obtained) => {
                identity = Some(obtained);
                break;
            }
            Err(error) if !error.is_retryable() => {
                tracing::error!(%error, "no certificate, and trying again cannot help");
                return;
            }
            Err(error) => tracing::warn!(%error, "no certificate yet; retrying"),
        }
        tokio::time::sleep(backoff.plain()).await;
    }
    let Some(mut identity) = identity else {
        tracing::error!("no certificate after 20 attempts");
        return;
    };
    loop {
        let (spiffe_id, expires_unix_ms) = (identity.spiffe_id.clone(), identity.expires_unix_ms);
        if let Err(error) = proxy.install_identity(identity) {
            tracing::error!(%error, "the certificate cannot be used for mTLS");
            return;
        }
        tracing::info!(%spiffe_id, expires_unix_ms, "certificate obtained");
        let current = proxy.identity.load_full().expect("installed above");
        identity = renew_when_due(&control, &proxy, &current).await;
    }
}

/// Waits until `current` is due for renewal (or `now` says the signing
/// root changed), then renews it, retrying with backoff (bounded by its
/// expiry: after that only a new token helps, and the proxy keeps retrying
/// in case the control plane comes back).
async fn renew_when_due(
    control: &ControlAccess,
    proxy: &Proxy,
    current: &mesh_proxy::identity::Identity,
) -> mesh_proxy::identity::Identity {
    let now = &proxy.renew_now;
    let jitter = rand::random_range(-1.0..=1.0);
    let due = current.renew_at_unix_ms(jitter);
    let wait = due.saturating_sub(mesh_proxy::clock::unix_millis());
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        _ = now.notified() => tracing::info!("the signing root changed: renewing the certificate now"),
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match mesh_proxy::identity::renew(control, proxy, current).await {
            Ok(renewed) => return renewed,
            Err(error) => tracing::warn!(%error, "renewal failed; retrying"),
        }
        tokio::time::sleep(backoff.plain()).await;
    }
}

async fn start_under_control(
    control_addr: &str,
    args: &Args,
    listeners: &mut Listeners,
    shutdown: &ShutdownSignal,
) -> Result<Arc<Proxy>, (u8, String)> {
    let service = args.service.clone().unwrap_or_default();
    let listen = Listen { outbound: args.outbound, inbound: args.inbound, admin: args.admin, app: args.app };
    let access = ControlAccess::new(control_addr, args.control_ca.as_deref(), args.credentials.as_deref())
        .map_err(|e| (2, e.to_string()))?;
    let proxy_id = args.proxy_id.clone().unwrap_or_else(|| format!("{service}-{}", std::process::id()));
    let servers = mesh_client::ServerList::parse_spread_by(&access.addr, &proxy_id)
        .map_err(|e| (2, format!("--control: {e}")))?;
    let mut options = ControlOptions {
        control: access.clone(),
        proxy_id,
        servers,
        service: service.clone(),
        version: args.app_version.clone(),
        listen: listen.clone(),
        upstreams: args.upstreams.clone(),
        upstream_protocols: Arc::new(OnceLock::new()),
        admin_addr: String::new(),
        keepalive: args.control_keepalive.max(Duration::from_millis(100)),
    };
    let empty = ProxyConfig {
        listen: listen.clone(),
        local_service: service,
        local_version: args.app_version.clone(),
        services: Vec::new(),
        upstreams: args.upstreams.clone(),
        identity: None,
    };
    let proxy = Proxy::waiting(empty);
    // The agent hands a one-time bootstrap token over in the environment
    // (never on the command line, which `ps` shows).
    if let Ok(token) = std::env::var(IDENTITY_TOKEN_ENV) {
        proxy.needs_identity.store(true, Ordering::Release);
        tokio::spawn(acquire_identity(access, token, proxy.clone()));
    }
    listeners.start_main(&listen, &proxy, shutdown).await.map_err(|e| (1, e.to_string()))?;
    options.admin_addr =
        listeners.bound.iter().find_map(|b| b.strip_prefix("admin=")).unwrap_or_default().to_owned();
    tokio::spawn(control::run(options.clone(), proxy.clone(), shutdown.clone()));
    // Upstream ports need to know their service's protocol: wait for the
    // first table (the admin listener already answers /ready with 503).
    let mut waited = tokio::time::interval(Duration::from_millis(20));
    while !proxy.has_table.load(Ordering::Acquire) {
        waited.tick().await;
        if *shutdown.borrow() {
            return Err((1, "shut down before the first routing table arrived".to_owned()));
        }
    }
    let protocols =
        listeners.start_upstreams(&args.upstreams, &proxy, shutdown).await.map_err(|e| (1, e.to_string()))?;
    let _ = options.upstream_protocols.set(protocols);
    Ok(proxy)
}
