//! Canary rollouts gated on the mesh's own measurements: a new version
//! gets a growing share of the traffic step by step while its callers'
//! proxies measure it meeting its gates; a breach rolls back at once with
//! the gate and the measured value; too little traffic holds the step with
//! the reason and then fails it. `meshctl rollout` shows and steers it.

use std::time::{Duration, Instant};

use mesh_tests::client::{Background, Tally};
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

const INTERVAL: Duration = Duration::from_secs(3);

/// `web` at `version`, its app started with `args`, rolled out in three
/// steps judged every 3 s on at least 10 requests. The p99 gate is loose
/// (a loaded test machine is slow) except where latency is under test.
/// Where failures are under test, a step needs 30 requests: on 10, a
/// version failing one request in five still passes a 99 % gate one time
/// in ten (0.8^10), on 30 one time in a thousand, and a step usually sees
/// over a hundred. Readiness asks `/ready`, which a failure rate leaves
/// alone, so failing requests do not make the instances flap.
fn job(version: &str, args: &str) -> String {
    let p99 = if args.contains("--latency") { "300ms" } else { "2s" };
    let min_requests = if args.contains("--fail-rate") { 30 } else { 10 };
    format!(
        r#"
name = "web"
version = "{version}"
replicas = 2

[task]
command = "mesh-echo"
args = ["--message", "hello from {version}"{args}]

[resources]
cpu_millis = 50
memory_mb = 32

[health]
readiness = {{ http = "/ready", interval = "200ms" }}

[update]
strategy = "canary"
steps = [20, 50, 100]
interval = "3s"
success_rate = 0.99
p99 = "{p99}"
min_requests = {min_requests}
stall_after = "6s"
"#
    )
}

struct Mesh {
    meshd: Meshd,
    _agent: Agent,
    client: String,
    dir: TempDir,
}

/// meshd, one node, a meshed client and `web` v1 running.
async fn mesh(name: &str) -> Mesh {
    let dir = TempDir::new(name);
    let meshd = Meshd::start(&dir.path("data"));
    let agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 2000, &dir.path("agent"), &[]);
    let mesh = Mesh { client: String::new(), meshd, _agent: agent, dir };
    mesh.run("v1", "");
    mesh.meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = mesh.meshd.mesh_client(&mesh.dir.path("client.toml"), "").await;
    Mesh { client, ..mesh }
}

impl Mesh {
    fn run(&self, version: &str, args: &str) {
        let file = self.dir.path(&format!("web-{version}.toml"));
        std::fs::write(&file, job(version, args)).unwrap();
        self.meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    }

    fn rollout(&self) -> Value {
        let report = self.meshd.ctl_json(&["rollout", "status", "web"]);
        report.as_array().and_then(|rows| rows.first()).cloned().unwrap_or(report)
    }

    /// Waits until the rollout is over; returns its report.
    async fn ended(&self, within: Duration) -> Value {
        eventually("the rollout ends", within, || {
            let report = self.rollout();
            let over = report["state"] == "promoted" || report["state"] == "rolled back";
            async move { over.then_some(report) }
        })
        .await
    }

    /// Waits until only `version`'s instances run and the service's split is gone.
    async fn settled_on(&self, version: &str) {
        eventually("only one version runs and the split is cleared", Duration::from_secs(30), || {
            let versions: Vec<Value> = self
                .meshd
                .instances()
                .iter()
                .filter(|i| i["job"] == "web")
                .map(|i| i["version"].clone())
                .collect();
            let splits = self.meshd.ctl_json(&["get", "splits"]);
            let split = splits.as_array().is_some_and(|rows| rows.iter().any(|r| r["service"] == "web"));
            let settled = versions.len() == 2 && versions.iter().all(|v| v == version) && !split;
            async move { settled.then_some(()) }
        })
        .await;
        let status = self.meshd.ctl_json(&["job", "status", "web"]);
        let status = status.as_array().and_then(|rows| rows.first()).cloned().unwrap_or(status);
        assert_eq!(status["version"], version, "{status}");
    }
}

fn gate<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["gates"]
        .as_array()
        .and_then(|gates| gates.iter().find(|g| g["gate"] == name))
        .unwrap_or_else(|| panic!("gate {name} in {report}"))
}

fn tally(what: &str, tally: &Tally) {
    eprintln!("{what}: {} ok, {} failed", tally.ok, tally.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_version_moves_through_every_step_under_load_without_a_failed_request() {
    let mesh = mesh("canary-healthy").await;
    let load = Background::start(&mesh.client, "web", 4);
    load.wait_for(100).await;
    let started = Instant::now();
    mesh.run("v2", "");

    // Step 1: a fifth of the traffic, then a pause holds it past its interval.
    let first = eventually("step 1 puts 20 % on v2", Duration::from_secs(30), || {
        let report = mesh.rollout();
        let moved = report["step"] == 1 && report["weights"]["v2"] == 20;
        async move { moved.then_some(report) }
    })
    .await;
    eprintln!("step 1: {first}");
    mesh.meshd.ctl_ok(&["rollout", "pause", "web"]);
    let paused_at = Instant::now();
    while paused_at.elapsed() < INTERVAL * 2 {
        let report = mesh.rollout();
        assert_eq!(
            (report["state"].as_str(), report["step"].as_u64()),
            (Some("paused"), Some(1)),
            "{report}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let table = mesh.meshd.ctl_ok(&["rollout", "status", "web"]);
    eprintln!("{table}");
    assert!(
        table.contains("paused") && table.contains("v1=80 v2=20") && table.contains("success rate"),
        "{table}"
    );
    mesh.meshd.ctl_ok(&["rollout", "resume", "web"]);

    // Every step in turn, each after its gates passed.
    let mut steps_seen = vec![1];
    let promoted = eventually("the rollout passes every step", Duration::from_secs(60), || {
        let report = mesh.rollout();
        if let Some(step) = report["step"].as_u64().filter(|s| !steps_seen.contains(s) && *s > 0) {
            eprintln!("step {step}: {}", report["message"]);
            steps_seen.push(step);
        }
        let done = report["state"] == "promoted";
        async move { done.then_some(report) }
    })
    .await;
    eprintln!("promoted after {:?}: {}", started.elapsed(), promoted["message"]);
    assert_eq!(steps_seen, vec![1, 2, 3], "each step in turn");
    assert!(promoted["message"].as_str().unwrap().contains("step 3 of 3 (100 % to the new version) passed"));
    mesh.settled_on("v2").await;
    let result = load.stop().await;
    tally("load", &result);
    assert_eq!(result.failed(), 0, "no failed request through the whole rollout: {result:?}");
    assert!(result.share("v2") > 0.0, "v2 served: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_is_rolled_back_at_the_first_step_on_its_success_rate() {
    let mesh = mesh("canary-failing").await;
    // POSTs: a proxy does not retry them, so callers see every failure.
    let load = Background::posts(&mesh.client, "web", 4);
    load.wait_for(100).await;
    mesh.run("v2", r#", "--fail-rate", "0.2""#);
    let report = mesh.ended(Duration::from_secs(60)).await;
    eprintln!("{report}");
    let message = report["message"].as_str().unwrap();
    assert_eq!(report["state"], "rolled back", "{report}");
    assert!(message.contains("success rate") && message.contains("breaks its gate ≥ 99.00 %"), "{message}");
    assert!(message.contains("step 1 of 3"), "at the first step: {message}");
    let success = gate(&report, "success rate");
    assert_eq!(success["passed"], false, "{report}");
    assert_eq!(report["weights"]["v1"], 100, "{report}");
    mesh.settled_on("v1").await;
    tally("load", &load.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_version_is_rolled_back_on_its_p99() {
    let mesh = mesh("canary-slow").await;
    let load = Background::start(&mesh.client, "web", 8);
    load.wait_for(100).await;
    mesh.run("v2", r#", "--latency", "500ms""#);
    let report = mesh.ended(Duration::from_secs(60)).await;
    eprintln!("{report}");
    let message = report["message"].as_str().unwrap();
    assert_eq!(report["state"], "rolled back", "{report}");
    assert!(message.contains("p99") && message.contains("breaks its gate ≤ 300 ms"), "{message}");
    assert_eq!(gate(&report, "p99")["passed"], false, "{report}");
    mesh.settled_on("v1").await;
    let result = load.stop().await;
    tally("load", &result);
    assert_eq!(result.failed(), 0, "slow, not failed: {result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_traffic_holds_the_step_with_the_reason_then_fails_it() {
    let mesh = mesh("canary-quiet").await;
    mesh.run("v2", "");
    let holding = eventually("the step holds for too little traffic", Duration::from_secs(30), || {
        let report = mesh.rollout();
        let holding = report["message"].as_str().is_some_and(|m| m.contains("holding"));
        async move { holding.then_some(report) }
    })
    .await;
    let message = holding["message"].as_str().unwrap();
    assert!(message.contains("fewer than min_requests 10"), "{message}");
    assert_eq!(holding["state"], "progressing", "{holding}");
    let held_at = Instant::now();
    let report = mesh.ended(Duration::from_secs(30)).await;
    let message = report["message"].as_str().unwrap();
    eprintln!("held {:?}, then: {message}", held_at.elapsed());
    assert_eq!(report["state"], "rolled back", "{report}");
    assert!(message.contains("too little traffic to judge the new version for 6s"), "{message}");
    mesh.settled_on("v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_promotes_one_rollout_and_aborts_the_next() {
    let mesh = mesh("canary-steered").await;
    // No traffic: the step would hold; promote skips the remaining steps.
    mesh.run("v2", "");
    eventually("v2's instances are ready and the step holds", Duration::from_secs(30), || {
        let report = mesh.rollout();
        let holding =
            report["message"].as_str().is_some_and(|m| m.contains("judged in") || m.contains("holding"));
        async move { holding.then_some(()) }
    })
    .await;
    let promoted = mesh.meshd.ctl_ok(&["rollout", "promote", "web"]);
    eprintln!("{promoted}");
    let report = mesh.ended(Duration::from_secs(10)).await;
    assert_eq!(report["state"], "promoted", "{report}");
    assert!(
        report["message"].as_str().unwrap().contains("promoted by `meshctl rollout promote`"),
        "{report}"
    );
    mesh.settled_on("v2").await;

    // The next one is aborted: all traffic back to v2, v3's instances stop.
    mesh.run("v3", "");
    eventually("v3's rollout is under way", Duration::from_secs(30), || {
        let report = mesh.rollout();
        let going = report["to"] == "v3" && report["state"] == "progressing";
        async move { going.then_some(()) }
    })
    .await;
    mesh.meshd.ctl_ok(&["rollout", "abort", "web"]);
    let report = mesh.ended(Duration::from_secs(10)).await;
    assert_eq!(
        (report["state"].as_str(), report["to"].as_str()),
        (Some("rolled back"), Some("v3")),
        "{report}"
    );
    assert!(report["message"]
        .as_str()
        .unwrap()
        .contains("rolled back to v2: aborted by `meshctl rollout abort`"));
    mesh.settled_on("v2").await;
    // Nothing is in progress now: steering it is refused with the reason.
    let (code, _, err) = mesh.meshd.ctl(&["rollout", "pause", "web"]);
    assert_ne!(code, 0);
    assert!(err.contains("has no rollout in progress"), "{err}");
}
