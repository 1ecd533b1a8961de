//! The proxy's metrics as Prometheus sees them: `promtool check metrics`
//! passes, and a real Prometheus scraping the proxy counts the requests.

use std::process::Command;
use std::time::Duration;

use mesh_tests::client::{closed_loop, get, http1};
use mesh_tests::metrics::text;
use mesh_tests::process::{Echo, Process, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, free_port, TempDir};

/// A real Prometheus on a free port with `config` (YAML); returns it and
/// its API address.
fn start_prometheus(dir: &TempDir, config: &str) -> (Process, String) {
    let port = free_port();
    let path = dir.path("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let prometheus = Process::start_quiet(Command::new("prometheus").args([
        &format!("--config.file={}", path.display()),
        &format!("--storage.tsdb.path={}", dir.path("tsdb").display()),
        &format!("--web.listen-address=127.0.0.1:{port}"),
    ]));
    (prometheus, format!("127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_prometheus_counts_requests() {
    let dir = TempDir::new("prometheus");
    let v1 = Echo::start("v1", &[]);
    let v2 = Echo::start("v2", &["--fail-rate", "1"]);
    let path = dir.path("proxy.toml");
    let service = ServiceSpec::new("echo")
        .line("split = { v1 = 100, v2 = 0 }")
        .endpoint(&v1.addr, "v1")
        .endpoint(&v2.addr, "v2");
    std::fs::write(&path, render(&[service], &[], None)).unwrap();
    let proxy = Proxy::start(&path);
    let tally = closed_loop(&proxy.outbound(), "echo", 150, 4).await;
    assert_eq!(tally.ok, 150);
    // Every family appears once something has been recorded.
    let _ = get(&http1(), &proxy.outbound(), "nope", "/").await;

    let metrics = text(&proxy.admin()).await;
    mesh_tests::metrics::promtool_check(&metrics);
    // The default shows six latency bounds and +Inf; `?detail=full` every
    // bound; the counts agree.
    let full = get(&http1(), &proxy.admin(), &proxy.admin(), "/metrics?detail=full").await.unwrap();
    let full = String::from_utf8_lossy(&full.body).into_owned();
    mesh_tests::metrics::promtool_check(&full);
    let v1_buckets = |text: &str| -> Vec<String> {
        let series = "mesh_http_request_duration_seconds_bucket{direction=\"outbound\",service=\"echo\",version=\"v1\"";
        text.lines().filter(|line| line.starts_with(series)).map(str::to_owned).collect()
    };
    let (default_buckets, full_buckets) = (v1_buckets(&metrics), v1_buckets(&full));
    assert_eq!((default_buckets.len(), full_buckets.len()), (7, 15), "{default_buckets:?}\n{full_buckets:?}");
    assert!(
        default_buckets.iter().all(|line| full_buckets.contains(line)),
        "{default_buckets:?}\n{full_buckets:?}"
    );
    assert!(default_buckets.last().unwrap().ends_with("} 150"), "{default_buckets:?}");

    // Prometheus scrapes the full set when its scrape config asks.
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mesh-proxy\n    params:\n      detail: [full]\n    static_configs:\n      - targets: ['{}']\n",
        proxy.admin()
    );
    let (_prometheus, api) = start_prometheus(&dir, &config);
    let query = "/api/v1/query?query=sum(mesh_http_requests_total%7Bdirection%3D%22outbound%22%2Cservice%3D%22echo%22%2Ccode%3D%22200%22%7D)";
    let value = eventually("Prometheus has scraped the proxy", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let answer = get(&http1(), &api, &api, query).await.ok()?;
            let body: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
            body["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()
        }
    })
    .await;
    assert_eq!(value, 150.0, "Prometheus counts what the client sent");
    let buckets = crate::query(
        &api,
        "count(mesh_http_request_duration_seconds_bucket{direction=\"outbound\",service=\"echo\",version=\"v1\"})",
    )
    .await
    .expect("a bucket count");
    assert_eq!(buckets[0]["value"][1], "15", "every bound: {buckets:?}");
}

/// One PromQL query's result vector from Prometheus's API.
async fn query(api: &str, promql: &str) -> Option<Vec<serde_json::Value>> {
    let encoded: String = promql
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let answer = get(&http1(), api, api, &format!("/api/v1/query?query={encoded}")).await.ok()?;
    let body: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
    body["data"]["result"].as_array().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_pointed_at_meshd_finds_every_sidecar_and_sees_the_split() {
    let dir = TempDir::new("prometheus-sd");
    // The shipped configuration and rules are valid.
    let shipped = mesh_tests::workspace_dir().join("docs/prometheus");
    let checks = [
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "mesh-rules.yml"),
        ("check", "rules", "mesh-alerts.yml"),
        // The alerts fire on the series they are meant for, and only then.
        ("test", "rules", "mesh-alerts.test.yml"),
    ];
    for (verb, what, file) in checks {
        let output =
            Command::new("promtool").args([verb, what]).arg(file).current_dir(&shipped).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {verb} {what} {file}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let meshd = mesh_tests::process::Meshd::start_dev_demo(&dir.path("data"));
    // Every demo instance is up beside its sidecar.
    let instances: std::collections::BTreeSet<String> =
        eventually("the demo runs", Duration::from_secs(60), || {
            let list = meshd.instances();
            let ids: std::collections::BTreeSet<String> = list
                .iter()
                .filter(|i| i["state"] == "running" && i["ready"] == true)
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect();
            async move { (ids.len() == 5).then_some(ids) }
        })
        .await;

    // The shipped configuration, pointed at this meshd and scraping faster.
    let config = std::fs::read_to_string(shipped.join("prometheus.yml"))
        .unwrap()
        .replace("127.0.0.1:7401", &meshd.admin)
        .replace("15s", "1s")
        .replace("5s", "1s")
        .replace("- mesh-", &format!("- {}/mesh-", shipped.display()));
    let (_prometheus, api) = start_prometheus(&dir, &config);

    // `up` for meshd and for every sidecar, found through meshd alone.
    eventually("Prometheus finds meshd and every sidecar", Duration::from_secs(60), || {
        let (api, instances) = (api.clone(), instances.clone());
        async move {
            let up = query(&api, "up == 1").await?;
            let found: std::collections::BTreeSet<String> =
                up.iter().filter_map(|s| s["metric"]["instance"].as_str().map(str::to_owned)).collect();
            let meshd_up = up.iter().any(|s| s["metric"]["job"] == "meshd");
            (meshd_up && instances.is_subset(&found)).then_some(())
        }
    })
    .await;
    // The split (v1 = 90, v2 = 10) shows in what the echo sidecars answered,
    // by version, through the shipped recording rule.
    let by_version = eventually("requests by version are recorded", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let series = query(
                &api,
                "sum by (version) (mesh:http_requests:total{service=\"echo\",direction=\"inbound\"})",
            )
            .await?;
            let count = |version: &str| {
                series
                    .iter()
                    .find(|s| s["metric"]["version"] == version)
                    .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            };
            let (v1, v2) = (count("v1")?, count("v2")?);
            (v1 + v2 >= 200.0).then_some((v1, v2))
        }
    })
    .await;
    // The callers' side names the service called, not the caller's own:
    // the traffic job's sidecar reports its calls to echo as echo's.
    eventually("the callers' view of echo is recorded", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let series =
                query(&api, "mesh:http_requests:total{service=\"echo\",direction=\"outbound\"} > 0").await?;
            (!series.is_empty()).then_some(())
        }
    })
    .await;
    let (v1, v2) = by_version;
    let share = 100.0 * v2 / (v1 + v2);
    let bound = mesh_tests::client::split_tolerance((v1 + v2) as u64, 10.0);
    assert!((share - 10.0).abs() <= bound, "v2 got {share:.1} % of {} requests (10 ± {bound:.1})", v1 + v2);
}
