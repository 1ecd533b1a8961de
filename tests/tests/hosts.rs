//! The mesh across hosts that are separate network stacks: meshd on one
//! host, node agents on two others, each in its own network namespace with
//! its own address on a bridge. A client on one host calls a service on
//! the other over mTLS; cutting that host's link takes its node down within
//! the heartbeat TTL, and the service runs again where it can be reached.

use std::path::Path;
use std::time::Duration;

use mesh_tests::netns::{Host, Lab};
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

/// A service job of one mesh-echo instance (which names itself in its answers).
fn echo_job(constraint: &str) -> String {
    format!(
        "name = \"web\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"mesh-echo\"\nargs = [\"--version\", \"v1\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[health]\nreadiness = {{ http = \"/ready\", interval = \"200ms\", timeout = \"500ms\", failures = 1 }}\n{constraint}"
    )
}

/// One request to `service` through the sidecar at `outbound`, made from
/// inside `host`: the answer's body, or why there is none.
fn call_from(host: &Host, outbound: &str, service: &str) -> Result<String, String> {
    let output = host
        .command(Path::new("curl"))
        .args(["-sS", "-m", "3", "-x", &format!("http://{outbound}"), &format!("http://{service}/")])
        .output()
        .expect("run curl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn node_states(meshd: &Meshd) -> Vec<(String, bool)> {
    let nodes = meshd.ctl_json(&["get", "nodes"]);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n["up"] == true))
        .collect()
}

/// The node of the instance that wrote `answer` (mesh-echo's JSON).
fn node_of(meshd: &Meshd, answer: &str) -> Option<String> {
    let answer: Value = serde_json::from_str(answer).ok()?;
    let instance = meshd.instances().into_iter().find(|i| i["id"] == answer["instance"])?;
    instance["node"].as_str().map(str::to_owned)
}

fn web_instances(meshd: &Meshd) -> Vec<Value> {
    meshd.instances().into_iter().filter(|i| i["job"] == "web" && i["state"] == "running").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_another_host_answers_over_the_mesh_and_moves_when_its_link_is_cut() {
    let dir = TempDir::new("hosts");
    let mut lab = Lab::new();
    let control = lab.host("control", 1);
    let a = lab.host("node-a", 2);
    let b = lab.host("node-b", 3);
    let meshd = Meshd::start_in(&control, &dir.path("data"), &["--heartbeat-ttl", "2s"]);
    let _agent_a = Agent::start_in(&a, &meshd, 1000, &dir.path("a"), &["--attribute", "zone=a"]);
    let _agent_b = Agent::start_in(&b, &meshd, 1000, &dir.path("b"), &["--attribute", "zone=b"]);
    let nodes = node_states(&meshd);
    assert_eq!(nodes, [("node-a".to_owned(), true), ("node-b".to_owned(), true)], "both hosts joined");

    // web on node-b, its caller on node-a: the call crosses the bridge.
    let job_file = dir.path("web.toml");
    std::fs::write(&job_file, echo_job("[[constraints]]\nattribute = \"zone\"\nvalue = \"b\"\n")).unwrap();
    meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    let web = meshd.running("web", 1, Duration::from_secs(30)).await;
    assert_eq!(web[0]["node"], "node-b");
    assert!(web[0]["addr"].as_str().unwrap().starts_with("10.77.0.3:"), "{}", web[0]);
    let outbound = meshd
        .mesh_client(&dir.path("client.toml"), "[[constraints]]\nattribute = \"zone\"\nvalue = \"a\"\n")
        .await;
    let answer = eventually("node-a's client reaches web on node-b", Duration::from_secs(10), || {
        let answer = call_from(&a, &outbound, "web").ok();
        async move { answer }
    })
    .await;
    assert_eq!(node_of(&meshd, &answer).as_deref(), Some("node-b"), "{answer}");

    // Lift the constraint so that web may run on node-a, then cut node-b off.
    std::fs::write(&job_file, echo_job("")).unwrap();
    meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    b.cut_link();
    eventually("node-b is down within its heartbeat TTL", Duration::from_secs(10), || {
        let down = node_states(&meshd).contains(&("node-b".to_owned(), false));
        async move { down.then_some(()) }
    })
    .await;
    eventually("web runs on node-a and answers there", Duration::from_secs(30), || {
        let answer = call_from(&a, &outbound, "web").ok();
        let on_a = answer.and_then(|answer| node_of(&meshd, &answer)).filter(|node| node == "node-a");
        async move { on_a }
    })
    .await;
    let endpoints = meshd.ctl_json(&["get", "endpoints"]);
    let web_endpoints: Vec<&Value> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["service"] == "web" && e["ready"] == true)
        .collect();
    assert!(
        web_endpoints.iter().all(|e| e["addr"].as_str().unwrap().starts_with("10.77.0.2:")),
        "no ready endpoint on the cut-off host: {web_endpoints:?}"
    );

    // The link comes back: node-b rejoins, and web runs once, not twice.
    b.restore_link();
    eventually("node-b is up again", Duration::from_secs(15), || {
        let up = node_states(&meshd).contains(&("node-b".to_owned(), true));
        async move { up.then_some(()) }
    })
    .await;
    eventually("one instance of web runs after the heal", Duration::from_secs(15), || {
        let running = web_instances(&meshd);
        async move { (running.len() == 1).then_some(()) }
    })
    .await;
    for _ in 0..5 {
        let answer = call_from(&a, &outbound, "web").expect("web answers after the heal");
        assert_eq!(node_of(&meshd, &answer).as_deref(), Some("node-a"), "{answer}");
    }
}
