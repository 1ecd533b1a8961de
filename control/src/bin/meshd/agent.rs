//! `meshd agent`: the node agent's start-up around the `mesh-agent` crate.

use super::*;

/// Runs an agent until `shutdown` completes, then stops its instances.
pub(crate) async fn agent(
    server: String,
    info: NodeInfo,
    data_dir: Option<PathBuf>,
    join_token: Option<String>,
    default_user: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Failure> {
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
        host: Arc::new(mesh_agent::host::NodeHost { link: link.clone() }),
        control: link.server.clone(),
        control_roots: link.roots_file().to_owned(),
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
    Ok(result?)
}

/// The join token from `--join-token-file`, else from `MESH_JOIN_TOKEN`.
pub(crate) fn join_token(file: Option<PathBuf>) -> Result<Option<String>, Failure> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("--join-token-file {}: {e}", file.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var("MESH_JOIN_TOKEN").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()))
}
