//! Splits, retries, the retry budget, the circuit breaker and latency-aware
//! balancing, through a real mesh-proxy in front of real mesh-echo servers.

use std::time::Duration;

use mesh_tests::client::{closed_loop, steady_rate};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{eventually, TempDir};

fn start_proxy(dir: &TempDir, services: &[ServiceSpec]) -> Proxy {
    let path = dir.path("proxy.toml");
    std::fs::write(&path, render(services, &[], None)).unwrap();
    Proxy::start(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_lands_within_two_points() {
    let dir = TempDir::new("split");
    let v1 = Echo::start("v1", &[]);
    let v2 = Echo::start("v2", &[]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("split = { v1 = 90, v2 = 10 }")
            .endpoint(&v1.addr, "v1")
            .endpoint(&v2.addr, "v2")],
    );
    let tally = closed_loop(&proxy.outbound(), "echo", 10_000, 16).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    assert_eq!(tally.ok, 10_000);
    let (v1_share, v2_share) = (tally.share("v1"), tally.share("v2"));
    assert!((v1_share - 90.0).abs() <= 2.0, "v1 got {v1_share:.2}%");
    assert!((v2_share - 10.0).abs() <= 2.0, "v2 got {v2_share:.2}%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_around_and_ejected() {
    let dir = TempDir::new("eject");
    let good_a = Echo::start("v1", &[]);
    let good_b = Echo::start("v1", &[]);
    let bad = Echo::start("v1", &["--fail-rate", "1"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("retry = { attempts = 3, on = [\"5xx\"] }")
            .line("breaker = { consecutive_failures = 7, base_ejection = \"1s\", max_ejection = \"60s\" }")
            .endpoint(&good_a.addr, "v1")
            .endpoint(&good_b.addr, "v1")
            .endpoint(&bad.addr, "v1")],
    );
    let tally = closed_loop(&proxy.outbound(), "echo", 2_000, 8).await;
    assert_eq!(tally.failed(), 0, "idempotent GETs must all succeed: {:?}", tally.failures);
    assert_eq!(tally.by_instance.get(&bad.addr), None, "no answer may come from the failing endpoint");

    let metrics = scrape(&proxy.admin()).await;
    assert_eq!(metrics.sum("mesh_endpoints", &[("service", "echo"), ("state", "ejected")]), 1.0);
    assert_eq!(metrics.sum("mesh_endpoints", &[("service", "echo"), ("state", "ready")]), 2.0);
    assert!(metrics.sum("mesh_endpoint_ejections_total", &[("service", "echo")]) >= 1.0);
    let retries = metrics.sum("mesh_http_retries_total", &[("service", "echo"), ("reason", "5xx")]);
    // Without the breaker a third of 2000 requests would need a retry.
    assert!((1.0..100.0).contains(&retries), "retries: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_everything_fails_retries_stop_at_the_budget() {
    let dir = TempDir::new("budget");
    let echoes: Vec<Echo> = (0..3).map(|_| Echo::start("v1", &["--fail-rate", "1"])).collect();
    let mut service = ServiceSpec::new("echo")
        .line("retry = { attempts = 3, on = [\"5xx\"], budget_ratio = 0.2, budget_min_per_second = 10 }")
        // The breaker stays out of the way so that only the budget limits retries.
        .line("breaker = { consecutive_failures = 60000 }");
    for echo in &echoes {
        service = service.endpoint(&echo.addr, "v1");
    }
    let proxy = start_proxy(&dir, &[service]);
    let requests = 1_000u64;
    let started = std::time::Instant::now();
    let tally = closed_loop(&proxy.outbound(), "echo", requests, 8).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(tally.ok, 0);
    assert_eq!(tally.failed(), requests);
    assert!(tally.failures.keys().any(|k| k.contains("retry-budget-exhausted")), "{:?}", tally.failures);

    let metrics = scrape(&proxy.admin()).await;
    let retries = metrics.sum("mesh_http_retries_total", &[("service", "echo")]);
    // 20 % of the requests plus 10 per second over each 10-second window.
    let windows = (elapsed / 10.0).ceil().max(1.0);
    let bound = 0.2 * requests as f64 + 10.0 * 10.0 * windows;
    assert!(retries > 0.0 && retries <= bound, "retries {retries} must be within (0, {bound}]");
    let exhausted =
        metrics.sum("mesh_http_requests_total", &[("service", "echo"), ("error", "retry-budget-exhausted")]);
    assert!(exhausted > 0.0, "answers marked retry-budget-exhausted are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_endpoint_gets_little_traffic() {
    let dir = TempDir::new("ewma");
    let fast_a = Echo::start("v1", &[]);
    let fast_b = Echo::start("v1", &[]);
    let slow = Echo::start("v1", &["--latency", "50ms"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .endpoint(&fast_a.addr, "v1")
            .endpoint(&fast_b.addr, "v1")
            .endpoint(&slow.addr, "v1")],
    );
    let tally = steady_rate(&proxy.outbound(), "echo", 300, Duration::from_secs(10)).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    // Enough answers for the share below to mean something (not a speed check).
    assert!(tally.ok >= 500, "only {} answers to judge the shares by", tally.ok);
    let slow_share = 100.0 * *tally.by_instance.get(&slow.addr).unwrap_or(&0) as f64 / tally.ok as f64;
    assert!(slow_share < 10.0, "the slow endpoint got {slow_share:.1}% of requests: {:?}", tally.by_instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_endpoints_get_no_traffic_and_an_ejected_one_comes_back() {
    let dir = TempDir::new("ready");
    let ready = Echo::start("v1", &[]);
    let not_ready = Echo::start("v1", &[]);
    let flaky = Echo::start("v1", &["--fail-rate", "1"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("retry = { attempts = 3, on = [\"5xx\"] }")
            .line(
                "breaker = { consecutive_failures = 2, base_ejection = \"200ms\", max_ejection = \"400ms\" }",
            )
            .endpoint(&ready.addr, "v1")
            .endpoint(&flaky.addr, "v1")
            .not_ready_endpoint(&not_ready.addr, "v1")],
    );
    let tally = closed_loop(&proxy.outbound(), "echo", 300, 4).await;
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    assert_eq!(tally.by_instance.get(&not_ready.addr), None);
    // It was ejected first: otherwise "comes back" below proves nothing.
    let ejections =
        scrape(&proxy.admin()).await.present("mesh_endpoint_ejections_total", &[("service", "echo")]);
    assert!(ejections >= 1.0, "the flaky endpoint was never ejected");

    // The flaky endpoint heals; its next probe succeeds and it is readmitted.
    let client = mesh_tests::client::http1();
    let heal = http::Request::post(format!("http://{}/_echo/config", flaky.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(br#"{"fail_rate":0}"#)))
        .unwrap();
    assert!(mesh_tests::client::send(&client, heal).await.unwrap().status.is_success());
    let outbound = proxy.outbound();
    eventually("the healed endpoint answers again", Duration::from_secs(10), || {
        let (client, outbound, flaky) = (client.clone(), outbound.clone(), flaky.addr.clone());
        async move {
            let answer = mesh_tests::client::get(&client, &outbound, "echo", "/").await.ok()?;
            (answer.header("x-instance") == Some(flaky.as_str())).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_is_ejected_by_its_timeouts() {
    let dir = TempDir::new("hang");
    let good = Echo::start("v1", &[]);
    let hanging = Echo::start("v1", &["--hang"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("timeout = \"200ms\"")
            .line("breaker = { consecutive_failures = 2, base_ejection = \"30s\", max_ejection = \"60s\" }")
            .endpoint(&good.addr, "v1")
            .endpoint(&hanging.addr, "v1")],
    );
    // Timeouts count against the hanging endpoint until it is ejected.
    let warmup = closed_loop(&proxy.outbound(), "echo", 40, 4).await;
    let timeouts = warmup.failures.get("504 Gateway Timeout timeout").copied().unwrap_or(0);
    assert!((1..=8).contains(&timeouts), "a few timeouts before the ejection: {:?}", warmup.failures);
    let after = closed_loop(&proxy.outbound(), "echo", 200, 4).await;
    assert_eq!(after.failed(), 0, "{:?}", after.failures);
    let metrics = scrape(&proxy.admin()).await;
    assert_eq!(metrics.sum("mesh_endpoints", &[("service", "echo"), ("state", "ejected")]), 1.0);
}

/// Ejections of service echo's v1 endpoints so far; the series must exist.
async fn ejections_of(proxy: &Proxy) -> f64 {
    scrape(&proxy.admin())
        .await
        .present("mesh_endpoint_ejections_total", &[("service", "echo"), ("version", "v1")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_probe_doubles_the_ejection() {
    let dir = TempDir::new("probe-doubling");
    let good = Echo::start("v1", &[]);
    let bad = Echo::start("v1", &["--fail-rate", "1"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("retry = { attempts = 3, on = [\"5xx\"], budget_min_per_second = 1000 }")
            .line("breaker = { consecutive_failures = 3, base_ejection = \"250ms\", max_ejection = \"60s\" }")
            .endpoint(&good.addr, "v1")
            .endpoint(&bad.addr, "v1")],
    );
    // Six seconds of steady traffic. Ejections of 250 ms, 500 ms, 1 s, 2 s,
    // 4 s after each failed probe: five ejections and four probes. A fixed
    // 250 ms ejection would eject (and probe) about 24 times.
    let tally = steady_rate(&proxy.outbound(), "echo", 200, Duration::from_secs(6)).await;
    assert_eq!(tally.failed(), 0, "retries cover the failing endpoint: {:?}", tally.failures);
    let ejections = ejections_of(&proxy).await;
    assert!((3.0..=7.0).contains(&ejections), "ejections in 6 s with doubling: {ejections}");
    // The bad endpoint saw the failures that ejected it and then one probe per ejection.
    let at_bad = bad.requests_seen().await;
    assert!(at_bad <= 3 + 8 + 4, "requests reaching the ejected endpoint: {at_bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_to_a_hanging_endpoint_ends_at_the_timeout() {
    let dir = TempDir::new("probe-hang");
    let good = Echo::start("v1", &[]);
    let hanging = Echo::start("v1", &["--hang"]);
    let proxy = start_proxy(
        &dir,
        &[ServiceSpec::new("echo")
            .line("timeout = \"200ms\"")
            .line("breaker = { consecutive_failures = 2, base_ejection = \"250ms\", max_ejection = \"60s\" }")
            .endpoint(&good.addr, "v1")
            .endpoint(&hanging.addr, "v1")],
    );
    let tally = steady_rate(&proxy.outbound(), "echo", 100, Duration::from_secs(5)).await;
    let ejections = ejections_of(&proxy).await;
    // Each probe hung, timed out, and ejected the endpoint again for twice
    // as long: a probe that never ended would have left one ejection.
    assert!((3.0..=6.0).contains(&ejections), "ejections in 5 s: {ejections}");
    // Only the requests sent to the hanging endpoint failed, each at its
    // timeout with the reason: the two that ejected it, then one per probe.
    let timeouts = tally.failures.get("504 Gateway Timeout timeout").copied().unwrap_or(0);
    assert_eq!(tally.failed(), timeouts, "{:?}", tally.failures);
    assert!(timeouts <= 2 + ejections as u64 + 2, "{timeouts} timeouts for {ejections} ejections");
    assert!(tally.ok >= 400, "everything else was answered: {} of 500", tally.ok);
}
