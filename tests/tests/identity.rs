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
    let agent = Agent::start(&meshd.listen, "node-a", "127.0.0.2", 1000, &dir.path("agent"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(&file, JOB).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let instance = eventually("the instance runs", Duration::from_secs(30), || {
        let found = meshd
            .ctl_json(&["get", "instances"])
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["state"] == "running" && i["ready"] == true)
            .cloned();
        async move { found }
    })
    .await;
    (meshd, agent, instance)
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

    let mut identity = IdentityClient::connect(format!("http://{}", meshd.listen)).await.unwrap();
    let token =
        |node: &str, instance: &str| pb::TokenRequest { node: node.into(), instance: instance.into() };
    let id = instance["id"].as_str().unwrap();

    // The scheduler vouches only for what it placed, where it placed it.
    for (node, instance) in [("node-b", id), ("node-a", "web-9"), ("node-a", "")] {
        let refused = identity.issue_token(token(node, instance)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{node} {instance}");
        assert!(refused.message().contains("is not placed on node"), "{}", refused.message());
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
    let dir = TempDir::new("identity-keys");
    let (_meshd, _agent, _instance) = cluster(&dir).await;
    let agent_files = files(&dir.path("agent"));
    assert!(agent_files.iter().any(|f| f.ends_with("proxy.stderr.log")), "{agent_files:?}");
    for file in agent_files.iter().chain(files(&dir.path("data")).iter()) {
        let content = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&content);
        // The store holds the CA's key by design (meshd.redb); nothing else may hold a key.
        if file.ends_with("meshd.redb") {
            continue;
        }
        assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", file.display());
    }
}
