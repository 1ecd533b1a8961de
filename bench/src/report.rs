//! The results as a Markdown table with ratios, and an SVG bar chart.

use std::fmt::Write;

/// The medians measured for one contender.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub name: String,
    pub saturation_rps: f64,
    /// Proxy CPU per request at saturation; `None` for the direct baseline.
    pub cpu_us_per_request: Option<f64>,
    /// The user-space part of it: the kernel's part (the same syscalls
    /// for every contender) dominates, and this is where proxies differ.
    pub user_cpu_us_per_request: Option<f64>,
    pub cpu_us_per_request_at_rate: Option<f64>,
    pub rate_p50_us: f64,
    pub rate_p99_us: f64,
    pub rate_p999_us: f64,
    pub sequential_p50_us: f64,
    pub sequential_p99_us: f64,
    pub peak_rss_mb: Option<f64>,
}

fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "–".to_owned(),
    }
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

pub fn markdown(rows: &[Row], rate: u32) -> String {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let haproxy = find("HAProxy");
    let envoy = find("Envoy");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| contender | req/s (32 conns) | CPU µs/req | ×HAProxy | ×Envoy | of it user µs/req | CPU µs/req @{rate}/s | p50 @{rate}/s µs | p99 @{rate}/s µs | p99 ×HAProxy | p99.9 @{rate}/s µs | 1-conn p50 µs | 1-conn p99 µs | peak RSS MB (1k/s, 100 conns) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} |",
            row.name,
            row.saturation_rps,
            opt(row.cpu_us_per_request, 1),
            ratio(row.cpu_us_per_request, haproxy.and_then(|h| h.cpu_us_per_request)),
            ratio(row.cpu_us_per_request, envoy.and_then(|e| e.cpu_us_per_request)),
            opt(row.user_cpu_us_per_request, 1),
            opt(row.cpu_us_per_request_at_rate, 1),
            row.rate_p50_us,
            row.rate_p99_us,
            ratio(Some(row.rate_p99_us), haproxy.map(|h| h.rate_p99_us)),
            row.rate_p999_us,
            row.sequential_p50_us,
            row.sequential_p99_us,
            opt(row.peak_rss_mb, 1),
        );
    }
    out
}

/// Medians for one full mesh path (or the one-hop yardstick).
#[derive(Debug, Clone, Default)]
pub struct PathRow {
    pub name: String,
    pub saturation_rps: f64,
    /// CPU of all the path's proxies per request at saturation.
    pub cpu_us_per_request: f64,
    pub rate_p50_us: f64,
    pub rate_p99_us: f64,
    /// New mTLS connections the second hop's proxy takes per CPU-second.
    pub handshakes_per_core_second: Option<f64>,
    /// 1 MiB answers through the path, 4 at a time, in MiB/s.
    pub mib_per_second: f64,
}

pub fn markdown_paths(rows: &[PathRow], rate: u32) -> String {
    let hop = rows.iter().find(|r| r.name == "HAProxy 1 hop");
    let envoy = rows.iter().find(|r| r.name == "Envoy path (mTLS)");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| path | req/s (32 conns) | CPU µs/req (all proxies) | ×HAProxy hop | ×Envoy path | p50 @{rate}/s µs | p99 @{rate}/s µs | p99 ×HAProxy hop | mTLS handshakes per core-second | 1 MiB answers, MiB/s |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {} | {} | {:.0} | {:.0} | {} | {} | {:.0} |",
            row.name,
            row.saturation_rps,
            row.cpu_us_per_request,
            ratio(Some(row.cpu_us_per_request), hop.map(|h| h.cpu_us_per_request)),
            ratio(Some(row.cpu_us_per_request), envoy.map(|e| e.cpu_us_per_request)),
            row.rate_p50_us,
            row.rate_p99_us,
            ratio(Some(row.rate_p99_us), hop.map(|h| h.rate_p99_us)),
            opt(row.handshakes_per_core_second, 0),
            row.mib_per_second,
        );
    }
    out
}

/// HTTP/2 and gRPC medians for one contender.
#[derive(Debug, Clone, Default)]
pub struct H2Row {
    pub name: String,
    pub h2_rps: f64,
    pub h2_cpu_us_per_request: Option<f64>,
    pub grpc_rps: f64,
    pub grpc_cpu_us_per_request: Option<f64>,
}

pub fn markdown_h2(rows: &[H2Row]) -> String {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let (haproxy, envoy) = (find("HAProxy"), find("Envoy"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| contender | h2 req/s | h2 CPU µs/req | ×HAProxy | ×Envoy | gRPC req/s | gRPC CPU µs/req | ×HAProxy | ×Envoy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} |",
            row.name,
            row.h2_rps,
            opt(row.h2_cpu_us_per_request, 1),
            ratio(row.h2_cpu_us_per_request, haproxy.and_then(|h| h.h2_cpu_us_per_request)),
            ratio(row.h2_cpu_us_per_request, envoy.and_then(|e| e.h2_cpu_us_per_request)),
            row.grpc_rps,
            opt(row.grpc_cpu_us_per_request, 1),
            ratio(row.grpc_cpu_us_per_request, haproxy.and_then(|h| h.grpc_cpu_us_per_request)),
            ratio(row.grpc_cpu_us_per_request, envoy.and_then(|e| e.grpc_cpu_us_per_request)),
        );
    }
    out
}

/// A chart panel: its title and the value it draws for a row.
type Panel<'a> = (&'a str, fn(&Row) -> f64);

/// Two bar groups: CPU per request and p99 at the fixed rate.
pub fn svg(rows: &[Row], rate: u32) -> String {
    let proxies: Vec<&Row> = rows.iter().filter(|r| r.cpu_us_per_request.is_some()).collect();
    let (width, height, bar, gap) = (760.0, 340.0, 28.0, 10.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let colours = ["#2b8cbe", "#e34a33", "#31a354", "#756bb1", "#636363"];
    let rate_title = format!("p99 µs at {rate} req/s (open loop)");
    let panels: [Panel<'_>; 2] = [
        ("proxy CPU µs per request (saturation)", |r| r.cpu_us_per_request.unwrap_or(0.0)),
        (&rate_title, |r| r.rate_p99_us),
    ];
    for (panel, (title, value)) in panels.iter().enumerate() {
        let x0 = 20.0 + panel as f64 * (width / 2.0);
        let _ = writeln!(out, "<text x=\"{x0}\" y=\"24\" font-weight=\"bold\">{title}</text>");
        let max = proxies.iter().map(|r| value(r)).fold(0.0_f64, f64::max).max(1e-9);
        for (i, row) in proxies.iter().enumerate() {
            let y = 44.0 + i as f64 * (bar + gap);
            let length = 220.0 * value(row) / max;
            let colour = colours[i % colours.len()];
            let _ = writeln!(
                out,
                "<text x=\"{x0}\" y=\"{}\">{}</text><rect x=\"{}\" y=\"{y}\" width=\"{length:.1}\" height=\"{bar}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{:.1}</text>",
                y + bar * 0.65,
                row.name,
                x0 + 90.0,
                x0 + 95.0 + length,
                y + bar * 0.65,
                value(row)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
