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
/// flight; three in flight per instance is its target. Each instance
/// takes 300 of the node's 1000 CPU millis: three fit beside the client.
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
target = { in_flight_per_instance = 3 }
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

    // Steady load: five callers on two instances is 2.5 in flight each,
    // under the target of 3, over what one instance may carry. For longer
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
    assert!(measured.contains("in flight per instance") && measured.contains("target 3"), "{measured}");

    // A 2× step: ten callers want four instances; three fit.
    let step = Background::start(&client, "web", 5);
    let stepped = Instant::now();
    let up = eventually("the scaler adds instances under the step", Duration::from_secs(30), || {
        let now = status(&meshd);
        async move { (now["replicas"].as_u64() > Some(2)).then_some(now) }
    })
    .await;
    let decided_after = stepped.elapsed();
    let first = decisions(&up).first().cloned().unwrap_or_default();
    assert!(first.starts_with("2 → ") && first.contains("in flight per instance > target 3"), "{first}");
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
