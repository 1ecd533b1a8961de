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
    let row = |version: &str| -> Vec<String> {
        last_table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cols| cols.len() >= 6 && cols[0] == "echo" && cols[1] == version)
            .unwrap_or_else(|| panic!("no echo {version} row in: {last_table}"))
    };
    let (v1, v2) = (row("v1"), row("v2"));
    let rate = |cols: &[String]| cols[2].parse::<f64>().unwrap();
    assert!(rate(&v1) + rate(&v2) > 20.0, "the traffic job's 50/s reach echo: {last_table}");
    // The table's rates are over its 2 s window: that many weighted picks.
    let picks = ((rate(&v1) + rate(&v2)) * 2.0).round() as u64;
    let v2_share = 100.0 * rate(&v2) / (rate(&v1) + rate(&v2));
    let bound = split_tolerance(picks, 10.0);
    assert!(rate(&v2) > 0.0 && (v2_share - 10.0).abs() <= bound, "v2 gets 10 % (±{bound:.1}): {last_table}");
    let success = |cols: &[String]| cols[3].parse::<f64>().unwrap();
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
