//! Three meshd servers on a three-member etcd, each server and its etcd
//! member on a host of its own, and three node hosts, each a network
//! namespace on a bridge. A client on one node calls a service on all
//! three nodes without pause while the leader meshd is killed (-9) and
//! etcd members fail: the calls never fail, a new leader acts, proxies
//! move to the surviving servers, and nothing acknowledged is lost.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_tests::etcd::Etcd;
use mesh_tests::netns::{Host, Lab};
use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

fn echo_job(name: &str, replicas: u32) -> String {
    format!(
        "name = \"{name}\"\nversion = \"v1\"\nreplicas = {replicas}\n\n[placement]\nanti_affinity = true\n\n[task]\ncommand = \"mesh-echo\"\nargs = [\"--version\", \"v1\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n\n[health]\nreadiness = {{ http = \"/ready\", interval = \"200ms\", timeout = \"500ms\", failures = 1 }}\n"
    )
}

/// What the load saw: requests answered 200 and the others, with why.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
}

/// Calls `service` through the sidecar at `outbound` from inside `host`,
/// over and over (curl keeps one connection for 50 calls) until `stop`.
fn load(
    host: &Host,
    outbound: &str,
    service: &str,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<Mutex<Tally>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let url = format!("http://{service}/");
    let mut command = host.command(Path::new("curl"));
    command.args(["-sS", "-m", "3", "-w", "%{http_code}\\n", "-x", &format!("http://{outbound}")]);
    for _ in 0..50 {
        command.args(["-o", "/dev/null", &url]);
    }
    let (program, args): (std::ffi::OsString, Vec<std::ffi::OsString>) =
        (command.get_program().to_owned(), command.get_args().map(|a| a.to_owned()).collect());
    let seen = tally.clone();
    let thread = std::thread::spawn(move || {
        // Bounded: a stop flag, and a ceiling on rounds.
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let output = std::process::Command::new(&program).args(&args).output().expect("run curl");
            let mut tally = seen.lock().unwrap();
            let codes = String::from_utf8_lossy(&output.stdout);
            for code in codes.lines() {
                match code {
                    "200" => tally.ok += 1,
                    other => tally.failed.push(format!("status {other}")),
                }
            }
            if !output.status.success() {
                tally.failed.push(String::from_utf8_lossy(&output.stderr).trim().to_owned());
            }
        }
    });
    (thread, tally)
}

/// `meshctl ARGS -o json` against `servers`, or None when it fails (no
/// leader yet, for a call only the leader answers).
fn json_via(meshd: &Meshd, servers: &str, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let (code, stdout, _) = meshd.ctl_via(servers, &all);
    (code == 0).then(|| serde_json::from_str(&stdout).expect("meshctl prints JSON"))
}

fn ctl_ok_via(meshd: &Meshd, servers: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = meshd.ctl_via(servers, args);
    assert_eq!(code, 0, "meshctl {args:?} via {servers} failed: {stdout}{stderr}");
    stdout
}

fn running(meshd: &Meshd, servers: &str, job: &str) -> Vec<Value> {
    let instances = json_via(meshd, servers, &["get", "instances"]).unwrap_or_default();
    let list = instances.as_array().cloned().unwrap_or_default();
    list.into_iter().filter(|i| i["job"] == job && i["state"] == "running" && i["ready"] == true).collect()
}

/// How many node heartbeats `meshd` on `host` handed on to the leader, from
/// its own metrics.
fn heartbeats_handed_on(host: &Host, meshd: &Meshd) -> u64 {
    let url = format!("http://{}/metrics", meshd.admin);
    let output = host.command(Path::new("curl")).args(["-s", "--max-time", "5", &url]).output().unwrap();
    let metrics = String::from_utf8_lossy(&output.stdout);
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("meshd_calls_handed_to_leader_total{method=\"/mesh.v1.Nodes/Heartbeat\"} ")
        })
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// The leader, as `meshctl status` on `server` names it.
fn leader_seen_by(meshd: &Meshd, server: &str) -> Option<String> {
    let (code, stdout, _) = meshd.ctl_via(server, &["status"]);
    if code != 0 {
        return None;
    }
    match stdout.lines().find_map(|line| line.strip_prefix("server ")) {
        // "server ADDR (leader: LEADER)": another server leads.
        Some(rest) => rest.split("(leader: ").nth(1).map(|l| l.trim_end_matches(')').to_owned()),
        // No such line: the server that answered leads.
        None => Some(server.to_owned()),
    }
    .filter(|leader| leader != "being elected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_losing_its_leader_and_etcd_members() {
    let dir = TempDir::new("ha");
    let mut lab = Lab::new();
    let server_hosts: Vec<Host> = (1..=3).map(|i| lab.host(&format!("server-{i}"), i)).collect();
    let node_hosts: Vec<Host> = (1..=3).map(|i| lab.host(&format!("node-{i}"), 10 + i)).collect();
    let mut etcd = Etcd::start(&server_hosts.iter().collect::<Vec<_>>(), &dir.0);
    let key = dir.path("store.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let endpoints = etcd.endpoints();
    let store_args = |extra: &'static [&'static str]| {
        let mut args = vec!["--store", "etcd", "--etcd-endpoints", &endpoints, "--store-key"];
        args.push(key.to_str().unwrap());
        args.extend_from_slice(&["--heartbeat-ttl", "2s"]);
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<String>>()
    };
    let servers: Vec<Meshd> = server_hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let args = store_args(&[]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Meshd::start_in(host, &dir.path(&format!("meshd-{i}")), &args)
        })
        .collect();
    let all = servers.iter().map(|m| m.listen.as_str()).collect::<Vec<_>>().join(",");
    // The first server started wrote the admin credential; the others share its users.
    let admin = &servers[0];
    let _agents: Vec<Agent> = node_hosts
        .iter()
        .map(|host| Agent::start_in_cluster(host, &all, admin, 1000, &dir.path(&host.name)))
        .collect();
    eventually("three nodes joined the leader", Duration::from_secs(20), || {
        let nodes =
            json_via(admin, &all, &["get", "nodes"]).and_then(|n| n.as_array().cloned()).unwrap_or_default();
        async move { (nodes.iter().filter(|n| n["up"] == true).count() == 3).then_some(()) }
    })
    .await;

    let web = dir.path("web.toml");
    // Scaled, with bounds that keep it at three: the leader's autoscaler
    // reads every server's traffic, and `job status` shows what it read.
    let scaled = "\n[scale]\nmin = 3\nmax = 3\ntarget = { rps_per_instance = 1000000 }\n";
    std::fs::write(&web, echo_job("web", 3) + scaled).unwrap();
    ctl_ok_via(admin, &all, &["job", "run", web.to_str().unwrap()]);
    eventually("three instances of web are ready", Duration::from_secs(40), || {
        let ready = running(admin, &all, "web").len() == 3;
        async move { ready.then_some(()) }
    })
    .await;
    let outbound = admin.mesh_client(&dir.path("client.toml"), "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let client_host = {
        let client = running(admin, &all, "client").remove(0);
        let node = client["node"].as_str().unwrap().to_owned();
        node_hosts.iter().find(|h| h.name == node).expect("the client's host")
    };
    let (load_thread, tally) = load(client_host, &outbound, "web", stop.clone());
    eventually("the load gets answers", Duration::from_secs(10), || {
        let ok = tally.lock().unwrap().ok > 0;
        async move { ok.then_some(()) }
    })
    .await;

    // A split written and acknowledged by every proxy, then the leader dies.
    let leader = leader_seen_by(admin, &servers[1].listen).expect("a leader");
    let leader_index =
        servers.iter().position(|m| m.listen == leader).expect("the leader is one of the servers");

    // Followers serve what only the leader knows by handing it on: meshctl
    // given one follower alone reads instances and nodes, and the node
    // that started on each follower (a node's name chooses where in the
    // list it starts: node-N on server N) keeps heartbeating through it.
    for (index, follower) in servers.iter().enumerate().filter(|(i, _)| *i != leader_index) {
        let only = follower.listen.as_str();
        let (code, out, err) = admin.ctl_via(only, &["get", "nodes", "-o", "json"]);
        assert_eq!(code, 0, "the follower {only} answers `get nodes`: {out}{err}");
        let nodes: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(nodes.as_array().unwrap().iter().filter(|n| n["up"] == true).count(), 3, "{nodes}");
        assert_eq!(running(admin, only, "web").len(), 3, "the follower {only} lists web's instances");
        // Logs come from the agent on the instance's host, through the follower and the leader.
        let logs = ctl_ok_via(admin, only, &["logs", "web"]);
        assert!(logs.contains("mesh-echo listening on"), "web's logs through {only}: {logs}");
        let host = &server_hosts[index];
        let before = heartbeats_handed_on(host, follower);
        eventually("a follower keeps handing on its node's heartbeats", Duration::from_secs(10), || {
            let now = heartbeats_handed_on(host, follower);
            async move { (now > before && before > 0).then_some(()) }
        })
        .await;
    }
    let answered = ctl_ok_via(admin, &leader, &["split", "web", "v1=100", "--wait"]);
    assert!(answered.contains("applied"), "{answered}");
    // A proxy that starts on the leader (a proxy's id chooses where in the
    // list it starts), so that the kill always leaves one to reconnect.
    let probe_id = (0..)
        .map(|n| format!("probe-{n}"))
        .find(|id| mesh_client::servers::first_index(id, servers.len()) == leader_index)
        .unwrap();
    let mut probe = node_hosts[0].command(&mesh_tests::bin("mesh-proxy"));
    probe.args(["--control", &all, "--credentials", &admin.credentials, "--service", "probe"]);
    probe.args(["--proxy-id", &probe_id, "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let _probe = mesh_tests::process::Process::start_with(&mut probe);
    let status = eventually("five proxies are counted, whichever server", Duration::from_secs(10), || {
        let status = json_via(admin, &all, &["status"]).filter(|s| s.as_array().unwrap().len() == 5);
        async move { status }
    })
    .await;
    let orphans: Vec<String> = status
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["server"] == leader.as_str())
        .map(|p| p["proxy_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(orphans.contains(&probe_id), "the probe is on the leader: {status}");

    let killed = Instant::now();
    servers[leader_index].process.signal(libc::SIGKILL);
    let survivors: Vec<&str> =
        servers.iter().filter(|m| m.listen != leader).map(|m| m.listen.as_str()).collect();
    let rest = survivors.join(",");
    let after = |what: &str| eprintln!("{what}: {} ms after the leader's kill", killed.elapsed().as_millis());

    eventually("every proxy of the dead server is connected to another", Duration::from_secs(20), || {
        let status =
            json_via(admin, &rest, &["status"]).and_then(|s| s.as_array().cloned()).unwrap_or_default();
        let moved = orphans.iter().all(|id| {
            status.iter().any(|p| {
                p["proxy_id"] == id.as_str() && p["connected"] == true && p["server"] != leader.as_str()
            })
        });
        async move { moved.then_some(()) }
    })
    .await;
    after(&format!("the {} proxies of the dead server reconnected elsewhere", orphans.len()));

    // A job submitted after the kill is placed by the new leader.
    let api = dir.path("api.toml");
    std::fs::write(&api, echo_job("api", 1)).unwrap();
    eventually("a surviving server takes the new job", Duration::from_secs(20), || {
        let (code, _, _) = admin.ctl_via(&rest, &["job", "run", api.to_str().unwrap()]);
        async move { (code == 0).then_some(()) }
    })
    .await;
    let new_leader = eventually("a new leader is elected", Duration::from_secs(20), || {
        // Until its lease expires, the dead leader is still named.
        let seen = leader_seen_by(admin, survivors[0]).filter(|seen| *seen != leader);
        async move { seen }
    })
    .await;
    after(&format!("new leader {new_leader}"));
    assert_ne!(new_leader, leader);
    eventually("the new leader places the job submitted after the kill", Duration::from_secs(30), || {
        let placed = !running(admin, &rest, "api").is_empty();
        async move { placed.then_some(()) }
    })
    .await;
    after("the job submitted after the kill runs");

    // Nothing acknowledged was lost, and no instance was placed twice.
    let splits = json_via(admin, &rest, &["get", "splits"]).unwrap();
    assert!(
        splits.to_string().contains("\"v1\":100") || splits.to_string().contains("100"),
        "the split is in force: {splits}"
    );
    assert_eq!(running(admin, &rest, "web").len(), 3, "web runs three instances, adopted, not placed again");

    // Two servers given the same job at once: it is placed once.
    let batch = dir.path("batch.toml");
    std::fs::write(&batch, echo_job("twice", 2)).unwrap();
    let racers: Vec<std::thread::JoinHandle<i32>> = survivors
        .iter()
        .map(|server| {
            let meshctl = mesh_tests::bin("meshctl").to_str().unwrap().to_owned();
            let namespace = admin.namespace.clone().expect("meshd runs in a host");
            let (server, credentials, file) =
                (server.to_string(), admin.credentials.clone(), batch.to_str().unwrap().to_owned());
            std::thread::spawn(move || {
                let args = [
                    "netns",
                    "exec",
                    &namespace,
                    &meshctl,
                    "--server",
                    &server,
                    "--credentials",
                    &credentials,
                ];
                let args: Vec<&str> = args.into_iter().chain(["job", "run", file.as_str()]).collect();
                mesh_tests::process::run(Path::new("ip"), &args).0
            })
        })
        .collect();
    for racer in racers {
        assert_eq!(racer.join().unwrap(), 0, "both servers take the job");
    }
    eventually("the job run twice has its two instances", Duration::from_secs(30), || {
        let count = running(admin, &rest, "twice").len();
        async move { (count == 2).then_some(()) }
    })
    .await;
    let instances = json_via(admin, &rest, &["get", "instances"]).unwrap();
    let twice = instances.as_array().unwrap().iter().filter(|i| i["job"] == "twice").count();
    assert_eq!(twice, 2, "placed once, not once per server: {instances}");

    // meshctl top and check read every proxy, on every host, through meshd.
    // The client's sidecar reports its traffic to the one server it is
    // connected to; each surviving server asked alone shows it (it adds
    // the other servers' proxies' traffic to its own).
    for server in &survivors {
        let top = json_via(admin, server, &["top", "--window", "5s"]).expect("meshctl top answers");
        let web_rps = top
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["service"] == "web")
            .map(|row| row["requests_per_second"].clone());
        assert!(
            web_rps.as_ref().and_then(Value::as_f64).is_some_and(|rps| rps > 0.0),
            "web's traffic shows through {server}: {top}"
        );
    }
    // The new leader's autoscaler reads the surviving servers' traffic as
    // meshd itself (a server asking in its own name): it measures web's
    // requests rather than holding for traffic it could not read.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = json_via(admin, &rest, &["job", "status", "web"]).unwrap_or_default();
        let status = status.as_array().and_then(|rows| rows.first()).cloned().unwrap_or(status);
        let scale = status["scale"].as_str().unwrap_or_default().to_owned();
        // A server just killed may be listed a while longer: holding for it is right.
        if scale.contains("requests/s per instance")
            && !scale.contains("now 0.0")
            && !scale.contains("holding")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader's autoscaler measures web's traffic on every server: {scale}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, checked, stderr) = admin.ctl_via(&rest, &["check", "-o", "json"]);
    let checked: Value =
        serde_json::from_str(&checked).unwrap_or_else(|_| panic!("check prints JSON: {stderr}"));
    let proxy_rows: Vec<&Value> = checked
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["what"] == "proxy" && row["name"] != probe_id.as_str())
        .collect();
    let web_hosts: std::collections::BTreeSet<String> =
        running(admin, &rest, "web").iter().map(|i| i["node"].as_str().unwrap().to_owned()).collect();
    assert_eq!(web_hosts.len(), 3, "web runs on the three node hosts");
    assert!(
        proxy_rows.len() >= 4 && proxy_rows.iter().all(|row| row["expires_unix"].is_u64()),
        "every proxy's certificate expiry, read through meshd: {checked}"
    );

    // One etcd member lost: writes still succeed.
    let member_of_dead_server = leader_index;
    etcd.kill(member_of_dead_server);
    ctl_ok_via(admin, &rest, &["split", "web", "v1=100", "--wait"]);
    // Two lost: writes fail with a clear error and exit code 5, proxies keep serving.
    let second = (member_of_dead_server + 1) % 3;
    etcd.kill(second);
    let served_before = tally.lock().unwrap().ok;
    let (code, stdout, stderr) = admin.ctl_via(&rest, &["split", "web", "--clear"]);
    assert_eq!(code, 5, "a write without etcd quorum fails as a store failure: {stdout}{stderr}");
    assert!(stderr.contains("cannot write its store") && stderr.contains("etcd"), "{stderr}");
    eventually("proxies keep serving without etcd quorum", Duration::from_secs(10), || {
        let ok = tally.lock().unwrap().ok > served_before + 20;
        async move { ok.then_some(()) }
    })
    .await;
    // The members return: the cluster recovers by itself.
    etcd.restart(member_of_dead_server);
    etcd.restart(second);
    etcd.wait_healthy(second, Duration::from_secs(30));
    eventually("writes succeed again once etcd has quorum", Duration::from_secs(30), || {
        let (code, _, _) = admin.ctl_via(&rest, &["split", "web", "v1=100", "--wait"]);
        async move { (code == 0).then_some(()) }
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    load_thread.join().unwrap();
    {
        let tally = tally.lock().unwrap();
        eprintln!("load: {} requests answered, {} failed", tally.ok, tally.failed.len());
        assert!(
            tally.failed.is_empty(),
            "no request failed: {:?}",
            &tally.failed[..tally.failed.len().min(10)]
        );
        assert!(tally.ok > 100, "the load ran: {} requests", tally.ok);
    }

    // A node's link cut: it is down within its TTL, its instance runs
    // elsewhere, and after the heal one copy runs, not two.
    let api_node = eventually("api runs once etcd is back", Duration::from_secs(30), || {
        let node = running(admin, &rest, "api").first().and_then(|i| i["node"].as_str().map(str::to_owned));
        async move { node }
    })
    .await;
    let cut = node_hosts.iter().find(|h| h.name == api_node).unwrap();
    cut.cut_link();
    let node_up = |name: &str| {
        let nodes =
            json_via(admin, &rest, &["get", "nodes"]).and_then(|n| n.as_array().cloned()).unwrap_or_default();
        nodes.iter().find(|n| n["name"] == name).map(|n| n["up"] == true)
    };
    eventually("the cut node is down within its heartbeat TTL", Duration::from_secs(15), || {
        let down = node_up(&api_node) == Some(false);
        async move { down.then_some(()) }
    })
    .await;
    eventually("api runs on another node", Duration::from_secs(30), || {
        let moved = running(admin, &rest, "api").iter().any(|i| i["node"] != api_node.as_str());
        async move { moved.then_some(()) }
    })
    .await;
    let endpoints = json_via(admin, &rest, &["get", "endpoints"]).unwrap();
    let cut_ip = format!("{}:", cut.ip);
    let stale = endpoints.as_array().unwrap().iter().any(|e| {
        e["service"] == "api" && e["ready"] == true && e["addr"].as_str().unwrap().starts_with(&cut_ip)
    });
    assert!(!stale, "no ready endpoint on the cut-off host: {endpoints}");
    cut.restore_link();
    eventually("the node is up again", Duration::from_secs(20), || {
        let up = node_up(&api_node) == Some(true);
        async move { up.then_some(()) }
    })
    .await;
    eventually("one copy of api runs after the heal", Duration::from_secs(20), || {
        let instances = json_via(admin, &rest, &["get", "instances"])
            .and_then(|i| i.as_array().cloned())
            .unwrap_or_default();
        let api: Vec<&Value> =
            instances.iter().filter(|i| i["job"] == "api" && i["state"] == "running").collect();
        let one = api.len() == 1 && api[0]["node"] != api_node.as_str();
        async move { one.then_some(()) }
    })
    .await;
}
