//! meshd: the mesh's control plane. `meshd server` holds the routing state
//! in an embedded store and streams routing tables to proxies; `meshd
//! agent` joins a node to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_control::server::admin::AdminService;
use mesh_control::server::discovery::DiscoveryService;
use mesh_control::server::nodes::{NodeRegistry, NodesService};
use mesh_control::server::registry::RegistryService;
use mesh_control::server::{http, ControlPlane};
use mesh_control::store::RedbStore;
use mesh_proto::mesh::v1::admin_server::AdminServer;
use mesh_proto::mesh::v1::discovery_server::DiscoveryServer;
use mesh_proto::mesh::v1::nodes_server::NodesServer;
use mesh_proto::mesh::v1::registry_server::RegistryServer;
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
    Server {
        /// Where the embedded store lives.
        #[arg(long)]
        data_dir: PathBuf,
        /// gRPC for proxies, agents and meshctl.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// HTTP admin: /metrics and /ready.
        #[arg(long, default_value = "127.0.0.1:7401")]
        admin: SocketAddr,
        /// A node that sends no heartbeat for this long is down.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        heartbeat_ttl: Duration,
    },
    /// Run a node agent: join the control plane and heartbeat.
    Agent {
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
    },
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Args::parse().command {
        Command::Server { data_dir, listen, admin, heartbeat_ttl } => {
            serve(data_dir, listen, admin, heartbeat_ttl).await
        }
        Command::Agent { server, name, advertise_ip, cpu_millis, memory_mb, attributes } => {
            let info = mesh_proto::mesh::v1::NodeInfo {
                name,
                advertise_ip: advertise_ip.to_string(),
                cpu_millis,
                memory_mb,
                attributes: attributes.into_iter().collect(),
            };
            mesh_control::agent::node::run(server, info).await
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

async fn serve(
    data_dir: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    heartbeat_ttl: Duration,
) -> Result<(), String> {
    let heartbeat_interval = (heartbeat_ttl / 3).max(Duration::from_millis(100));
    let nodes = Arc::new(NodeRegistry::new(heartbeat_interval, heartbeat_ttl));
    let store = RedbStore::open(&data_dir).map_err(|e| e.to_string())?;
    let control = ControlPlane::new(Box::new(store)).map_err(|e| e.to_string())?;
    let grpc = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let http = TcpListener::bind(admin).await.map_err(|e| format!("cannot listen on {admin}: {e}"))?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(http::serve(http, control.clone()));
    // Tests and scripts read this line to learn the bound ports.
    println!("meshd ready listen={grpc_addr} admin={http_addr} version={}", control.current_version());
    tracing::info!(%grpc_addr, %http_addr, data_dir = %data_dir.display(), "meshd server ready");
    let shutdown = async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can watch SIGTERM");
        tokio::select! {
            _ = terminate.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    // Updates and acks are small messages that must not wait for Nagle.
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(RegistryServer::new(RegistryService { control: control.clone() }))
        .add_service(DiscoveryServer::new(DiscoveryService { control: control.clone() }))
        .add_service(NodesServer::new(NodesService { registry: nodes.clone() }))
        .add_service(AdminServer::new(AdminService { control, nodes }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| e.to_string())
}
