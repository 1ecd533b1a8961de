//! A job's resource limits hold through the kernel: an app that goes over
//! its memory is killed by its cgroup (and never swaps), one that spins is
//! held to its CPU share. Real processes in real cgroups.

use std::path::Path;
use std::time::{Duration, Instant};

use mesh_tests::process::{cgroup_dir, cgroup_v2, Agent, Meshd};
use mesh_tests::{eventually, TempDir};

fn job(name: &str, command: &str, args: &str, cpu_millis: u32, memory_mb: u32) -> String {
    format!(
        "name = \"{name}\"\nversion = \"v1\"\nreplicas = 1\n\n[task]\ncommand = \"{command}\"\nargs = {args}\n\n[resources]\ncpu_millis = {cpu_millis}\nmemory_mb = {memory_mb}\n"
    )
}

/// A `key value` line's value in a cgroup file.
fn stat(file: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_killed_by_its_cgroup_and_never_swaps() {
    let dir = TempDir::new("memory-hog");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _agent = Agent::start(&meshd, "limits-mem", &mesh_tests::node_ip(), 1000, &dir.path("a"), &[]);
    // After a second's pause (to be found), 256 MB written against a 32 MB limit.
    let file = dir.path("hog.toml");
    let args = r#"["-c", "import time; time.sleep(1); b = b'x' * (256 << 20); print('survived')"]"#;
    std::fs::write(&file, job("hog", "/usr/bin/python3", args, 500, 32)).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let group = eventually("the hog runs in its memory group", Duration::from_secs(30), || {
        let group = meshd
            .instances()
            .into_iter()
            .find(|i| i["job"] == "hog" && i["state"] == "running")
            .and_then(|i| cgroup_dir(i["pid"].as_i64()?, "memory"))
            .filter(|group| group.ends_with("hog-0"));
        async move { group }
    })
    .await;

    let instance = eventually("the hog is killed and restarted", Duration::from_secs(30), || {
        let found = meshd.instances().into_iter().find(|i| {
            i["job"] == "hog"
                && i["restarts"].as_u64() >= Some(1)
                && i["message"].as_str().is_some_and(|m| m.contains("signal: 9"))
        });
        async move { found }
    })
    .await;
    let id = instance["id"].as_str().unwrap();
    // The kernel's own record: out-of-memory kills in this group.
    let events = if cgroup_v2() { group.join("memory.events") } else { group.join("memory.oom_control") };
    let kills = stat(&events, "oom_kill").unwrap_or_else(|| panic!("no oom_kill in {}", events.display()));
    assert!(kills >= 1, "the cgroup killed it: {} says {kills}", events.display());
    // No swap to hide in: memory plus swap is capped at the memory limit.
    let limit = 32u64 << 20;
    if cgroup_v2() {
        let swap = std::fs::read_to_string(group.join("memory.swap.max")).unwrap_or_default();
        assert!(swap.is_empty() || swap.trim() == "0", "memory.swap.max: {swap}");
    } else {
        let memsw = group.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            assert_eq!(std::fs::read_to_string(&memsw).unwrap().trim().parse::<u64>().unwrap(), limit);
        }
        assert_eq!(std::fs::read_to_string(group.join("memory.swappiness")).unwrap().trim(), "0");
    }
    let log = std::fs::read_to_string(dir.path("a").join(format!("instances/{id}/app.stdout.log")))
        .unwrap_or_default();
    assert!(!log.contains("survived"), "the hog never got its 256 MB: {log}");
}

/// Clock ticks of CPU the processes in a group have used (user + system).
fn group_cpu_ticks(group: &Path) -> u64 {
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
    procs.lines().filter_map(|pid| cpu_ticks(pid.trim().parse().ok()?)).sum()
}

/// Clock ticks of CPU a process has used (user + system).
fn cpu_ticks(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_hog_is_held_to_its_share() {
    let dir = TempDir::new("cpu-hog");
    let meshd = Meshd::start_with(&dir.path("data"), "127.0.0.1:0", &["--heartbeat-ttl", "1s"]);
    let _agent = Agent::start(&meshd, "limits-cpu", &mesh_tests::node_ip(), 1000, &dir.path("a"), &[]);
    let file = dir.path("spin.toml");
    std::fs::write(&file, job("spin", "/bin/sh", r#"["-c", "while :; do :; done"]"#, 100, 32)).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    let instance = meshd.running("spin", 1, Duration::from_secs(30)).await.remove(0);
    let group = cgroup_dir(instance["pid"].as_i64().unwrap(), "cpu").expect("the spinner's cpu group");
    assert!(group.ends_with("spin-0"), "{}", group.display());
    let throttled_file = group.join("cpu.stat");
    let throttled = |file: &Path| stat(file, "nr_throttled").unwrap_or(0);

    // Over twenty 100 ms periods in which the kernel throttled it, it got
    // about a tenth of a core (100 CPU millis), not the whole core it asks for.
    let (ticks_before, started, periods_before) =
        (group_cpu_ticks(&group), Instant::now(), throttled(&throttled_file));
    eventually("twenty throttled periods", Duration::from_secs(20), || {
        let done = throttled(&throttled_file) >= periods_before + 20;
        async move { done.then_some(()) }
    })
    .await;
    let used = group_cpu_ticks(&group).saturating_sub(ticks_before) as f64 / 100.0;
    let share = used / started.elapsed().as_secs_f64();
    assert!(share < 0.2, "the spinner used {share:.2} of a core (limit 0.1)");
    assert!(share > 0.02, "and it did run: {share:.3} of a core");
}
