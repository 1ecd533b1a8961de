//! meshd: the mesh's control plane. `meshd server` holds the routing state
//! and the jobs in an embedded store, schedules instances and streams
//! routing tables to proxies; `meshd agent` joins a node and runs what is
//! placed on it; `meshd dev` is both in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_agent::instance::{reap_leftovers, Context};
use mesh_agent::link::ControlLink;
use mesh_agent::supervisor::Supervisor;
use mesh_control::auth::join::JoinTokens;
use mesh_control::auth::layer::AuthLayer;
use mesh_control::auth::policy::Role;
use mesh_control::auth::users::Users;
use mesh_control::identity::ca::Authority;
use mesh_control::identity::rotation::Trust;
use mesh_control::server::access::{issue_credential, AccessService};
use mesh_control::server::admin::AdminService;
use mesh_control::server::discovery::DiscoveryService;
use mesh_control::server::identity::{IdentityService, TrustKeeper};
use mesh_control::server::jobs::{JobsService, Scheduler};
use mesh_control::server::liveness::NodeRegistry;
use mesh_control::server::nodes::NodesService;
use mesh_control::server::registry::RegistryService;
use mesh_control::server::tls::{self, ServerTls};
use mesh_control::server::{http, incoming, ControlPlane};
use mesh_control::store::RedbStore;
use mesh_proto::mesh::v1::access_server::AccessServer;
use mesh_proto::mesh::v1::admin_server::AdminServer;
use mesh_proto::mesh::v1::discovery_server::DiscoveryServer;
use mesh_proto::mesh::v1::identity_server::IdentityServer;
use mesh_proto::mesh::v1::jobs_server::JobsServer;
use mesh_proto::mesh::v1::nodes_server::NodesServer;
use mesh_proto::mesh::v1::registry_server::RegistryServer;
use mesh_proto::mesh::v1::NodeInfo;
use std::os::unix::fs::OpenOptionsExt;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "meshd", version, about = "The mesh's control plane")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane.
    Server(ServerArgs),
    /// The control plane and one agent in one process, for development;
    /// `--demo` also deploys the demo jobs.
    Dev {
        #[command(flatten)]
        server: ServerArgs,
        /// Deploy the demo: service `echo`, v1 (3 instances) and v2 (1), split 90/10, and a job calling it.
        #[arg(long)]
        demo: bool,
        /// The dev node's CPU for placement; default: the host's cores × 1000.
        #[arg(long)]
        cpu_millis: Option<u64>,
        /// The dev node's memory for placement; default: the host's.
        #[arg(long)]
        memory_mb: Option<u64>,
    },
    /// Save or restore the server's store (with meshd stopped).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Run a node agent: join the control plane, heartbeat, run instances.
    Agent {
        /// Instance logs and pid files, kept private (0700); default:
        /// /var/lib/meshd/agent-NAME for root, ~/.local/state/meshd/agent-NAME otherwise.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The control plane's gRPC address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        server: String,
        /// The node's name.
        #[arg(long)]
        name: String,
        /// The IP peers use to reach this node's sidecars (any 127.x works on one machine).
        #[arg(long)]
        advertise_ip: std::net::IpAddr,
        #[arg(long)]
        cpu_millis: u64,
        #[arg(long)]
        memory_mb: u64,
        /// A node attribute for job constraints: KEY=VALUE (repeatable).
        #[arg(long = "attribute", value_parser = parse_attribute)]
        attributes: Vec<(String, String)>,
        /// A file holding a join token (`meshctl node token create`), for
        /// the first start; later starts use the node certificate kept in
        /// the data dir.
        #[arg(long, env = "MESH_JOIN_TOKEN_FILE")]
        join_token_file: Option<PathBuf>,
        /// Whom apps run as when their job names no `user` (an agent
        /// running as root only; others run apps as themselves).
        #[arg(long, default_value = "nobody")]
        default_user: String,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Write everything the store holds (routing state, jobs, the CA and
    /// its key) to FILE, readable only by its owner.
    Save {
        #[arg(long)]
        data_dir: PathBuf,
        file: PathBuf,
    },
    /// Make the store hold what FILE holds; the store file there before is
    /// kept aside.
    Restore {
        #[arg(long)]
        data_dir: PathBuf,
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct ServerArgs {
    /// Where the embedded store lives; default: /var/lib/meshd/server (root)
    /// or ~/.local/state/meshd/server, and .../dev for `meshd dev`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC for proxies, agents and meshctl.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// HTTP admin: /metrics, /ready and /prometheus/targets (service discovery).
    #[arg(long, default_value = "127.0.0.1:7401")]
    admin: SocketAddr,
    /// A node that sends no heartbeat for this long is down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    heartbeat_ttl: Duration,
    /// The trust domain of workload identities (spiffe://DOMAIN/service/NAME).
    #[arg(long, default_value = "mesh.local")]
    trust_domain: String,
    /// An operator's CA certificate (root or intermediate, PEM) instead of a generated root.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// How long workload certificates live.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    cert_ttl: Duration,
    /// Start a new, empty mesh even though the data dir held one (its store
    /// damaged or gone): the old store file is kept aside, and a new CA
    /// means no existing sidecar certificate is trusted.
    #[arg(long)]
    reinitialize: bool,
    /// gRPC connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// A gRPC connection that sends nothing (or does not finish its TLS
    /// handshake) for this long is closed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    first_byte_timeout: Duration,
    /// Another name or IP address clients dial meshd by, for its TLS
    /// certificate (repeatable); the listen address is always in it.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    // `meshd shim -- PROGRAM ARGS` (started by the agent for each app) is
    // plain single-threaded code: it must run before any runtime thread
    // exists, so that its blocked signals are blocked everywhere.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|first| first == "shim") {
        let mut rest: Vec<std::ffi::OsString> = args.collect();
        if rest.first().is_some_and(|a| a == "--") {
            rest.remove(0);
        }
        if rest.is_empty() {
            eprintln!("meshd shim: usage: meshd shim -- PROGRAM [ARGS...]");
            return ExitCode::from(2);
        }
        let program = rest.remove(0);
        mesh_agent::shim::run(program, rest);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(async_main())
}

async fn async_main() -> ExitCode {
    mesh_common::logging::init();
    let result = match Args::parse().command {
        Command::Server(mut args) => {
            args.data_dir.get_or_insert_with(|| mesh_agent::files::default_state_dir("server"));
            serve(args, tokio::sync::oneshot::channel().0).await
        }
        Command::Dev { mut server, demo, cpu_millis, memory_mb } => {
            server.data_dir.get_or_insert_with(|| mesh_agent::files::default_state_dir("dev"));
            let (cpus, memory) = host_size();
            dev(server, demo, cpu_millis.unwrap_or(cpus), memory_mb.unwrap_or(memory)).await
        }
        Command::Snapshot { command } => snapshot(command),
        Command::Agent {
            data_dir,
            server,
            name,
            advertise_ip,
            cpu_millis,
            memory_mb,
            attributes,
            join_token_file,
            default_user,
        } => {
            // Checked before the name becomes part of a folder's name.
            if let Err(error) = mesh_control::state::check_name("node", &name) {
                eprintln!("meshd: {}", error.0);
                return ExitCode::from(2);
            }
            let info = mesh_proto::mesh::v1::NodeInfo {
                name,
                advertise_ip: advertise_ip.to_string(),
                cpu_millis,
                memory_mb,
                attributes: attributes.into_iter().collect(),
                logs_addr: String::new(),
            };
            let join_token = match join_token(join_token_file) {
                Ok(token) => token,
                Err(error) => {
                    eprintln!("meshd: {error}");
                    return ExitCode::from(2);
                }
            };
            agent(server, info, data_dir, join_token, default_user, shutdown_signal()).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshd: {error}");
            ExitCode::from(1)
        }
    }
}

/// The join token from `--join-token-file`, else from `MESH_JOIN_TOKEN`.
fn join_token(file: Option<PathBuf>) -> Result<Option<String>, String> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("--join-token-file {}: {e}", file.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var("MESH_JOIN_TOKEN").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()))
}

/// Writes the admin credential into the data dir on the first start (no
/// user yet), and says where. Returns its path.
fn first_admin_credential(
    data_dir: &std::path::Path,
    trust: &TrustKeeper,
    users: &Users,
    control: &ControlPlane,
    server: &str,
) -> Result<PathBuf, String> {
    let path = data_dir.join(mesh_client::credentials::ADMIN_FILE);
    if users.list().is_empty() {
        let credential = issue_credential(trust, users, control, "admin", Role::Admin, server)?;
        credential.write(&path)?;
        tracing::info!(file = %path.display(), "wrote the admin credential (meshctl finds it there, or give --credentials FILE)");
    }
    Ok(path)
}

async fn serve(args: ServerArgs, bound: tokio::sync::oneshot::Sender<SocketAddr>) -> Result<(), String> {
    let ServerArgs {
        data_dir,
        listen,
        admin,
        heartbeat_ttl,
        trust_domain,
        ca_cert,
        ca_key,
        cert_ttl,
        max_connections,
        first_byte_timeout,
        reinitialize,
        server_names,
    } = args;
    let data_dir = data_dir.expect("a data dir was chosen");
    let heartbeat_interval = (heartbeat_ttl / 3).max(Duration::from_millis(100));
    let nodes = Arc::new(NodeRegistry::new(heartbeat_interval, heartbeat_ttl));
    let store = RedbStore::open(&data_dir, reinitialize).map_err(|e| e.to_string())?;
    let control = ControlPlane::new(Arc::new(store)).map_err(|e| e.to_string())?;
    let scheduler = Scheduler::start(control.clone(), nodes.clone())?;
    let operator_ca = ca_cert.is_some();
    let trust = trust_state(control.store(), &trust_domain, ca_cert, ca_key)?;
    let trust = TrustKeeper::new(trust, control.clone(), operator_ca, cert_ttl);
    let users = Arc::new(Users::load(control.store()).map_err(|e| e.to_string())?);
    let grpc = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let http = TcpListener::bind(admin).await.map_err(|e| format!("cannot listen on {admin}: {e}"))?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let tls = Arc::new(ServerTls::new(tls::names_for(grpc_addr, &server_names), &trust.current())?);
    let follower = tls.clone();
    trust.follow_with(move |next| {
        if let Err(error) = follower.follow(next) {
            tracing::error!(%error, "meshd's TLS cannot follow the new trust state");
        }
    });
    tokio::spawn(follow_trust(tls.clone(), trust.clone()));
    let credential = first_admin_credential(&data_dir, &trust, &users, &control, &grpc_addr.to_string())?;
    tokio::spawn(http::serve(http, control.clone(), scheduler.clone()));
    // Tests and scripts read this line to learn the bound ports.
    println!(
        "meshd ready listen={grpc_addr} admin={http_addr} version={} data_dir={} credentials={}",
        control.current_version(),
        data_dir.display(),
        credential.display()
    );
    tracing::info!(%grpc_addr, %http_addr, data_dir = %data_dir.display(), "meshd server ready");
    let _ = bound.send(grpc_addr);
    let limits =
        incoming::Limits { max_connections: max_connections as usize, first_byte_within: first_byte_timeout };
    let gate =
        incoming::Gate { tls: tls.clone(), trust_domain: trust_domain.clone(), control: control.clone() };
    let incoming = incoming::admit(grpc, limits, gate);
    let join_tokens = Arc::new(std::sync::Mutex::new(JoinTokens::default()));
    let tls_for_jobs = tls.clone();
    tonic::transport::Server::builder()
        .layer(AuthLayer { users: users.clone(), control: control.clone() })
        .add_service(RegistryServer::new(RegistryService { control: control.clone(), users: users.clone() }))
        .add_service(DiscoveryServer::new(DiscoveryService { control: control.clone() }))
        .add_service(NodesServer::new(NodesService {
            registry: nodes.clone(),
            scheduler: scheduler.clone(),
            control: control.clone(),
            trust: trust.clone(),
            join_tokens: join_tokens.clone(),
            cert_ttl,
        }))
        .add_service(AccessServer::new(AccessService {
            users: users.clone(),
            control: control.clone(),
            trust: trust.clone(),
            tls,
            join_tokens,
            server: grpc_addr.to_string(),
        }))
        .add_service(IdentityServer::new(IdentityService {
            control: control.clone(),
            trust,
            scheduler: scheduler.clone(),
            tokens: Default::default(),
            cert_ttl,
        }))
        .add_service(JobsServer::new(JobsService {
            scheduler,
            users: users.clone(),
            tls: tls_for_jobs,
            trust_domain: trust_domain.clone(),
        }))
        .add_service(AdminServer::new(AdminService { control, nodes }))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Renews meshd's TLS certificate at half its life (rotations are followed
/// as they happen, through the trust keeper).
async fn follow_trust(tls: Arc<ServerTls>, trust: Arc<TrustKeeper>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(error) = tls.follow(&trust.current()) {
            tracing::error!(%error, "cannot renew meshd's TLS certificate");
        }
    }
}

fn snapshot(command: SnapshotCommand) -> Result<(), String> {
    use mesh_control::store::snapshot;
    let locked = |e: mesh_control::store::StoreError| {
        let hint = if e.0.contains("already open") { " (stop meshd first: it holds the store)" } else { "" };
        format!("{e}{hint}")
    };
    match command {
        SnapshotCommand::Save { data_dir, file } => {
            let store = RedbStore::open(&data_dir, false).map_err(locked)?;
            let taken = snapshot::take(&store).map_err(|e| e.to_string())?;
            let json = serde_json::to_vec_pretty(&taken).map_err(|e| e.to_string())?;
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            out.write_all(&json)
                .and_then(|()| out.sync_all())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!(
                "saved version {} ({} services, {} jobs, CA: {}) to {}",
                taken.version,
                taken.services.len(),
                taken.jobs.len(),
                if taken.trust.is_some() { "yes" } else { "no" },
                file.display()
            );
        }
        SnapshotCommand::Restore { data_dir, file } => {
            let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let taken: snapshot::Snapshot = serde_json::from_slice(&text)
                .map_err(|e| format!("{} is not a meshd snapshot: {e}", file.display()))?;
            let store = RedbStore::open(&data_dir, true).map_err(locked)?;
            snapshot::restore(&store, &taken).map_err(|e| e.to_string())?;
            println!("restored version {} into {}", taken.version, data_dir.display());
        }
    }
    Ok(())
}

/// The trust state: the operator's CA from files, else the one in the
/// store (with a rotation in progress, if one was), else a new root saved
/// to the store. Keys are never logged.
fn trust_state(
    store: &dyn mesh_control::store::Store,
    trust_domain: &str,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
) -> Result<Trust, String> {
    if let (Some(cert), Some(key)) = (ca_cert, ca_key) {
        let read =
            |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
        let authority = Authority::from_pem(&read(&cert)?, &read(&key)?, trust_domain)
            .map_err(|e| format!("--ca-cert/--ca-key: {e}"))?;
        tracing::info!(cert = %cert.display(), %trust_domain, "using the operator's CA");
        return Ok(Trust::steady(authority));
    }
    if let Some(stored) = store.load_trust().map_err(|e| e.to_string())? {
        return Trust::from_stored(stored, trust_domain).map_err(|e| format!("the stored CA: {e}"));
    }
    let trust = Trust::steady(Authority::generate(trust_domain)?);
    store.save_trust(&trust.to_stored()).map_err(|e| e.to_string())?;
    tracing::info!(%trust_domain, "generated a root CA and stored it");
    Ok(trust)
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("can watch SIGTERM");
    tokio::select! {
        _ = terminate.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Runs an agent until `shutdown` completes, then stops its instances.
async fn agent(
    server: String,
    info: NodeInfo,
    data_dir: Option<PathBuf>,
    join_token: Option<String>,
    default_user: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let data_dir = data_dir.unwrap_or_else(|| mesh_agent::files::default_data_dir(&info.name));
    mesh_agent::files::private_dir(&data_dir)?;
    let link = ControlLink::establish(&server, &info.name, &data_dir, join_token).await?;
    let reaped = reap_leftovers(&data_dir);
    if reaped > 0 {
        tracing::info!(reaped, "stopped what a previous run of this agent left behind");
    }
    let bin_dir = std::env::current_exe().ok().and_then(|exe| exe.parent().map(PathBuf::from));
    let proxy_program = bin_dir
        .as_ref()
        .map(|dir| dir.join("mesh-proxy"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("mesh-proxy"));
    let advertise_ip: std::net::IpAddr =
        info.advertise_ip.parse().map_err(|e| format!("advertise ip: {e}"))?;
    // Instance logs, for `meshctl logs`, on the node's address.
    let logs = TcpListener::bind((advertise_ip, 0)).await.map_err(|e| format!("logs listener: {e}"))?;
    let mut info = info;
    info.logs_addr = logs.local_addr().map_err(|e| e.to_string())?.to_string();
    tokio::spawn(mesh_agent::logs::serve(logs, data_dir.clone(), link.clone()));
    let cgroups = mesh_agent::cgroup::detect(std::path::Path::new("/sys/fs/cgroup"));
    tracing::info!(?cgroups, "cgroup hierarchy for instance limits");
    let cgroup_parent = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        data_dir.hash(&mut hasher);
        format!("meshd/{}-{:08x}", info.name, hasher.finish() as u32)
    };
    if let Some(hierarchy) = &cgroups {
        mesh_agent::instance::remove_stale_cgroups(hierarchy, &cgroup_parent);
    }
    let context = Context {
        link: link.clone(),
        advertise_ip,
        data_dir,
        proxy_program,
        // Apps run under this binary's `shim` subcommand.
        shim_program: std::env::current_exe().ok(),
        bin_dir,
        node: info.name.clone(),
        default_user,
        cgroup_parent,
        cgroups,
    };
    let supervisor = Arc::new(Supervisor::new(context));
    let result = tokio::select! {
        result = mesh_agent::node::run(link, info, supervisor.clone()) => result,
        _ = shutdown => Ok(()),
    };
    supervisor.stop_all().await;
    result
}

/// The demo jobs: service `echo` in two versions, and a traffic generator
/// calling it through its own sidecar.
const DEMO_JOBS: [(&str, &str); 3] = [("echo-v1", ECHO_V1), ("echo-v2", ECHO_V2), ("traffic", TRAFFIC)];

const ECHO_V1: &str = r#"name = "echo-v1"
service = "echo"
version = "v1"
replicas = 3

[task]
command = "mesh-echo"
args = ["--version", "v1"]

[resources]
cpu_millis = 100
memory_mb = 64

[health]
readiness = { http = "/ready", interval = "500ms", timeout = "500ms", failures = 1 }
liveness = { http = "/live", interval = "2s", failures = 3 }
"#;

const ECHO_V2: &str = r#"name = "echo-v2"
service = "echo"
version = "v2"
replicas = 1

[task]
command = "mesh-echo"
args = ["--version", "v2"]

[resources]
cpu_millis = 100
memory_mb = 64

[health]
readiness = { http = "/ready", interval = "500ms", timeout = "500ms", failures = 1 }
"#;

const TRAFFIC: &str = r#"name = "traffic"
version = "v1"
replicas = 1

[task]
command = "mesh-echo"
args = ["--traffic", "echo", "--traffic-rate", "50"]

[resources]
cpu_millis = 100
memory_mb = 64

[[upstreams]]
service = "echo"
"#;

/// The control plane and one agent (node `dev` on 127.0.0.1) in one process.
/// The host's CPU (cores × 1000 millis) and memory (MB), for a dev node.
fn host_size() -> (u64, u64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(1024 * 1024);
    (cores * 1000, memory_kb / 1024)
}

async fn dev(server: ServerArgs, demo: bool, cpu_millis: u64, memory_mb: u64) -> Result<(), String> {
    let data_dir = server.data_dir.clone().expect("a data dir was chosen");
    let (bound, address) = tokio::sync::oneshot::channel();
    let mut control = tokio::spawn(serve(server, bound));
    let address = match address.await {
        Ok(address) => address,
        Err(_) => return control.await.map_err(|e| e.to_string())?,
    };
    let info = NodeInfo {
        name: "dev".into(),
        advertise_ip: "127.0.0.1".into(),
        cpu_millis,
        memory_mb,
        attributes: Default::default(),
        logs_addr: String::new(),
    };
    // The agent stops its instances when the signal comes or the control plane ends.
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = agent_stopped => {}
        }
    };
    // meshd dev is its own admin: it gives its node a join token unless
    // the node joined in an earlier run.
    let agent_dir = data_dir.join("agent");
    let join_token = if agent_dir.join("node.credentials.toml").exists() {
        None
    } else {
        match dev_join_token(address, &data_dir).await {
            Ok(token) => Some(token),
            Err(error) => {
                control.abort();
                return Err(format!("the dev node cannot join: {error}"));
            }
        }
    };
    let mut agent = tokio::spawn(agent(
        address.to_string(),
        info,
        Some(agent_dir),
        join_token,
        "nobody".into(),
        agent_shutdown,
    ));
    if demo {
        if let Err(error) = deploy_demo(address, &data_dir).await {
            tracing::error!(%error, "the demo could not be deployed");
        }
    }
    tokio::select! {
        result = &mut control => {
            let _ = stop_agent.send(());
            let _ = agent.await;
            result.map_err(|e| e.to_string())?
        }
        result = &mut agent => {
            result.map_err(|e| e.to_string())??;
            control.await.map_err(|e| e.to_string())?
        }
    }
}

/// A channel to this process's own server with the admin credential it wrote.
async fn admin_channel(
    address: SocketAddr,
    data_dir: &std::path::Path,
) -> Result<tonic::transport::Channel, mesh_client::ClientError> {
    let credentials = mesh_client::Credentials::read(&data_dir.join(mesh_client::credentials::ADMIN_FILE))?;
    mesh_client::connect(&address.to_string(), &credentials.tls()?, Duration::from_secs(2)).await
}

async fn dev_join_token(address: SocketAddr, data_dir: &std::path::Path) -> Result<String, String> {
    use mesh_proto::mesh::v1 as pb;
    let mut access =
        mesh_proto::mesh::v1::access_client::AccessClient::new(admin_channel(address, data_dir).await?);
    let request = pb::JoinTokenRequest { ttl_ms: 60_000, uses: 1 };
    Ok(access.create_join_token(request).await.map_err(|e| e.message().to_owned())?.into_inner().token)
}

async fn deploy_demo(address: SocketAddr, data_dir: &std::path::Path) -> Result<(), String> {
    use mesh_proto::mesh::v1 as pb;
    let channel = admin_channel(address, data_dir).await.map_err(|e| format!("demo: {e}"))?;
    let jobs = mesh_proto::mesh::v1::jobs_client::JobsClient::new(channel.clone());
    let dir = data_dir.join("demo");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let run = |name: &'static str, text: &'static str| {
        let mut jobs = jobs.clone();
        let dir = dir.clone();
        async move {
            // The job files are written out so users can read and edit them.
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            let request = pb::RunJobRequest { text: text.into(), dir: dir.display().to_string() };
            jobs.run(request).await.map_err(|e| format!("demo job {name}: {}", e.message())).map(drop)
        }
    };
    // The caller starts once the split is in force, so that its first
    // request is already split 90/10.
    let (callees, caller) = DEMO_JOBS.split_at(DEMO_JOBS.len() - 1);
    for (name, text) in callees {
        run(name, text).await?;
    }
    let mut admin = mesh_proto::mesh::v1::admin_client::AdminClient::new(channel);
    // A split names versions the registry knows, and the demo starts once
    // every instance is ready: wait (bounded) for all three endpoints.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let endpoints = admin.list_endpoints(pb::Empty {}).await.map_err(|e| e.message().to_owned())?;
        let ready = |version: &str| {
            let endpoints = &endpoints.get_ref().endpoints;
            endpoints.iter().filter(|e| e.service == "echo" && e.version == version && e.ready).count()
        };
        if ready("v1") == 3 && ready("v2") == 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the demo instances were not ready within 60 s; see `meshctl get instances`".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let split = pb::SetSplitRequest {
        service: "echo".into(),
        weights: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into_iter().collect(),
    };
    admin.set_split(split).await.map_err(|e| format!("demo split: {}", e.message()))?;
    for (name, text) in caller {
        run(name, text).await?;
    }
    println!(
        "meshd demo deployed: jobs echo-v1 (3 instances), echo-v2 (1), traffic (calls echo); split echo v1=90 v2=10; job files in {}",
        dir.display()
    );
    println!("try: meshctl --server {address} top    then: meshctl --server {address} split echo v1=50 v2=50 --wait");
    Ok(())
}
