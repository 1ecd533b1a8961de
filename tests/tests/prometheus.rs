//! The proxy's metrics as Prometheus sees them: `promtool check metrics`
//! passes, and a real Prometheus scraping the proxy counts the requests.

use std::process::Command;
use std::time::Duration;

use mesh_tests::client::{closed_loop, get, http1};
use mesh_tests::metrics::text;
use mesh_tests::process::{Echo, Process, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, free_port, TempDir};

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

    let port = free_port();
    let config = dir.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mesh-proxy\n    static_configs:\n      - targets: ['{}']\n",
            proxy.admin()
        ),
    )
    .unwrap();
    let _prometheus = Process::start_quiet(Command::new("prometheus").args([
        &format!("--config.file={}", config.display()),
        &format!("--storage.tsdb.path={}", dir.path("tsdb").display()),
        &format!("--web.listen-address=127.0.0.1:{port}"),
    ]));
    let api = format!("127.0.0.1:{port}");
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
}
