//! Workload identity: every sidecar the agent starts gets a certificate
//! from the control plane's CA for a one-time token the scheduler vouches
//! for; a token works once, only for its own instance's service; private
//! keys are never written to disk nor logged.

use std::path::Path;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

const JOB: &str = "name = \"web\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"mesh-echo\"\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n";

/// A running `web` instance beside its certified sidecar.
async fn cluster(dir: &TempDir) -> (Meshd, Agent, Value) {
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(&file, JOB).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let instance = meshd.running("web", 1, Duration::from_secs(30)).await.remove(0);
    (meshd, agent, instance)
}

/// `cluster` and a meshed client; returns the client sidecar's outbound address.
async fn cluster_with_client(dir: &TempDir) -> (Meshd, Agent, String) {
    let (meshd, agent, _) = cluster(dir).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    (meshd, agent, client)
}

/// Two `web` instances and a meshed client, every sidecar certified;
/// returns the client sidecar's outbound address.
async fn two_webs_and_a_client(dir: &TempDir, meshd_args: &[&str]) -> (Meshd, Agent, String) {
    let mut args = vec!["--heartbeat-ttl", "1s"];
    args.extend_from_slice(meshd_args);
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &args);
    let agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(&file, JOB.replace("replicas = 1", "replicas = 2")).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    (meshd, agent, client)
}

fn request(names: Vec<String>) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(names).unwrap().serialize_request(&key).unwrap().pem().unwrap()
}

fn uri_names(pem: &str) -> Vec<String> {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = der.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().expect("a SAN");
    san.value.general_names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_work_once_and_only_for_their_own_instance() {
    let dir = TempDir::new("identity-tokens");
    let (meshd, _agent, instance) = cluster(&dir).await;

    // The sidecar holds a certificate: its expiry is in its metrics (24 h by default).
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    let sidecar =
        proxies.as_array().unwrap().iter().find(|p| p["proxy_id"] == instance["id"]).expect("the sidecar");
    let metrics = scrape(sidecar["admin_addr"].as_str().unwrap()).await;
    let expiry = metrics.sum("mesh_identity_cert_expiry_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((expiry - now - 24.0 * 3600.0).abs() < 120.0, "expires at {expiry}, now {now}");
    let logs = std::fs::read_to_string(dir.path("agent").join("instances/web-0/proxy.stderr.log")).unwrap();
    assert!(
        logs.contains("certificate obtained") && logs.contains("spiffe://mesh.local/service/web"),
        "{logs}"
    );

    // Asked as node-a, with the certificate its agent holds.
    let node_a = dir.path("agent").join("node.credentials.toml");
    let mut identity = IdentityClient::new(meshd.channel_as(node_a.to_str().unwrap()).await);
    let token =
        |node: &str, instance: &str| pb::TokenRequest { node: node.into(), instance: instance.into() };
    let id = instance["id"].as_str().unwrap();

    // The scheduler vouches only for what it placed, where it placed it.
    // A node asks only for itself.
    let cases = [
        ("node-b", id, "may speak only for itself"),
        ("node-a", "web-9", "is not placed on node"),
        ("node-a", "", "is not placed on node"),
    ];
    for (node, instance, why) in cases {
        let refused = identity.issue_token(token(node, instance)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{node} {instance}");
        assert!(refused.message().contains(why), "{}", refused.message());
    }
    let granted = identity.issue_token(token("node-a", id)).await.unwrap().into_inner();
    assert_eq!(granted.service, "web");

    // A request for another identity gets the token's, and only that.
    let asked = request(vec!["spiffe://mesh.local/service/admin".into()]);
    let signed = identity
        .sign(pb::SignRequest { token: granted.token.clone(), csr_pem: asked.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uri_names(&signed.certificate_pem), vec!["URI(spiffe://mesh.local/service/web)".to_owned()]);
    assert_eq!(signed.spiffe_id, "spiffe://mesh.local/service/web");
    assert!(signed.bundle.unwrap().roots_pem.contains("BEGIN CERTIFICATE"));

    // Used once: never again.
    let again = identity.sign(pb::SignRequest { token: granted.token, csr_pem: asked }).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(again.message().contains("already used"), "{}", again.message());

    // A bad request does not spend a token.
    let fresh = identity.issue_token(token("node-a", id)).await.unwrap().into_inner().token;
    let bad =
        identity.sign(pb::SignRequest { token: fresh.clone(), csr_pem: "garbage".into() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(identity.sign(pb::SignRequest { token: fresh, csr_pem: request(vec![]) }).await.is_ok());
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_are_never_written_or_logged() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("identity-keys");
    // A data dir made beforehand, readable by everyone, as `mkdir` leaves it.
    std::fs::create_dir_all(dir.path("data")).unwrap();
    std::fs::set_permissions(dir.path("data"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_meshd, _agent, _instance) = cluster(&dir).await;
    // The store holds the CA's key: only its owner reads it, or its folder.
    let mode = |path: std::path::PathBuf| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path("data")), 0o700, "the data dir");
    assert_eq!(mode(dir.path("data").join("meshd.redb")), 0o600, "the store file");
    let agent_files = files(&dir.path("agent"));
    assert!(agent_files.iter().any(|f| f.ends_with("proxy.stderr.log")), "{agent_files:?}");
    for file in agent_files.iter().chain(files(&dir.path("data")).iter()) {
        let content = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&content);
        // The store holds the CA's key by design, the credentials their
        // owner's key: each readable by its owner only. Nothing else may
        // hold a key or a join token (logs included); sidecar keys stay in memory.
        let holds_key = ["meshd.redb", "admin.credentials.toml", "node.credentials.toml"];
        if holds_key.iter().any(|name| file.ends_with(name)) {
            assert_eq!(mode(file.clone()), 0o600, "{}", file.display());
            continue;
        }
        assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", file.display());
        assert!(!text.contains("meshjoin."), "{} holds a join token", file.display());
    }
    let node_key = std::fs::read_to_string(dir.path("agent").join("node.credentials.toml")).unwrap();
    assert!(node_key.contains("PRIVATE KEY"), "the node keeps its key for restarts");
    assert_eq!(mode(dir.path("agent")), 0o700, "the agent's data dir");
}

/// The sidecar of the first running instance of `job`: (inbound address, admin address).
fn sidecar(meshd: &Meshd, job: &str) -> (String, String) {
    let instances = meshd.ctl_json(&["get", "instances"]);
    let instance =
        instances.as_array().unwrap().iter().find(|i| i["job"] == job).expect("the instance").clone();
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    let proxy =
        proxies.as_array().unwrap().iter().find(|p| p["proxy_id"] == instance["id"]).expect("its sidecar");
    (instance["addr"].as_str().unwrap().to_owned(), proxy["admin_addr"].as_str().unwrap().to_owned())
}

async fn inbound_handshakes(admin: &str, result: &str) -> f64 {
    scrape(admin).await.sum("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", result)])
}

/// A certificate and key from a CA that is not the mesh's, as files for openssl.
fn stranger(dir: &TempDir) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://mesh.local/service/client").unwrap(),
    )];
    let cert = params.signed_by(&key, &ca).unwrap();
    let (cert_path, key_path) = (dir.path("stranger.pem"), dir.path("stranger.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path.display().to_string(), key_path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_port_takes_only_mesh_peers_unless_permissive() {
    let dir = TempDir::new("identity-inbound");
    let (meshd, _agent, _instance) = cluster(&dir).await;
    let (inbound, admin) = sidecar(&meshd, "web");

    // Plaintext: refused with the reason.
    let (code, out, _) = mesh_tests::process::run(
        Path::new("/usr/bin/curl"),
        &["-s", "-i", "-H", "Host: web", &format!("http://{inbound}/")],
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.to_lowercase().contains("x-mesh-error: authz-denied") && out.contains("mTLS"), "{out}");

    // TLS with a certificate from another CA, or with none: the handshake fails.
    let failed_before = inbound_handshakes(&admin, "failed").await;
    let (cert, key) = stranger(&dir);
    let attempts: [&[&str]; 2] = [&["-cert", &cert, "-key", &key], &[]];
    for extra in attempts {
        // -ign_eof: wait for the server's answer (in TLS 1.3 the client
        // certificate is judged after the client thinks it is done); bounded by `timeout`.
        let mut args = vec!["10", "openssl", "s_client", "-connect", &inbound, "-tls1_3", "-ign_eof"];
        args.extend_from_slice(extra);
        let mut openssl = std::process::Command::new("timeout")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run openssl");
        {
            use std::io::Write;
            let mut stdin = openssl.stdin.take().unwrap();
            let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n");
        }
        let output = openssl.wait_with_output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(text.contains("alert") && !text.contains("HTTP/1.1 200"), "openssl {extra:?}: {text}");
    }
    eventually("the refused handshakes are counted", Duration::from_secs(5), || {
        let admin = admin.clone();
        async move { (inbound_handshakes(&admin, "failed").await >= failed_before + 2.0).then_some(()) }
    })
    .await;

    // Permissive (migration): plaintext is served.
    meshd.ctl_ok(&["policy", "web", "--permissive", "--wait"]);
    let (_, out, _) = mesh_tests::process::run(
        Path::new("/usr/bin/curl"),
        &["-s", "-i", "-H", "Host: web", &format!("http://{inbound}/")],
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// One request on an open HTTP/1.1 connection; returns the status code
/// and the whole answer (its head and body), for a failure to show.
async fn status_on(stream: &mut tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.expect("the connection is open");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(1))), "the connection stays open for an answer: {read:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("a sized answer");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head[9..12].parse().unwrap(), format!("{head}{}", String::from_utf8_lossy(&body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_holds_for_the_next_request_on_a_kept_alive_connection() {
    let dir = TempDir::new("identity-policy-live");
    let (meshd, _agent, _instance) = cluster(&dir).await;
    let (inbound, _) = sidecar(&meshd, "web");
    let mut plaintext = tokio::net::TcpStream::connect(&inbound).await.unwrap();
    let (status, answer) = status_on(&mut plaintext).await;
    assert_eq!(status, 403, "mTLS only at first: {answer}");
    // (policy change, status of the next request on the same connection)
    let steps: [(&[&str], u16); 4] = [
        (&["--permissive"], 200),
        (&["--allow-from", "client"], 403),
        (&["--allow-all-mesh"], 200),
        (&["--permissive", "false"], 403),
    ];
    for (change, expected) in steps {
        let mut args = vec!["policy", "web"];
        args.extend_from_slice(change);
        args.push("--wait");
        meshd.ctl_ok(&args);
        let (status, answer) = status_on(&mut plaintext).await;
        assert_eq!(status, expected, "after {change:?}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cannot_pass_for_another_service() {
    let dir = TempDir::new("identity-impostor");
    let (meshd, _agent, client) = cluster_with_client(&dir).await;
    let (web_inbound, _) = sidecar(&meshd, "web");

    // web's own endpoint answers over mTLS.
    let http = mesh_tests::client::http1();
    let answer = mesh_tests::client::get(&http, &client, "web", "/").await.unwrap();
    assert_eq!(answer.status, 200);

    // Someone registers web's sidecar as an endpoint of service `payments`.
    let mut registry = mesh_proto::mesh::v1::registry_client::RegistryClient::new(meshd.channel().await);
    let endpoint = pb::Endpoint {
        service: "payments".into(),
        version: "v1".into(),
        addr: web_inbound,
        ready: true,
        meshed: true,
        quic: false,
    };
    registry.register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false }).await.unwrap();
    // The caller's sidecar wants payments' identity and sees web's: no request reaches it.
    let answer = eventually("calls to payments are refused", Duration::from_secs(10), || {
        let (http, client) = (http.clone(), client.clone());
        async move {
            let answer = mesh_tests::client::get(&http, &client, "payments", "/").await.ok()?;
            (answer.status != 404).then_some(answer)
        }
    })
    .await;
    assert_eq!(answer.status, 502, "{:?}", answer.body);
    assert_eq!(answer.header("x-mesh-error"), Some("connect-failed"));
    let why = String::from_utf8_lossy(&answer.body);
    assert!(why.contains("mTLS with payments"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_identities_may_call_a_service() {
    let dir = TempDir::new("identity-authz");
    let (meshd, _agent, client) = cluster_with_client(&dir).await;
    let (_, web_admin) = sidecar(&meshd, "web");
    let http = mesh_tests::client::http1();
    let call = || mesh_tests::client::get(&http, &client, "web", "/");
    assert_eq!(call().await.unwrap().status, 200, "every mesh identity may call by default");

    // Only frontend and admin: the client (identity `client`) is refused, with the reason.
    meshd.ctl_ok(&["policy", "web", "--allow-from", "frontend,admin", "--wait"]);
    let refused = call().await.unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.header("x-mesh-error"), Some("authz-denied"));
    let why = String::from_utf8_lossy(&refused.body);
    assert!(why.contains("spiffe://mesh.local/service/client may not call web"), "{why}");
    let denied = scrape(&web_admin)
        .await
        .sum("mesh_authz_denied_total", &[("caller", "spiffe://mesh.local/service/client")]);
    assert!(denied >= 1.0, "the refusal is counted with the caller's identity");

    // Allowed by name, then every mesh identity again.
    meshd.ctl_ok(&["policy", "web", "--allow-from", "client", "--wait"]);
    assert_eq!(call().await.unwrap().status, 200);
    meshd.ctl_ok(&["policy", "web", "--allow-from", "frontend", "--wait"]);
    assert_eq!(call().await.unwrap().status, 403);
    meshd.ctl_ok(&["policy", "web", "--allow-all-mesh", "--wait"]);
    assert_eq!(call().await.unwrap().status, 200);
    // A bad name is refused and changes nothing.
    let (code, _, stderr) = meshd.ctl(&["policy", "web", "--allow-from", "Not A Name"]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(call().await.unwrap().status, 200);
}

/// The admin address of every connected sidecar.
fn sidecar_admins(meshd: &Meshd) -> Vec<String> {
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    proxies.as_array().unwrap().iter().filter_map(|p| p["admin_addr"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_under_load_and_meet_new_handshakes() {
    let dir = TempDir::new("identity-renewal");
    let (meshd, _agent, client) = two_webs_and_a_client(&dir, &["--cert-ttl", "15s"]).await;
    let (_, client_admin) = sidecar(&meshd, "client");
    let admins = sidecar_admins(&meshd);
    assert_eq!(admins.len(), 3, "two webs and the client: {admins:?}");
    let expiry = |admin: String| async move {
        scrape(&admin).await.present("mesh_identity_cert_expiry_timestamp_seconds", &[])
    };
    let outbound_ok = || async {
        scrape(&client_admin)
            .await
            .present("mesh_tls_handshakes_total", &[("direction", "outbound"), ("result", "ok")])
    };
    let handshakes_before = outbound_ok().await;
    let mut last: Vec<f64> = Vec::new();
    for admin in &admins {
        last.push(expiry(admin.clone()).await);
    }

    // Every sidecar renews twice (about every 10 s) under constant load.
    let load = mesh_tests::client::Background::start(&client, "web", 2);
    let mut renewals = vec![0; admins.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while renewals.iter().any(|n| *n < 2) {
        assert!(std::time::Instant::now() < deadline, "renewals per sidecar within 90 s: {renewals:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (i, admin) in admins.iter().enumerate() {
            let now = expiry(admin.clone()).await;
            if now > last[i] {
                renewals[i] += 1;
                last[i] = now;
            }
        }
    }
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "failed requests across renewals: {:?}", tally.failures);
    assert!(tally.ok > 100, "traffic flowed: {}", tally.ok);
    // Renewed certificates were presented: the client opened new mTLS
    // connections to both webs after its renewals, and no handshake failed.
    let handshakes = outbound_ok().await - handshakes_before;
    assert!(handshakes >= 4.0, "only {handshakes} new outbound handshakes after two renewals");
    for admin in &admins {
        let failed = scrape(admin)
            .await
            .present("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", "failed")]);
        assert_eq!(failed, 0.0, "a handshake failed at {admin}");
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_waits_out_a_control_plane_outage_and_succeeds_before_expiry() {
    let dir = TempDir::new("identity-outage");
    let ttl = 30.0;
    let (meshd, _agent, client) = two_webs_and_a_client(&dir, &["--cert-ttl", "30s"]).await;
    let admins = sidecar_admins(&meshd);
    let expiry = |admin: String| async move {
        scrape(&admin).await.present("mesh_identity_cert_expiry_timestamp_seconds", &[])
    };
    let mut expiries = Vec::new();
    for admin in &admins {
        expiries.push(expiry(admin.clone()).await);
    }
    let load = mesh_tests::client::Background::start(&client, "web", 2);
    load.wait_for(100).await;

    // meshd dies before any sidecar's renewal is due (at 70 % ± 5 % of the life).
    let listen = meshd.listen.clone();
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let all_due = expiries.iter().cloned().fold(0.0, f64::max) - 0.25 * ttl + 1.0;
    assert!(unix_seconds() < all_due - 3.0, "the outage starts before the renewals are due");
    eventually("every sidecar's renewal came due during the outage", Duration::from_secs(40), || {
        let due = unix_seconds() > all_due;
        async move { due.then_some(()) }
    })
    .await;
    for (admin, before) in admins.iter().zip(&expiries) {
        let now = expiry(admin.clone()).await;
        assert_eq!(now, *before, "{admin} keeps the certificate it has while renewal fails");
        assert!(now > unix_seconds(), "{admin}'s certificate is still valid");
    }

    // meshd comes back at the same address: every sidecar renews before its expiry.
    let meshd = Meshd::start_on(&dir.path("data"), &listen);
    for (admin, before) in admins.iter().zip(&expiries) {
        let renewed_at = eventually("the sidecar renews once meshd is back", Duration::from_secs(20), || {
            let admin = admin.clone();
            async move { (expiry(admin).await > *before).then(unix_seconds) }
        })
        .await;
        assert!(renewed_at < *before, "{admin} renewed before its old certificate expired");
    }
    load.wait_for(100).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "requests failed around the outage: {:?}", tally.failures);
    drop(meshd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_check_reports_expiries_and_warns_before_them() {
    let dir = TempDir::new("identity-check");
    let (meshd, _agent, instance) = cluster(&dir).await;
    let rows = meshd.ctl_json(&["check"]);
    let rows = rows.as_array().unwrap();
    let ca = rows.iter().find(|r| r["what"] == "ca").expect("the CA is listed");
    assert_eq!(ca["status"], "ok");
    assert!(ca["name"].as_str().unwrap().contains("mesh root CA for mesh.local"), "{ca}");
    let proxy =
        rows.iter().find(|r| r["what"] == "proxy" && r["name"] == instance["id"]).expect("the sidecar");
    assert_eq!(proxy["status"], "ok", "{proxy}");
    assert_eq!(proxy["bundle_version"], 1);
    let in_a_day =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 24 * 3600;
    assert!(proxy["expires_unix"].as_u64().unwrap().abs_diff(in_a_day) < 120, "{proxy}");
    // meshd's own certificate (7 days, from the root) and the node's (24 h).
    let server = rows.iter().find(|r| r["what"] == "server").expect("meshd's certificate");
    assert_eq!(
        (server["status"].as_str(), server["root"].as_str()),
        (Some("ok"), ca["root"].as_str().map(|r| r.trim_end_matches(" (signs)"))),
        "{server}"
    );
    assert!(server["expires_unix"].as_u64().unwrap().abs_diff(in_a_day + 6 * 24 * 3600) < 120, "{server}");
    let node = rows.iter().find(|r| r["what"] == "node" && r["name"] == "node-a").expect("the node");
    assert_eq!(node["status"], "ok", "{node}");
    assert!(node["expires_unix"].as_u64().unwrap().abs_diff(in_a_day) < 120, "{node}");
    // Certificates of 24 h expire within two days: warned, exit code 4.
    let (code, out, stderr) = meshd.ctl(&["check", "--warn-within", "48h"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(out.contains("WARN: expires soon") && stderr.contains("need attention"), "{out}{stderr}");
}

/// The CA rows of `meshctl check` and the root each connected proxy's certificate is from.
fn roots_in_use(meshd: &Meshd) -> (Vec<String>, Vec<String>) {
    let rows = meshd.ctl_json(&["check"]);
    let rows = rows.as_array().unwrap();
    let of = |what: &str| -> Vec<String> {
        rows.iter().filter(|r| r["what"] == what).map(|r| r["root"].as_str().unwrap().to_owned()).collect()
    };
    (of("ca"), of("proxy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_in_stages_under_load_without_a_failed_request() {
    let dir = TempDir::new("identity-rotation");
    let (meshd, _agent, client) = two_webs_and_a_client(&dir, &[]).await;
    let (cas, _) = roots_in_use(&meshd);
    assert_eq!(cas.len(), 1, "{cas:?}");
    let old_root = cas[0].trim_end_matches(" (signs)").to_owned();

    let load = mesh_tests::client::Background::start(&client, "web", 2);
    load.wait_for(100).await;
    let out = meshd.ctl_ok(&["identity", "rotate-root", "--stage-timeout", "60s"]);
    load.wait_for(100).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "failed requests around the rotation: {:?}\n{out}", tally.failures);
    eprintln!("{out}");

    // Each stage is reported in order, each finished by every proxy.
    let stages: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix('[')?.split(']').next()).collect();
    let mut order = stages.clone();
    order.dedup();
    assert_eq!(order, ["add-root", "reissue", "remove-old-root", "done"], "{out}");
    assert_eq!(out.matches("proxies caught up").count(), 3, "{out}");

    // One root now, a new one, and every proxy's certificate is from it.
    let (cas, proxies) = roots_in_use(&meshd);
    assert_eq!(cas.len(), 1, "the old root left the bundle: {cas:?}");
    let new_root = cas[0].trim_end_matches(" (signs)").to_owned();
    assert_ne!(new_root, old_root);
    assert!(proxies.len() >= 3, "{proxies:?}");
    assert!(proxies.iter().all(|root| *root == new_root), "{proxies:?} vs {new_root}");
    // Every proxy and node holds the final bundle (versions 2, 3, 4: one
    // per stage), and the node's certificate is from the new root too.
    let rows = meshd.ctl_json(&["check"]);
    let rows = rows.as_array().unwrap();
    for row in rows {
        assert_eq!(row["bundle_version"], 4, "{row}");
    }
    let nodes: Vec<_> = rows.iter().filter(|r| r["what"] == "node").collect();
    assert!(!nodes.is_empty() && nodes.iter().all(|n| n["root"] == new_root.as_str()), "{nodes:?}");

    // A proxy that starts now gets a certificate from the new root and its
    // new connections are accepted by sidecars that trust only that root.
    let late = meshd.mesh_client_named("late", &dir.path("late.toml"), "").await;
    let late_load = mesh_tests::client::Background::start(&late, "web", 1);
    late_load.wait_for(20).await;
    let tally = late_load.stop().await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);

    // Nothing to resume: a second run rotates again from the start.
    let again = meshd.ctl_ok(&["identity", "rotate-root", "--stage-timeout", "60s"]);
    assert!(again.contains("[done]"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_between_sidecars_go_over_mtls_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("identity-upgrade");
    let (meshd, _agent, client) = cluster_with_client(&dir).await;
    let (_, web_admin) = sidecar(&meshd, "web");
    let handshakes_before = inbound_handshakes(&web_admin, "ok").await;

    let mut stream = tokio::net::TcpStream::connect(&client).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        let mut byte = [0u8; 1];
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(read, 1, "closed early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // After the switch, bytes flow both ways through both sidecars.
    for message in ["ping", "some more bytes"] {
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await.unwrap().unwrap();
        assert_eq!(echoed, message.as_bytes());
    }
    // The upgrade took a connection of its own, and it was an mTLS one (the
    // inbound refuses plaintext).
    let handshakes_after = inbound_handshakes(&web_admin, "ok").await;
    assert!(handshakes_after > handshakes_before, "{handshakes_before} → {handshakes_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sidecar_keeps_the_old_root_trusted_until_it_holds_a_new_certificate() {
    let dir = TempDir::new("identity-stalled-rotation");
    let (meshd, _agent, client) = cluster_with_client(&dir).await;
    let web = meshd.instances().into_iter().find(|i| i["job"] == "web").unwrap();
    let (web_proxy, web_proxy_pid) =
        (web["id"].as_str().unwrap().to_owned(), web["proxy_pid"].as_i64().unwrap());
    let (cas, _) = roots_in_use(&meshd);
    let old_root = cas[0].trim_end_matches(" (signs)").to_owned();

    // web's sidecar stops answering while the root rotates.
    // SAFETY: signalling a process this test's cluster started.
    unsafe { libc::kill(web_proxy_pid as i32, libc::SIGSTOP) };
    let (code, out, err) = meshd.ctl(&["identity", "rotate-root", "--stage-timeout", "8s"]);
    assert_eq!(code, 1, "the rotation stops rather than strand the stalled sidecar:\n{out}{err}");
    assert!(out.contains("[reissue]") && out.contains(&web_proxy), "{out}{err}");
    assert!(!out.contains("[remove-old-root]"), "the old root stays: {out}");
    let (code, check, _) = meshd.ctl(&["check"]);
    assert_eq!(code, 4, "check says a proxy is behind:\n{check}");
    assert!(check.contains("BEHIND"), "{check}");

    // It resumes: it renews under the new root by itself, and the rotation completes.
    // SAFETY: as above.
    unsafe { libc::kill(web_proxy_pid as i32, libc::SIGCONT) };
    eventually("web's sidecar holds a certificate from the new root", Duration::from_secs(30), || {
        let (_, out, _) = meshd.ctl(&["check", "-o", "json"]);
        let rows: Value = serde_json::from_str(&out).unwrap_or_default();
        let web_root = rows.as_array().and_then(|rows| {
            rows.iter()
                .find(|r| r["name"] == web_proxy.as_str())
                .and_then(|r| r["root"].as_str().map(str::to_owned))
        });
        let renewed = web_root.is_some_and(|root| !root.is_empty() && root != old_root);
        async move { renewed.then_some(()) }
    })
    .await;
    let again = meshd.ctl_ok(&["identity", "rotate-root", "--stage-timeout", "30s"]);
    assert!(again.contains("[done]"), "{again}");
    let tally = mesh_tests::client::closed_loop(&client, "web", 20, 2).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
}
