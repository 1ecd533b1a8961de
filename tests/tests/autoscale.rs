//! Autoscaling on the mesh's own traffic: a job with `[scale]` grows
//! under a load step within seconds, says so with the reason, says what
//! cannot be placed, keeps serving every request meanwhile, holds still
//! under steady load, and shrinks only after its stabilization window.

use std::time::{Duration, Instant};

use mesh_tests::client::Background;
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

/// `web` answers after 50 ms, so each caller keeps about one request in
/// flight; 2.5 in flight per instance is its target. Each instance takes
/// 300 of the node's 1000 CPU millis: three fit beside the client.
const JOB: &str = r#"
name = "web"
version = "v1"
replicas = 2

[task]
command = "mesh-echo"
args = ["--latency", "50ms"]

[resources]
cpu_millis = 300
memory_mb = 32

[scale]
min = 1
max = 6
target = { in_flight_per_instance = 2.5 }
scale_down_after = "8s"
"#;

const WINDOW: Duration = Duration::from_secs(8);

fn status(meshd: &Meshd) -> Value {
    let status = meshd.ctl_json(&["job", "status", "web"]);
    status.as_array().and_then(|rows| rows.first()).cloned().unwrap_or(status)
}

fn decisions(status: &Value) -> Vec<String> {
    status["scale_decisions"]
        .as_array()
        .map(|list| list.iter().map(|d| d.as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_job_follows_a_load_step_up_at_once_and_down_after_its_window() {
    let dir = TempDir::new("autoscale");
    let meshd = Meshd::start(&dir.path("data"));
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(&file, JOB).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;

    // Steady load: five callers on two instances is at most 2.5 in flight
    // each, the target, and more than one instance may carry. For longer
    // than the window, the count holds and nothing is decided.
    let steady = Background::start(&client, "web", 5);
    steady.wait_for(100).await;
    let steady_from = Instant::now();
    while steady_from.elapsed() < WINDOW + Duration::from_secs(4) {
        let now = status(&meshd);
        assert_eq!(now["replicas"], 2, "steady load changes nothing: {now}");
        assert_eq!(decisions(&now), Vec::<String>::new(), "no decision under steady load");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let measured = status(&meshd)["scale"].as_str().unwrap_or_default().to_owned();
    eprintln!("steady: {measured}");
    assert!(measured.contains("in flight per instance") && measured.contains("target 2.5"), "{measured}");

    // A 2× step: ten callers (about 9.5 in flight) want four instances; three fit.
    let step = Background::start(&client, "web", 5);
    let stepped = Instant::now();
    let up = eventually("the scaler adds instances under the step", Duration::from_secs(30), || {
        let now = status(&meshd);
        async move { (now["replicas"].as_u64() > Some(2)).then_some(now) }
    })
    .await;
    let decided_after = stepped.elapsed();
    let first = decisions(&up).first().cloned().unwrap_or_default();
    assert!(first.starts_with("2 → ") && first.contains("in flight per instance > target 2.5"), "{first}");
    meshd.running("web", 3, Duration::from_secs(30)).await;
    let ready_after = stepped.elapsed();
    eprintln!(
        "2× step: decided after {decided_after:?}, three instances ready after {ready_after:?}: {first}"
    );
    // The fourth cannot be placed, and the job says so.
    let short = eventually("the decision says what cannot be placed", Duration::from_secs(20), || {
        let now = status(&meshd);
        let said = decisions(&now).iter().any(|d| d.contains("→ 4") && d.contains("not all can be placed"));
        async move { said.then_some(now) }
    })
    .await;
    eprintln!("capacity: {:?}; pending: {}", decisions(&short), short["pending"]);
    assert!(short["pending"].as_str().unwrap_or_default().contains("1 unplaced"), "{short}");

    // Every request of both loads was served through the change.
    let (steady, step) = (steady.stop().await, step.stop().await);
    let stopped = Instant::now();
    assert_eq!((steady.failed(), step.failed()), (0, 0), "no failed request: {steady:?} {step:?}");
    assert!(steady.ok + step.ok > 500, "the loads ran: {steady:?} {step:?}");

    // Load removed: instances go only once the window has passed.
    eventually("the scaler starts removing instances once idle", WINDOW * 4, || {
        let now = status(&meshd);
        async move { (now["replicas"].as_u64() < Some(4)).then_some(()) }
    })
    .await;
    let shrunk_after = stopped.elapsed();
    let down = eventually("the scaler removes instances once idle", WINDOW * 4, || {
        let now = status(&meshd);
        async move { (now["replicas"] == 1).then_some(now) }
    })
    .await;
    let last = decisions(&down).first().cloned().unwrap_or_default();
    eprintln!("idle: first removal after {shrunk_after:?}, down to 1 after {:?}: {last}", stopped.elapsed());
    assert!(shrunk_after >= WINDOW - Duration::from_secs(1), "not before the 8s window: {shrunk_after:?}");
    assert!(last.ends_with("ago)") && last.contains("→ 1: no more than 1 wanted for 8s"), "{last}");
    meshd.running("web", 1, Duration::from_secs(30)).await;
}

/// `idle` scales to zero after three quiet seconds; a caller's sidecar
/// holds requests for it for up to 30 s. `never` can be placed nowhere,
/// and its callers wait 2 s.
const IDLE: &str = r#"
name = "idle"
version = "v1"
replicas = 1

[task]
command = "mesh-echo"
args = ["--message", "awake"]

[resources]
cpu_millis = 100
memory_mb = 32

[health]
readiness = { http = "/", interval = "200ms" }

[scale]
min = 0
max = 2
target = { in_flight_per_instance = 5 }
scale_down_after = "3s"
hold_requests_for = "30s"
"#;

const NEVER: &str = r#"
name = "never"
version = "v1"
replicas = 0

[task]
command = "mesh-echo"

[[constraints]]
attribute = "zone"
value = "nowhere"

[scale]
min = 0
max = 1
target = { in_flight_per_instance = 5 }
hold_requests_for = "2s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_job_scales_to_zero_and_the_first_request_after_wakes_it() {
    let dir = TempDir::new("scale-to-zero");
    let meshd = Meshd::start(&dir.path("data"));
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    for (name, text) in [("idle", IDLE), ("never", NEVER)] {
        let file = dir.path(&format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    }
    meshd.running("idle", 1, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    let http = mesh_tests::client::http1();
    let answer = mesh_tests::client::get(&http, &client, "idle", "/").await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");

    // Quiet for the window: the job goes to zero instances.
    let quiet = Instant::now();
    let zero = eventually("the idle job scales to zero", Duration::from_secs(30), || {
        let now = meshd.ctl_json(&["job", "status", "idle"]);
        let now = now.as_array().and_then(|r| r.first()).cloned().unwrap_or(now);
        let gone = now["replicas"] == 0 && !meshd.instances().iter().any(|i| i["job"] == "idle");
        async move { gone.then_some(now) }
    })
    .await;
    eprintln!("zero after {:?}: {:?}", quiet.elapsed(), decisions(&zero));
    assert!(decisions(&zero).first().is_some_and(|d| d.starts_with("1 → 0")), "{zero}");

    // The first request after idle waits for an instance and is served.
    let asked = Instant::now();
    let answer = mesh_tests::client::get(&http, &client, "idle", "/").await.unwrap();
    let woke_after = asked.elapsed();
    assert_eq!(answer.status, 200, "the first request after idle succeeds: {answer:?}");
    assert!(String::from_utf8_lossy(&answer.body).contains("awake"), "{answer:?}");
    let now = meshd.ctl_json(&["job", "status", "idle"]);
    let now = now.as_array().and_then(|r| r.first()).cloned().unwrap_or(now);
    let woke = decisions(&now).first().cloned().unwrap_or_default();
    eprintln!("the first request after idle took {woke_after:?}; {woke}");
    assert!(woke.starts_with("0 → 1: 1 request held by callers for an instance"), "{woke}");

    // A job that can never run: its callers wait the 2 s, then get 503
    // with the reason.
    let asked = Instant::now();
    let answer = mesh_tests::client::get(&http, &client, "never", "/").await.unwrap();
    let waited = asked.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("x-mesh-error"), Some("no-endpoints"), "{answer:?}");
    let body = String::from_utf8_lossy(&answer.body);
    assert!(body.contains("no instance of \"never\" became ready within 2s"), "{body}");
    assert!(waited >= Duration::from_secs(2), "held for its bound: {waited:?}");
    let never = meshd.ctl_json(&["job", "status", "never"]);
    eprintln!("never: {never}");
}
