//! Routes and rate limits through the control plane: `meshctl apply -f`
//! checks a file whole (a bad one changes nothing), applies it, and with
//! `--wait` returns once every proxy has it; a header canary then routes
//! at the callers' sidecars, and the service's own sidecar holds two
//! callers, told apart by their mTLS identities, each to its own limit.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use mesh_tests::client::{http1, send, steady_rate, Answer};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Agent, Echo, Meshd};
use mesh_tests::TempDir;

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

const CANARY: &str = r#"
[[routes]]
service = "web"
name = "canary-by-header"
match = { headers = { "x-canary" = "1" } }
backends = { v2 = 100 }
"#;

const LIMITS: &str = r#"
[[rate_limits]]
service = "web"
per_caller = { requests_per_second = 20, burst = 5 }
overrides = [ { caller = "spiffe://mesh.local/service/batch", requests_per_second = 5, burst = 1 } ]
"#;

async fn call(outbound: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(format!("http://{outbound}/")).header("host", "web");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(&http1(), request.body(Full::new(Bytes::new())).unwrap()).await.unwrap()
}

/// The versions that answered `n` calls.
async fn versions(outbound: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let answer = call(outbound, headers).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        seen.push(answer.header("x-version").unwrap_or("?").to_owned());
    }
    seen.sort();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_rate_limits_applied_with_meshctl_reach_the_proxies() {
    let dir = TempDir::new("routes-mesh");
    let meshd = Meshd::start(&dir.path("data"));
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    std::fs::write(dir.path("web.toml"), WEB).unwrap();
    meshd.ctl_ok(&["job", "run", dir.path("web.toml").to_str().unwrap()]);
    meshd.running("web", 1, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    let batch = meshd.mesh_client_named("batch", &dir.path("batch.toml"), "").await;
    // A v2 beside the job's v1, outside the scheduler; the split keeps plain traffic on v1.
    let v2 = Echo::start("v2", &[]);
    meshd.ctl_ok(&["register", "web", "--version", "v2", "--addr", &v2.addr, "--plaintext-ok"]);
    meshd.ctl_ok(&["split", "web", "v1=100", "--wait"]);
    assert_eq!(versions(&client, &[("x-canary", "1")], 10).await, ["v1"]);

    // Bad files: refused whole, with the cause; nothing is applied.
    let bad_version = CANARY.replace("v2 = 100", "v3 = 100");
    let field_error = CANARY.replace(
        "backends = { v2 = 100 }",
        "backends = { v2 = 100 }\nmirror = { version = \"v2\", percent = 200 }",
    );
    let with_limits = format!("{LIMITS}\n{}", bad_version);
    for (name, text, words) in [
        ("unknown-version.toml", bad_version.as_str(), "names version \"v3\""),
        ("field.toml", field_error.as_str(), "line 7, field `routes[0].mirror.percent`"),
        ("half.toml", with_limits.as_str(), "names version \"v3\""),
    ] {
        let path = dir.path(name);
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = meshd.ctl(&["apply", "-f", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{name} is refused: {stdout}");
        assert!(stderr.contains(words), "{name}: {stderr}");
        assert_eq!(meshd.ctl_json(&["get", "routes"]), serde_json::json!([]), "{name} applied nothing");
    }

    // The header canary, applied and waited for: at once, x-canary: 1 goes to v2.
    std::fs::write(dir.path("canary.toml"), CANARY).unwrap();
    let applied = meshd.ctl_ok(&["apply", "-f", dir.path("canary.toml").to_str().unwrap(), "--wait"]);
    assert!(applied.contains("web: 1 route(s) applied"), "{applied}");
    assert_eq!(versions(&client, &[("x-canary", "1")], 10).await, ["v2"]);
    assert_eq!(versions(&client, &[("x-canary", "0")], 10).await, ["v1"]);

    // A file of rate limits alone leaves the routes as they are.
    std::fs::write(dir.path("limits.toml"), LIMITS).unwrap();
    meshd.ctl_ok(&["apply", "-f", dir.path("limits.toml").to_str().unwrap(), "--wait"]);
    let listed = meshd.ctl_json(&["get", "routes", "web"]);
    let kinds: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|row| row["kind"].as_str()).collect();
    assert_eq!(kinds, ["route", "rate_limit"], "{listed}");
    let table = meshd.ctl_ok(&["get", "routes"]);
    let row = |words: &[&str]| table.lines().any(|line| words.iter().all(|w| line.contains(w)));
    assert!(row(&["canary-by-header", "header x-canary=1", "v2=100"]), "{table}");
    assert!(row(&["(rate limit)", "spiffe://mesh.local/service/batch", "5/s, burst 1"]), "{table}");
    assert!(row(&["(rate limit)", "each caller", "20/s, burst 5"]), "{table}");

    // Two callers at 50/s each for 4 s, at once: each gets its own rate.
    let seconds = 4;
    let (ours, theirs) = tokio::join!(
        steady_rate(&client, "web", 50, Duration::from_secs(seconds)),
        steady_rate(&batch, "web", 50, Duration::from_secs(seconds)),
    );
    let limited = |tally: &mesh_tests::client::Tally| {
        tally.failures.get("429 Too Many Requests rate-limited").copied().unwrap_or(0)
    };
    for (tally, rate, burst, who) in [(&ours, 20, 5, "client"), (&theirs, 5, 1, "batch")] {
        let want = (rate * seconds + burst) as f64;
        eprintln!("{who}: {} admitted, {} limited; want about {want}", tally.ok, limited(tally));
        assert_eq!(
            tally.ok + limited(tally),
            tally.ok + tally.failed(),
            "{who}: only the limit refuses: {tally:?}"
        );
        assert!(
            (tally.ok as f64 - want).abs() <= 0.15 * want + 1.0,
            "{who}: {} admitted, want {want} ± 15 %",
            tally.ok
        );
    }
    let refused = loop {
        let answer = call(&batch, &[]).await;
        if answer.status == 429 {
            break answer;
        }
    };
    assert_eq!(refused.header("x-mesh-error"), Some("rate-limited"));
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    // The service's own sidecar counted every refusal.
    let proxies = meshd.ctl_json(&["get", "proxies"]);
    let admin = proxies.as_array().unwrap().iter().find(|p| p["service"] == "web").unwrap()["admin_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let counted =
        scrape(&admin).await.sum("mesh_rate_limited_total", &[("service", "web"), ("limit", "caller")]);
    assert_eq!(counted, (limited(&ours) + limited(&theirs) + 1) as f64);

    // Deleting the route and the limit undoes them.
    meshd.ctl_ok(&["delete", "rate-limit", "web", "--wait"]);
    assert_eq!(versions(&batch, &[], 30).await, ["v1"], "no limit: 30 calls at once all pass");
    meshd.ctl_ok(&["delete", "route", "web", "canary-by-header", "--wait"]);
    assert_eq!(versions(&client, &[("x-canary", "1")], 10).await, ["v1"]);
    assert_eq!(meshd.ctl_json(&["get", "routes"]), serde_json::json!([]));
    let (code, _, stderr) = meshd.ctl(&["delete", "route", "web", "nothing-here"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("has no route \"nothing-here\""), "{stderr}");
}
