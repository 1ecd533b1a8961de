//! Nodes: agents join and heartbeat; a killed agent's node goes down within
//! the heartbeat TTL; after a server restart the agents join again.

use std::time::Duration;

use mesh_tests::process::{run, Agent, Meshd};
use mesh_tests::{bin, eventually, TempDir};

fn agent(meshd: &Meshd, name: &str, ip: &str, dir: &TempDir) -> Agent {
    Agent::start(meshd, name, ip, 1000, &dir.path(name), &["--attribute", &format!("zone={name}")])
}

/// (name, up) of every node meshctl lists.
fn nodes(meshd: &Meshd) -> Vec<(String, bool)> {
    let list = meshd.ctl_json(&["get", "nodes"]);
    list.as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n["up"].as_bool().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_go_down_within_the_ttl_and_rejoin_after_a_restart() {
    let dir = TempDir::new("nodes");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _a = agent(&meshd, "node-a", "127.0.0.2", &dir);
    let b = agent(&meshd, "node-b", "127.0.0.3", &dir);
    let _c = agent(&meshd, "node-c", "127.0.0.4", &dir);
    let all_up = vec![("node-a".to_owned(), true), ("node-b".to_owned(), true), ("node-c".to_owned(), true)];
    assert_eq!(nodes(&meshd), all_up);
    let listed = meshd.ctl_json(&["get", "nodes"]);
    assert_eq!(listed[1]["advertise_ip"], "127.0.0.3");
    assert_eq!(listed[1]["attributes"]["zone"], "node-b");

    b.kill();
    eventually("node-b is down within its TTL", Duration::from_secs(5), || {
        let down = nodes(&meshd)
            == vec![("node-a".to_owned(), true), ("node-b".to_owned(), false), ("node-c".to_owned(), true)];
        async move { down.then_some(()) }
    })
    .await;

    // Nodes are soft state: after a restart the agents join again.
    let listen = meshd.listen.clone();
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let meshd = Meshd::start_with(&dir.path("data"), &listen, &["--heartbeat-ttl", "1s"]);
    eventually("the live agents join the restarted server", Duration::from_secs(20), || {
        let back = nodes(&meshd) == vec![("node-a".to_owned(), true), ("node-c".to_owned(), true)];
        async move { back.then_some(()) }
    })
    .await;
}

#[test]
fn a_bad_node_description_is_refused_with_the_reason() {
    let dir = TempDir::new("bad-node");
    let meshd = Meshd::start(&dir.path("data"));
    let args = ["agent", "--server", &meshd.listen, "--name", "Bad Name", "--advertise-ip", "127.0.0.2"];
    let (code, _, stderr) =
        run(&bin("meshd"), &[&args[..], &["--cpu-millis", "100", "--memory-mb", "64"]].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a valid name"), "{stderr}");
    // Refused before anything is written: no data dir for it under the default place.
    assert!(
        !std::path::Path::new("/var/lib/meshd/agent-Bad Name").exists(),
        "a folder was made for a refused name"
    );
    let (code, _, stderr) = run(
        &bin("meshd"),
        &["agent", "--name", "n", "--advertise-ip", "not-an-ip", "--cpu-millis", "1", "--memory-mb", "1"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("not-an-ip"), "{stderr}");
}
