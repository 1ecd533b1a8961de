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
use mesh_control::server::leader::Leader;
use mesh_control::server::liveness::NodeRegistry;
use mesh_control::server::nodes::NodesService;
use mesh_control::server::registry::RegistryService;
use mesh_control::server::tls::{self, ServerTls};
use mesh_control::server::{http, incoming, ControlPlane};
use mesh_control::store::{EtcdStore, RedbStore};
use mesh_proto::mesh::v1::access_server::AccessServer;
use mesh_proto::mesh::v1::admin_server::AdminServer;
use mesh_proto::mesh::v1::identity_server::IdentityServer;
use mesh_proto::mesh::v1::jobs_server::JobsServer;
use mesh_proto::mesh::v1::nodes_server::NodesServer;
use mesh_proto::mesh::v1::registry_server::RegistryServer;
use mesh_proto::mesh::v1::wire::discovery_server::DiscoveryServer;
use mesh_proto::mesh::v1::NodeInfo;
use std::os::unix::fs::OpenOptionsExt;
use tokio::net::TcpListener;

/// What ends a meshd command: the typed errors of the crates it runs
/// (store, CA, link, client), or a message of its own; reported at the top.
type Failure = Box<dyn std::error::Error + Send + Sync>;

mod agent;
mod dev;
mod server;
mod snapshot;

use agent::{agent, join_token};
use dev::{dev, host_size};
use server::serve;
use snapshot::snapshot;

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
    /// Changes committed within this long of a routing update go to the
    /// proxies together, at its end; a change after a quiet spell goes at
    /// once. Longer: less CPU under churn, slower convergence under churn.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    publish_window: Duration,
    /// While changes come faster than one per --publish-window, the window
    /// doubles with each update, up to this; a slower rate brings it back.
    /// Equal to --publish-window: a window that never grows.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "400ms")]
    publish_window_max: Duration,
    /// How sidecars reach the peers of a service whose policy sets no
    /// transport (`meshctl policy SVC --transport`): `tcp` (mTLS over
    /// TCP) or `quic` (HTTP/3, falling back to TCP per peer). Give every
    /// server the same.
    #[arg(long, default_value = "tcp")]
    default_transport: mesh_common::policy::Transport,
    /// Where the state lives: `redb` (embedded, one server) or `etcd`
    /// (shared by several servers, one of them elected leader).
    #[arg(long, value_enum, default_value = "redb")]
    store: StoreKind,
    /// The etcd cluster's client URLs (host:port, comma-separated), for --store etcd.
    #[arg(long, required_if_eq("store", "etcd"))]
    etcd_endpoints: Option<String>,
    /// A file of 32 random bytes, the same for every server, that seals the
    /// CA's keys in etcd (`head -c 32 /dev/urandom > FILE`), for --store etcd.
    #[arg(long, required_if_eq("store", "etcd"))]
    store_key: Option<PathBuf>,
    /// The address other servers, agents and meshctl reach this server's
    /// gRPC port at (it must be one of theirs); default: --listen.
    #[arg(long)]
    advertise: Option<String>,
    /// With --store etcd: the leader's lease; a dead leader is replaced
    /// about this long after it stopped.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    leader_ttl: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    Redb,
    Etcd,
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

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("can watch SIGTERM");
    tokio::select! {
        _ = terminate.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
