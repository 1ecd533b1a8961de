//! Reading a proxy's `/metrics` the way Prometheus would.

use crate::client::{get, http1};

/// The samples of a scrape, as (name with labels, value).
pub struct Scrape(pub Vec<(String, f64)>);

impl Scrape {
    /// Sum of the samples of `name` whose labels include every `key="value"` in `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let metric = series.split('{').next().unwrap_or_default();
                metric == name && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Like `sum`, but the series must exist: a check that a counter is 0
    /// must not pass because the series disappeared or was renamed.
    pub fn present(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.0.iter().any(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        });
        assert!(found, "no series {name} with labels {labels:?} in the scrape");
        self.sum(name, labels)
    }
}

pub async fn scrape(admin: &str) -> Scrape {
    let answer = get(&http1(), admin, admin, "/metrics").await.expect("scrape /metrics");
    assert!(answer.status.is_success(), "/metrics answered {}", answer.status);
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    Scrape(
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect(),
    )
}

pub async fn text(admin: &str) -> String {
    let answer = get(&http1(), admin, admin, "/metrics").await.expect("scrape /metrics");
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// Runs `promtool check metrics` on a scrape and fails with its complaints.
pub fn promtool_check(metrics: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command");
    promtool.stdin.take().expect("piped stdin").write_all(metrics.as_bytes()).expect("write to promtool");
    let checked = promtool.wait_with_output().expect("promtool ran");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}
