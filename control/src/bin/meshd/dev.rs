//! `meshd dev`: a server and an agent in one process, with `--demo` the demo jobs.

use super::*;

/// The demo jobs: service `echo` in two versions, and a traffic generator
/// calling it through its own sidecar.
pub(crate) const DEMO_JOBS: [(&str, &str); 3] =
    [("echo-v1", ECHO_V1), ("echo-v2", ECHO_V2), ("traffic", TRAFFIC)];

pub(crate) const ECHO_V1: &str = r#"name = "echo-v1"
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

pub(crate) const ECHO_V2: &str = r#"name = "echo-v2"
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

pub(crate) const TRAFFIC: &str = r#"name = "traffic"
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
pub(crate) fn host_size() -> (u64, u64) {
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

pub(crate) async fn dev(
    server: ServerArgs,
    demo: bool,
    cpu_millis: u64,
    memory_mb: u64,
) -> Result<(), Failure> {
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
                return Err(format!("the dev node cannot join: {error}").into());
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
pub(crate) async fn admin_channel(
    address: SocketAddr,
    data_dir: &std::path::Path,
) -> Result<tonic::transport::Channel, mesh_client::ClientError> {
    let credentials = mesh_client::Credentials::read(&data_dir.join(mesh_client::credentials::ADMIN_FILE))?;
    mesh_client::connect(&address.to_string(), &credentials.tls()?, Duration::from_secs(2)).await
}

pub(crate) async fn dev_join_token(
    address: SocketAddr,
    data_dir: &std::path::Path,
) -> Result<String, Failure> {
    use mesh_proto::mesh::v1 as pb;
    let mut access =
        mesh_proto::mesh::v1::access_client::AccessClient::new(admin_channel(address, data_dir).await?);
    let request = pb::JoinTokenRequest { ttl_ms: 60_000, uses: 1 };
    Ok(access.create_join_token(request).await.map_err(|e| e.message().to_owned())?.into_inner().token)
}

pub(crate) async fn deploy_demo(address: SocketAddr, data_dir: &std::path::Path) -> Result<(), Failure> {
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
