//! The scheduler end to end: real meshd server and agents (one per
//! loopback address), jobs submitted with meshctl, instances running as
//! processes beside their own mesh-proxy, traffic through the mesh.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use mesh_tests::client::Background;
use mesh_tests::process::{alive, cgroup_dir, cgroup_v2, Agent, Meshd};
use mesh_tests::{bin, eventually, TempDir};
use serde_json::Value;

fn agent(meshd: &Meshd, name: &str, ip: &str, data: &Path, cpu_millis: u32) -> Agent {
    Agent::start(meshd, name, ip, cpu_millis, data, &[])
}

/// A service job of `replicas` mesh-echo instances, with a readiness check.
fn echo_job(name: &str, version: &str, replicas: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nservice = \"web\"\nversion = \"{version}\"\nreplicas = {replicas}\n\n[task]\ncommand = \"mesh-echo\"\nargs = [\"--version\", \"{version}\", \"--message\", \"hello from ${{MESH_INSTANCE}}\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[health]\nreadiness = {{ http = \"/ready\", interval = \"200ms\", timeout = \"500ms\", failures = 1 }}\n{extra}"
    )
}

/// The memory limit (bytes) and CPU quota (µs per 100 ms) of the cgroups
/// a process is in, on cgroup v1 or v2.
fn cgroup_limits(pid: i64) -> (u64, u64) {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let group = |controller| {
        cgroup_dir(pid, controller).unwrap_or_else(|| panic!("{pid} has no {controller} cgroup"))
    };
    if cgroup_v2() {
        let memory = read(group("memory").join("memory.max")).trim().parse().unwrap();
        let cpu = read(group("cpu").join("cpu.max")).split_whitespace().next().unwrap().parse().unwrap();
        (memory, cpu)
    } else {
        let memory = read(group("memory").join("memory.limit_in_bytes"));
        let cpu = read(group("cpu").join("cpu.cfs_quota_us"));
        (memory.trim().parse().unwrap(), cpu.trim().parse().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_beside_sidecars_heals_and_moves_off_a_dead_node() {
    let dir = TempDir::new("scheduler");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let node_a = agent(&meshd, "node-a", "127.0.0.2", &dir.path("a"), 1000);
    let _node_b =
        Agent::start(&meshd, "node-b", "127.0.0.3", 1000, &dir.path("b"), &["--attribute", "zone=b"]);
    let job_file = dir.path("web.toml");
    std::fs::write(&job_file, echo_job("web", "v1", 3, "\n[placement]\nstrategy = \"spread\"\n")).unwrap();
    let out = meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    assert!(out.contains("job web submitted"), "{out}");

    // Placed, started beside a sidecar, ready, with the fields users read.
    let list = meshd.running("web", 3, Duration::from_secs(30)).await;
    let nodes: BTreeSet<&str> = list.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, BTreeSet::from(["node-a", "node-b"]), "spread uses both nodes: {list:?}");
    for instance in &list {
        assert_eq!(instance["version"], "v1");
        assert!(alive(instance["pid"].as_i64().unwrap()), "{instance}");
        assert!(alive(instance["proxy_pid"].as_i64().unwrap()), "{instance}");
        let ip = if instance["node"] == "node-a" { "127.0.0.2:" } else { "127.0.0.3:" };
        assert!(instance["addr"].as_str().unwrap().starts_with(ip), "{instance}");
    }
    // The app's environment is the contract's.
    let first = &list[0];
    let environ = std::fs::read(format!("/proc/{}/environ", first["pid"])).unwrap();
    let environ: Vec<String> =
        environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    let var = |name: &str| {
        environ
            .iter()
            .find_map(|v| v.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {environ:?}"))
            .to_owned()
    };
    assert_eq!(var("MESH_JOB"), "web");
    assert_eq!(var("MESH_INSTANCE"), first["id"].as_str().unwrap());
    assert_eq!(var("MESH_VERSION"), "v1");
    assert!(var("PORT").parse::<u16>().is_ok());
    assert_eq!(var("HTTP_PROXY"), format!("http://{}", var("MESH_OUTBOUND")));
    // The app runs inside a cgroup holding the job's limits (32 MB, 100 CPU millis).
    let (memory_limit, cpu_quota) = cgroup_limits(first["pid"].as_i64().unwrap());
    assert_eq!(memory_limit, 32 * 1024 * 1024);
    assert_eq!(cpu_quota, 10_000, "100 CPU millis: 10 ms per 100 ms period");
    // It runs in its own working directory, and `${MESH_INSTANCE}` in its args became its id.
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", first["pid"])).unwrap();
    assert!(cwd.ends_with(format!("instances/{}/work", first["id"].as_str().unwrap())), "{}", cwd.display());
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", first["pid"])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(&format!("hello from {}", first["id"].as_str().unwrap())), "{cmdline}");
    // Its endpoint is its sidecar's inbound listener, and it is ready. The
    // registration follows the agent's report once it is stored, a moment
    // after the instance list shows it.
    let expected: BTreeSet<String> = list.iter().map(|i| i["addr"].as_str().unwrap().to_owned()).collect();
    eventually("every ready instance's endpoint is ready", Duration::from_secs(10), || {
        let endpoints = meshd.ctl_json(&["get", "endpoints"]);
        let addrs: BTreeSet<String> = endpoints
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["service"] == "web" && e["ready"] == true)
            .map(|e| e["addr"].as_str().unwrap().to_owned())
            .collect();
        let matches = addrs == expected;
        async move { matches.then_some(()) }
    })
    .await;

    // Traffic through a meshed client's sidecar (mTLS to web's, kept off node-a) reaches every instance.
    let client = meshd
        .mesh_client(&dir.path("client.toml"), "[[constraints]]\nattribute = \"zone\"\nvalue = \"b\"\n")
        .await;
    let load = Background::start(&client, "web", 4);
    load.wait_for(300).await;

    // An app killed with SIGKILL comes back (with backoff), same instance.
    let victim = list.iter().find(|i| i["node"] == "node-b").unwrap().clone();
    let victim_id = victim["id"].as_str().unwrap().to_owned();
    unsafe { libc::kill(victim["pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
    let restarted = eventually("the killed app restarts", Duration::from_secs(15), || {
        let back = meshd.instances().into_iter().find(|i| {
            i["id"] == victim_id.as_str()
                && i["restarts"].as_u64() >= Some(1)
                && i["state"] == "running"
                && i["ready"] == true
                && i["pid"] != victim["pid"]
        });
        async move { back }
    })
    .await;
    assert_eq!(restarted["node"], victim["node"]);
    load.wait_for(300).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "failed requests around the app's restart: {:?}", tally.failures);
    let answering: BTreeSet<&String> = tally.by_instance.keys().collect();
    assert!(answering.len() >= 3, "every instance answered some requests: {answering:?}");
    // From here retries are off and half the load is POSTs, which no
    // proxy may resend: what the tables say is what the callers get.
    meshd.ctl_ok(&["policy", "web", "--retry-attempts", "1", "--wait"]);
    let load = Background::start(&client, "web", 2);
    let posts = Background::posts(&client, "web", 2);
    load.wait_for(200).await;
    posts.wait_for(100).await;

    // Node A dies (its agent and, with it, its instances): everything runs on B.
    node_a.kill();
    // Within the TTL (1 s) and a few seconds to start sidecars and apps.
    let moved = eventually("the instances move to node-b", Duration::from_secs(12), || {
        let list: Vec<Value> = meshd
            .instances()
            .into_iter()
            .filter(|i| i["job"] == "web" && i["state"] == "running" && i["ready"] == true)
            .collect();
        let all_on_b = list.len() == 3 && list.iter().all(|i| i["node"] == "node-b");
        async move { all_on_b.then_some(list) }
    })
    .await;
    // Requests in flight to node-a, or sent before its death was noticed
    // (one TTL), can fail without retries; each says why, and none hangs.
    let mut tally = load.stop().await;
    let post_tally = posts.stop().await;
    tally.failures.extend(post_tally.failures);
    // With retries off, a request whose answer was under way when node-a's
    // sidecar was killed can only be cut (its headers may have left
    // already): at most one per concurrent caller (2 GET and 2 POST loops).
    // Every other failure is a mesh error with its reason.
    let mut cut = 0;
    for (failure, count) in &tally.failures {
        if failure.starts_with("request failed") || failure.starts_with("body failed") {
            cut += count;
            continue;
        }
        assert!(
            failure.starts_with("502 ") || failure.starts_with("503 ") || failure.starts_with("504 "),
            "a failure while node-a died is a mesh error with its reason: {:?}",
            tally.failures
        );
        assert!(failure.split(' ').nth(3).is_some_and(|reason| !reason.is_empty()), "{failure}");
    }
    assert!(cut <= 4, "only requests in flight at the death may be cut: {:?}", tally.failures);
    // Once the instances run on node-b, node-a's endpoints are out of every table.
    let load = Background::start(&client, "web", 2);
    let posts = Background::posts(&client, "web", 2);
    load.wait_for(300).await;
    posts.wait_for(150).await;
    let tally = load.stop().await;
    let post_tally = posts.stop().await;
    assert_eq!(tally.failed() + post_tally.failed(), 0, "failed after the move: {tally:?} {post_tally:?}");
    assert!(tally.by_instance.keys().all(|id| moved.iter().any(|i| i["id"] == id.as_str())), "{tally:?}");

    // Stopping the job stops every process and removes its endpoints.
    let pids: Vec<i64> =
        moved.iter().flat_map(|i| [i["pid"].as_i64().unwrap(), i["proxy_pid"].as_i64().unwrap()]).collect();
    meshd.ctl_ok(&["job", "stop", "web"]);
    eventually("the job's processes exit", Duration::from_secs(20), || {
        let gone = pids.iter().all(|pid| !alive(*pid));
        async move { gone.then_some(()) }
    })
    .await;
    eventually("the job's endpoints leave the registry", Duration::from_secs(5), || {
        let endpoints = meshd.ctl_json(&["get", "endpoints"]);
        let none = endpoints.as_array().unwrap().iter().all(|e| e["service"] != "web");
        async move { none.then_some(()) }
    })
    .await;
    // The service stays (its policy waits for endpoints to come back) and says it is orphaned.
    let services = meshd.ctl_json(&["get", "services"]);
    let web = services.as_array().unwrap().iter().find(|s| s["name"] == "web").expect("web is listed");
    assert_eq!(web["note"], "orphaned: no job or endpoint", "{web}");
    let client =
        services.as_array().unwrap().iter().find(|s| s["name"] == "client").expect("client is listed");
    assert_eq!(client["note"], "", "a service with a job is not orphaned: {client}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_is_restarted_beside_its_running_app() {
    let dir = TempDir::new("sidecar-death");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 2000);
    let job_file = dir.path("web.toml");
    std::fs::write(&job_file, echo_job("web", "v1", 2, "")).unwrap();
    meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    let list = meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    let load = Background::start(&client, "web", 4);
    load.wait_for(200).await;

    let victim = list[0].clone();
    let old_proxy = victim["proxy_pid"].as_i64().unwrap();
    unsafe { libc::kill(old_proxy as i32, libc::SIGKILL) };
    let back = eventually("the sidecar is back and the endpoint ready", Duration::from_secs(10), || {
        let found = meshd.instances().into_iter().find(|i| {
            i["id"] == victim["id"]
                && i["proxy_restarts"].as_u64() == Some(1)
                && i["proxy_pid"].as_i64().is_some_and(|pid| pid != old_proxy && pid > 0 && alive(pid))
                && i["ready"] == true
                && i["state"] == "running"
        });
        async move { found }
    })
    .await;
    assert_eq!(back["pid"], victim["pid"], "the app kept running: {back}");
    assert_eq!(back["restarts"], 0, "the app was not restarted: {back}");
    // Its endpoint is registered ready again once the report is stored.
    eventually("its endpoint is ready again", Duration::from_secs(10), || {
        let endpoints = meshd.ctl_json(&["get", "endpoints"]);
        let ready =
            endpoints.as_array().unwrap().iter().any(|e| e["addr"] == victim["addr"] && e["ready"] == true);
        async move { ready.then_some(()) }
    })
    .await;
    // Traffic reaches the instance through its new sidecar.
    load.wait_for(300).await;
    let tally = load.stop().await;
    // Every request the sidecar's death reached is retried elsewhere, even
    // one whose answer's headers had left it: the caller's sidecar holds
    // headers until the body begins, so a death in between is retried too.
    assert_eq!(tally.failed(), 0, "failed requests around the sidecar's death: {:?}", tally.failures);
    eventually("the instance answers callers again", Duration::from_secs(10), || {
        let (client, id) = (client.clone(), victim["id"].as_str().unwrap().to_owned());
        async move {
            let after = mesh_tests::client::closed_loop(&client, "web", 100, 4).await;
            assert_eq!(after.failed(), 0, "{:?}", after.failures);
            after.by_instance.contains_key(&id).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_completes_and_its_sidecar_exits_with_it() {
    let dir = TempDir::new("batch");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let job = "name = \"report\"\nversion = \"v1\"\nkind = \"batch\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo finished $MESH_INSTANCE\"]\n";
    let job_file = dir.path("report.toml");
    std::fs::write(&job_file, job).unwrap();
    meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    let status = eventually("the batch job completes", Duration::from_secs(30), || {
        let status = meshd.ctl_json(&["job", "status", "report"]);
        async move { (status[0]["state"] == "complete").then_some(status) }
    })
    .await;
    assert_eq!(status[0]["kind"], "batch");
    let list = meshd.instances();
    let instance = list.iter().find(|i| i["job"] == "report").expect("the instance is listed");
    assert_eq!(instance["state"], "complete");
    assert_eq!(instance["proxy_pid"], 0, "the sidecar has exited: {instance}");
    let log = std::fs::read_to_string(dir.path("a").join("instances/report-0/app.stdout.log")).unwrap();
    assert_eq!(log, "finished report-0\n");
    // Still complete a while later: a finished batch instance is not run again.
    let sidecars = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("--proxy-id\0report-") && c.contains(&format!("--control\0{}\0", meshd.listen))
                })
            })
            .count()
    };
    assert_eq!(sidecars(), 0);
    assert_eq!(meshd.ctl_json(&["job", "status", "report"])[0]["state"], "complete");
}

#[test]
fn a_bad_job_file_changes_nothing_and_names_the_field() {
    let dir = TempDir::new("bad-job");
    let meshd = Meshd::start(&dir.path("data"));
    let cases = [
        ("name = \"web\"\nversion = \"v1\"\nreplicas = -1\n[task]\ncommand = \"x\"\n", "replicas"),
        (
            "name = \"web\"\nversion = \"v1\"\n[task]\ncommand = \"x\"\n[resources]\ncpu_millis = \"lots\"\n",
            "cpu_millis",
        ),
        ("name = \"Web Server\"\nversion = \"v1\"\n[task]\ncommand = \"x\"\n", "name"),
        ("name = \"web\"\nversion = \"v1\"\n[task]\ncommand = \"x\"\ncolour = \"blue\"\n", "colour"),
        ("name = \"web\"\n[task]\ncommand = \"x\"\n", "version"),
    ];
    for (text, field) in cases {
        let file = dir.path("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (code, _, stderr) = meshd.ctl(&["job", "run", file.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert!(stderr.contains(field), "{text}: the error names `{field}`: {stderr}");
    }
    assert_eq!(meshd.ctl_json(&["get", "jobs"]), serde_json::json!([]));
    assert_eq!(meshd.ctl_json(&["get", "instances"]), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overcommitted_job_waits_with_the_reason() {
    let dir = TempDir::new("overcommit");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 250);
    let job_file = dir.path("big.toml");
    // 3 × 100 CPU millis on a node with 250: two fit, one waits.
    std::fs::write(&job_file, echo_job("big", "v1", 3, "")).unwrap();
    let out = meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()]);
    // `job run` says at once where the instances went, and why not all did.
    assert!(out.contains("placed 2 of 3; 1 unplaced") && out.to_lowercase().contains("cpu"), "{out}");
    meshd.running("big", 2, Duration::from_secs(30)).await;
    let status = eventually("the job reports why one instance waits", Duration::from_secs(10), || {
        let status = meshd.ctl_json(&["job", "status", "big"]);
        async move { (status[0]["state"] == "pending").then_some(status) }
    })
    .await;
    let reason = status[0]["pending"].as_str().unwrap();
    assert!(reason.contains("1 unplaced") && reason.to_lowercase().contains("cpu"), "{reason}");
    // Tables stay within 100 columns; the reason is in `job status`.
    let jobs = meshd.ctl_ok(&["get", "jobs"]);
    assert!(jobs.lines().all(|l| l.chars().count() <= 100), "{jobs}");
    let status = meshd.ctl_ok(&["job", "status", "big"]);
    let mut lines = status.lines();
    assert_eq!(lines.next(), Some("job big: a service job of service web, version v1, pending"), "{status}");
    assert_eq!(lines.next(), Some("instances: 3 wanted, 2 running, 2 ready"), "{status}");
    assert!(status.contains(reason), "{status}");
}

/// (version, state, ready) of every instance of `job`, sorted.
fn versions(meshd: &Meshd, job: &str) -> Vec<(String, String, bool)> {
    let mut list: Vec<(String, String, bool)> = meshd
        .instances()
        .into_iter()
        .filter(|i| i["job"] == job)
        .map(|i| {
            (
                i["version"].as_str().unwrap().to_owned(),
                i["state"].as_str().unwrap().to_owned(),
                i["ready"] == true,
            )
        })
        .collect();
    list.sort();
    list
}

fn all_running(version: &str, count: usize) -> Vec<(String, String, bool)> {
    vec![(version.to_owned(), "running".to_owned(), true); count]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_fail_no_request_and_a_bad_version_rolls_back() {
    let dir = TempDir::new("rolling");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _a = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 2000);
    let _b = agent(&meshd, "node-b", &mesh_tests::node_ip(), &dir.path("b"), 2000);
    let update = |canary: u32| {
        format!("\n[update]\nmax_parallel = 1\nmin_healthy = \"500ms\"\nhealthy_deadline = \"4s\"\ncanary = {canary}\nauto_revert = true\n")
    };
    let job_file = dir.path("web.toml");
    let submit = |text: String| {
        std::fs::write(&job_file, text).unwrap();
        meshd.ctl_ok(&["job", "run", job_file.to_str().unwrap()])
    };
    submit(echo_job("web", "v1", 3, &update(0)));
    meshd.running("web", 3, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;
    // Retries off, and half the load non-idempotent POSTs: an instance
    // stopped before its endpoint left the callers' tables fails requests
    // here, where retries would hide it.
    meshd.ctl_ok(&["policy", "web", "--retry-attempts", "1", "--wait"]);
    let load = Background::start(&client, "web", 2);
    let posts = Background::posts(&client, "web", 2);
    load.wait_for(200).await;
    posts.wait_for(100).await;

    // v1 → v2 under load: new instances come up one at a time, old ones go.
    submit(echo_job("web", "v2", 3, &update(0)));
    eventually("every instance runs v2", Duration::from_secs(60), || {
        let done = versions(&meshd, "web") == all_running("v2", 3);
        async move { done.then_some(()) }
    })
    .await;
    let status = meshd.ctl_json(&["job", "status", "web"]);
    assert_eq!(status[0]["version"], "v2");
    eventually("the update reports completion", Duration::from_secs(5), || {
        let status = meshd.ctl_json(&["job", "status", "web"]);
        async move { (status[0]["deployment"] == "updated from v1 to v2").then_some(()) }
    })
    .await;
    load.wait_for(200).await;

    // v3 never becomes ready: rolled back to v2, and the status says why.
    let not_ready = echo_job("web", "v3", 3, &update(0))
        .replace("\"--version\", \"v3\"", "\"--version\", \"v3\", \"--not-ready\"");
    assert!(not_ready.contains("--not-ready"), "{not_ready}");
    submit(not_ready);
    let status = eventually("the update to v3 is rolled back", Duration::from_secs(30), || {
        let status = meshd.ctl_json(&["job", "status", "web"]);
        let rolled_back =
            status[0]["deployment"].as_str().is_some_and(|d| d.starts_with("rolled back to v2"));
        async move { rolled_back.then_some(status) }
    })
    .await;
    let why = status[0]["deployment"].as_str().unwrap();
    assert!(why.contains("v3 not healthy within 4s") && why.contains("/ready"), "{why}");
    assert_eq!(status[0]["version"], "v2");
    eventually("only v2 runs again", Duration::from_secs(20), || {
        let done = versions(&meshd, "web") == all_running("v2", 3);
        async move { done.then_some(()) }
    })
    .await;

    // A canary runs beside v2 until promoted.
    submit(echo_job("web", "v4", 3, &update(1)));
    eventually("the canary waits for promotion", Duration::from_secs(30), || {
        let status = meshd.ctl_json(&["job", "status", "web"]);
        let waiting = status[0]["deployment"]
            .as_str()
            .is_some_and(|d| d.contains("waiting for `meshctl job promote web`"));
        async move { waiting.then_some(()) }
    })
    .await;
    let mut expected = all_running("v2", 3);
    expected.push(("v4".to_owned(), "running".to_owned(), true));
    assert_eq!(versions(&meshd, "web"), expected);
    meshd.ctl_ok(&["job", "promote", "web"]);
    eventually("every instance runs v4", Duration::from_secs(60), || {
        let done = versions(&meshd, "web") == all_running("v4", 3);
        async move { done.then_some(()) }
    })
    .await;
    load.wait_for(200).await;
    posts.wait_for(100).await;

    let services = meshd.ctl_json(&["get", "services"]);
    let web = services.as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web["policy"]["retry_attempts"], 1, "retries stayed off through the updates: {web}");
    let post_tally = posts.stop().await;
    assert_eq!(post_tally.failed(), 0, "failed POSTs during the updates: {:?}", post_tally.failures);
    let tally = load.stop().await;
    assert_eq!(tally.failed(), 0, "failed requests during the updates: {:?}", tally.failures);
    for version in ["v1", "v2", "v4"] {
        assert!(tally.by_version.contains_key(version), "{version} answered: {:?}", tally.by_version);
    }
    assert!(
        !tally.by_version.contains_key("v3"),
        "the never-ready v3 got no traffic: {:?}",
        tally.by_version
    );
}

/// A job of `replicas` light instances (a sleeping shell, no health
/// check: ready once started), placed as `placement` says.
fn sleeper_job(name: &str, replicas: u32, cpu_millis: u32, placement: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"v1\"\nreplicas = {replicas}\n\n[task]\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\n\n[resources]\ncpu_millis = {cpu_millis}\nmemory_mb = 64\n\n[placement]\n{placement}\n"
    )
}

/// Instances per node of `job`, sorted, once `count` are running.
async fn spread_of(meshd: &Meshd, job: &str, count: usize) -> Vec<usize> {
    let list = meshd.running(job, count, Duration::from_secs(60)).await;
    let mut per_node: std::collections::BTreeMap<String, usize> = Default::default();
    for instance in &list {
        *per_node.entry(instance["node"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_node.into_values().collect();
    counts.sort_unstable();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_replicas_on_three_nodes_go_where_the_policy_says() {
    let dir = TempDir::new("placement");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _agents: Vec<Agent> = ["a", "b", "c"]
        .iter()
        .map(|name| agent(&meshd, &format!("node-{name}"), &mesh_tests::node_ip(), &dir.path(name), 1000))
        .collect();
    eventually("three nodes up", Duration::from_secs(10), || {
        let up =
            meshd.ctl_json(&["get", "nodes"]).as_array().unwrap().iter().filter(|n| n["up"] == true).count();
        async move { (up == 3).then_some(()) }
    })
    .await;
    let file = dir.path("job.toml");
    let run = |text: String| {
        std::fs::write(&file, text).unwrap();
        meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    };
    // (job, cpu per instance, placement, instances per used node)
    let cases = [
        ("packed", 300, "strategy = \"bin-pack\"", vec![3, 3]),
        ("spread", 100, "strategy = \"spread\"", vec![2, 2, 2]),
    ];
    for (job, cpu, placement, expected) in cases {
        run(sleeper_job(job, 6, cpu, placement));
        assert_eq!(spread_of(&meshd, job, 6).await, expected, "{job}");
        meshd.ctl_ok(&["job", "stop", job]);
        eventually("the job's instances are gone", Duration::from_secs(30), || {
            let none = meshd.instances().iter().all(|i| i["job"] != job);
            async move { none.then_some(()) }
        })
        .await;
    }
    // Anti-affinity: one per node; the other three wait, and say why.
    run(sleeper_job("apart", 6, 100, "anti_affinity = true"));
    assert_eq!(spread_of(&meshd, "apart", 3).await, vec![1, 1, 1]);
    let status = eventually("the rest waits with a reason", Duration::from_secs(10), || {
        let status = meshd.ctl_json(&["job", "status", "apart"]);
        async move { (status[0]["state"] == "pending").then_some(status) }
    })
    .await;
    let reason = status[0]["pending"].as_str().unwrap();
    assert!(reason.contains("3 unplaced") && reason.contains("anti-affinity"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_restarts_neither_orphans_nor_duplicates_instances() {
    let dir = TempDir::new("agent-restart");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "2s"]);
    let node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let file = dir.path("job.toml");
    std::fs::write(&file, echo_job("web", "v1", 2, "")).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let before = meshd.running("web", 2, Duration::from_secs(30)).await;
    let old_pids: Vec<i64> =
        before.iter().flat_map(|i| [i["pid"].as_i64().unwrap(), i["proxy_pid"].as_i64().unwrap()]).collect();

    // The agent dies and comes back at once, before its node is declared down.
    node.kill();
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    eventually("the old processes are gone", Duration::from_secs(10), || {
        let gone = old_pids.iter().all(|pid| !alive(*pid));
        async move { gone.then_some(()) }
    })
    .await;
    let after = eventually("the same instances run again, once each", Duration::from_secs(30), || {
        let list: Vec<Value> = meshd.instances().into_iter().filter(|i| i["job"] == "web").collect();
        let fresh = list.len() == 2
            && list.iter().all(|i| {
                i["state"] == "running"
                    && i["ready"] == true
                    && !old_pids.contains(&i["pid"].as_i64().unwrap())
            });
        async move { fresh.then_some(list) }
    })
    .await;
    let ids =
        |list: &[Value]| list.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&after), ids(&before), "the scheduler's instances, not new ones");
    // Exactly one app and one sidecar per instance on the machine.
    for instance in &after {
        let id = instance["id"].as_str().unwrap();
        let sidecars = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                // This test's sidecars: other tests run instances with the same ids.
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains(&format!("--proxy-id\0{id}\0"))
                        && c.contains(&format!("--control\0{}\0", meshd.listen))
                })
            })
            .filter(|e| e.file_name().to_str().and_then(|p| p.parse::<i64>().ok()).is_some_and(alive))
            .count();
        assert_eq!(sidecars, 1, "one sidecar for {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_server_is_ready_only_once_its_health_service_says_serving() {
    let dir = TempDir::new("grpc-health");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let flag = dir.path("serving");
    let script = mesh_tests::workspace_dir().join("tests/python/grpc_health_server.py");
    let job = format!(
        "name = \"greeter\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"{}\"\nargs = [\"{}\", \"{}\"]\n# The test's Python may live in root's home (pyenv), which nobody can enter.\nuser = \"root\"\n\n[[ports]]\nname = \"grpc\"\nprotocol = \"grpc\"\n\n[health]\nreadiness = {{ grpc = true, interval = \"200ms\", timeout = \"2s\", failures = 1 }}\n",
        mesh_tests::python().display(),
        script.display(),
        flag.display()
    );
    let file = dir.path("greeter.toml");
    std::fs::write(&file, job).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);

    // Running, answering its health checks with NOT_SERVING: not ready, no traffic.
    let instance = eventually("the agent sees NOT_SERVING", Duration::from_secs(60), || {
        let found = meshd.instances().into_iter().find(|i| {
            i["state"] == "running" && i["message"].as_str().is_some_and(|m| m.contains("NOT_SERVING"))
        });
        async move { found }
    })
    .await;
    assert_eq!(instance["ready"], false, "{instance}");
    let endpoint_ready = |meshd: &Meshd| {
        meshd
            .ctl_json(&["get", "endpoints"])
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["service"] == "greeter" && e["ready"] == true)
    };
    assert!(!endpoint_ready(&meshd), "no ready endpoint while NOT_SERVING");
    // The job's declared port protocol is its service's, for every proxy.
    let services = meshd.ctl_json(&["get", "services"]);
    let greeter = services.as_array().unwrap().iter().find(|s| s["name"] == "greeter").expect("the service");
    assert_eq!(greeter["policy"]["protocol"], "grpc", "{greeter}");

    // It reports SERVING: ready, and its endpoint with it.
    std::fs::write(&flag, "").unwrap();
    meshd.running("greeter", 1, Duration::from_secs(10)).await;
    eventually("the endpoint turns ready", Duration::from_secs(5), || {
        let ready = endpoint_ready(&meshd);
        async move { ready.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_keeps_exiting_backs_off_and_shows_a_crash_loop() {
    let dir = TempDir::new("crash-loop");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let job = "name = \"flaky\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"echo starting $(date +%s%N); exit 3\"]\n";
    let file = dir.path("flaky.toml");
    std::fs::write(&file, job).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let started = std::time::Instant::now();
    let instance = eventually("the status shows a crash loop", Duration::from_secs(30), || {
        let found = meshd.instances().into_iter().find(|i| {
            i["job"] == "flaky" && i["message"].as_str().is_some_and(|m| m.starts_with("crash loop"))
        });
        async move { found }
    })
    .await;
    let message = instance["message"].as_str().unwrap();
    assert!(message.contains("exit status: 3"), "{message}");
    assert!(instance["restarts"].as_u64().unwrap() >= 3, "{instance}");
    // Backoff doubles from 250 ms: the n-th restart waits at least
    // 250 ms × 2^n after the exit before it (a fixed delay fails this), and
    // not much more (a stuck supervisor fails that).
    let log_path = dir.path("a").join("instances/flaky-0/app.stdout.log");
    let starts: Vec<u64> = eventually("four starts are logged", Duration::from_secs(15), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let starts: Vec<u64> = log
            .lines()
            .map(|l| {
                l.strip_prefix("starting ").and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{log}"))
            })
            .collect();
        async move { (starts.len() >= 4).then_some(starts) }
    })
    .await;
    for (n, pair) in starts.windows(2).take(3).enumerate() {
        let gap = Duration::from_nanos(pair[1] - pair[0]);
        let backoff = Duration::from_millis(250) * 2u32.pow(n as u32);
        assert!(
            gap >= backoff && gap < backoff + Duration::from_secs(3),
            "restart {n}: {gap:?} after the last start"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_job_file_at_the_same_version_rolls_out_and_an_identical_one_changes_nothing() {
    let dir = TempDir::new("same-version");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let job = |script: &str, replicas: u32| {
        format!("name = \"fixme\"\nversion = \"v1\"\nreplicas = {replicas}\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\n\n[resources]\ncpu_millis = 10\nmemory_mb = 16\n\n[update]\nmin_healthy = \"200ms\"\n")
    };
    let file = dir.path("fixme.toml");
    let submit = |text: String| {
        std::fs::write(&file, text).unwrap();
        meshd.ctl_ok(&["job", "run", file.to_str().unwrap()])
    };
    submit(job("exit 3", 2));
    eventually("the broken job crash-loops", Duration::from_secs(30), || {
        let looping = meshd
            .instances()
            .iter()
            .any(|i| i["message"].as_str().is_some_and(|m| m.starts_with("crash loop")));
        async move { looping.then_some(()) }
    })
    .await;

    // The fix, same version: its instances are replaced by ones running the new args.
    submit(job("exec sleep 600", 2));
    let fixed = eventually("new instances run the fixed task", Duration::from_secs(30), || {
        let running: Vec<Value> = meshd
            .instances()
            .into_iter()
            .filter(|i| i["job"] == "fixme" && i["state"] == "running" && i["restarts"] == 0)
            .collect();
        let all = meshd.instances().iter().filter(|i| i["job"] == "fixme").count();
        async move { (running.len() == 2 && all == 2).then_some(running) }
    })
    .await;
    for instance in &fixed {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", instance["pid"])).unwrap_or_default();
        assert!(String::from_utf8_lossy(&cmdline).contains("sleep"), "{instance}");
    }
    eventually("the job says what happened", Duration::from_secs(10), || {
        let status = meshd.ctl_json(&["job", "status", "fixme"]);
        async move { (status[0]["deployment"] == "updated v1 to its new task").then_some(()) }
    })
    .await;

    // The same file again: nothing changes, and meshctl says so.
    let ids =
        |list: &[Value]| list.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect::<BTreeSet<_>>();
    let out = submit(job("exec sleep 600", 2));
    assert!(out.contains("unchanged"), "{out}");
    // More replicas of the same task: the running ones stay.
    submit(job("exec sleep 600", 3));
    let grown = meshd.running("fixme", 3, Duration::from_secs(20)).await;
    assert!(ids(&fixed).is_subset(&ids(&grown)), "the running instances were kept: {fixed:?} {grown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_come_from_the_node_that_ran_the_instance_and_follow_new_output() {
    let dir = TempDir::new("logs");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    // Prints a line, then one more for each line appended to a file the test writes.
    let feed = dir.path("feed");
    std::fs::write(&feed, "").unwrap();
    let script = format!("echo hello from $MESH_INSTANCE; echo oops >&2; tail -n +1 -f {}", feed.display());
    let job = format!(
        "name = \"talker\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", \"{script}\"]\n"
    );
    let file = dir.path("talker.toml");
    std::fs::write(&file, job).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("talker", 1, Duration::from_secs(30)).await;
    let out = eventually("the first line is logged", Duration::from_secs(10), || {
        let out = meshd.ctl_ok(&["logs", "talker"]);
        async move { out.contains("hello").then_some(out) }
    })
    .await;
    assert_eq!(out, "hello from talker-0\n");
    assert_eq!(meshd.ctl_ok(&["logs", "talker", "--stderr"]), "oops\n");
    let (code, _, stderr) = meshd.ctl(&["logs", "nothing"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no job \"nothing\""), "{stderr}");

    // --follow prints what comes later.
    let mut follow = std::process::Command::new(bin("meshctl"))
        .args(["--server", &meshd.listen, "--credentials", &meshd.credentials, "logs", "talker", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        lines_rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line {what} within 10 s"))
    };
    assert_eq!(next("from before"), "hello from talker-0");
    std::fs::write(&feed, "appended later\n").unwrap();
    assert_eq!(next("appended"), "appended later");
    let _ = follow.kill();
    let _ = follow.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_liveness_check_restarts_the_app() {
    let dir = TempDir::new("liveness");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let liveness =
        "liveness = { http = \"/live\", interval = \"200ms\", timeout = \"500ms\", failures = 2 }\n";
    let file = dir.path("web.toml");
    std::fs::write(&file, echo_job("web", "v1", 1, "") + liveness).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let before = meshd.running("web", 1, Duration::from_secs(30)).await.remove(0);
    // The app stops answering /live (mesh-echo's runtime knob, on its own port).
    let environ = std::fs::read(format!("/proc/{}/environ", before["pid"])).unwrap();
    let port = String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|v| v.strip_prefix("PORT=").map(str::to_owned))
        .expect("PORT in the app's environment");
    let (code, _, stderr) = mesh_tests::process::run(
        Path::new("/usr/bin/curl"),
        &["-sf", "-X", "POST", "-d", "{\"not_live\":true}", &format!("http://127.0.0.1:{port}/_echo/config")],
    );
    assert_eq!(code, 0, "{stderr}");
    let after = eventually("the app is restarted", Duration::from_secs(15), || {
        let found = meshd.instances().into_iter().find(|i| {
            i["id"] == before["id"]
                && i["restarts"].as_u64() >= Some(1)
                && i["pid"] != before["pid"]
                && i["ready"] == true
        });
        async move { found }
    })
    .await;
    assert!(!alive(before["pid"].as_i64().unwrap()), "the unlive app was stopped");
    assert_eq!(after["state"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_a_server_restart_and_running_instances_are_kept() {
    let dir = TempDir::new("server-restart");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _node = agent(&meshd, "node-a", &mesh_tests::node_ip(), &dir.path("a"), 1000);
    let file = dir.path("web.toml");
    std::fs::write(&file, echo_job("web", "v1", 2, "")).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let before = meshd.running("web", 2, Duration::from_secs(30)).await;

    let listen = meshd.listen.clone();
    meshd.process.signal(libc::SIGKILL);
    drop(meshd);
    let meshd = Meshd::start_with(&dir.path("data"), &listen, &["--heartbeat-ttl", "1s"]);
    assert_eq!(meshd.ctl_json(&["get", "jobs"])[0]["name"], "web", "the job is stored");
    // The agent joins again and its running instances are adopted, not restarted.
    let after = meshd.running("web", 2, Duration::from_secs(30)).await;
    let pids = |list: &[Value]| list.iter().map(|i| i["pid"].as_i64().unwrap()).collect::<BTreeSet<_>>();
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(meshd.instances().len(), 2, "nothing started twice");
}
