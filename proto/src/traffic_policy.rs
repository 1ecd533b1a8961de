//! Routes and rate limits across the wire: the typed values of
//! `mesh_common::traffic_policy` to their messages and back. meshd checks
//! a routes file before it stores it; what comes off the wire is checked
//! again only for what the messages cannot rule out (two path kinds, no
//! backends), and the proxy compiles the expressions itself.

use std::collections::BTreeMap;

use mesh_common::traffic_policy::{
    AbortFault, Backends, Bucket, DelayFault, FaultSpec, GrpcMethod, MirrorSpec, MirrorTarget, PathMatch,
    RateLimitSpec, RouteMatch, RouteRetry, RouteSpec,
};

use crate::convert::{retry_on_from_pb, retry_on_to_pb};
use crate::mesh::v1 as pb;

pub fn route_to_pb(route: &RouteSpec) -> pb::Route {
    let m = &route.matches;
    let (mut path, mut path_prefix, mut path_regex) = (String::new(), String::new(), String::new());
    match &m.path {
        Some(PathMatch::Exact(p)) => path = p.clone(),
        Some(PathMatch::Prefix(p)) => path_prefix = p.clone(),
        Some(PathMatch::Regex(p)) => path_regex = p.clone(),
        None => {}
    }
    let matches = pb::RouteMatch {
        path,
        path_prefix,
        path_regex,
        method: m.method.clone().unwrap_or_default(),
        headers: m.headers.clone().into_iter().collect(),
        headers_regex: m.headers_regex.clone().into_iter().collect(),
        headers_present: m.headers_present.clone(),
        query: m.query.clone().into_iter().collect(),
        grpc_method: m.grpc_method.as_ref().map(GrpcMethod::text).unwrap_or_default(),
    };
    let (backend_versions, backend_service) = match &route.backends {
        Backends::Versions(weights) => (weights.clone().into_iter().collect(), String::new()),
        Backends::Service(name) => (Default::default(), name.clone()),
    };
    let (retry_attempts, retry_on) = match &route.retry {
        Some(retry) => (retry.attempts, retry.on.iter().map(|c| retry_on_to_pb(*c)).collect()),
        None => (0, Vec::new()),
    };
    pb::Route {
        name: route.name.clone(),
        r#match: Some(matches),
        backend_versions,
        backend_service,
        timeout_ms: route.timeout_ms.unwrap_or(0),
        retry_attempts,
        retry_on,
        mirror: route.mirror.as_ref().map(|mirror| {
            let (version, service) = match &mirror.target {
                MirrorTarget::Version(v) => (v.clone(), String::new()),
                MirrorTarget::Service(s) => (String::new(), s.clone()),
            };
            pb::Mirror {
                version,
                service,
                per_million: mirror.per_million,
                max_in_flight: mirror.max_in_flight,
            }
        }),
        fault: route.fault.as_ref().map(|fault| {
            let delay = fault.delay.as_ref();
            let abort = fault.abort.as_ref();
            pb::Fault {
                delay_ms: delay.map_or(0, |d| d.duration_ms),
                delay_per_million: delay.map_or(0, |d| d.per_million),
                abort_status: abort.map_or(0, |a| u32::from(a.status)),
                abort_grpc_status: abort.and_then(|a| a.grpc_status).map_or(0, u32::from),
                abort_per_million: abort.map_or(0, |a| a.per_million),
            }
        }),
    }
}

fn some_text(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

pub fn route_from_pb(route: &pb::Route) -> Result<RouteSpec, String> {
    let what = |message: &str| format!("route {:?}: {message}", route.name);
    let m = route.r#match.clone().unwrap_or_default();
    let paths = [
        some_text(&m.path).map(PathMatch::Exact),
        some_text(&m.path_prefix).map(PathMatch::Prefix),
        some_text(&m.path_regex).map(PathMatch::Regex),
    ];
    let mut given = paths.into_iter().flatten();
    let path = given.next();
    if given.next().is_some() {
        return Err(what("more than one kind of path match"));
    }
    let grpc_method = some_text(&m.grpc_method).map(|text| match text.split_once('/') {
        Some((service, method)) => {
            GrpcMethod { service: service.to_owned(), method: Some(method.to_owned()) }
        }
        None => GrpcMethod { service: text, method: None },
    });
    let matches = RouteMatch {
        path,
        method: some_text(&m.method),
        headers: m.headers.into_iter().collect(),
        headers_regex: m.headers_regex.into_iter().collect(),
        headers_present: m.headers_present,
        query: m.query.into_iter().collect(),
        grpc_method,
    };
    let backends = match (route.backend_versions.is_empty(), route.backend_service.is_empty()) {
        (false, true) => Backends::Versions(route.backend_versions.clone().into_iter().collect()),
        (true, false) => Backends::Service(route.backend_service.clone()),
        _ => return Err(what("needs versions or a service as backends, not both or neither")),
    };
    let retry = match route.retry_attempts {
        0 => None,
        attempts => {
            let on = route.retry_on.iter().map(|c| retry_on_from_pb(*c)).collect::<Result<_, _>>()?;
            Some(RouteRetry { attempts, on })
        }
    };
    let mirror = match &route.mirror {
        Some(mirror) => {
            let target = match (some_text(&mirror.version), some_text(&mirror.service)) {
                (Some(version), None) => MirrorTarget::Version(version),
                (None, Some(service)) => MirrorTarget::Service(service),
                _ => return Err(what("a mirror names a version or a service")),
            };
            Some(MirrorSpec { target, per_million: mirror.per_million, max_in_flight: mirror.max_in_flight })
        }
        None => None,
    };
    let fault = route.fault.as_ref().map(|fault| FaultSpec {
        delay: (fault.delay_per_million > 0)
            .then_some(DelayFault { duration_ms: fault.delay_ms, per_million: fault.delay_per_million }),
        abort: (fault.abort_per_million > 0).then(|| AbortFault {
            status: u16::try_from(fault.abort_status).unwrap_or(503),
            grpc_status: u8::try_from(fault.abort_grpc_status).ok().filter(|c| *c > 0),
            per_million: fault.abort_per_million,
        }),
    });
    Ok(RouteSpec {
        name: route.name.clone(),
        matches,
        backends,
        timeout_ms: (route.timeout_ms > 0).then_some(route.timeout_ms),
        retry,
        mirror,
        fault,
    })
}

fn bucket_to_pb(bucket: &Bucket) -> pb::Bucket {
    pb::Bucket { requests_per_second: bucket.requests_per_second, burst: bucket.burst }
}

fn bucket_from_pb(bucket: &pb::Bucket) -> Bucket {
    Bucket { requests_per_second: bucket.requests_per_second.max(1), burst: bucket.burst.max(1) }
}

pub fn rate_limit_to_pb(limit: &RateLimitSpec) -> pb::RateLimit {
    pb::RateLimit {
        overall: limit.overall.as_ref().map(bucket_to_pb),
        per_caller: limit.per_caller.as_ref().map(bucket_to_pb),
        overrides: limit.overrides.iter().map(|(caller, b)| (caller.clone(), bucket_to_pb(b))).collect(),
    }
}

pub fn rate_limit_from_pb(limit: &pb::RateLimit) -> RateLimitSpec {
    RateLimitSpec {
        overall: limit.overall.as_ref().map(bucket_from_pb),
        per_caller: limit.per_caller.as_ref().map(bucket_from_pb),
        overrides: limit
            .overrides
            .iter()
            .map(|(caller, b)| (caller.clone(), bucket_from_pb(b)))
            .collect::<BTreeMap<_, _>>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::traffic_policy::file::parse_traffic_policy;

    #[test]
    fn every_route_and_limit_of_a_file_crosses_the_wire_unchanged() {
        let text = r#"
[[routes]]
service = "echo"
name = "a"
match = { path_regex = "/u/[0-9]+", method = "GET", headers = { "x-a" = "1" }, headers_regex = { "x-b" = "b.*" }, headers_present = ["x-c"], query = { q = "1" } }
backends = { v1 = 90, v2 = 10 }
timeout = "1s"
retry = { attempts = 2, on = ["5xx", "unavailable"] }
mirror = { service = "shadow", percent = 0.5, max_in_flight = 7 }
fault = { delay = { duration = "200ms", percent = 1.5 }, abort = { status = 429, grpc_status = 8, percent = 0.01 } }

[[routes]]
service = "echo"
name = "b"
match = { grpc_method = "pkg.Svc" }
backends = { service = "other" }

[[rate_limits]]
service = "echo"
requests_per_second = 50
per_caller = { requests_per_second = 5 }
overrides = [ { caller = "spiffe://mesh.local/service/batch", requests_per_second = 1, burst = 3 } ]
"#;
        let file = parse_traffic_policy(text).unwrap();
        for route in &file.routes["echo"] {
            assert_eq!(&route_from_pb(&route_to_pb(route)).unwrap(), route);
        }
        let limit = &file.rate_limits["echo"];
        assert_eq!(&rate_limit_from_pb(&rate_limit_to_pb(limit)), limit);
    }
}
