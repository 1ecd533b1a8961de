//! Faults the control plane must survive, injected as an operator's bad
//! day would: a restart that nodes rejoin late, a stalled meshd. Real
//! processes; the faults are real signals.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::registry_client::RegistryClient;
use mesh_tests::process::{alive, run_bounded, Agent, Meshd};
use mesh_tests::{bin, eventually, TempDir};

fn agent(meshd: &Meshd, name: &str, ip: &str, data: &Path) -> Agent {
    Agent::start(meshd, name, ip, 1000, data, &[])
}

fn spread_job(name: &str, replicas: u32) -> String {
    format!(
        "name = \"{name}\"\nversion = \"v1\"\nreplicas = {replicas}\n\n[task]\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[placement]\nstrategy = \"spread\"\n"
    )
}

/// Instance id → (node, app pid) of the running instances of `job`.
fn placed(meshd: &Meshd, job: &str) -> BTreeMap<String, (String, i64)> {
    meshd
        .instances()
        .into_iter()
        .filter(|i| i["job"] == job && i["state"] == "running")
        .map(|i| {
            let node = i["node"].as_str().unwrap_or_default().to_owned();
            (i["id"].as_str().unwrap_or_default().to_owned(), (node, i["pid"].as_i64().unwrap_or(0)))
        })
        .collect()
}

async fn nodes_up(meshd: &Meshd, count: usize) {
    eventually(&format!("{count} nodes up"), Duration::from_secs(20), || {
        let list = meshd.ctl_json(&["get", "nodes"]);
        let up = list.as_array().unwrap().iter().filter(|n| n["up"] == true).count();
        async move { (up == count).then_some(()) }
    })
    .await;
}

/// meshd with `meshd_args`, agents node-a and node-b, and a two-instance
/// spread job `web` running; returns them and where `web` runs.
async fn web_on_two_nodes(
    dir: &TempDir,
    meshd_args: &[&str],
) -> (Meshd, Agent, Agent, BTreeMap<String, (String, i64)>) {
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", meshd_args);
    let a = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"));
    let b = agent(&meshd, "node-b", &mesh_tests::node_ip(), &dir.path("b"));
    nodes_up(&meshd, 2).await;
    let file = dir.path("web.toml");
    std::fs::write(&file, spread_job("web", 2)).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("web", 2, Duration::from_secs(30)).await;
    let running = placed(&meshd, "web");
    (meshd, a, b, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_waits_for_late_nodes_and_keeps_their_instances() {
    let dir = TempDir::new("late-node");
    let ttl = ["--heartbeat-ttl", "3s"];
    let (meshd, _a, b, before) = web_on_two_nodes(&dir, &ttl).await;
    let nodes: Vec<&str> = before.values().map(|(node, _)| node.as_str()).collect();
    assert!(nodes.contains(&"node-a") && nodes.contains(&"node-b"), "spread over both nodes: {before:?}");

    // meshd restarts while node-b is paused: node-b comes back after node-a
    // has rejoined, still well inside its TTL.
    b.0.signal(libc::SIGSTOP);
    let listen = meshd.listen.clone();
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let meshd = Meshd::start_with(&dir.path("data"), &listen, &ttl);
    let paused_at = Instant::now();
    eventually("node-a's instance is adopted", Duration::from_secs(10), || {
        let adopted = placed(&meshd, "web").values().any(|(node, _)| node == "node-a");
        async move { adopted.then_some(()) }
    })
    .await;
    // The scheduler has run with only node-a back, and says what it waits for.
    eventually("the job waits for its nodes", Duration::from_secs(5), || {
        let status = meshd.ctl_json(&["job", "status", "web"]);
        let reason = status[0]["pending"].as_str().unwrap_or_default().to_owned();
        async move { reason.contains("after a server start").then_some(()) }
    })
    .await;
    assert!(paused_at.elapsed() < Duration::from_secs(3), "node-b is late, but inside its TTL");
    b.0.signal(libc::SIGCONT);

    eventually("both instances are back where they ran", Duration::from_secs(20), || {
        let now = placed(&meshd, "web");
        async move { (now.len() == 2 && now.values().all(|(_, pid)| *pid > 0)).then_some(()) }
    })
    .await;
    assert_eq!(placed(&meshd, "web"), before, "the same instances on the same nodes, same processes");
    assert_eq!(meshd.instances().len(), 2, "nothing placed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_restarts_nothing() {
    let dir = TempDir::new("stalled-server");
    let (meshd, _a, _b, before) = web_on_two_nodes(&dir, &["--heartbeat-ttl", "1s"]).await;

    // meshd stops for three TTLs: every node's last heartbeat is old when it resumes.
    meshd.process.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    meshd.process.signal(libc::SIGCONT);

    // For three TTLs after, the nodes stay up and no instance moves.
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let nodes = meshd.ctl_json(&["get", "nodes"]);
        let down: Vec<_> = nodes.as_array().unwrap().iter().filter(|n| n["up"] != true).collect();
        assert!(down.is_empty(), "nodes down after meshd's own stall: {down:?}");
        assert_eq!(placed(&meshd, "web"), before, "the instances keep running where they were");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn echo_job(service: &str, version: &str) -> String {
    format!(
        "name = \"shop\"\nservice = \"{service}\"\nversion = \"{version}\"\nreplicas = 1\n\n[task]\ncommand = \"mesh-echo\"\nargs = [\"--version\", \"{version}\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[health]\nreadiness = {{ http = \"/ready\", interval = \"200ms\", timeout = \"500ms\", failures = 1 }}\n"
    )
}

/// (service, version, ready) of every registered endpoint.
fn endpoints(meshd: &Meshd) -> Vec<(String, String, bool)> {
    let list = meshd.ctl_json(&["get", "endpoints"]);
    let mut all: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let text = |key: &str| e[key].as_str().unwrap_or_default().to_owned();
            (text("service"), text("version"), e["ready"] == true)
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_changes_service_only_with_a_new_version() {
    let dir = TempDir::new("service-change");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _a = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"));
    let file = dir.path("shop.toml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, echo_job("web", "v1")).unwrap();
    meshd.ctl_ok(&["job", "run", path]);
    meshd.running("shop", 1, Duration::from_secs(30)).await;
    let before = endpoints(&meshd);
    assert_eq!(before, vec![("web".to_owned(), "v1".to_owned(), true)]);

    // Same version, another service: refused with the reason, nothing changes.
    std::fs::write(&file, echo_job("api", "v1")).unwrap();
    let (code, _, stderr) = meshd.ctl(&["job", "run", path]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("same version") && stderr.contains("\"api\""), "{stderr}");
    assert_eq!(meshd.ctl_json(&["job", "status", "shop"])[0]["service"], "web");
    assert_eq!(endpoints(&meshd), before);

    // A new version rolls over: the new instance serves "api", the old one
    // keeps "web" until it is stopped.
    std::fs::write(&file, echo_job("api", "v2")).unwrap();
    meshd.ctl_ok(&["job", "run", path]);
    eventually("the job runs v2 under api, and web is gone", Duration::from_secs(30), || {
        let now = endpoints(&meshd);
        let moved = now == vec![("api".to_owned(), "v2".to_owned(), true)];
        let mixed = now.iter().any(|(service, version, _)| (service == "api") != (version == "v2"));
        assert!(!mixed, "an endpoint under the other version's service: {now:?}");
        async move { moved.then_some(()) }
    })
    .await;
}

#[test]
fn endpoints_nobody_can_call_and_policies_for_unknown_services_are_refused() {
    let dir = TempDir::new("refusals");
    let meshd = Meshd::start(&dir.path("data"));
    meshd.ctl_ok(&["register", "web", "--version", "v1", "--addr", "127.0.0.1:8080"]);
    // (what, meshctl arguments, words of the error)
    let table: [(&str, &[&str], &str); 3] = [
        ("port 0", &["register", "web", "--version", "v1", "--addr", "127.0.0.1:0"], "cannot be called"),
        ("any address", &["register", "web", "--version", "v1", "--addr", "0.0.0.0:80"], "cannot be called"),
        ("a typo of a service", &["policy", "wbe", "--timeout", "1s"], "unknown service \"wbe\""),
    ];
    let services_before = meshd.ctl_json(&["get", "services"]);
    for (what, args, words) in table {
        let (code, _, stderr) = meshd.ctl(args);
        assert_ne!(code, 0, "{what}: {stderr}");
        assert!(stderr.contains(words), "{what}: {stderr}");
    }
    assert_eq!(meshd.ctl_json(&["get", "services"]), services_before, "nothing was created or changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_grpc_connections_are_closed_and_meshd_keeps_serving() {
    use tokio::io::AsyncReadExt;
    let dir = TempDir::new("grpc-idle");
    let limits = ["--max-connections", "30", "--first-byte-timeout", "2s"];
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &limits);
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(tokio::net::TcpStream::connect(&meshd.listen).await.unwrap());
    }
    // Every connection that sent no preface is closed after the first-byte timeout.
    for (i, stream) in idle.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "idle connection {i} is still open: {read:?}");
    }
    // And meshctl, which speaks, is served again.
    meshd.ctl_ok(&["get", "services"]);
}

/// `meshd server` on `data`, expected to refuse to start: its stderr.
fn refused_start(data: &Path, extra: &[&str]) -> String {
    let data = data.to_str().unwrap();
    let mut args = vec!["server", "--data-dir", data, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (code, stderr) = run_bounded(&bin("meshd"), &args, Duration::from_secs(20));
    assert!(code.is_some_and(|c| c != 0), "meshd must refuse to start: {stderr}");
    assert!(!stderr.contains("panicked"), "a clear error, not a panic: {stderr}");
    stderr
}

fn snapshot(action: &str, data: &Path, file: &Path) -> String {
    let args = ["snapshot", action, "--data-dir", data.to_str().unwrap(), file.to_str().unwrap()];
    let (code, stderr) = run_bounded(&bin("meshd"), &args, Duration::from_secs(20));
    assert_eq!(code, Some(0), "meshd snapshot {action}: {stderr}");
    std::fs::read_to_string(file).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_by_name_and_a_snapshot_brings_it_back() {
    let dir = TempDir::new("damaged-store");
    let data = dir.path("data");
    let meshd = Meshd::start(&data);
    meshd.ctl_ok(&["register", "web", "--version", "v1", "--addr", "127.0.0.1:8080"]);
    let services = meshd.ctl_json(&["get", "services"]);
    // While meshd runs, its store is in use, not damaged: nothing to repair.
    let early = dir.path("early.json");
    let args = ["snapshot", "save", "--data-dir", data.to_str().unwrap(), early.to_str().unwrap()];
    let (code, stderr) = run_bounded(&bin("meshd"), &args, Duration::from_secs(20));
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(stderr.contains("in use") && stderr.contains("stop meshd first"), "{stderr}");
    assert!(!stderr.contains("is damaged") && !stderr.contains("--reinitialize"), "{stderr}");
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let saved = snapshot("save", &data, &dir.path("backup.json"));
    assert!(saved.contains("BEGIN CERTIFICATE"), "the snapshot holds the CA");
    let store = data.join("meshd.redb");
    let good = std::fs::read(&store).unwrap();

    // (what, the damage, words of the error)
    let scribbled: Vec<u8> =
        good.iter().enumerate().map(|(i, b)| if (i / 512) % 2 == 1 { !b } else { *b }).collect();
    let cases: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("truncated", Some(good[..good.len() / 2].to_vec()), "damaged"),
        ("bit-flipped", Some(scribbled), "damaged"),
        ("zero bytes", Some(Vec::new()), "empty (0 bytes)"),
        ("gone", None, "is missing"),
    ];
    for (what, damage, words) in cases {
        let _ = std::fs::remove_file(&store);
        if let Some(bytes) = damage {
            std::fs::write(&store, bytes).unwrap();
        }
        let stderr = refused_start(&data, &[]);
        assert!(stderr.contains("meshd.redb") && stderr.contains(words), "{what}: {stderr}");
        assert!(
            stderr.contains("--reinitialize") && stderr.contains("snapshot"),
            "{what} says what to do: {stderr}"
        );
    }

    // The snapshot brings everything back: routes, and the same CA.
    snapshot("restore", &data, &dir.path("backup.json"));
    let meshd = Meshd::start(&data);
    assert_eq!(meshd.ctl_json(&["get", "services"]), services);
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let again = snapshot("save", &data, &dir.path("again.json"));
    assert_eq!(again, saved, "the restored store holds what was saved");

    // --reinitialize starts a new mesh on purpose, and keeps the old file aside.
    std::fs::write(&store, b"garbage").unwrap();
    let meshd = Meshd::start_with(&data, "127.0.0.1:0", &["--reinitialize"]);
    assert_eq!(meshd.ctl_json(&["get", "services"]), serde_json::json!([]));
    let kept = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(".old-"));
    assert!(kept, "the damaged file is kept aside");
}

/// A small tmpfs of the test's own, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs (the suite runs as root)");
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", self.0.to_str().unwrap()]).status();
    }
}

/// Fills the file system under `file` until it refuses more.
fn fill(file: &Path) {
    use std::io::Write;
    let mut out = std::fs::File::create(file).unwrap();
    let block = vec![7u8; 64 * 1024];
    for _ in 0..100_000 {
        if out.write_all(&block).and_then(|()| out.sync_data()).is_err() {
            return;
        }
    }
    panic!("the small disk never filled");
}

async fn ready_status(admin: &str) -> u16 {
    let client = mesh_tests::client::http1();
    mesh_tests::client::get(&client, admin, "meshd", "/ready").await.map(|a| a.status.as_u16()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_clearly_and_meshd_recovers_when_space_is_back() {
    let dir = TempDir::new("full-disk");
    let disk = SmallDisk::mount(dir.path("disk"), "8m");
    let meshd = Meshd::start(&disk.0.join("data"));
    meshd.ctl_ok(&["register", "web", "--version", "v1", "--addr", "127.0.0.1:8080"]);
    assert_eq!(ready_status(&meshd.admin).await, 200);
    fill(&disk.0.join("filler"));

    // Writes fail: with their own exit code and message, and meshd says it is not ready.
    let mut failed = None;
    for port in 8081..8581u16 {
        let addr = format!("127.0.0.1:{port}");
        let (code, _, stderr) = meshd.ctl(&["register", "web", "--version", "v1", "--addr", &addr]);
        if code != 0 {
            failed = Some((addr, code, stderr));
            break;
        }
    }
    let (addr, code, stderr) = failed.expect("a write fails on a full disk");
    assert_eq!(code, 5, "the store-write exit code: {stderr}");
    assert!(stderr.contains("cannot write its store"), "{stderr}");
    assert_eq!(ready_status(&meshd.admin).await, 503, "not ready while writes fail");
    let registered = meshd.ctl_json(&["get", "endpoints"]).to_string();
    assert!(registered.contains("127.0.0.1:8080"), "{registered}");
    assert!(!registered.contains(&addr), "the failed change was not applied: {registered}");

    // Twenty changes at once, committed in groups: every caller hears how
    // its own change ended, and a failed one is nowhere.
    let channel = meshd.channel().await;
    let mut calls = tokio::task::JoinSet::new();
    for port in 9000..9020u16 {
        let mut registry = RegistryClient::new(channel.clone());
        calls.spawn(async move {
            let endpoint = pb::Endpoint {
                service: "web".into(),
                version: "v1".into(),
                addr: format!("127.0.0.1:{port}"),
                ready: true,
                meshed: false,
                quic: false,
            };
            let call =
                registry.register(pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok: false });
            let answer = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .expect("every caller gets an answer");
            (port, answer.map(|_| ()))
        });
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = calls.join_next().await {
        outcomes.push(outcome.unwrap());
    }
    let registered = meshd.ctl_json(&["get", "endpoints"]).to_string();
    let mut failures = 0;
    for (port, answer) in &outcomes {
        let present = registered.contains(&format!("127.0.0.1:{port}\""));
        match answer {
            Ok(()) => assert!(present, "an acknowledged change is applied: {port}"),
            Err(status) => {
                failures += 1;
                assert_eq!(
                    status.metadata().get("mesh-failure").and_then(|v| v.to_str().ok()),
                    Some("store-write"),
                    "{status:?}"
                );
                assert!(!present, "a failed change is not applied: {port} in {registered}");
            }
        }
    }
    assert!(failures >= 10, "the full disk failed the group commits: {failures} of 20 failed");

    // Space comes back: meshd writes again without a restart.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    eventually("meshd is ready again", Duration::from_secs(10), || async {
        (ready_status(&meshd.admin).await == 200).then_some(())
    })
    .await;
    meshd.ctl_ok(&["register", "web", "--version", "v1", "--addr", &addr]);
    assert!(meshd.ctl_json(&["get", "endpoints"]).to_string().contains(&addr));
    drop(meshd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_paused_past_its_ttl_runs_no_instance_twice_when_it_resumes() {
    let dir = TempDir::new("paused-agent");
    let (meshd, _a, b, before) = web_on_two_nodes(&dir, &["--heartbeat-ttl", "1s"]).await;
    let (on_b, (_, b_pid)) =
        before.iter().find(|(_, (node, _))| node == "node-b").expect("an instance on node-b");
    let (on_b, b_pid) = (on_b.clone(), *b_pid);

    // node-b's agent stops (its app keeps running); after the TTL the
    // instance is replaced on node-a.
    b.0.signal(libc::SIGSTOP);
    let replaced = eventually("node-b's instance is replaced on node-a", Duration::from_secs(20), || {
        let now = placed(&meshd, "web");
        let done =
            now.len() == 2 && !now.contains_key(&on_b) && now.values().all(|(node, _)| node == "node-a");
        async move { done.then_some(now) }
    })
    .await;
    assert!(alive(b_pid), "the paused node's app still runs: nothing could stop it");

    // node-b resumes: its stale instance is stopped, not adopted, and the
    // job has exactly its two replicas, both the replacements.
    b.0.signal(libc::SIGCONT);
    eventually("the stale instance on node-b stops and leaves the listing", Duration::from_secs(20), || {
        let gone = !alive(b_pid) && meshd.instances().iter().all(|i| i["id"] != on_b.as_str());
        async move { gone.then_some(()) }
    })
    .await;
    let settle_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle_until {
        assert_eq!(placed(&meshd, "web"), replaced, "the job keeps its two replacements, nothing else");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
