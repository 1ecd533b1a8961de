//! The README's first command: the demo starts, routes requests to both
//! versions, and cleans up after itself.

use mesh_tests::{bin, workspace_dir};

#[test]
fn the_demo_serves_traffic_and_cleans_up() {
    let bin_dir = bin("mesh-proxy").parent().unwrap().to_path_buf();
    let output = std::process::Command::new(workspace_dir().join("scripts/demo"))
        .args(["--seconds", "4"])
        .env("MESH_BIN_DIR", &bin_dir)
        .output()
        .expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let last = stdout.lines().rfind(|l| l.starts_with("requests=")).expect("the demo reports progress");
    let numbers: Vec<u64> =
        last.split_whitespace().map(|field| field.split('=').nth(1).unwrap().parse().unwrap()).collect();
    let (requests, v1, v2, errors) = (numbers[0], numbers[1], numbers[2], numbers[3]);
    assert!(requests >= 20, "{last}");
    assert_eq!(errors, 0, "{last}");
    assert_eq!(v1 + v2, requests, "{last}");
    assert!(v1 > v2, "the 90/10 split favours v1: {last}");

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
