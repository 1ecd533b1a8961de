//! A guard on the proxy's cost per request that a busy machine cannot fool:
//! callgrind counts the instructions the release mesh-proxy executes per
//! request on the HTTP/1.1 hop and on the two-proxy mTLS path
//! (`bench/callgrind-hop`), and each count must stay within 5 % of
//! `bench/callgrind-baseline`. Counting instructions, not
//! time, is what makes it stable on a shared machine: repeated runs agree
//! within about 1.5 %.

use mesh_tests::workspace_dir;

/// The release build `scripts/test` makes before the suite runs.
fn release_proxy() -> std::path::PathBuf {
    let path = std::env::var_os("MESH_RELEASE_PROXY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/release/mesh-proxy"));
    assert!(
        path.is_file(),
        "no release mesh-proxy at {}: scripts/test builds it (cargo build --release -p mesh-proxy)",
        path.display()
    );
    path
}

/// The recorded count of `key` (`http1_hop`, `mtls_path`).
fn baseline(key: &str) -> f64 {
    let text =
        std::fs::read_to_string(workspace_dir().join("bench/callgrind-baseline")).expect("the baseline file");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("a {key} line in bench/callgrind-baseline"))
}

/// Runs `bench/callgrind-hop` on `path` and checks its count against the
/// baseline's `key`.
fn within_five_percent(path: &str, key: &str) {
    let output = std::process::Command::new(workspace_dir().join("bench/callgrind-hop"))
        .arg(release_proxy())
        .arg("guard")
        .arg(path)
        .current_dir(workspace_dir())
        .output()
        .expect("run bench/callgrind-hop");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench/callgrind-hop failed:\n{stdout}\n{stderr}");
    // "guard: R requests, I Ir, N instructions/request"
    let line =
        stdout.lines().find(|l| l.starts_with("guard:")).unwrap_or_else(|| panic!("no result:\n{stdout}"));
    let requests: f64 = line.split_whitespace().nth(1).and_then(|r| r.parse().ok()).expect("a request count");
    assert!(requests >= 1000.0, "too few requests to count: {line}");
    let measured: f64 = line
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    let baseline = baseline(key);
    let ratio = measured / baseline;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{key}: {measured} instructions per request against a baseline of {baseline} ({:+.1} %): find what \
         changed the request path's cost; if it is meant, record it in bench/RESULTS.md and update \
         bench/callgrind-baseline",
        (ratio - 1.0) * 100.0
    );
}

#[test]
fn the_http1_hop_stays_within_five_percent_of_its_baseline() {
    within_five_percent("http1", "http1_hop");
}

/// The mTLS path: the caller's proxy and the callee's, summed per request.
#[test]
fn the_mtls_path_stays_within_five_percent_of_its_baseline() {
    within_five_percent("mtls", "mtls_path");
}
