//! A service's traffic policy beyond its defaults: routes (matches sent to
//! their own backends, with their own timeout and retries, mirroring and
//! fault injection) and a local rate limit at its inbound.
//!
//! These are the validated values every program shares: meshctl and meshd
//! read them from a routes file, meshd stores them and sends them to
//! proxies, and the proxy's static config takes the same tables. The
//! checks live in [`file`], so a value here is always a valid one.

pub mod file;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::RetryOn;

/// Parts per million in one percent: percentages are kept as whole parts
/// per million, so 0.01 % is exactly 100.
pub const PER_MILLION_PER_PERCENT: u32 = 10_000;

/// One route of a service: requests that match go to its backends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    pub backends: Backends,
    /// The whole request, retries included; `None`: the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
}

/// What a request must carry to take a route; every condition given must
/// hold, and a match with none takes every request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// An HTTP method, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header name (lower case) to its exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Header name to a regular expression its whole value must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers_regex: BTreeMap<String, String>,
    /// Header names that must be present, whatever their value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_present: Vec<String>,
    /// Query parameter to its exact (decoded) value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_method: Option<GrpcMethod>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// A regular expression the whole path must match.
    Regex(String),
}

/// A gRPC call by service (`pkg.Service`) and method; no method: any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcMethod {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcMethod {
    /// As written in files: `pkg.Service/Method`, or `pkg.Service`.
    pub fn text(&self) -> String {
        match &self.method {
            Some(method) => format!("{}/{method}", self.service),
            None => self.service.clone(),
        }
    }
}

/// Where a route's requests go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backends {
    /// Versions of the route's own service by weight (adding up to 100).
    Versions(BTreeMap<String, u32>),
    /// Another service, with its own endpoints and split.
    Service(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRetry {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
}

/// What a mirrored request is copied to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorTarget {
    Version(String),
    Service(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSpec {
    pub target: MirrorTarget,
    pub per_million: u32,
    /// Mirrored requests in flight at most; beyond, copies are dropped.
    pub max_in_flight: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayFault {
    pub duration_ms: u64,
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortFault {
    /// The HTTP status an aborted request gets.
    pub status: u16,
    /// The gRPC status a gRPC caller gets instead; `None`: UNAVAILABLE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    pub per_million: u32,
}

/// A token bucket: a steady rate and the burst it may run ahead by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub requests_per_second: u32,
    pub burst: u32,
}

impl Bucket {
    /// A bucket with the default burst: a tenth of a second's requests.
    pub fn with_default_burst(requests_per_second: u32) -> Bucket {
        Bucket { requests_per_second, burst: requests_per_second.div_ceil(10).max(1) }
    }
}

/// A local rate limit at a service's inbound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSpec {
    /// All callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<Bucket>,
    /// Each caller identity (SPIFFE ID) alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_caller: Option<Bucket>,
    /// Callers with a bucket of their own, by SPIFFE ID.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Bucket>,
}

impl RateLimitSpec {
    /// The bucket a caller gets on its own: its override, else `per_caller`.
    pub fn caller_bucket(&self, caller: &str) -> Option<Bucket> {
        self.overrides.get(caller).copied().or(self.per_caller)
    }
}

/// A routes file once validated: per service, its routes in order (when
/// the file has any for it) and its rate limit (when it has one).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicyFile {
    pub routes: BTreeMap<String, Vec<RouteSpec>>,
    pub rate_limits: BTreeMap<String, RateLimitSpec>,
}

/// A percentage as written, from parts per million: `0.01`, `5`, `100`.
pub fn percent_text(per_million: u32) -> String {
    let whole = per_million / PER_MILLION_PER_PERCENT;
    let fraction = per_million % PER_MILLION_PER_PERCENT;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:04}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

impl RouteSpec {
    /// The match in one line, for listings: `path_prefix=/api method=POST`.
    pub fn match_text(&self) -> String {
        let m = &self.matches;
        let mut parts = Vec::new();
        match &m.path {
            Some(PathMatch::Exact(p)) => parts.push(format!("path={p}")),
            Some(PathMatch::Prefix(p)) => parts.push(format!("path_prefix={p}")),
            Some(PathMatch::Regex(p)) => parts.push(format!("path_regex={p}")),
            None => {}
        }
        if let Some(method) = &m.method {
            parts.push(format!("method={method}"));
        }
        parts.extend(m.headers.iter().map(|(k, v)| format!("header {k}={v}")));
        parts.extend(m.headers_regex.iter().map(|(k, v)| format!("header {k}~{v}")));
        parts.extend(m.headers_present.iter().map(|k| format!("header {k}")));
        parts.extend(m.query.iter().map(|(k, v)| format!("query {k}={v}")));
        if let Some(grpc) = &m.grpc_method {
            parts.push(format!("grpc_method={}", grpc.text()));
        }
        if parts.is_empty() {
            "(every request)".to_owned()
        } else {
            parts.join(" ")
        }
    }

    /// The backends in one line: `v1=90 v2=10`, or `service=other`.
    pub fn backends_text(&self) -> String {
        match &self.backends {
            Backends::Versions(weights) => {
                weights.iter().map(|(v, w)| format!("{v}={w}")).collect::<Vec<_>>().join(" ")
            }
            Backends::Service(name) => format!("service={name}"),
        }
    }

    /// Services other than its own that the route sends to or mirrors to.
    pub fn other_services(&self) -> impl Iterator<Item = &str> {
        let backend = match &self.backends {
            Backends::Service(name) => Some(name.as_str()),
            Backends::Versions(_) => None,
        };
        let mirror = match self.mirror.as_ref().map(|m| &m.target) {
            Some(MirrorTarget::Service(name)) => Some(name.as_str()),
            _ => None,
        };
        backend.into_iter().chain(mirror)
    }

    /// Versions of its own service that the route sends to or mirrors to.
    pub fn own_versions(&self) -> impl Iterator<Item = &str> {
        let backends = match &self.backends {
            Backends::Versions(weights) => Some(weights.keys().map(String::as_str)),
            Backends::Service(_) => None,
        };
        let mirror = match self.mirror.as_ref().map(|m| &m.target) {
            Some(MirrorTarget::Version(version)) => Some(version.as_str()),
            _ => None,
        };
        backends.into_iter().flatten().chain(mirror)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_print_as_written() {
        // (parts per million, text)
        let table = [(100, "0.01"), (1_000_000, "100"), (15_000, "1.5"), (50_000, "5"), (1, "0.0001")];
        for (per_million, text) in table {
            assert_eq!(percent_text(per_million), text);
        }
    }
}
