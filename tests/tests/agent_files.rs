//! The agent runs as root and must not be turned against the host: a pid
//! record it did not write kills nothing, a data dir that is not its own is
//! refused, and symlinks planted among its files are not followed.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use mesh_tests::process::{alive, run_bounded, Agent, Meshd, Process};
use mesh_tests::{bin, eventually, TempDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_records_that_are_not_the_agents_own_processes_kill_nothing() {
    let dir = TempDir::new("planted-pids");
    let meshd = Meshd::start(&dir.path("data"));
    // A process of someone else's, in a group of its own.
    let bystander = Process::start_quiet(Command::new("/bin/sleep").arg("600"));
    let pid = bystander.pid();
    // Records naming it: an old-style line with no start time, and one whose
    // start time is not its own (its pid was reused, as after a reboot).
    let instances = dir.path("agent").join("instances");
    for (name, record) in [("old-0", format!("{pid}\n")), ("reused-0", format!("{pid} 1\n"))] {
        std::fs::create_dir_all(instances.join(name)).unwrap();
        std::fs::write(instances.join(name).join("pids"), record).unwrap();
    }
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    eventually("the agent joined", Duration::from_secs(10), || {
        let nodes = meshd.ctl_json(&["get", "nodes"]);
        async move { (nodes.as_array().map(Vec::len) == Some(1)).then_some(()) }
    })
    .await;
    assert!(alive(pid.into()), "the agent killed a process group it did not start");
    let mode = std::fs::metadata(dir.path("agent")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data dir is private");
}

#[test]
fn a_data_dir_that_belongs_to_another_user_is_refused() {
    let dir = TempDir::new("foreign-dir");
    let data = dir.path("agent");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let args = [
        "agent",
        "--server",
        "127.0.0.1:9",
        "--name",
        "node-a",
        "--advertise-ip",
        "127.0.0.2",
        "--cpu-millis",
        "100",
        "--memory-mb",
        "64",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    // Bounded: an agent that took the folder would run on.
    let (code, stderr) = run_bounded(&bin("meshd"), &args, Duration::from_secs(10));
    assert!(code.is_some_and(|c| c != 0), "the agent must refuse the folder: {stderr}");
    assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_never_read_through_a_planted_symlink() {
    let dir = TempDir::new("planted-link");
    let meshd = Meshd::start(&dir.path("data"));
    let secret = dir.path("secret");
    std::fs::write(&secret, "the host's secret").unwrap();
    let instance = dir.path("agent").join("instances").join("web-0");
    std::fs::create_dir_all(&instance).unwrap();
    std::os::unix::fs::symlink(&secret, instance.join("app.stdout.log")).unwrap();
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    // web-0 is placed on the node; its log is the planted link.
    let job = dir.path("web.toml");
    std::fs::write(&job, "name = \"web\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\n").unwrap();
    meshd.ctl_ok(&["job", "run", job.to_str().unwrap()]);
    eventually("web-0 is placed", Duration::from_secs(10), || {
        let placed = meshd.instances().iter().any(|i| i["id"] == "web-0");
        async move { placed.then_some(()) }
    })
    .await;
    // `meshctl logs` reads through meshd from the agent, which never follows the link.
    let (_, stdout, stderr) = meshd.ctl(&["logs", "web"]);
    assert!(!stdout.contains("secret") && !stderr.contains("secret"), "{stdout}{stderr}");
    assert!(stderr.contains("no stdout log for instance web-0"), "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_an_app_starts_outlives_an_agent_killed_with_sigkill() {
    let dir = TempDir::new("escapees");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    // The app forks a grandchild into a session and process group of its own.
    let pid_file = dir.path("grandchild.pid");
    let script = format!("setsid sleep 600 & echo $! > {}; exec sleep 600", pid_file.display());
    let job = format!(
        "name = \"forker\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\n# It writes into the test's folder.\nuser = \"root\"\n\n[resources]\ncpu_millis = 10\nmemory_mb = 16\n"
    );
    let file = dir.path("forker.toml");
    std::fs::write(&file, job).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let instance = meshd.running("forker", 1, Duration::from_secs(30)).await.remove(0);
    let app = instance["pid"].as_i64().unwrap() as i32;
    let grandchild: i32 = eventually("the grandchild is started", Duration::from_secs(10), || {
        let pid = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok());
        async move { pid }
    })
    .await;
    assert!(alive(grandchild.into()));

    agent.kill();
    eventually("the app and everything it started are gone", Duration::from_secs(15), || {
        let gone = !alive(app.into()) && !alive(grandchild.into());
        async move { gone.then_some(()) }
    })
    .await;
}

/// The live processes of process group `pgid`.
fn in_group(pgid: i64) -> Vec<i64> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().is_some_and(|stat| {
                let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
                fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z")
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instances_pid_leaves_nothing_running_and_it_restarts() {
    let dir = TempDir::new("kill-instance");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    let job = "name = \"web\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"mesh-echo\"\n\n[resources]\ncpu_millis = 10\nmemory_mb = 32\n";
    let file = dir.path("web.toml");
    std::fs::write(&file, job).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let before = meshd.running("web", 1, Duration::from_secs(30)).await.remove(0);
    let pid = before["pid"].as_i64().unwrap();
    // Without a readiness check the instance counts as running once the
    // shim is started; the app follows a moment later.
    eventually("the instance's group holds the shim and the app", Duration::from_secs(10), || {
        let both = in_group(pid).len() >= 2;
        async move { both.then_some(()) }
    })
    .await;

    // kill -9 of the pid `get instances` shows: nothing of the instance is left, and it restarts.
    // SAFETY: signalling a process of this test's cluster.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    eventually("nothing of the killed instance runs", Duration::from_secs(10), || {
        let left = in_group(pid);
        async move { left.is_empty().then_some(()) }
    })
    .await;
    eventually("the instance runs again", Duration::from_secs(20), || {
        let again = meshd.instances().into_iter().any(|i| {
            i["id"] == before["id"]
                && i["state"] == "running"
                && i["ready"] == true
                && i["pid"] != before["pid"]
        });
        async move { again.then_some(()) }
    })
    .await;
}
