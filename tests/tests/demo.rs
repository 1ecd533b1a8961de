//! The README's first command: the demo deploys its jobs, live traffic
//! reaches both versions as `meshctl top` shows, and it cleans up after
//! itself.

use mesh_tests::client::split_tolerance;
use mesh_tests::{bin, workspace_dir};

#[test]
fn the_demo_serves_traffic_and_cleans_up() {
    let bin_dir = bin("mesh-proxy").parent().unwrap().to_path_buf();
    let output = std::process::Command::new(workspace_dir().join("scripts/demo"))
        .args(["--seconds", "6"])
        .env("MESH_BIN_DIR", &bin_dir)
        .output()
        .expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    // The last `meshctl top` table: echo v1 and v2 both serve, v1 the most
    // (split 90/10), all requests succeed.
    let last_table = stdout.rsplit("--- meshctl top").next().expect("the demo shows meshctl top");
    // Columns by their header, so that a new column moves nothing.
    let header: Vec<&str> = last_table
        .lines()
        .find(|l| l.starts_with("SERVICE"))
        .unwrap_or_else(|| panic!("no header in: {last_table}"))
        .split_whitespace()
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name}"));
    let row = |version: &str| -> Vec<String> {
        last_table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cols| cols.len() == header.len() && cols[0] == "echo" && cols[1] == version)
            .unwrap_or_else(|| panic!("no echo {version} row in: {last_table}"))
    };
    let (v1, v2) = (row("v1"), row("v2"));
    let value = |cols: &[String], name: &str| cols[column(name)].parse::<f64>().unwrap();
    let rate = |cols: &[String]| value(cols, "REQUESTS_PER_SECOND");
    assert!(rate(&v1) + rate(&v2) > 20.0, "the traffic job's 50/s reach echo: {last_table}");
    // Each request in the table's window is one weighted pick.
    let (n1, n2) = (value(&v1, "REQUESTS"), value(&v2, "REQUESTS"));
    let v2_share = 100.0 * n2 / (n1 + n2);
    let bound = split_tolerance((n1 + n2) as u64, 10.0);
    assert!(n2 > 0.0 && (v2_share - 10.0).abs() <= bound, "v2 gets 10 % (±{bound:.1}): {last_table}");
    let success = |cols: &[String]| value(cols, "SUCCESS_RATE");
    assert_eq!((success(&v1), success(&v2)), (100.0, 100.0), "success rates: {last_table}");
    let work_dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mesh demo running (work dir ")?.strip_suffix("):"))
        .expect("the demo names its work dir");
    assert!(!std::path::Path::new(work_dir).exists(), "the work dir {work_dir} is removed");
    let server = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("meshd dev at ")?.split_whitespace().next())
        .expect("the demo names meshd's address");
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        // meshd names the work dir; the sidecars name meshd's address.
        .filter(|cmdline| cmdline.contains(work_dir) || cmdline.contains(&format!("--control {server}")))
        .collect();
    assert!(leftovers.is_empty(), "the demo left processes behind: {leftovers:?}");
}

/// Command lines of running processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(needle))
        .collect()
}

/// Starts the demo with no time limit and returns it with its work dir and
/// meshd's address once its first `meshctl top` table is on the way.
fn running_demo() -> (std::process::Child, String, String) {
    use std::io::BufRead;
    let bin_dir = bin("mesh-proxy").parent().unwrap().to_path_buf();
    let mut command = std::process::Command::new(workspace_dir().join("scripts/demo"));
    command.env("MESH_BIN_DIR", &bin_dir).stdout(std::process::Stdio::piped());
    // Its own process group, as a shell gives a foreground job, and Ctrl-C
    // and SIGTERM at their defaults, as a terminal's shell leaves them:
    // whoever ran the suite (a background job, say) may have left them
    // ignored, and bash cannot trap a signal ignored when it started.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    // SAFETY: between fork and exec only async-signal-safe calls are
    // allowed; signal(2) is one.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut demo = command.spawn().expect("run scripts/demo");
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut work_dir, mut server) = (None, None);
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(dir) =
                line.strip_prefix("mesh demo running (work dir ").and_then(|l| l.strip_suffix("):"))
            {
                work_dir = Some(dir.to_owned());
            }
            if let Some(rest) = line.trim().strip_prefix("meshd dev at ") {
                server = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with("--- meshctl top") {
                if let (Some(dir), Some(server)) = (work_dir.take(), server.take()) {
                    let _ = tx.send((dir, server));
                }
            }
        }
    });
    let (work_dir, server) =
        rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the demo comes up and shows top");
    (demo, work_dir, server)
}

/// Waits (bounded) for the demo to exit; returns its exit code.
fn exit_within(demo: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = demo.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = demo.kill();
    None
}

#[test]
fn ctrl_c_or_sigterm_stops_the_demo_and_everything_it_started() {
    // (signal, sent to the whole process group as a terminal's Ctrl-C does?, exit code)
    for (signal, to_group, code) in [(libc::SIGINT, true, 130), (libc::SIGTERM, false, 143)] {
        let (mut demo, work_dir, server) = running_demo();
        let pid = demo.id() as i32;
        // SAFETY: signalling the demo we started (or its process group).
        unsafe { libc::kill(if to_group { -pid } else { pid }, signal) };
        // Its instances drain before they stop: seconds, bounded here generously.
        let exited = exit_within(&mut demo, std::time::Duration::from_secs(30));
        assert_eq!(exited, Some(code), "signal {signal}: the demo ends within 30 s");
        assert!(!std::path::Path::new(&work_dir).exists(), "the work dir {work_dir} is removed");
        let mut leftovers = processes_mentioning(&work_dir);
        // The sidecars name meshd's address.
        leftovers.extend(processes_mentioning(&format!("--control {server}")));
        assert!(leftovers.is_empty(), "signal {signal}: the demo left processes behind: {leftovers:?}");
    }
}

#[test]
fn meshd_dev_runs_as_written_with_a_per_user_data_dir_and_the_hosts_size() {
    use std::os::unix::fs::PermissionsExt;
    // A user's machine: not root, a home of its own.
    let home = mesh_tests::TempDir::new("dev-home");
    std::fs::set_permissions(&home.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(bin("meshd"))
        .args(["dev", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("HOME", &home.0);
    let meshd = mesh_tests::process::Process::start_with(&mut command);
    let data_dir = meshd.field("data_dir");
    assert_eq!(
        std::path::PathBuf::from(&data_dir),
        home.0.join(".local/state/meshd/dev"),
        "{}",
        meshd.first_line
    );
    // meshctl, as the same user with no flag at all, finds the admin
    // credential meshd dev wrote and the address in it.
    let meshctl = || {
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(bin("meshctl"))
            .args(["get", "nodes", "-o", "json"])
            .env("HOME", &home.0)
            .env_remove("MESH_CREDENTIALS")
            .env_remove("MESH_SERVER")
            .output()
            .expect("meshctl runs");
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
    };
    // The dev node joins at once; bounded anyway.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let nodes = loop {
        let out = meshctl();
        let nodes: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if nodes[0]["cpu_millis"].is_u64() {
            break nodes;
        }
        assert!(std::time::Instant::now() < deadline, "meshctl with no flags: {out}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(nodes[0]["cpu_millis"].as_u64(), Some(cores * 1000), "the host's cores: {nodes}");
    let memory_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert_eq!(nodes[0]["memory_mb"].as_u64(), Some(memory_kb / 1024), "the host's memory: {nodes}");
}
