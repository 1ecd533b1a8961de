//! meshd's authenticated control plane: every method refused without a
//! credential, writes refused for a viewer, roles and revocation through
//! meshctl, nodes that join with tokens and may speak only for themselves,
//! and TLS that refuses plaintext and foreign-CA clients at the handshake.

use std::time::Duration;

use mesh_client::{ClientTls, Credentials};
use mesh_control::auth::policy::{Requirement, Role, METHODS};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use mesh_proto::mesh::v1::nodes_client::NodesClient;
use mesh_tests::metrics::scrape;
use mesh_tests::process::{run, run_bounded, Agent, Meshd};
use mesh_tests::{bin, eventually, TempDir};
use tonic::Code;

/// Calls the method at `path` with an empty message; its status code.
async fn call(channel: tonic::transport::Channel, path: &'static str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let codec = tonic_prost::ProstCodec::<pb::Empty, pb::Empty>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    match grpc.unary(tonic::Request::new(pb::Empty {}), path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// The mesh's roots, which anyone may hold: TLS without a client certificate.
async fn anonymous(meshd: &Meshd) -> tonic::transport::Channel {
    let roots = Credentials::read(std::path::Path::new(&meshd.credentials)).unwrap().roots;
    let tls = ClientTls::from_roots_pem(&roots).unwrap();
    mesh_client::connect(&meshd.listen, &tls, Duration::from_secs(5)).await.unwrap()
}

/// Creates user `name` with `role`; returns their credential file.
fn user(meshd: &Meshd, dir: &TempDir, name: &str, role: &str) -> String {
    let file = dir.path(&format!("{name}.toml"));
    let file = file.to_str().unwrap().to_owned();
    meshd.ctl_ok(&["user", "create", name, "--role", role, "--out", &file]);
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_refused_without_a_credential_and_every_write_for_a_viewer() {
    let dir = TempDir::new("access-methods");
    let meshd = Meshd::start(&dir.path("data"));
    let viewer = user(&meshd, &dir, "ci", "viewer");
    let (stranger, viewer) = (anonymous(&meshd).await, meshd.channel_as(&viewer).await);
    // Renewing replaces the caller's credential: it comes last.
    const RENEW: &str = "/mesh.v1.Access/RenewCredential";
    let mut methods: Vec<_> = METHODS.iter().filter(|(path, ..)| *path != RENEW).collect();
    methods.extend(METHODS.iter().filter(|(path, ..)| *path == RENEW));
    for (path, requirement, _) in methods {
        let code = call(stranger.clone(), path).await;
        if *requirement == Requirement::Public {
            // The request carries its proof; an empty one is refused for what it lacks.
            assert_ne!(code, Code::Unauthenticated, "{path}");
        } else {
            assert_eq!(code, Code::Unauthenticated, "{path} without a credential");
        }
        let code = call(viewer.clone(), path).await;
        match requirement {
            Requirement::Role(Role::Viewer)
            | Requirement::NodeOrRole(Role::Viewer)
            | Requirement::ServerOrRole(Role::Viewer) => {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{path} for a viewer: {code:?}"
                )
            }
            Requirement::Public => {}
            _ => assert_eq!(code, Code::PermissionDenied, "{path} for a viewer"),
        }
    }
    // The viewer renewed their credential last: the old one no longer counts.
    assert_eq!(call(viewer.clone(), "/mesh.v1.Admin/ListServices").await, Code::Unauthenticated);
    // A method the table does not list is refused, not served.
    assert_eq!(call(meshd.channel().await, "/mesh.v1.Admin/Unlisted").await, Code::PermissionDenied);
    let metrics = scrape(&meshd.admin).await;
    assert!(metrics.sum("meshd_refused_calls_total", &[("reason", "unauthenticated")]) >= 20.0);
    assert!(metrics.sum("meshd_refused_calls_total", &[("reason", "permission-denied")]) >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_meshctl_may_do_and_revocation_counts_at_once() {
    let dir = TempDir::new("access-roles");
    let meshd = Meshd::start(&dir.path("data"));
    let viewer = user(&meshd, &dir, "ci", "viewer");
    let operator = user(&meshd, &dir, "ops", "operator");
    let as_user = |file: &str, args: &[&str]| {
        let mut all = vec!["--server", meshd.listen.as_str(), "--credentials", file];
        all.extend_from_slice(args);
        run(&bin("meshctl"), &all)
    };
    let (code, out, _) = as_user(&viewer, &["whoami"]);
    assert_eq!((code, out.trim()), (0, "user ci (role viewer)"));
    assert_eq!(as_user(&viewer, &["get", "services"]).0, 0, "a viewer reads");

    let (code, _, err) = as_user(&viewer, &["register", "web", "--version", "v1", "--addr", "127.0.0.9:80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs the operator role; your credential is viewer \"ci\""), "{err}");
    assert_eq!(as_user(&operator, &["register", "web", "--version", "v1", "--addr", "127.0.0.9:80"]).0, 0);
    let (code, _, err) = as_user(&operator, &["policy", "web", "--permissive", "true"]);
    assert_eq!(code, 2, "policies are an admin's: {err}");
    assert!(err.contains("needs the admin role; your credential is operator \"ops\""), "{err}");
    let (code, _, err) = as_user(&operator, &["user", "create", "eve", "--role", "admin"]);
    assert!(code == 2 && err.contains("needs the admin role"), "{err}");

    // Revoked: the next call is refused, without a restart.
    meshd.ctl_ok(&["user", "revoke", "ci"]);
    let (code, _, err) = as_user(&viewer, &["get", "services"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("revoked"), "{err}");
    // Rotated: the old credential stops, the new one works.
    let rotated = dir.path("ops-new.toml");
    meshd.ctl_ok(&["user", "rotate", "ops", "--out", rotated.to_str().unwrap()]);
    let (code, _, err) = as_user(&operator, &["get", "services"]);
    assert!(code == 2 && err.contains("replaced by a newer one"), "{err}");
    assert_eq!(as_user(rotated.to_str().unwrap(), &["get", "services"]).0, 0);
    let users = meshd.ctl_json(&["user", "list"]);
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "ops"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&rotated).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a credential holds a key");

    // The admin credential rotates too: the old file stops, the new one works.
    let admin = dir.path("admin-new.toml");
    meshd.ctl_ok(&["user", "rotate", "admin", "--out", admin.to_str().unwrap()]);
    let (code, _, err) = as_user(&meshd.credentials, &["user", "list"]);
    assert!(code == 2 && err.contains("replaced by a newer one"), "{err}");
    assert_eq!(as_user(admin.to_str().unwrap(), &["user", "list"]).0, 0);

    // No credential at all: meshctl says where to get one.
    let (code, _, err) = run(
        &bin("meshctl"),
        &["--server", &meshd.listen, "--credentials", "/nonexistent", "get", "services"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_clients_are_refused_at_the_handshake() {
    let dir = TempDir::new("access-tls");
    let meshd = Meshd::start(&dir.path("data"));
    // Plaintext HTTP/2, as a client without TLS speaks gRPC.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", meshd.listen)).unwrap();
    let refused = match plaintext.connect().await {
        Ok(channel) => call(channel, "/mesh.v1.Admin/ListServices").await,
        Err(_) => Code::Unavailable,
    };
    assert!(
        !matches!(refused, Code::Ok | Code::Unauthenticated | Code::PermissionDenied),
        "a plaintext client gets nothing: {refused:?}"
    );
    // A client whose certificate comes from another CA (another mesh).
    let other = TempDir::new("access-tls-other");
    let foreign_meshd = Meshd::start(&other.path("data"));
    let foreign = Credentials::read(std::path::Path::new(&foreign_meshd.credentials)).unwrap();
    let ours = Credentials::read(std::path::Path::new(&meshd.credentials)).unwrap();
    let tls = ClientTls::from_roots_pem(&ours.roots)
        .unwrap()
        .with_identity(&foreign.certificate, &foreign.key)
        .unwrap();
    let attempt = match mesh_client::connect(&meshd.listen, &tls, Duration::from_secs(5)).await {
        Ok(channel) => call(channel, "/mesh.v1.Admin/ListServices").await,
        Err(_) => Code::Unavailable,
    };
    assert!(
        !matches!(attempt, Code::Ok | Code::Unauthenticated | Code::PermissionDenied),
        "a foreign client certificate fails the handshake: {attempt:?}"
    );
    // And a client that trusts another CA does not trust this meshd.
    let wrong_roots = ClientTls::from_roots_pem(&foreign.roots).unwrap();
    let error = mesh_client::connect(&meshd.listen, &wrong_roots, Duration::from_secs(5)).await.unwrap_err();
    assert!(error.to_string().contains("certificate"), "{error}");
    let metrics = scrape(&meshd.admin).await;
    assert!(
        metrics.sum("meshd_tls_handshake_failures_total", &[]) >= 3.0,
        "each failed handshake is counted"
    );
}

const WEB_ON_B: &str = "name = \"web\"\nversion = \"v1\"\nreplicas = 2\n\n[task]\ncommand = \"mesh-echo\"\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[[constraints]]\nattribute = \"zone\"\nvalue = \"b\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_may_speak_only_for_itself() {
    let dir = TempDir::new("access-impostor");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _a = Agent::start(&meshd, "node-a", "127.0.0.2", 1000, &dir.path("a"), &["--attribute", "zone=a"]);
    let _b = Agent::start(&meshd, "node-b", "127.0.0.3", 1000, &dir.path("b"), &["--attribute", "zone=b"]);
    let file = dir.path("web.toml");
    std::fs::write(&file, WEB_ON_B).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let webs = meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = meshd
        .mesh_client(&dir.path("client.toml"), "[[constraints]]\nattribute = \"zone\"\nvalue = \"a\"\n")
        .await;
    let load = mesh_tests::client::Background::start(&client, "web", 2);
    load.wait_for(20).await;

    // node-a, with its own certificate, tries to pass for node-b.
    let node_a = dir.path("a").join("node.credentials.toml");
    let channel = meshd.channel_as(node_a.to_str().unwrap()).await;
    let mut nodes = NodesClient::new(channel.clone());
    let as_b = pb::HeartbeatRequest { name: "node-b".into(), ..Default::default() };
    let refused = nodes.heartbeat(as_b).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("may speak only for itself"), "{}", refused.message());
    let join_as_b = pb::NodeInfo {
        name: "node-b".into(),
        advertise_ip: "127.0.0.2".into(),
        cpu_millis: u64::MAX,
        memory_mb: 1,
        ..Default::default()
    };
    assert_eq!(nodes.join(join_as_b).await.unwrap_err().code(), Code::PermissionDenied);
    // It reports node-b's instances as failed, under its own name: ignored.
    let fake: Vec<pb::InstanceReport> = webs
        .iter()
        .map(|web| pb::InstanceReport {
            id: web["id"].as_str().unwrap().into(),
            job: "web".into(),
            version: "v1".into(),
            state: pb::InstanceState::Failed as i32,
            ..Default::default()
        })
        .collect();
    for _ in 0..5 {
        let heartbeat =
            pb::HeartbeatRequest { name: "node-a".into(), instances: fake.clone(), ..Default::default() };
        let assigned = nodes.heartbeat(heartbeat).await.unwrap().into_inner().assignments;
        assert!(assigned.iter().all(|a| a.job != "web"), "node-a gets none of node-b's work: {assigned:?}");
    }
    // It asks for a token for node-b's instance: refused either way.
    let mut identity = IdentityClient::new(channel);
    let web_id = webs[0]["id"].as_str().unwrap();
    for (node, why) in [("node-b", "may speak only for itself"), ("node-a", "is not placed on node")] {
        let request = pb::TokenRequest { node: node.into(), instance: web_id.into() };
        let refused = identity.issue_token(request).await.unwrap_err();
        assert!(refused.message().contains(why), "{node}: {}", refused.message());
    }
    // A plaintext endpoint registered by hand into web, which sidecars
    // serve, would downgrade its callers: refused, and only an admin may allow it.
    let ops = user(&meshd, &dir, "ops", "operator");
    let register = ["register", "web", "--version", "v1", "--addr", "127.0.0.9:80"];
    let as_ops = |extra: &[&str]| {
        let mut args = vec!["--server", meshd.listen.as_str(), "--credentials", ops.as_str()];
        args.extend_from_slice(&register);
        args.extend_from_slice(extra);
        run(&bin("meshctl"), &args)
    };
    let (code, _, err) = as_ops(&[]);
    assert!(code == 2 && err.contains("would downgrade its callers"), "{code} {err}");
    let (code, _, err) = as_ops(&["--plaintext-ok"]);
    assert!(code == 2 && err.contains("needs the admin role"), "{code} {err}");
    // The service is untouched: both endpoints ready, no request failed.
    let endpoints = meshd.ctl_json(&["get", "endpoints"]);
    let web: Vec<_> = endpoints.as_array().unwrap().iter().filter(|e| e["service"] == "web").collect();
    assert_eq!(web.iter().filter(|e| e["ready"] == true).count(), 2, "{endpoints}");
    assert_eq!(web.len(), 2, "nothing was added: {endpoints}");
    load.wait_for(50).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    let impostor = scrape(&meshd.admin).await.sum("meshd_refused_calls_total", &[("reason", "impostor")]);
    assert!(impostor >= 2.0 + 2.0 * 5.0 + 1.0, "every attempt is counted: {impostor}");
}

/// `meshd agent` arguments for node `name` joining with a token file.
fn agent_args(meshd: &Meshd, dir: &TempDir, name: &str, token: &str) -> Vec<String> {
    let token_file = dir.path(&format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    let data = dir.path(name);
    [
        "agent",
        "--server",
        &meshd.listen,
        "--name",
        name,
        "--advertise-ip",
        "127.0.0.5",
        "--cpu-millis",
        "1000",
        "--memory-mb",
        "256",
        "--data-dir",
        data.to_str().unwrap(),
        "--join-token-file",
        token_file.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// Runs an agent whose join must fail: its exit code and stderr.
fn failed_join(meshd: &Meshd, dir: &TempDir, name: &str, token: &str) -> (Option<i32>, String) {
    let args = agent_args(meshd, dir, name, token);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_bounded(&bin("meshd"), &args, Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_good_token_only_and_rejoins_with_its_certificate() {
    let dir = TempDir::new("access-join");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let good = meshd.join_token();
    // (token, why it is refused)
    let wrong_secret = {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], "0".repeat(32), parts[2])
    };
    let expired = meshd.ctl_ok(&["node", "token", "create", "--ttl", "1ms"]).trim().to_owned();
    let other_mesh = TempDir::new("access-join-other");
    let other = Meshd::start(&other_mesh.path("data"));
    let foreign = other.join_token();
    let cases = [
        ("garbage", "not a join token".to_owned()),
        (wrong_secret.as_str(), "not one this server issued".to_owned()),
        (expired.as_str(), "has expired".to_owned()),
        (foreign.as_str(), "not the one the join token names".to_owned()),
    ];
    for (i, (token, why)) in cases.iter().enumerate() {
        let (code, err) = failed_join(&meshd, &dir, &format!("bad-{i}"), token);
        assert!(code.is_some_and(|c| c != 0), "{token}: {code:?} {err}");
        assert!(err.contains(why), "{token}: {err}");
    }
    // A good token joins one node (its ready line comes once it joined);
    // used again, it is used up.
    let args = agent_args(&meshd, &dir, "node-y", &good);
    let node_y =
        mesh_tests::process::Process::start_with(std::process::Command::new(bin("meshd")).args(&args));
    assert!(node_y.first_line.contains("name=node-y"), "{}", node_y.first_line);
    let (code, err) = failed_join(&meshd, &dir, "node-z", &good);
    assert!(code.is_some_and(|c| c != 0) && err.contains("used as many times"), "{code:?} {err}");
    drop(node_y);
    let first = Agent::start(&meshd, "node-x", "127.0.0.5", 1000, &dir.path("x"), &[]);

    // A restarted agent needs no token: it kept its certificate (0600).
    drop(first);
    let again = Agent::start(&meshd, "node-x", "127.0.0.5", 1000, &dir.path("x"), &[]);
    eventually("node-x is up again", Duration::from_secs(10), || {
        let nodes = meshd.ctl_json(&["get", "nodes"]);
        let up = nodes.as_array().unwrap().iter().any(|n| n["name"] == "node-x" && n["up"] == true);
        async move { up.then_some(()) }
    })
    .await;
    drop(again);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path("x").join("node.credentials.toml")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// meshctl as uid nobody, with a home of its own.
fn meshctl_as_nobody(home: &TempDir, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(bin("meshctl"))
        .args(args)
        .env("HOME", &home.0)
        .env_remove("MESH_CREDENTIALS")
        .output()
        .expect("setpriv runs meshctl");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_local_user_can_change_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("access-nobody");
    let meshd = Meshd::start_dev_demo(&dir.path("data"));
    eventually("the demo's split is set", Duration::from_secs(60), || {
        let set = meshd.ctl_json(&["get", "splits"]).as_array().is_some_and(|s| !s.is_empty());
        async move { set.then_some(()) }
    })
    .await;
    let home = TempDir::new("access-nobody-home");
    std::fs::set_permissions(&home.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let job = home.path("id.toml");
    std::fs::write(&job, "name = \"id\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"id\"]\n").unwrap();
    let server = meshd.listen.as_str();
    // The attempts of the issue that found these holes, as meshctl makes them.
    let attempts: [&[&str]; 4] = [
        &["--server", server, "split", "echo", "v1=0", "v2=100"],
        &["--server", server, "job", "run", job.to_str().unwrap()],
        &["--server", server, "register", "echo", "--version", "v1", "--addr", "127.0.0.9:80"],
        &["--server", server, "get", "services"],
    ];
    for args in attempts {
        // No credential of its own, and root's is not readable.
        let (code, _, err) = meshctl_as_nobody(&home, args);
        assert!(code == 2 && err.contains("no credential"), "{args:?}: {code} {err}");
        let mut with_roots = vec!["--credentials", meshd.credentials.as_str()];
        with_roots.extend_from_slice(args);
        let (code, _, err) = meshctl_as_nobody(&home, &with_roots);
        assert!(code == 2 && err.contains("Permission denied"), "{args:?}: {code} {err}");
    }
    // Nothing changed: the demo's split and endpoints are as they were.
    let splits = meshd.ctl_json(&["get", "splits"]);
    assert_eq!(splits[0]["weights"], serde_json::json!({"v1": 90, "v2": 10}), "{splits}");
    let endpoints = meshd.ctl_json(&["get", "endpoints"]);
    assert!(endpoints.as_array().unwrap().iter().all(|e| e["addr"] != "127.0.0.9:80"), "{endpoints}");
    assert!(meshd.ctl_json(&["get", "jobs"]).as_array().unwrap().iter().all(|j| j["name"] != "id"));
}

/// The uid a process runs as, from /proc.
fn uid_of(pid: i64) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_run_unprivileged_and_cannot_read_the_nodes_secrets() {
    let dir = TempDir::new("access-unprivileged");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("a"), &[]);
    // From inside an instance: the node's credential, the store, the admin credential, the agent's folder.
    let secrets = [
        dir.path("a").join("node.credentials.toml"),
        dir.path("data").join("meshd.redb"),
        dir.path("data").join("admin.credentials.toml"),
    ];
    let mut script = "echo uid=$(id -u);".to_owned();
    for file in &secrets {
        let file = file.display();
        script.push_str(&format!(
            " if cat {file} >/dev/null 2>&1; then echo READ {file}; else echo DENIED; fi;"
        ));
    }
    let agent_dir = dir.path("a");
    script.push_str(&format!(" if ls {} >/dev/null 2>&1; then echo LISTED; fi;", agent_dir.display()));
    script.push_str(" touch ./own-file && echo WROTE; exec sleep 600");
    let job = |name: &str, user: &str| {
        format!("name = \"{name}\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n{user}\n[resources]\ncpu_millis = 10\nmemory_mb = 16\n")
    };
    let file = dir.path("peek.toml");
    std::fs::write(&file, job("peek", "")).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let peek = meshd.running("peek", 1, Duration::from_secs(30)).await.remove(0);
    let out = eventually("the app reports", Duration::from_secs(10), || {
        let out = meshd.ctl_ok(&["logs", "peek"]);
        async move { out.contains("WROTE").then_some(out) }
    })
    .await;
    assert!(out.contains("uid=65534"), "apps run as nobody by default: {out}");
    assert_eq!(out.matches("DENIED").count(), secrets.len(), "{out}");
    assert!(!out.contains("READ") && !out.contains("LISTED"), "{out}");
    assert_eq!(uid_of(peek["pid"].as_i64().unwrap()), Some(65534));

    // The node serves instance output to meshd alone: not in plaintext, and
    // not to a user's certificate either (users read logs through meshd).
    let logs_addr = meshd.ctl_json(&["get", "nodes"])[0]["logs_addr"].as_str().unwrap().to_owned();
    let plaintext = mesh_tests::client::send(
        &mesh_tests::client::http1(),
        http::Request::get(format!("http://{logs_addr}/logs/peek-0")).body(Default::default()).unwrap(),
    )
    .await;
    assert!(plaintext.is_err(), "plaintext logs: {plaintext:?}");
    let admin = Credentials::read(std::path::Path::new(&meshd.credentials)).unwrap();
    let node_id = "spiffe://mesh.local/node/node-a";
    let as_user = ClientTls::expecting(&admin.roots, node_id)
        .unwrap()
        .with_identity(&admin.certificate, &admin.key)
        .unwrap();
    let config = as_user.config_for(b"http/1.1").unwrap();
    let tcp = tokio::net::TcpStream::connect(&logs_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("agent.mesh").unwrap();
    let refused = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Err(_) => true,
        Ok(mut tls) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tls.write_all(b"GET /logs/peek-0 HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
            !String::from_utf8_lossy(&answer).contains("uid=")
        }
    };
    assert!(refused, "a user's certificate reads no logs at the node");

    // Root is an admin's decision: an operator may not ask for it.
    let ops = user(&meshd, &dir, "ops", "operator");
    let root_file = dir.path("root.toml");
    std::fs::write(&root_file, job("rooted", "user = \"root\"")).unwrap();
    let (code, _, err) = run(
        &bin("meshctl"),
        &["--server", &meshd.listen, "--credentials", &ops, "job", "run", root_file.to_str().unwrap()],
    );
    assert!(code == 2 && err.contains("needs the admin role"), "{code} {err}");
    meshd.ctl_ok(&["job", "run", root_file.to_str().unwrap()]);
    let rooted = meshd.running("rooted", 1, Duration::from_secs(30)).await.remove(0);
    assert_eq!(uid_of(rooted["pid"].as_i64().unwrap()), Some(0));
    // A user the node does not have: the instance fails and says why.
    let ghost = dir.path("ghost.toml");
    std::fs::write(&ghost, job("ghost", "user = \"no-such-user\"")).unwrap();
    meshd.ctl_ok(&["job", "run", ghost.to_str().unwrap()]);
    eventually("the instance names the missing user", Duration::from_secs(15), || {
        let found = meshd.instances().iter().any(|i| {
            i["job"] == "ghost"
                && i["message"].as_str().is_some_and(|m| m.contains("does not exist on this node"))
        });
        async move { found.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_token_reaches_meshds_log() {
    let dir = TempDir::new("access-log");
    let log = dir.path("meshd.log");
    let data = dir.path("data");
    // meshd at debug level, its log in a file: everything it says is looked at.
    let mut command = std::process::Command::new("sh");
    command
        // The harness sets RUST_LOG=warn for what it starts; debug here.
        .args(["-c", "RUST_LOG=debug exec \"$0\" \"$@\" 2>>\"$MESHD_LOG\"", bin("meshd").to_str().unwrap()])
        .args([
            "server",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--heartbeat-ttl", "1s"])
        .env("MESHD_LOG", &log);
    let meshd = Meshd::from_process(mesh_tests::process::Process::start_with(&mut command));
    let token = meshd.join_token();
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("a"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(
        &file,
        "name = \"web\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"mesh-echo\"\n",
    )
    .unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("web", 1, Duration::from_secs(30)).await;
    user(&meshd, &dir, "ci", "viewer");
    meshd.ctl_ok(&["identity", "rotate-root", "--stage-timeout", "30s"]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("user credential issued"), "the log is written at debug level: {}", text.len());
    let secret = token.split('.').nth(1).unwrap();
    for needle in ["PRIVATE KEY", "meshjoin.", secret] {
        assert!(!text.contains(needle), "meshd's log holds {needle:?}");
    }
}
