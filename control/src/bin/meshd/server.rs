//! `meshd server`: the store, the CA, the gRPC services and the admin port.

use super::*;
use mesh_control::server::forward::Peers;

/// Writes the admin credential into the data dir on the first start (no
/// user yet), and says where. Returns its path.
pub(crate) fn first_admin_credential(
    data_dir: &std::path::Path,
    trust: &TrustKeeper,
    users: &Users,
    control: &ControlPlane,
    server: &str,
) -> Result<PathBuf, Failure> {
    let path = data_dir.join(mesh_client::credentials::ADMIN_FILE);
    if users.list().is_empty() {
        let credential = issue_credential(trust, users, control.store(), "admin", Role::Admin, server)?;
        credential.write(&path)?;
        tracing::info!(file = %path.display(), "wrote the admin credential (meshctl finds it there, or give --credentials FILE)");
    }
    Ok(path)
}

pub(crate) async fn serve(
    args: ServerArgs,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<(), Failure> {
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
        publish_window,
        publish_window_max,
        default_transport,
        store: store_kind,
        etcd_endpoints,
        store_key,
        advertise,
        leader_ttl,
    } = args;
    if publish_window_max < publish_window {
        return Err(Failure::from(format!(
            "--publish-window-max ({}) is shorter than --publish-window ({})",
            humantime::format_duration(publish_window_max),
            humantime::format_duration(publish_window)
        )));
    }
    let publish_window =
        mesh_control::server::PublishWindow { base: publish_window, max: publish_window_max };
    let data_dir = data_dir.expect("a data dir was chosen");
    let grpc = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let me = advertise.unwrap_or_else(|| grpc_addr.to_string());
    let (store, leader, etcd): (Arc<dyn mesh_control::store::Store>, _, _) = match store_kind {
        StoreKind::Redb => {
            let store = RedbStore::open(&data_dir, reinitialize).map_err(|e| e.to_string())?;
            (Arc::new(store), Leader::sole(&me), None)
        }
        StoreKind::Etcd => {
            // The data dir holds only the admin credential here: private.
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(&data_dir)
                .map_err(|e| format!("{}: {e}", data_dir.display()))?;
            let endpoints = etcd_endpoints.expect("clap requires --etcd-endpoints");
            let key = store_key.expect("clap requires --store-key");
            let store = Arc::new(EtcdStore::open(&endpoints, &key).map_err(|e| e.to_string())?);
            tracing::info!(%endpoints, "the store is etcd, shared with the other servers");
            let leader = Leader::elect(store.clone(), me.clone(), leader_ttl);
            (store.clone() as Arc<dyn mesh_control::store::Store>, leader, Some(store))
        }
    };
    let defaults = mesh_control::state::MeshDefaults { transport: default_transport };
    let control = ControlPlane::with_defaults(store, publish_window, defaults).map_err(|e| e.to_string())?;
    // Made once the store is open: waiting for etcd is not meshd stalling.
    let heartbeat_interval = (heartbeat_ttl / 3).max(Duration::from_millis(100));
    let nodes = Arc::new(NodeRegistry::new(heartbeat_interval, heartbeat_ttl));
    let scheduler = Scheduler::start(control.clone(), nodes.clone(), leader.clone())?;
    let operator_ca = ca_cert.is_some();
    let trust = trust_state(control.store(), etcd.as_deref(), &trust_domain, ca_cert, ca_key)?;
    let trust = TrustKeeper::new(trust, control.clone(), nodes.clone(), operator_ca, cert_ttl);
    let users = Arc::new(Users::load(control.store()).map_err(|e| e.to_string())?);
    mesh_control::server::replica::follow_store(&control, scheduler.clone(), users.clone(), trust.clone());
    if let Some(etcd) = &etcd {
        mesh_control::server::shared_proxies::share(control.clone(), etcd.clone(), me.clone());
        scheduler
            .set_node_leases(mesh_control::server::node_leases::NodeLeases::new(etcd.clone(), heartbeat_ttl));
    }
    let http = TcpListener::bind(admin).await.map_err(|e| format!("cannot listen on {admin}: {e}"))?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let mut server_names = server_names;
    server_names.extend(me.rsplit_once(':').map(|(host, _)| host.trim_matches(['[', ']']).to_owned()));
    let tls = Arc::new(ServerTls::new(tls::names_for(grpc_addr, &server_names), &trust.current())?);
    let follower = tls.clone();
    trust.follow_with(move |next| {
        if let Err(error) = follower.follow(next) {
            tracing::error!(%error, "meshd's TLS cannot follow the new trust state");
        }
    });
    tokio::spawn(follow_trust(tls.clone(), trust.clone()));
    let credential = first_admin_credential(&data_dir, &trust, &users, &control, &me)?;
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
    let peers = Arc::new(Peers::new(
        leader.clone(),
        me.clone(),
        tls.clone(),
        trust_domain.clone(),
        scheduler.node_leases().cloned(),
    ));
    scheduler.set_peers(peers.clone());
    tonic::transport::Server::builder()
        .layer(AuthLayer { users: users.clone(), control: control.clone(), peers: peers.clone() })
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
            server: me.clone(),
            leader: leader.clone(),
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
        .add_service(AdminServer::new(AdminService { control, nodes, leader, me, peers: peers.clone() }))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    Ok(())
}

/// Renews meshd's TLS certificate at half its life (rotations are followed
/// as they happen, through the trust keeper).
pub(crate) async fn follow_trust(tls: Arc<ServerTls>, trust: Arc<TrustKeeper>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(error) = tls.follow(&trust.current()) {
            tracing::error!(%error, "cannot renew meshd's TLS certificate");
        }
    }
}

/// The trust state: the operator's CA from files, else the one in the
/// store (with a rotation in progress, if one was), else a new root saved
/// to the store. Keys are never logged.
pub(crate) fn trust_state(
    store: &dyn mesh_control::store::Store,
    shared: Option<&EtcdStore>,
    trust_domain: &str,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
) -> Result<Trust, Failure> {
    if let (Some(cert), Some(key)) = (ca_cert, ca_key) {
        let read =
            |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
        let authority = Authority::from_pem(&read(&cert)?, &read(&key)?, trust_domain)
            .map_err(|e| format!("--ca-cert/--ca-key: {e}"))?;
        tracing::info!(cert = %cert.display(), %trust_domain, "using the operator's CA");
        return Ok(Trust::steady(authority));
    }
    if let Some(stored) = store.load_trust().map_err(|e| e.to_string())? {
        return Ok(Trust::from_stored(stored, trust_domain).map_err(|e| format!("the stored CA: {e}"))?);
    }
    let trust = Trust::steady(Authority::generate(trust_domain)?);
    if let Some(shared) = shared {
        // Servers starting together: the first CA stored is everyone's.
        let stored = shared.create_trust(&trust.to_stored()).map_err(|e| e.to_string())?;
        return Ok(Trust::from_stored(stored, trust_domain).map_err(|e| format!("the stored CA: {e}"))?);
    }
    store.save_trust(&trust.to_stored()).map_err(|e| e.to_string())?;
    tracing::info!(%trust_domain, "generated a root CA and stored it");
    Ok(trust)
}
