//! Routing-table reloads: under load nothing fails, and a bad file is
//! rejected with a clear error while the table in force keeps serving.

use std::path::Path;
use std::time::Duration;

use mesh_tests::client::{closed_loop, get, http1, steady_rate};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{run, Echo, Proxy};
use mesh_tests::proxy_config::{render, ServiceSpec};
use mesh_tests::{bin, eventually, TempDir};

/// Replaces the file in one step, as config management tools do, so the
/// watcher never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

async fn config_version(admin: &str) -> u64 {
    let answer = get(&http1(), admin, admin, "/config").await.unwrap();
    let config: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    config["version"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_every_100ms_under_load_fails_no_request() {
    let dir = TempDir::new("reload-load");
    let a = Echo::start("v1", &[]);
    let b = Echo::start("v2", &[]);
    let c = Echo::start("v2", &[]);
    // Tables alternate in split and in which v2 endpoint exists.
    let tables = [
        render(
            &[ServiceSpec::new("echo")
                .line("split = { v1 = 90, v2 = 10 }")
                .endpoint(&a.addr, "v1")
                .endpoint(&b.addr, "v2")],
            &[],
            None,
        ),
        render(
            &[ServiceSpec::new("echo")
                .line("split = { v1 = 10, v2 = 90 }")
                .endpoint(&a.addr, "v1")
                .endpoint(&c.addr, "v2")],
            &[],
            None,
        ),
    ];
    let path = dir.path("proxy.toml");
    std::fs::write(&path, &tables[0]).unwrap();
    let proxy = Proxy::start(&path);
    let outbound = proxy.outbound();
    let load =
        tokio::spawn(async move { steady_rate(&outbound, "echo", 1_000, Duration::from_secs(10)).await });
    let mut reloads = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    while !load.is_finished() && reloads < 200 {
        ticker.tick().await;
        reloads += 1;
        write_atomically(&path, &tables[reloads % 2]);
        proxy.process.signal(libc::SIGHUP);
    }
    let tally = load.await.unwrap();
    assert_eq!(tally.failed(), 0, "{:?}", tally.failures);
    // Enough requests overlapped the reloads to see one fail (not a speed check).
    assert!(tally.ok >= 1_000, "only {} requests ran across the reloads", tally.ok);
    let metrics = scrape(&proxy.admin()).await;
    let applied = metrics.sum("mesh_config_reloads_total", &[("result", "ok")]);
    assert!(applied >= 80.0, "{applied} tables applied for {reloads} reloads");
    // Every table applied after the first was built and timed (one scrape:
    // the watcher may still apply the last file; a build in progress may
    // be timed but not yet counted).
    let timed = metrics.sum("mesh_config_reload_duration_seconds_count", &[]);
    assert!((applied - 1.0..=applied).contains(&timed), "{timed} builds timed for {applied} tables applied");
    assert!(tally.by_instance.contains_key(&b.addr) && tally.by_instance.contains_key(&c.addr));
}

const GOOD_SERVICE: &str = "split = { v1 = 100, v2 = 0 }";

/// (what, bad line replacing the split line, field the error names)
const BAD_FILES: [(&str, &str, &str); 7] = [
    ("syntax error", "split = { v1 = 100, v2 = ", "(file)"),
    ("unknown field", "splitt = { v1 = 100 }", "splitt"),
    ("negative weight", "split = { v1 = 100, v2 = -5 }", "services[0].split.v2"),
    ("weight on an unknown version", "split = { v1 = 100, v9 = 5 }", "services[0].split.v9"),
    ("weights adding up to zero", "split = { v1 = 0, v2 = 0 }", "services[0].split"),
    ("unparsable duration", "timeout = \"soon\"", "services[0].timeout"),
    ("duplicate service", "[[services]]\nname = \"echo\"", "services[1].name"),
];

fn config_with(line: &str, v1: &str, v2: &str) -> String {
    render(&[ServiceSpec::new("echo").line(line).endpoint(v1, "v1").endpoint(v2, "v2")], &[], None)
}

#[test]
fn a_bad_file_at_startup_is_refused_with_line_and_field() {
    let dir = TempDir::new("bad-start");
    let path = dir.path("proxy.toml");
    for (what, line, field) in BAD_FILES {
        let text = config_with(line, "127.0.0.1:1", "127.0.0.1:2");
        let expected_line = text
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.contains(line.lines().last().unwrap()))
            .unwrap()
            + 1;
        std::fs::write(&path, &text).unwrap();
        let (code, _, stderr) = run(&bin("mesh-proxy"), &["--config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert!(stderr.contains(&format!("field `{field}`")), "{what}: the error names {field}: {stderr}");
        if what != "syntax error" {
            assert!(
                stderr.contains(&format!("line {expected_line},")),
                "{what}: the error names line {expected_line}: {stderr}"
            );
        } else {
            assert!(stderr.contains("line "), "{what}: {stderr}");
        }
    }
    let (code, _, stderr) = run(&bin("mesh-proxy"), &["--config", "/nonexistent/proxy.toml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/proxy.toml"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_on_reload_leaves_the_table_in_force() {
    let dir = TempDir::new("bad-reload");
    let v1 = Echo::start("v1", &[]);
    let v2 = Echo::start("v2", &[]);
    let path = dir.path("proxy.toml");
    std::fs::write(&path, config_with(GOOD_SERVICE, &v1.addr, &v2.addr)).unwrap();
    let proxy = Proxy::start(&path);
    let admin = proxy.admin();
    let version = config_version(&admin).await;
    for (index, (what, line, _)) in BAD_FILES.iter().enumerate() {
        write_atomically(&path, &config_with(line, &v1.addr, &v2.addr));
        proxy.process.signal(libc::SIGHUP);
        let rejected = (index + 1) as f64;
        eventually(&format!("{what} is rejected"), Duration::from_secs(10), || {
            let admin = admin.clone();
            async move {
                let count = scrape(&admin).await.sum("mesh_config_reloads_total", &[("result", "rejected")]);
                (count >= rejected).then_some(())
            }
        })
        .await;
        assert_eq!(config_version(&admin).await, version, "{what}: the table in force is unchanged");
        let tally = closed_loop(&proxy.outbound(), "echo", 50, 4).await;
        assert_eq!(tally.failed(), 0, "{what}: {:?}", tally.failures);
        assert_eq!(tally.share("v1"), 100.0, "{what}: the old split still holds");
    }
    // A good file is applied again.
    write_atomically(&path, &config_with("split = { v1 = 0, v2 = 100 }", &v1.addr, &v2.addr));
    proxy.process.signal(libc::SIGHUP);
    eventually("the good file is applied", Duration::from_secs(10), || {
        let admin = admin.clone();
        async move { (config_version(&admin).await > version).then_some(()) }
    })
    .await;
    assert_eq!(closed_loop(&proxy.outbound(), "echo", 50, 4).await.share("v2"), 100.0);
}
