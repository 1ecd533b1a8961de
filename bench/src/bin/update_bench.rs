//! What a routing update from the control plane costs one proxy at a large
//! table, side by side in one run: the whole table (a proxy's first update,
//! or one after it resubscribed) against a change to one service (an
//! endpoint flap or a split change), through the same code a proxy runs:
//! the routes are checked and converted (`control::to_change`), then the
//! table is built and published (`Proxy::apply_control`).
//!
//! `mesh-update-bench [--services 1000] [--endpoints 10] [--rounds 200]`

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mesh_proto::mesh::v1 as pb;
use mesh_proxy::config::{parse_config, Listen};
use mesh_proxy::control::{to_change, ControlOptions, Routes};
use mesh_proxy::control_tls::ControlAccess;
use mesh_proxy::proxy::{Proxy, Update};

struct Args {
    services: usize,
    endpoints: usize,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut args = Args { services: 1000, endpoints: 10, rounds: 200 };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number =
            value.parse::<usize>().unwrap_or_else(|_| usage(&format!("{flag}: `{value}` is not a number")));
        match flag.as_str() {
            "--services" => args.services = number,
            "--endpoints" => args.endpoints = number,
            "--rounds" => args.rounds = number.max(1),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    args
}

fn usage(why: &str) -> ! {
    eprintln!(
        "mesh-update-bench: {why}\nusage: mesh-update-bench [--services N] [--endpoints N] [--rounds N]"
    );
    std::process::exit(2);
}

/// Service `index`'s route, with endpoint `flapped` (if any) not ready.
fn route(index: usize, endpoints: usize, flapped: Option<usize>) -> pb::ServiceRoute {
    let endpoint = |e: usize| {
        let n = index * endpoints + e + 1;
        let addr = SocketAddr::from((Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8), 8080));
        pb::Endpoint {
            addr: addr.to_string(),
            version: if e.is_multiple_of(2) { "v1" } else { "v2" }.into(),
            ready: flapped != Some(e),
            meshed: true,
            ..Default::default()
        }
    };
    pb::ServiceRoute {
        name: format!("svc-{index}"),
        endpoints: (0..endpoints).map(endpoint).collect(),
        split: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into(),
        ..Default::default()
    }
}

fn options() -> ControlOptions {
    ControlOptions {
        control: ControlAccess::with_roots("", ""),
        proxy_id: "bench".into(),
        servers: mesh_client::ServerList::parse("127.0.0.1:7400").unwrap(),
        service: "client".into(),
        version: "v1".into(),
        listen: Listen { outbound: None, inbound: None, admin: None, app: None },
        upstreams: Vec::new(),
        upstream_protocols: Arc::new(OnceLock::new()),
        admin_addr: String::new(),
        keepalive: Duration::from_secs(10),
    }
}

/// Takes `changed` into the proxy's view and applies it as `version`;
/// returns how long the conversion and the build took.
fn apply(proxy: &Proxy, routes: &mut Routes, changed: Vec<pb::ServiceRoute>, version: u64) -> Duration {
    let options = options();
    let started = Instant::now();
    let touched: BTreeSet<String> = changed.iter().map(|r| r.name.clone()).collect();
    for route in changed {
        routes.received.insert(route.name.clone(), route);
    }
    let change = to_change(routes, &touched, &options);
    proxy.apply_control(Update::Services(change), version);
    started.elapsed()
}

fn main() {
    let args = parse_args();
    let proxy = Proxy::waiting(parse_config("[listen]\n").expect("an empty table"));
    let mut routes = Routes::default();
    let whole = |flapped: Option<usize>| -> Vec<pb::ServiceRoute> {
        (0..args.services).map(|i| route(i, args.endpoints, flapped.filter(|_| i == 0))).collect()
    };
    let mut version = 0;
    let mut next_version = || {
        version += 1;
        version
    };
    let first = apply(&proxy, &mut routes, whole(None), next_version());
    let mut full = Vec::new();
    let mut one = Vec::new();
    // Interleaved, so the machine's noise falls on both.
    for round in 0..args.rounds {
        // Every round flaps one endpoint of the first service, then puts it back.
        let flapped = Some(round % args.endpoints);
        if round.is_multiple_of(10) {
            full.push(apply(&proxy, &mut routes, whole(flapped), next_version()));
        } else {
            one.push(apply(&proxy, &mut routes, vec![route(0, args.endpoints, flapped)], next_version()));
        }
    }
    assert_eq!(proxy.table.load().services.len(), args.services, "every service is in the table");
    let summary = |times: &mut Vec<Duration>| {
        times.sort();
        let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
        (mean, times[times.len() / 2], times[times.len() * 99 / 100])
    };
    let (full_mean, full_p50, full_p99) = summary(&mut full);
    let (one_mean, one_p50, one_p99) = summary(&mut one);
    let endpoints = args.services * args.endpoints;
    println!(
        "Routing updates applied by one proxy at {} services × {} endpoints ({endpoints})",
        args.services, args.endpoints
    );
    println!("first table: {first:.2?}");
    println!("| update | count | mean | p50 | p99 |");
    println!("|---|---:|---:|---:|---:|");
    println!("| whole table | {} | {full_mean:.2?} | {full_p50:.2?} | {full_p99:.2?} |", full.len());
    println!("| one service changed | {} | {one_mean:.2?} | {one_p50:.2?} | {one_p99:.2?} |", one.len());
    println!(
        "one service / whole table (mean): {:.4}",
        one_mean.as_secs_f64() / full_mean.as_secs_f64().max(f64::MIN_POSITIVE)
    );
}
