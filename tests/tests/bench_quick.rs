//! The benchmark itself keeps working: `bench/run --quick` runs every
//! contender and each answers without errors, the full mesh path (two
//! proxies, plaintext and mTLS, and Envoy's) likewise, then the control-plane
//! benchmark with a few simulated proxies, then the scheduler's at a tenth
//! of its scale. The numbers are not judged
//! here; they live in bench/RESULTS.md.

use mesh_tests::{bin, workspace_dir};

#[test]
fn the_quick_benchmark_runs_every_contender() {
    let bin_dir = bin("mesh-bench").parent().unwrap().to_path_buf();
    let output = std::process::Command::new(workspace_dir().join("bench/run"))
        .arg("--quick")
        .env("MESH_BIN_DIR", &bin_dir)
        .current_dir(workspace_dir())
        .output()
        .expect("run bench/run --quick");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench/run --quick failed:\n{stdout}\n{stderr}");
    let contenders = ["direct (no proxy)", "mesh-proxy", "HAProxy", "nginx", "Envoy"];
    let paths = ["mesh path (plaintext)", "mesh path (mTLS)", "Envoy path (mTLS)", "HAProxy 1 hop"];
    for contender in contenders.into_iter().chain(paths) {
        let row = stdout
            .lines()
            .find(|line| line.starts_with(&format!("| {contender} |")))
            .unwrap_or_else(|| panic!("no row for {contender}:\n{stdout}"));
        let requests_per_second: f64 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(requests_per_second > 0.0, "{contender} answered nothing: {row}");
    }
    // The two mTLS paths report a handshake rate (the last column).
    for path in ["mesh path (mTLS)", "Envoy path (mTLS)"] {
        let row = stdout.lines().find(|line| line.starts_with(&format!("| {path} |"))).unwrap();
        let rate: f64 = row.trim_end_matches('|').rsplit('|').next().unwrap().trim().parse().unwrap_or(0.0);
        assert!(rate > 0.0, "{path} has no handshake rate: {row}");
    }
    for measure in [
        "split change → last ack, p99",
        "bytes per proxy per endpoint flap",
        "meshd memory per connected proxy",
        "bin-pack: place 1000 instances on 100 nodes",
        "spread: reconcile 100 nodes, 1000 instances, after losing its busiest node",
    ] {
        assert!(stdout.contains(measure), "the control-plane benchmark reports {measure:?}:\n{stdout}");
    }
    // The simulated proxies' traffic summaries reach meshd: its window
    // over them has the four rows each proxy sends.
    let traffic = stdout
        .lines()
        .find(|line| line.starts_with("| `Admin.Traffic` over 10 s of every proxy ("))
        .unwrap_or_else(|| panic!("no traffic summaries row:\n{stdout}"));
    let rows: u32 = traffic.split('(').nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert_eq!(rows, 4, "{traffic}");
    // Three servers on etcd: the failover is measured, not "never".
    for measure in ["first placement by the new leader: ", "connected to another: "] {
        let line = stdout
            .lines()
            .find(|line| line.contains(measure))
            .unwrap_or_else(|| panic!("{measure}:\n{stdout}"));
        assert!(line.ends_with(" ms"), "the failover completed: {line}");
    }
    let svg = std::fs::read_to_string(workspace_dir().join("bench/results/http1-quick.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("mesh-proxy"), "the chart is written");
}
