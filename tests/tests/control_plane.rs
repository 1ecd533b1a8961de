//! The control plane with real processes: meshd, proxies under its
//! control, meshctl. Traffic shifting with --wait, a server killed and
//! restarted under load, a stuck subscriber, bad input, refused updates.

use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_tests::client::{closed_loop, split_tolerance, Background};
use mesh_tests::process::{Echo, Meshd, Proxy};
use mesh_tests::{eventually, TempDir};

/// meshd with echo v1 and v2 registered, and a proxy under its control.
struct Mesh {
    _dir: TempDir,
    meshd: Meshd,
    v1: Echo,
    v2: Echo,
    proxy: Proxy,
}

fn mesh(name: &str) -> Mesh {
    let dir = TempDir::new(name);
    let meshd = Meshd::start(&dir.path("data"));
    let v1 = Echo::start("v1", &[]);
    let v2 = Echo::start("v2", &[]);
    for (echo, version) in [(&v1, "v1"), (&v2, "v2")] {
        meshd.ctl_ok(&["register", "echo", "--version", version, "--addr", &echo.addr]);
    }
    let proxy = Proxy::start_control(&meshd, "client", &["--upstream", "echo=127.0.0.1:0"]);
    Mesh { _dir: dir, meshd, v1, v2, proxy }
}

fn status_version(meshd: &Meshd) -> u64 {
    let (code, stdout, _) = meshd.ctl(&["status"]);
    assert_eq!(code, 0);
    stdout.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("status prints the version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifting_in_ten_point_steps_under_load_fails_nothing() {
    let mesh = mesh("shift");
    mesh.meshd.ctl_ok(&["split", "echo", "v1=100", "v2=0", "--wait"]);
    let background = Background::start(&mesh.proxy.outbound(), "echo", 4);
    for step in 0..=10u32 {
        let v2 = step * 10;
        let (w1, w2) = (format!("v1={}", 100 - v2), format!("v2={v2}"));
        let stdout = mesh.meshd.ctl_ok(&["split", "echo", &w1, &w2, "--wait", "--timeout", "10s"]);
        assert!(stdout.contains("applied version"), "{stdout}");
        let tally = closed_loop(&mesh.proxy.outbound(), "echo", 4_000, 8).await;
        assert_eq!(tally.failed(), 0, "step {v2}%: {:?}", tally.failures);
        let (observed, bound) = (tally.share("v2"), split_tolerance(tally.answered(), f64::from(v2)));
        assert!((observed - f64::from(v2)).abs() <= bound, "step {v2}%: v2 got {observed:.2}% (±{bound:.2})");
    }
    // Clearing the split lets every ready endpoint share; deregistering one
    // takes it out of every table.
    mesh.meshd.ctl_ok(&["split", "echo", "--clear", "--wait"]);
    assert_eq!(mesh.meshd.ctl_json(&["get", "splits"]), serde_json::json!([]));
    let shared = closed_loop(&mesh.proxy.outbound(), "echo", 2_000, 8).await;
    // Both share. Not evenly: P2C on peak-EWMA sends more to whichever is
    // quicker at the moment (seen: 85/15 on a loaded machine); what it
    // guarantees is that in-flight requests raise a busy endpoint's cost, so
    // neither starves under 8 concurrent callers.
    assert!(shared.share("v1") >= 5.0 && shared.share("v2") >= 5.0, "{:?}", shared.by_version);
    mesh.meshd.ctl_ok(&["deregister", "echo", "--addr", &mesh.v2.addr]);
    let endpoints = mesh.meshd.ctl_json(&["get", "endpoints"]);
    assert_eq!(endpoints.as_array().unwrap().len(), 1, "{endpoints}");
    assert_eq!(endpoints[0]["addr"], mesh.v1.addr.as_str());
    mesh_tests::eventually(
        "the deregistered endpoint leaves the proxy's table",
        Duration::from_secs(10),
        || {
            let outbound = mesh.proxy.outbound();
            async move { (closed_loop(&outbound, "echo", 200, 4).await.share("v1") == 100.0).then_some(()) }
        },
    )
    .await;
    let background = background.stop().await;
    assert_eq!(background.failed(), 0, "the constant load saw failures: {:?}", background.failures);
    assert!(background.ok > 100, "the constant load ran: {}", background.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_no_request_and_no_state() {
    let dir = TempDir::new("kill-server");
    let data = dir.path("data");
    let meshd = Meshd::start(&data);
    let v1 = Echo::start("v1", &[]);
    let v2 = Echo::start("v2", &[]);
    for (echo, version) in [(&v1, "v1"), (&v2, "v2")] {
        meshd.ctl_ok(&["register", "echo", "--version", version, "--addr", &echo.addr]);
    }
    let proxy = Proxy::start_control(&meshd, "client", &[]);
    meshd.ctl_ok(&["split", "echo", "v1=30", "v2=70", "--wait"]);
    meshd.ctl_ok(&["policy", "echo", "--timeout", "3s", "--retry-attempts", "2", "--wait"]);
    let version = status_version(&meshd);
    let background = Background::start(&proxy.outbound(), "echo", 4);
    background.wait_for(200).await;

    let listen = meshd.listen.clone();
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    // The proxy keeps serving its last table while the server is gone.
    background.wait_for(1_000).await;

    let meshd = Meshd::start_on(&data, &listen);
    assert_eq!(status_version(&meshd), version, "the version survives the restart");
    eventually("the proxy reconnects and is current", Duration::from_secs(30), || {
        let proxies = meshd.ctl_json(&["get", "proxies"]);
        let current = proxies.as_array().is_some_and(|list| {
            list.len() == 1 && list[0]["connected"] == true && list[0]["acked_version"] == version
        });
        async move { current.then_some(()) }
    })
    .await;
    let splits = meshd.ctl_json(&["get", "splits"]);
    assert_eq!(splits[0]["weights"], serde_json::json!({"v1": 30, "v2": 70}), "{splits}");
    assert_control_metrics(&meshd, version).await;
    let services = meshd.ctl_json(&["get", "services"]);
    assert_eq!(services[0]["policy"]["timeout_ms"], 3000, "{services}");
    assert_eq!(services[0]["policy"]["retry_attempts"], 2, "{services}");
    // And the restarted server still drives the proxy.
    meshd.ctl_ok(&["split", "echo", "v1=0", "v2=100", "--wait"]);
    background.wait_for(200).await;
    let tally = background.stop().await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    assert_eq!(closed_loop(&proxy.outbound(), "echo", 200, 4).await.share("v2"), 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_delays_no_one_and_costs_bounded_memory() {
    let mesh = mesh("stuck");
    // A thousand endpoints make each update of "bulk" ~40 KB, so a backlog would show.
    let mut registry = registry_client(&mesh.meshd).await;
    for port in 20_000..21_000u32 {
        register(&mut registry, &format!("127.0.0.9:{port}"), true).await;
    }
    // A subscriber that says hello and then never reads its stream.
    let channel = mesh.meshd.channel().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let hello = pb::Hello { proxy_id: "stuck-proxy".into(), service: "stuck".into(), ..Default::default() };
    tx.send(pb::SubscribeRequest { message: Some(pb::subscribe_request::Message::Hello(hello)) })
        .await
        .unwrap();
    let _stuck_stream = pb::discovery_client::DiscoveryClient::new(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    mesh.meshd.ctl_ok(&["split", "echo", "v1=50", "v2=50"]);
    eventually("the stuck subscriber is reported stalled", Duration::from_secs(15), || {
        let status = mesh.meshd.ctl_json(&["status"]);
        let stalled =
            status.as_array().unwrap().iter().any(|p| p["proxy_id"] == "stuck-proxy" && p["stalled"] == true);
        async move { stalled.then_some(()) }
    })
    .await;
    // Changes with --wait complete for the healthy proxy, well inside 2 s.
    for step in 0..10 {
        let (w1, w2) = (format!("v1={}", 100 - step * 10), format!("v2={}", step * 10));
        mesh.meshd.ctl_ok(&["split", "echo", &w1, &w2, "--wait", "--timeout", "2s"]);
    }
    // Memory: flap one endpoint of the large service many times.
    for i in 0..100 {
        register(&mut registry, "127.0.0.9:20000", i % 2 == 0).await;
    }
    let before = rss_kib(mesh.meshd.process.pid());
    for i in 0..500 {
        register(&mut registry, "127.0.0.9:20000", i % 2 == 0).await;
    }
    let after = rss_kib(mesh.meshd.process.pid());
    // 500 updates of ~40 KB would be ~20 MB if they queued for the stuck subscriber.
    assert!(after.saturating_sub(before) < 5 * 1024, "meshd grew from {before} KiB to {after} KiB");
    let stdout = mesh.meshd.ctl_ok(&["split", "echo", "v1=100", "v2=0", "--wait", "--timeout", "2s"]);
    assert!(stdout.contains("not waited for: stuck-proxy"), "{stdout} {}", mesh.meshd.ctl_json(&["status"]));
}

async fn registry_client(meshd: &Meshd) -> pb::registry_client::RegistryClient<tonic::transport::Channel> {
    pb::registry_client::RegistryClient::new(meshd.channel().await)
}

async fn register(
    registry: &mut pb::registry_client::RegistryClient<tonic::transport::Channel>,
    addr: &str,
    ready: bool,
) {
    let endpoint = pb::Endpoint {
        service: "bulk".into(),
        version: "v1".into(),
        addr: addr.into(),
        ready,
        meshed: false,
        quic: false,
    };
    registry.register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false }).await.unwrap();
}

/// meshd's /metrics passes promtool and reports the proxy and the version.
async fn assert_control_metrics(meshd: &Meshd, version: u64) {
    mesh_tests::metrics::promtool_check(&mesh_tests::metrics::text(&meshd.admin).await);
    let scrape = mesh_tests::metrics::scrape(&meshd.admin).await;
    assert_eq!(scrape.sum("meshd_connected_proxies", &[]), 1.0);
    assert_eq!(scrape.sum("meshd_config_version", &[]), version as f64);
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let mesh = mesh("bad-input");
    mesh.meshd.ctl_ok(&["split", "echo", "v1=90", "v2=10", "--wait"]);
    let version = status_version(&mesh.meshd);
    // (arguments, words stderr must contain)
    let table: &[(&[&str], &str)] = &[
        (&["split", "echo", "v1=50", "v3=50"], "unknown version \"v3\""),
        (&["split", "echo", "v1=50", "v2=60"], "add up to 110"),
        (&["split", "echo", "v1=0", "v2=0"], "add up to 0"),
        (&["split", "nope", "v1=100"], "unknown service \"nope\""),
        (&["split", "echo", "v1=abc"], "not a whole number"),
        (&["split", "echo", "v1"], "not VERSION=WEIGHT"),
        (&["split", "echo"], "required"),
        (&["policy", "echo", "--timeout", "soon"], "soon"),
        (&["policy", "echo", "--retry-attempts", "0"], "retry-attempts"),
        (&["policy", "echo", "--protocol", "smtp"], "smtp"),
        (&["register", "echo", "--version", "v1", "--addr", "not-an-address"], "not an IP:port"),
        (&["deregister", "echo", "--addr", "127.0.0.1:1"], "no endpoint"),
        (&["get", "everything"], "everything"),
        (&["frobnicate"], "frobnicate"),
    ];
    for (args, words) in table {
        let (code, _, stderr) = mesh.meshd.ctl(args);
        assert_ne!(code, 0, "meshctl {args:?} must fail");
        assert!(stderr.contains(words), "meshctl {args:?}: stderr should name {words:?}: {stderr}");
    }
    assert_eq!(status_version(&mesh.meshd), version, "nothing changed on the server");
    let splits = mesh.meshd.ctl_json(&["get", "splits"]);
    assert_eq!(splits[0]["weights"], serde_json::json!({"v1": 90, "v2": 10}));
    // An unreachable server is named.
    let (code, _, stderr) = mesh_tests::process::run(
        &mesh_tests::bin("meshctl"),
        &["--server", "127.0.0.1:1", "--credentials", &mesh.meshd.credentials, "get", "services"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot reach meshd at 127.0.0.1:1"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_shows_in_status_with_the_reason() {
    let mesh = mesh("refused");
    let upstream = mesh.proxy.upstream("echo");
    // The proxy serves "echo" as HTTP on its upstream port; switching the
    // service to opaque TCP needs a restart, so it refuses the update.
    let (code, _, stderr) =
        mesh.meshd.ctl(&["policy", "echo", "--protocol", "tcp", "--wait", "--wait-timeout", "3s"]);
    assert_ne!(code, 0, "--wait fails when a proxy refuses");
    assert!(stderr.contains("refused") && stderr.contains("restart the proxy"), "{stderr}");
    let status = mesh.meshd.ctl_json(&["status"]);
    let proxy = &status.as_array().unwrap()[0];
    assert!(proxy["rejected_reason"].as_str().unwrap().contains("changed protocol"), "{status}");
    assert!(proxy["lag"].as_u64().unwrap() >= 1, "{status}");
    // The table in force keeps serving.
    let tally = closed_loop(&upstream, "echo", 50, 2).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_route_keeps_its_last_table_and_holds_back_nothing_else() {
    let dir = TempDir::new("nack");
    let meshd = Meshd::start(&dir.path("data"));
    let web = Echo::start("v1", &[]);
    let api = Echo::start("v1", &[]);
    meshd.ctl_ok(&["register", "web", "--version", "v1", "--addr", &web.addr]);
    meshd.ctl_ok(&["register", "api", "--version", "v1", "--addr", &api.addr]);
    // web has its own upstream port, started for HTTP.
    let proxy = Proxy::start_control(&meshd, "client", &["--upstream", "web=127.0.0.1:0"]);
    let web_port = proxy.upstream("web");
    meshd.ctl_ok(&["policy", "api", "--timeout", "5s", "--wait"]);
    assert_eq!(closed_loop(&web_port, "web", 50, 2).await.ok, 50);

    // web turns TCP: this proxy cannot without a restart, says so, and keeps
    // serving web as it was.
    let (code, stdout, stderr) =
        meshd.ctl(&["policy", "web", "--protocol", "tcp", "--wait", "--timeout", "3s"]);
    assert_ne!(code, 0, "the change cannot converge: {stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("restart the proxy"),
        "the refusal names its cause: {stdout}{stderr}"
    );
    let tally = closed_loop(&web_port, "web", 50, 2).await;
    assert_eq!(tally.ok, 50, "web still served over HTTP: {:?}", tally.failures);

    // An unrelated change still reaches the table: a second api endpoint gets traffic.
    let api2 = Echo::start("v2", &[]);
    meshd.ctl_ok(&["register", "api", "--version", "v2", "--addr", &api2.addr]);
    eventually("the new api endpoint is in the proxy's table", Duration::from_secs(10), || {
        let outbound = proxy.outbound();
        async move { (closed_loop(&outbound, "api", 100, 4).await.share("v2") > 0.0).then_some(()) }
    })
    .await;
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    assert!(proxies[0]["rejected_reason"].as_str().unwrap_or_default().contains("\"web\""), "{proxies}");

    // Undoing the change brings the proxy back in line, with everything applied.
    meshd.ctl_ok(&["policy", "web", "--protocol", "http", "--wait", "--timeout", "10s"]);
    let version = status_version(&meshd);
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    assert_eq!(proxies[0]["acked_version"], version, "{proxies}");
    assert_eq!(closed_loop(&web_port, "web", 50, 2).await.ok, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_contact_shows_whether_a_quiet_proxy_is_alive() {
    let dir = TempDir::new("last-contact");
    let meshd = Meshd::start(&dir.path("data"));
    let proxy = Proxy::start_control(&meshd, "client", &["--control-keepalive", "300ms"]);
    let last_contact_ms_ago = || {
        let proxies = meshd.ctl_json(&["get", "proxies"]);
        proxies[0]["last_contact_ms_ago"].as_u64()
    };
    eventually("the proxy is connected", Duration::from_secs(10), || {
        let seen = last_contact_ms_ago();
        async move { seen }
    })
    .await;
    // No change for three seconds: a healthy, quiet proxy is still in contact.
    let watch_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < watch_until {
        let ago = last_contact_ms_ago().expect("a last contact");
        assert!(ago < 2_000, "a live proxy's last contact is {ago} ms ago");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A stopped proxy's last contact grows.
    proxy.process.signal(libc::SIGSTOP);
    eventually("a stopped proxy's last contact ages", Duration::from_secs(10), || {
        let old = last_contact_ms_ago().is_some_and(|ago| ago > 3_000);
        async move { old.then_some(()) }
    })
    .await;
    proxy.process.signal(libc::SIGCONT);
    eventually("it is back in contact", Duration::from_secs(10), || {
        let fresh = last_contact_ms_ago().is_some_and(|ago| ago < 2_000);
        async move { fresh.then_some(()) }
    })
    .await;
}
