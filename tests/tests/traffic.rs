//! Traffic summaries: every sidecar tells meshd what its traffic was each
//! second, and `meshctl top` and `meshctl stat` read a window of them from
//! meshd: what the callers got and what the instances served, with
//! success rate, latency, requests in flight and the mesh's own errors.

use std::time::Duration;

use mesh_tests::process::{Agent, Meshd};
use mesh_tests::{eventually, TempDir};
use serde_json::Value;

/// Two instances of `web` that fail a fifth of their requests (503) and
/// answer after 30 ms.
const JOB: &str = "name = \"web\"\nversion = \"v1\"\nreplicas = 2\n\n[task]\ncommand = \"mesh-echo\"\nargs = [\"--fail-rate\", \"0.2\", \"--latency\", \"30ms\"]\n\n[resources]\ncpu_millis = 100\nmemory_mb = 32\n";

fn row<'a>(rows: &'a Value, direction: Option<&str>) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| {
        r["service"] == "web" && r["version"] == "v1" && direction.is_none_or(|d| r["direction"] == d)
    })
}

fn number(row: &Value, field: &str) -> f64 {
    row[field].as_f64().unwrap_or_else(|| panic!("{field} in {row}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_and_stat_show_what_callers_got_and_instances_served_from_meshd() {
    let dir = TempDir::new("traffic");
    let meshd = Meshd::start(&dir.path("data"));
    let _agent = Agent::start(&meshd, "node-a", &mesh_tests::node_ip(), 1000, &dir.path("agent"), &[]);
    let file = dir.path("web.toml");
    std::fs::write(&file, JOB).unwrap();
    meshd.ctl_ok(&["job", "run", file.to_str().unwrap()]);
    meshd.running("web", 2, Duration::from_secs(30)).await;
    let client = meshd.mesh_client(&dir.path("client.toml"), "").await;

    // POSTs: a proxy does not retry them, so the callers see every failure.
    let load = mesh_tests::client::Background::posts(&client, "web", 4);
    load.wait_for(200).await;
    // A window the load has filled: the callers' view in `top`.
    let top = eventually("top shows web's traffic over a full window", Duration::from_secs(20), || {
        let top = meshd.ctl_json(&["top", "--window", "5s"]);
        let filled = row(&top, None).is_some_and(|r| number(r, "requests_per_second") > 20.0);
        async move { filled.then_some(top) }
    })
    .await;
    // Four callers wait on the two instances nearly all the time: the
    // instances' sidecars count them in flight.
    eventually("requests in flight at web's instances show", Duration::from_secs(10), || {
        let top = meshd.ctl_json(&["top", "--window", "5s"]);
        let busy =
            row(&top, None).and_then(|r| r["in_flight"].as_i64()).is_some_and(|n| (2..=4).contains(&n));
        async move { busy.then_some(()) }
    })
    .await;
    let tally = load.stop().await;
    let web = row(&top, None).unwrap().clone();
    eprintln!("top: {web}\nthe load: {} ok, {} failed", tally.ok, tally.failed());

    // The callers' success rate is the load's own, about 80 % (a fifth fail).
    let success = number(&web, "success_rate");
    assert!((65.0..=92.0).contains(&success), "success rate {success} %: {web}");
    // Latency: the 30 ms the app takes, in the 25–50 ms bucket.
    assert_eq!(number(&web, "p50_ms"), 50.0, "{web}");

    // Once every sidecar has reported, a window over the whole run counts
    // each request once on each side: what the callers got is what the
    // load saw, and what the instances served is the same; 5xx from the
    // app, none from the mesh.
    let sent = tally.ok + tally.failed();
    let stat =
        eventually("every request of the load is counted on both sides", Duration::from_secs(10), || {
            let stat = meshd.ctl_json(&["stat", "web", "--window", "60s"]);
            let count =
                |direction: &str| row(&stat, Some(direction)).map(|r| r["requests"].as_u64().unwrap());
            let settled = count("outbound") == Some(sent) && count("inbound") == Some(sent);
            async move { settled.then_some(stat) }
        })
        .await;
    eprintln!("stat: {stat}");
    let (inbound, outbound) = (row(&stat, Some("inbound")).unwrap(), row(&stat, Some("outbound")).unwrap());
    let failed = format!("5xx={}", tally.failed());
    for side in [inbound, outbound] {
        assert!(side["status_classes"].as_str().unwrap().contains(&failed), "{failed}: {side}");
        assert_eq!(side["mesh_errors"], "", "no error of the mesh's own: {side}");
    }
    assert_eq!(inbound["proxies"], 2, "both instances' sidecars report: {inbound}");

    // Once the load stops, a short window shows none, and nothing in flight.
    eventually("web's traffic leaves a short window", Duration::from_secs(10), || {
        let top = meshd.ctl_json(&["top", "--window", "1s"]);
        let quiet =
            row(&top, None).is_none_or(|r| number(r, "requests_per_second") == 0.0 && r["in_flight"] == 0);
        async move { quiet.then_some(()) }
    })
    .await;

    // A window meshd does not keep is refused with the reason.
    let (code, _, err) = meshd.ctl(&["top", "--window", "2m"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("too long") && err.contains("60s"), "{err}");
}
