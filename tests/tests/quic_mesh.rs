//! QUIC through the control plane: a scheduled instance's endpoint
//! announces that its sidecar serves QUIC; `meshctl policy --transport
//! quic` makes callers reach it over HTTP/3, and `meshctl status --peers`
//! shows each proxy's transport per peer; `--transport tcp` takes it back.

use std::time::Duration;

use mesh_tests::client::{get, http1};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};

const WEB: &str = r#"
name = "web"
version = "v1"
replicas = 1

[task]
command = "mesh-echo"

[resources]
cpu_millis = 50
memory_mb = 32
"#;

/// The admin address of the proxy of `service`, from `meshctl get proxies`.
fn admin_of(meshd: &Meshd, service: &str) -> String {
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    let rows = proxies.as_array().expect("proxy rows");
    let proxy = rows.iter().find(|p| p["service"] == service).unwrap_or_else(|| panic!("{proxies}"));
    proxy["admin_addr"].as_str().expect("an admin address").to_owned()
}

/// meshd (with extra flags) and one agent running `web`, and the upstream
/// address of a meshed client that calls it. The agent lives as long as
/// its binding: bind it by name, not to `_` or `..`.
struct WebMesh {
    meshd: Meshd,
    _agent: Agent,
    client: String,
}

async fn web_mesh(dir: &TempDir, meshd_flags: &[&str]) -> WebMesh {
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", meshd_flags);
    let agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    std::fs::write(dir.path("web.toml"), WEB).unwrap();
    meshd.ctl_ok(&["job", "run", dir.path("web.toml").to_str().unwrap()]);
    meshd.running("web", 1, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    WebMesh { meshd, _agent: agent, client }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_set_to_quic_is_reached_over_quic_and_status_shows_each_peer() {
    let dir = TempDir::new("quic-mesh");
    let WebMesh { meshd, _agent, client } = web_mesh(&dir, &[]).await;

    // The instance's sidecar serves QUIC, and its endpoint says so.
    let endpoints = meshd.ctl_json(&["get", "endpoints"]);
    let web = endpoints.as_array().unwrap().iter().find(|e| e["service"] == "web").expect("web's endpoint");
    assert_eq!((web["meshed"].as_bool(), web["quic"].as_bool()), (Some(true), Some(true)), "{endpoints}");
    let peer = web["addr"].as_str().unwrap().to_owned();

    // Over TCP by default: no peer rows.
    let http = http1();
    for _ in 0..5 {
        assert_eq!(get(&http, &client, "web", "/").await.unwrap().status, 200);
    }
    let web_admin = admin_of(&meshd, "web");
    let served_over_quic =
        || async { scrape(&web_admin).await.sum("mesh_quic_requests_total", &[("direction", "inbound")]) };
    assert_eq!(served_over_quic().await, 0.0);

    // Set to QUIC: the next requests cross over HTTP/3.
    meshd.ctl_ok(&["policy", "web", "--transport", "quic", "--wait"]);
    for i in 0..20 {
        let answer = get(&http, &client, "web", "/").await.unwrap();
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
    }
    // The first request opens the connection while it goes over TCP.
    assert!(served_over_quic().await >= 19.0, "{}", served_over_quic().await);

    // meshctl status shows the client's proxy reaching web's peer over QUIC.
    let peers = eventually("the client's proxy reports its peer", Duration::from_secs(15), || async {
        let peers = meshd.ctl_json(&["status", "--peers"]);
        let rows = peers.as_array().cloned().unwrap_or_default();
        rows.iter().any(|row| row["peer"] == peer.as_str() && row["transport"] == "quic").then_some(peers)
    })
    .await;
    let row = &peers.as_array().unwrap()[0];
    assert_eq!((row["service"].as_str(), row["why"].as_str()), (Some("web"), Some("")), "{peers}");
    let table = meshd.ctl_ok(&["status"]);
    assert!(table.lines().any(|line| line.contains("1/1")), "the quic_peers column: {table}");
    let table = meshd.ctl_ok(&["status", "--peers"]);
    assert!(table.lines().any(|line| line.contains(&peer) && line.contains("quic")), "{table}");

    // Back to TCP: requests stop crossing over QUIC, and no peer is listed.
    meshd.ctl_ok(&["policy", "web", "--transport", "tcp", "--wait"]);
    let before = served_over_quic().await;
    for _ in 0..5 {
        assert_eq!(get(&http, &client, "web", "/").await.unwrap().status, 200);
    }
    assert_eq!(served_over_quic().await, before);
    eventually("no peer is listed once web is on TCP", Duration::from_secs(15), || async {
        let peers = meshd.ctl_json(&["status", "--peers"]);
        peers.as_array().is_some_and(|rows| rows.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_a_root_rotation_under_load_over_quic_fail_no_request() {
    let dir = TempDir::new("quic-identity");
    let WebMesh { meshd, _agent, client } = web_mesh(&dir, &["--cert-ttl", "15s"]).await;
    meshd.ctl_ok(&["policy", "web", "--transport", "quic", "--wait"]);
    let (web_admin, client_admin) = (admin_of(&meshd, "web"), admin_of(&meshd, "client"));
    let expiry = |admin: String| async move {
        scrape(&admin).await.present("mesh_identity_cert_expiry_timestamp_seconds", &[])
    };
    let quic_handshakes = || async {
        let metrics = scrape(&web_admin).await;
        (
            metrics.sum("mesh_quic_requests_total", &[("direction", "inbound")]),
            metrics.sum("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", "failed")]),
        )
    };
    let (expiries, (served_before, _)) =
        ((expiry(web_admin.clone()).await, expiry(client_admin.clone()).await), quic_handshakes().await);

    // Both sidecars renew (every ~10 s) while requests flow over QUIC.
    let load = mesh_tests::client::Background::start(&client, "web", 2);
    load.wait_for(50).await;
    eventually("both sidecars renewed", Duration::from_secs(60), || async {
        let now = (expiry(web_admin.clone()).await, expiry(client_admin.clone()).await);
        (now.0 > expiries.0 && now.1 > expiries.1).then_some(())
    })
    .await;
    load.wait_for(50).await;

    // Then the root rotates, in stages, under the same load.
    let out = meshd.ctl_ok(&["identity", "rotate-root", "--stage-timeout", "60s"]);
    assert!(out.contains("[done]"), "{out}");
    load.wait_for(100).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "failed requests: {:?}\n{out}", tally.failures);

    // QUIC carried them: new connections with the new certificates, no
    // handshake refused, no fall back to TCP.
    let (served, failed_handshakes) = quic_handshakes().await;
    let sent = served - served_before;
    let client_metrics = scrape(&client_admin).await;
    let quic_lines = |scrape: &mesh_tests::metrics::Scrape| {
        format!(
            "{:?}",
            scrape.0.iter().filter(|(k, _)| k.contains("quic") || k.contains("tls")).collect::<Vec<_>>()
        )
    };
    assert!(
        sent >= tally.ok as f64 * 0.9,
        "{sent} of {} requests over QUIC; the client's:\n{}",
        tally.ok,
        quic_lines(&client_metrics)
    );
    assert_eq!(failed_handshakes, 0.0);
    assert_eq!(client_metrics.sum("mesh_quic_fallbacks_total", &[]), 0.0);
    let opened =
        client_metrics.sum("mesh_tls_handshakes_total", &[("direction", "outbound"), ("result", "ok")]);
    assert!(opened >= 3.0, "a QUIC connection per certificate: {opened} handshakes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_wide_default_of_quic_holds_until_a_service_says_otherwise() {
    let dir = TempDir::new("quic-default");
    let WebMesh { meshd, _agent, client } = web_mesh(&dir, &["--default-transport", "quic"]).await;
    let web_admin = admin_of(&meshd, "web");
    let served_over_quic =
        || async { scrape(&web_admin).await.sum("mesh_quic_requests_total", &[("direction", "inbound")]) };

    // No policy names a transport: the mesh's default, QUIC, holds.
    let http = http1();
    for i in 0..20 {
        assert_eq!(get(&http, &client, "web", "/").await.unwrap().status, 200, "request {i}");
    }
    assert!(served_over_quic().await >= 19.0, "{}", served_over_quic().await);

    // A service's own transport wins over the default.
    meshd.ctl_ok(&["policy", "web", "--transport", "tcp", "--wait"]);
    let before = served_over_quic().await;
    for _ in 0..5 {
        assert_eq!(get(&http, &client, "web", "/").await.unwrap().status, 200);
    }
    assert_eq!(served_over_quic().await, before);
}
