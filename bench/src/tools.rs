//! Running wrk and reading its report.

use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_second: f64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs wrk with one thread: `connections` keep-alive connections for `duration`.
pub fn wrk(url: &str, host: &str, connections: u32, duration: Duration) -> Result<WrkResult, String> {
    let output = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{}s", duration.as_secs().max(1))])
        .args(["--latency", "-H", &format!("Host: {host}"), url])
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr)));
    }
    parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's report:\n{text}"))
}

pub fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut result = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => result.requests_per_second = value.parse().ok()?,
            [count, "requests", "in", ..] => result.requests = count.parse().ok()?,
            ["50%", value] => result.p50_us = micros(value)?,
            ["99%", value] => result.p99_us = micros(value)?,
            ["Non-2xx", "or", "3xx", "responses:", value] => result.errors += value.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                result.errors +=
                    rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>()
            }
            _ => {}
        }
    }
    (result.requests > 0).then_some(result)
}

/// wrk prints `123.45us`, `1.20ms` or `2.00s`.
fn micros(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  512.00us\n     75%    1.00ms\n     99%    2.50ms\n  51234 requests in 1.00s, 7.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 3\nRequests/sec:  51234.56\n";
        let result = parse_wrk(report).unwrap();
        assert_eq!(result.requests, 51234);
        assert_eq!(result.p50_us, 512.0);
        assert_eq!(result.p99_us, 2500.0);
        assert_eq!(result.errors, 6);
        assert!((result.requests_per_second - 51234.56).abs() < 0.01);
    }
}

#[derive(Debug, Clone, Default)]
pub struct H2loadResult {
    pub succeeded: u64,
    pub requests_per_second: f64,
    pub failed: u64,
    /// h2load's request and status-code lines, for the error message.
    pub summary: String,
}

/// How long an h2load run lasts.
#[derive(Debug, Clone, Copy)]
pub enum H2loadRun {
    /// For a time, after a one-second warm-up that is not counted.
    For(Duration),
    /// Until this many requests are done: every request started is
    /// finished, so the count can be checked against the backend's.
    Requests(u64),
}

/// Runs h2load (HTTP/2 prior knowledge) with one thread: `connections`
/// connections × `streams` concurrent streams. With a body file, requests
/// are gRPC unary calls.
pub fn h2load(
    url: &str,
    authority: &str,
    connections: u32,
    streams: u32,
    run: H2loadRun,
    grpc_body: Option<&std::path::Path>,
) -> Result<H2loadResult, String> {
    let mut command = h2load_command(authority, grpc_body);
    command.args(["-t1", &format!("-c{connections}"), &format!("-m{streams}")]);
    match run {
        H2loadRun::For(duration) => {
            command.args([&format!("--duration={}", duration.as_secs().max(1)), "--warm-up-time=1"])
        }
        H2loadRun::Requests(count) => command.arg(format!("-n{count}")),
    };
    let output = command.arg(url).output().map_err(|e| format!("cannot run h2load: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("h2load failed: {text}{}", String::from_utf8_lossy(&output.stderr)));
    }
    parse_h2load(&text).ok_or_else(|| format!("cannot read h2load's report:\n{text}"))
}

/// h2load with the authority set and, for gRPC, the body and headers of a unary call.
pub fn h2load_command(authority: &str, grpc_body: Option<&std::path::Path>) -> Command {
    let mut command = Command::new("h2load");
    command.args(["-H", &format!(":authority: {authority}")]);
    if let Some(body) = grpc_body {
        let body = body.to_str().unwrap_or_default();
        command.args(["-d", body, "-H", "content-type: application/grpc", "-H", "te: trailers"]);
    }
    command
}

pub fn parse_h2load(text: &str) -> Option<H2loadResult> {
    let mut result = H2loadResult::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rate = rest.split(", ").nth(1)?.strip_suffix(" req/s")?;
            result.requests_per_second = rate.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            result.summary.push_str(line);
            result.summary.push('\n');
            for part in rest.split(", ") {
                let (count, what) = part.split_once(' ')?;
                let count: u64 = count.parse().ok()?;
                match what {
                    "succeeded" => result.succeeded = count,
                    "failed" | "errored" | "timeout" => result.failed += count,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            result.summary.push_str(line);
            result.summary.push('\n');
            // A non-2xx answer counts as a failure even though h2load calls it done.
            for part in rest.split(", ").skip(1) {
                result.failed += part.split_once(' ')?.0.parse::<u64>().ok()?;
            }
        }
    }
    (result.succeeded > 0).then_some(result)
}

#[cfg(test)]
mod h2load_tests {
    use super::*;

    #[test]
    fn reads_an_h2load_report() {
        let report = "finished in 5.00s, 40123.45 req/s, 1.2MB/s\nrequests: 200617 total, 200617 started, 200617 done, 200610 succeeded, 7 failed, 0 errored, 0 timeout\nstatus codes: 200610 2xx, 0 3xx, 0 4xx, 2 5xx\n";
        let result = parse_h2load(report).unwrap();
        assert_eq!(result.succeeded, 200610);
        assert_eq!(result.failed, 9);
        assert!((result.requests_per_second - 40123.45).abs() < 0.01);
    }
}
