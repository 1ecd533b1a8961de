//! The TOML form of routes and rate limits, and every check on it. A
//! routes file (`meshctl apply -f`) and the proxy's static config take the
//! same `[[routes]]` and `[[rate_limits]]` tables; both are checked here,
//! whole, before anything is applied, and an error names the line and the
//! field.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    AbortFault, Backends, Bucket, DelayFault, FaultSpec, GrpcMethod, MirrorSpec, MirrorTarget, PathMatch,
    RateLimitSpec, RouteMatch, RouteRetry, RouteSpec, TrafficPolicyFile, PER_MILLION_PER_PERCENT,
};
use crate::duration::HumanDuration;
use crate::file_error::{parse_toml, FileError};
use crate::policy::{check_retry_attempts, RetryOn};

/// Routes one service may have; first match wins, so a long list is
/// slow to read for people and proxies alike.
pub const MAX_ROUTES_PER_SERVICE: usize = 100;
/// The longest route timeout or injected delay.
pub const MAX_ROUTE_DURATION: Duration = Duration::from_secs(600);
pub const DEFAULT_MIRROR_MAX_IN_FLIGHT: u32 = 100;
const MAX_MIRROR_IN_FLIGHT: u32 = 10_000;
const MAX_RATE: u32 = 10_000_000;
/// Compiled regular expressions stay small: they run on every request.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrafficFile {
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    rate_limits: Vec<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    service: Spanned<String>,
    name: Spanned<String>,
    #[serde(rename = "match")]
    matches: Option<RawMatch>,
    backends: Spanned<BTreeMap<String, Spanned<toml::Value>>>,
    timeout: Option<Spanned<HumanDuration>>,
    retry: Option<RawRetry>,
    mirror: Option<Spanned<RawMirror>>,
    fault: Option<Spanned<RawFault>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    path_regex: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
    headers: Option<BTreeMap<String, Spanned<String>>>,
    headers_regex: Option<BTreeMap<String, Spanned<String>>>,
    headers_present: Option<Spanned<Vec<String>>>,
    query: Option<BTreeMap<String, Spanned<String>>>,
    grpc_method: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Spanned<u32>,
    on: Option<Vec<RetryOn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    version: Option<String>,
    service: Option<String>,
    percent: Spanned<f64>,
    max_in_flight: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    delay: Option<RawDelay>,
    abort: Option<Spanned<RawAbort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelay {
    duration: Spanned<HumanDuration>,
    percent: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAbort {
    status: Option<Spanned<u16>>,
    grpc_status: Option<Spanned<u8>>,
    percent: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    service: Spanned<String>,
    requests_per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
    per_caller: Option<RawBucket>,
    #[serde(default)]
    overrides: Vec<RawOverride>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    requests_per_second: Spanned<u32>,
    burst: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    caller: Spanned<String>,
    requests_per_second: Spanned<u32>,
    burst: Option<Spanned<u32>>,
}

/// Parses and checks a routes file's text (`meshctl apply -f`).
pub fn parse_traffic_policy(text: &str) -> Result<TrafficPolicyFile, FileError> {
    let raw: RawTrafficFile = parse_toml(text)?;
    if raw.routes.is_empty() && raw.rate_limits.is_empty() {
        return Err(FileError::at(text, None, "(file)", "the file has no [[routes]] and no [[rate_limits]]"));
    }
    check_traffic_policy(text, raw.routes, raw.rate_limits)
}

/// Checks `[[routes]]` and `[[rate_limits]]` tables read from `text`
/// (which may hold other tables too, as the proxy's config does).
pub fn check_traffic_policy(
    text: &str,
    routes: Vec<RawRoute>,
    rate_limits: Vec<RawRateLimit>,
) -> Result<TrafficPolicyFile, FileError> {
    let checker = Checker { text };
    let mut file = TrafficPolicyFile::default();
    for (index, raw) in routes.into_iter().enumerate() {
        let field = format!("routes[{index}]");
        let service = checker.name(&raw.service, &format!("{field}.service"), "service")?;
        let name_span = raw.name.span();
        let route = checker.route(&field, raw)?;
        let list = file.routes.entry(service).or_default();
        if list.iter().any(|r| r.name == route.name) {
            let message = format!("duplicate route {:?} of this service", route.name);
            return Err(checker.error(name_span, format!("{field}.name"), message));
        }
        if list.len() == MAX_ROUTES_PER_SERVICE {
            let message = format!("a service may have at most {MAX_ROUTES_PER_SERVICE} routes");
            return Err(checker.error(name_span, format!("{field}.name"), message));
        }
        list.push(route);
    }
    for (index, raw) in rate_limits.into_iter().enumerate() {
        let field = format!("rate_limits[{index}]");
        let service = checker.name(&raw.service, &format!("{field}.service"), "service")?;
        if file.rate_limits.contains_key(&service) {
            let message = format!("service {service:?} has another [[rate_limits]] table; give it one");
            return Err(checker.error(raw.service.span(), format!("{field}.service"), message));
        }
        let limit = checker.rate_limit(&field, raw)?;
        file.rate_limits.insert(service, limit);
    }
    Ok(file)
}

struct Checker<'a> {
    text: &'a str,
}

impl Checker<'_> {
    fn error(&self, span: Range<usize>, field: String, message: impl Into<String>) -> FileError {
        FileError::at(self.text, Some(span), field, message)
    }

    fn name(&self, name: &Spanned<String>, field: &str, what: &str) -> Result<String, FileError> {
        crate::name::check_name(what, name.get_ref())
            .map_err(|message| self.error(name.span(), field.to_owned(), message))?;
        Ok(name.get_ref().clone())
    }

    fn route(&self, field: &str, raw: RawRoute) -> Result<RouteSpec, FileError> {
        let name = self.name(&raw.name, &format!("{field}.name"), "route")?;
        let matches = match raw.matches {
            Some(raw_match) => self.route_match(&format!("{field}.match"), raw_match)?,
            None => RouteMatch::default(),
        };
        let backends = self.backends(&format!("{field}.backends"), &raw.backends)?;
        let timeout_ms = match &raw.timeout {
            Some(timeout) => Some(self.duration_ms(timeout, &format!("{field}.timeout"))?),
            None => None,
        };
        let retry = match raw.retry {
            Some(retry) => {
                let attempts = *retry.attempts.get_ref();
                check_retry_attempts(attempts)
                    .map_err(|e| self.error(retry.attempts.span(), format!("{field}.retry.attempts"), e))?;
                Some(RouteRetry { attempts, on: retry.on.unwrap_or_else(|| vec![RetryOn::ConnectFailure]) })
            }
            None => None,
        };
        let mirror = match raw.mirror {
            Some(mirror) => Some(self.mirror(&format!("{field}.mirror"), mirror)?),
            None => None,
        };
        let fault = match raw.fault {
            Some(fault) => Some(self.fault(&format!("{field}.fault"), fault)?),
            None => None,
        };
        Ok(RouteSpec { name, matches, backends, timeout_ms, retry, mirror, fault })
    }

    fn route_match(&self, field: &str, raw: RawMatch) -> Result<RouteMatch, FileError> {
        let paths = [
            raw.path.map(|p| ("path", p)),
            raw.path_prefix.map(|p| ("path_prefix", p)),
            raw.path_regex.map(|p| ("path_regex", p)),
        ];
        let mut given = paths.into_iter().flatten();
        let path = given.next();
        if let Some((kind, second)) = given.next() {
            let message = "give one of path, path_prefix and path_regex, not several";
            return Err(self.error(second.span(), format!("{field}.{kind}"), message));
        }
        let path = match path {
            Some((kind, value)) => {
                let at = format!("{field}.{kind}");
                let text = value.get_ref().clone();
                if kind == "path_regex" {
                    self.regex(&value, &at)?;
                    Some(PathMatch::Regex(text))
                } else if !text.starts_with('/') {
                    return Err(self.error(
                        value.span(),
                        at,
                        format!("a path starts with '/', got {text:?}"),
                    ));
                } else if kind == "path" {
                    Some(PathMatch::Exact(text))
                } else {
                    Some(PathMatch::Prefix(text))
                }
            }
            None => None,
        };
        let method = match raw.method {
            Some(method) => {
                let text = method.get_ref();
                let token = !text.is_empty() && text.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
                if !token {
                    let message =
                        format!("method {text:?} is not an HTTP method in upper case, such as GET or POST");
                    return Err(self.error(method.span(), format!("{field}.method"), message));
                }
                Some(text.clone())
            }
            None => None,
        };
        let headers = self.header_map(&format!("{field}.headers"), raw.headers, false)?;
        let headers_regex = self.header_map(&format!("{field}.headers_regex"), raw.headers_regex, true)?;
        let mut headers_present = Vec::new();
        if let Some(names) = raw.headers_present {
            for name in names.get_ref() {
                let lower = self.header_name(name, names.span(), &format!("{field}.headers_present"))?;
                headers_present.push(lower);
            }
        }
        let mut query = BTreeMap::new();
        for (name, value) in raw.query.unwrap_or_default() {
            if name.is_empty() {
                return Err(self.error(
                    value.span(),
                    format!("{field}.query"),
                    "a query parameter needs a name",
                ));
            }
            query.insert(name, value.into_inner());
        }
        let grpc_method = match raw.grpc_method {
            Some(grpc) => {
                let at = format!("{field}.grpc_method");
                if path.is_some() || method.is_some() {
                    let message = "grpc_method names the path and method itself; leave out path and method";
                    return Err(self.error(grpc.span(), at, message));
                }
                Some(self.grpc_method(&grpc, at)?)
            }
            None => None,
        };
        Ok(RouteMatch { path, method, headers, headers_regex, headers_present, query, grpc_method })
    }

    fn header_map(
        &self,
        field: &str,
        raw: Option<BTreeMap<String, Spanned<String>>>,
        regex: bool,
    ) -> Result<BTreeMap<String, String>, FileError> {
        let mut map = BTreeMap::new();
        for (name, value) in raw.unwrap_or_default() {
            let at = format!("{field}.{name}");
            let lower = self.header_name(&name, value.span(), &at)?;
            if regex {
                self.regex(&value, &at)?;
            }
            if map.insert(lower, value.into_inner()).is_some() {
                return Err(FileError::at(
                    self.text,
                    None,
                    at,
                    "the header is named twice (names ignore case)",
                ));
            }
        }
        Ok(map)
    }

    fn header_name(&self, name: &str, span: Range<usize>, field: &str) -> Result<String, FileError> {
        let token = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(self.error(span, field.to_owned(), format!("{name:?} is not an HTTP header name")));
        }
        Ok(name.to_ascii_lowercase())
    }

    fn regex(&self, value: &Spanned<String>, field: &str) -> Result<(), FileError> {
        compile_regex(value.get_ref()).map(|_| ()).map_err(|e| self.error(value.span(), field.to_owned(), e))
    }

    fn grpc_method(&self, value: &Spanned<String>, field: String) -> Result<GrpcMethod, FileError> {
        let text = value.get_ref();
        let (service, method) = match text.split_once('/') {
            Some((service, method)) => (service, Some(method)),
            None => (text.as_str(), None),
        };
        let part_ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        if !part_ok(service) || method.is_some_and(|m| !part_ok(m) || m.contains('.')) {
            let message = format!("{text:?} is not a gRPC method: write \"package.Service/Method\", or \"package.Service\" for all its methods");
            return Err(self.error(value.span(), field, message));
        }
        Ok(GrpcMethod { service: service.to_owned(), method: method.map(str::to_owned) })
    }

    fn backends(
        &self,
        field: &str,
        raw: &Spanned<BTreeMap<String, Spanned<toml::Value>>>,
    ) -> Result<Backends, FileError> {
        let map = raw.get_ref();
        if let Some(service) = map.get("service") {
            if map.len() > 1 {
                let message = "backends are versions by weight, or { service = \"other\" } alone";
                return Err(self.error(raw.span(), field.to_owned(), message));
            }
            let at = format!("{field}.service");
            let Some(name) = service.get_ref().as_str() else {
                return Err(self.error(service.span(), at, "a service is named by a string"));
            };
            crate::name::check_name("service", name).map_err(|e| self.error(service.span(), at, e))?;
            return Ok(Backends::Service(name.to_owned()));
        }
        if map.is_empty() {
            let message = "a route needs backends: versions by weight, such as { v1 = 90, v2 = 10 }";
            return Err(self.error(raw.span(), field.to_owned(), message));
        }
        let mut weights = BTreeMap::new();
        for (version, weight) in map {
            let at = format!("{field}.{version}");
            crate::name::check_name("version", version)
                .map_err(|e| self.error(weight.span(), at.clone(), e))?;
            let value = weight.get_ref().as_integer().filter(|w| (0..=100).contains(w));
            let Some(value) = value else {
                let message = "a weight is a whole number from 0 to 100";
                return Err(self.error(weight.span(), at, message));
            };
            weights.insert(version.clone(), value as u32);
        }
        let total: u32 = weights.values().sum();
        if total != 100 {
            let message = format!("the weights add up to {total}; they must add up to 100");
            return Err(self.error(raw.span(), field.to_owned(), message));
        }
        Ok(Backends::Versions(weights))
    }

    fn duration_ms(&self, value: &Spanned<HumanDuration>, field: &str) -> Result<u64, FileError> {
        let duration = value.get_ref().0;
        if duration.is_zero() || duration > MAX_ROUTE_DURATION {
            let message = format!(
                "must be longer than zero and at most {}",
                humantime::format_duration(MAX_ROUTE_DURATION)
            );
            return Err(self.error(value.span(), field.to_owned(), message));
        }
        if !duration.subsec_nanos().is_multiple_of(1_000_000) {
            let message = "give whole milliseconds";
            return Err(self.error(value.span(), field.to_owned(), message));
        }
        Ok(duration.as_millis() as u64)
    }

    fn percent(&self, value: &Spanned<f64>, field: String) -> Result<u32, FileError> {
        per_million(*value.get_ref()).map_err(|message| self.error(value.span(), field, message))
    }

    fn mirror(&self, field: &str, raw: Spanned<RawMirror>) -> Result<MirrorSpec, FileError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let target = match (raw.version, raw.service) {
            (Some(version), None) => {
                crate::name::check_name("version", &version)
                    .map_err(|e| self.error(span.clone(), format!("{field}.version"), e))?;
                MirrorTarget::Version(version)
            }
            (None, Some(service)) => {
                crate::name::check_name("service", &service)
                    .map_err(|e| self.error(span.clone(), format!("{field}.service"), e))?;
                MirrorTarget::Service(service)
            }
            _ => {
                let message = "a mirror names one target: version = \"v2\", or service = \"other\"";
                return Err(self.error(span, field.to_owned(), message));
            }
        };
        let per_million = self.percent(&raw.percent, format!("{field}.percent"))?;
        let max_in_flight = match raw.max_in_flight {
            Some(max) if (1..=MAX_MIRROR_IN_FLIGHT).contains(max.get_ref()) => *max.get_ref(),
            Some(max) => {
                let message = format!("must be from 1 to {MAX_MIRROR_IN_FLIGHT}");
                return Err(self.error(max.span(), format!("{field}.max_in_flight"), message));
            }
            None => DEFAULT_MIRROR_MAX_IN_FLIGHT,
        };
        Ok(MirrorSpec { target, per_million, max_in_flight })
    }

    fn fault(&self, field: &str, raw: Spanned<RawFault>) -> Result<FaultSpec, FileError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let delay = match raw.delay {
            Some(delay) => Some(DelayFault {
                duration_ms: self.duration_ms(&delay.duration, &format!("{field}.delay.duration"))?,
                per_million: self.percent(&delay.percent, format!("{field}.delay.percent"))?,
            }),
            None => None,
        };
        let abort = match raw.abort {
            Some(abort) => {
                let abort_span = abort.span();
                let abort = abort.into_inner();
                let status = match abort.status {
                    Some(status) if (400..=599).contains(status.get_ref()) => *status.get_ref(),
                    Some(status) => {
                        let message =
                            format!("an abort's status is from 400 to 599, got {}", status.get_ref());
                        return Err(self.error(status.span(), format!("{field}.abort.status"), message));
                    }
                    None if abort.grpc_status.is_some() => 503,
                    None => {
                        let message = "an abort needs status (HTTP), grpc_status, or both";
                        return Err(self.error(abort_span, format!("{field}.abort"), message));
                    }
                };
                let grpc_status = match abort.grpc_status {
                    Some(code) if (1..=16).contains(code.get_ref()) => Some(*code.get_ref()),
                    Some(code) => {
                        let message = format!("a gRPC error status is from 1 to 16, got {}", code.get_ref());
                        return Err(self.error(code.span(), format!("{field}.abort.grpc_status"), message));
                    }
                    None => None,
                };
                let per_million = self.percent(&abort.percent, format!("{field}.abort.percent"))?;
                Some(AbortFault { status, grpc_status, per_million })
            }
            None => None,
        };
        if delay.is_none() && abort.is_none() {
            return Err(self.error(span, field.to_owned(), "a fault needs a delay, an abort, or both"));
        }
        Ok(FaultSpec { delay, abort })
    }

    fn bucket(
        &self,
        field: &str,
        rate: &Spanned<u32>,
        burst: Option<&Spanned<u32>>,
    ) -> Result<Bucket, FileError> {
        let requests_per_second = *rate.get_ref();
        if !(1..=MAX_RATE).contains(&requests_per_second) {
            let message = format!("must be from 1 to {MAX_RATE}");
            return Err(self.error(rate.span(), format!("{field}requests_per_second"), message));
        }
        let mut bucket = Bucket::with_default_burst(requests_per_second);
        if let Some(burst) = burst {
            if !(1..=MAX_RATE).contains(burst.get_ref()) {
                let message = format!("must be from 1 to {MAX_RATE}");
                return Err(self.error(burst.span(), format!("{field}burst"), message));
            }
            bucket.burst = *burst.get_ref();
        }
        Ok(bucket)
    }

    fn rate_limit(&self, field: &str, raw: RawRateLimit) -> Result<RateLimitSpec, FileError> {
        let overall = match (&raw.requests_per_second, &raw.burst) {
            (Some(rate), burst) => Some(self.bucket(&format!("{field}."), rate, burst.as_ref())?),
            (None, Some(burst)) => {
                let message = "a burst goes with requests_per_second";
                return Err(self.error(burst.span(), format!("{field}.burst"), message));
            }
            (None, None) => None,
        };
        let per_caller = match &raw.per_caller {
            Some(bucket) => Some(self.bucket(
                &format!("{field}.per_caller."),
                &bucket.requests_per_second,
                bucket.burst.as_ref(),
            )?),
            None => None,
        };
        let mut overrides = BTreeMap::new();
        let mut seen = HashSet::new();
        for (index, entry) in raw.overrides.iter().enumerate() {
            let at = format!("{field}.overrides[{index}].");
            let caller = entry.caller.get_ref();
            if crate::spiffe::SpiffeId::parse(caller).is_none() {
                let message =
                    format!("caller {caller:?} is not a SPIFFE ID such as spiffe://mesh.local/service/batch");
                return Err(self.error(entry.caller.span(), format!("{at}caller"), message));
            }
            if !seen.insert(caller.clone()) {
                let message = format!("caller {caller:?} has another override");
                return Err(self.error(entry.caller.span(), format!("{at}caller"), message));
            }
            overrides
                .insert(caller.clone(), self.bucket(&at, &entry.requests_per_second, entry.burst.as_ref())?);
        }
        if overall.is_none() && per_caller.is_none() && overrides.is_empty() {
            let message = "a rate limit needs requests_per_second, per_caller or overrides";
            return Err(self.error(raw.service.span(), field.to_owned(), message));
        }
        Ok(RateLimitSpec { overall, per_caller, overrides })
    }
}

/// A percentage (above 0, at most 100, in steps of 0.0001) as parts per million.
pub fn per_million(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || percent <= 0.0 || percent > 100.0 {
        return Err(format!("a percentage is above 0 and at most 100, got {percent}"));
    }
    let scaled = percent * f64::from(PER_MILLION_PER_PERCENT);
    let whole = scaled.round();
    if (scaled - whole).abs() > 1e-6 * scaled.max(1.0) || whole < 1.0 {
        return Err(format!("{percent} % is finer than the 0.0001 % a percentage can be"));
    }
    Ok(whole as u32)
}

/// The regular expression a value must match whole, compiled with a size
/// limit; the error says what is wrong with it.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[routes]]
service = "echo"
name = "canary-by-header"
match = { headers = { "X-Canary" = "1" } }
backends = { v2 = 100 }

[[routes]]
service = "echo"
name = "api-writes"
match = { path_prefix = "/api", method = "POST" }
backends = { v1 = 90, v2 = 10 }
timeout = "1s"
retry = { attempts = 2, on = ["5xx"] }
mirror = { version = "v2", percent = 5, max_in_flight = 100 }
fault = { delay = { duration = "200ms", percent = 1.5 }, abort = { status = 503, percent = 0.01 } }

[[routes]]
service = "echo"
name = "greet"
match = { grpc_method = "mesh.echo.v1.Echo/Greet" }
backends = { service = "greeter" }

[[rate_limits]]
service = "echo"
requests_per_second = 1000
burst = 200
per_caller = { requests_per_second = 100, burst = 20 }
overrides = [ { caller = "spiffe://mesh.local/service/batch", requests_per_second = 10 } ]
"#;

    #[test]
    fn the_documented_example_parses_to_its_values() {
        let file = parse_traffic_policy(GOOD).unwrap();
        let routes = &file.routes["echo"];
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["canary-by-header", "api-writes", "greet"]);
        assert_eq!(routes[0].matches.headers["x-canary"], "1", "header names are lower-cased");
        let writes = &routes[1];
        assert_eq!(writes.matches.path, Some(PathMatch::Prefix("/api".into())));
        assert_eq!(writes.timeout_ms, Some(1000));
        assert_eq!(writes.retry, Some(RouteRetry { attempts: 2, on: vec![RetryOn::ServerError] }));
        let mirror = writes.mirror.as_ref().unwrap();
        assert_eq!((mirror.per_million, mirror.max_in_flight), (50_000, 100));
        let fault = writes.fault.as_ref().unwrap();
        assert_eq!(fault.delay, Some(DelayFault { duration_ms: 200, per_million: 15_000 }));
        assert_eq!(fault.abort, Some(AbortFault { status: 503, grpc_status: None, per_million: 100 }));
        assert_eq!(routes[2].backends, Backends::Service("greeter".into()));
        let grpc = routes[2].matches.grpc_method.as_ref().unwrap();
        assert_eq!((grpc.service.as_str(), grpc.method.as_deref()), ("mesh.echo.v1.Echo", Some("Greet")));
        let limit = &file.rate_limits["echo"];
        assert_eq!(limit.overall, Some(Bucket { requests_per_second: 1000, burst: 200 }));
        assert_eq!(limit.caller_bucket("spiffe://mesh.local/service/batch").unwrap().requests_per_second, 10);
        assert_eq!(limit.caller_bucket("spiffe://mesh.local/service/web").unwrap().requests_per_second, 100);
    }

    /// A route with `fields` set (TOML lines) after a valid head.
    fn route(fields: &str) -> String {
        format!("[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = {{ v1 = 100 }}\n{fields}\n")
    }

    #[test]
    fn each_wrong_field_is_named_with_its_line() {
        let routes_with = |fields: &str| route(fields);
        let limit = |fields: &str| format!("[[rate_limits]]\nservice = \"echo\"\n{fields}\n");
        // (file, field named, words the message has, line)
        let table: Vec<(String, &str, &str, usize)> = vec![
            (routes_with("match = { path = \"api\" }"), "routes[0].match.path", "starts with '/'", 5),
            (
                routes_with("match = { path_regex = \"(\" }"),
                "routes[0].match.path_regex",
                "regular expression",
                5,
            ),
            (
                routes_with("match = { path = \"/a\", path_prefix = \"/b\" }"),
                "routes[0].match.path_prefix",
                "one of path",
                5,
            ),
            (routes_with("match = { method = \"post\" }"), "routes[0].match.method", "upper case", 5),
            (
                routes_with("match = { headers = { \"bad header\" = \"1\" } }"),
                "routes[0].match.headers.bad header",
                "not an HTTP header name",
                5,
            ),
            (
                routes_with("match = { headers_regex = { \"x-a\" = \"[\" } }"),
                "routes[0].match.headers_regex.x-a",
                "regular expression",
                5,
            ),
            (
                routes_with("match = { grpc_method = \"no spaces/x\" }"),
                "routes[0].match.grpc_method",
                "not a gRPC method",
                5,
            ),
            (
                routes_with("match = { grpc_method = \"a.B/C\", method = \"POST\" }"),
                "routes[0].match.grpc_method",
                "leave out path and method",
                5,
            ),
            (
                routes_with("match = { colour = \"red\" }"),
                "routes[0].match.colour",
                "unknown field `colour`",
                5,
            ),
            (routes_with("timeout = \"0s\""), "routes[0].timeout", "longer than zero", 5),
            (routes_with("timeout = \"soon\""), "routes[0].timeout", "unparsable duration", 5),
            (routes_with("retry = { attempts = 0 }"), "routes[0].retry.attempts", "from 1 to 10", 5),
            (
                routes_with("retry = { attempts = 2, on = [\"sometimes\"] }"),
                "routes[0].retry.on[0]",
                "unknown variant",
                5,
            ),
            (routes_with("mirror = { percent = 5 }"), "routes[0].mirror", "one target", 5),
            (
                routes_with("mirror = { version = \"v2\", percent = 0 }"),
                "routes[0].mirror.percent",
                "above 0",
                5,
            ),
            (
                routes_with("mirror = { version = \"v2\", percent = 101 }"),
                "routes[0].mirror.percent",
                "at most 100",
                5,
            ),
            (
                routes_with("mirror = { version = \"v2\", percent = 0.00001 }"),
                "routes[0].mirror.percent",
                "finer than",
                5,
            ),
            (
                routes_with("mirror = { version = \"v2\", percent = 1, max_in_flight = 0 }"),
                "routes[0].mirror.max_in_flight",
                "from 1",
                5,
            ),
            (routes_with("fault = { }"), "routes[0].fault", "a delay, an abort", 5),
            (
                routes_with("fault = { abort = { status = 200, percent = 1 } }"),
                "routes[0].fault.abort.status",
                "from 400 to 599",
                5,
            ),
            (
                routes_with("fault = { abort = { grpc_status = 0, percent = 1 } }"),
                "routes[0].fault.abort.grpc_status",
                "from 1 to 16",
                5,
            ),
            (routes_with("fault = { abort = { percent = 1 } }"), "routes[0].fault.abort", "needs status", 5),
            (
                routes_with("fault = { delay = { duration = \"11m\", percent = 1 } }"),
                "routes[0].fault.delay.duration",
                "at most 10m",
                5,
            ),
            (
                "[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = { v1 = 90 }\n".into(),
                "routes[0].backends",
                "add up to 90",
                4,
            ),
            (
                "[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = { v1 = 100, service = \"x\" }\n"
                    .into(),
                "routes[0].backends",
                "alone",
                4,
            ),
            (
                "[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = { v1 = \"all\" }\n".into(),
                "routes[0].backends.v1",
                "whole number",
                4,
            ),
            (
                "[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = { }\n".into(),
                "routes[0].backends",
                "needs backends",
                4,
            ),
            (
                "[[routes]]\nservice = \"Echo\"\nname = \"r\"\nbackends = { v1 = 100 }\n".into(),
                "routes[0].service",
                "not a valid name",
                2,
            ),
            (
                "[[routes]]\nservice = \"echo\"\nbackends = { v1 = 100 }\n".into(),
                "routes[0]",
                "missing field `name`",
                1,
            ),
            (format!("{}{}", route(""), route("")), "routes[1].name", "duplicate route", 8),
            (limit("requests_per_second = 0"), "rate_limits[0].requests_per_second", "from 1", 3),
            (limit("burst = 5"), "rate_limits[0].burst", "goes with requests_per_second", 3),
            (limit(""), "rate_limits[0]", "needs requests_per_second", 2),
            (
                limit("per_caller = { requests_per_second = 10, burst = 0 }"),
                "rate_limits[0].per_caller.burst",
                "from 1",
                3,
            ),
            (
                limit("overrides = [ { caller = \"batch\", requests_per_second = 1 } ]"),
                "rate_limits[0].overrides[0].caller",
                "not a SPIFFE ID",
                3,
            ),
            (
                format!("{}{}", limit("requests_per_second = 1"), limit("requests_per_second = 2")),
                "rate_limits[1].service",
                "another [[rate_limits]]",
                5,
            ),
            ("[[routs]]\n".into(), "routs", "unknown field `routs`", 1),
            ("".into(), "(file)", "no [[routes]]", 0),
        ];
        for (text, field, words, line) in table {
            let error = parse_traffic_policy(&text).expect_err(&text);
            assert_eq!(error.field, field, "{text}\n{error}");
            assert!(error.message.contains(words), "{text}\n{error}");
            let want_line = if line == 0 { None } else { Some(line) };
            assert_eq!(error.line, want_line, "{text}\n{error}");
        }
    }

    #[test]
    fn percentages_keep_a_ten_thousandth_of_a_percent() {
        // (percent, parts per million or the error's words)
        let table: [(f64, Result<u32, &str>); 7] = [
            (0.01, Ok(100)),
            (0.0001, Ok(1)),
            (1.5, Ok(15_000)),
            (100.0, Ok(1_000_000)),
            (0.00005, Err("finer than")),
            (0.0, Err("above 0")),
            (f64::NAN, Err("above 0")),
        ];
        for (percent, expected) in table {
            match (per_million(percent), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{percent}"),
                (Err(got), Err(words)) => assert!(got.contains(words), "{percent}: {got}"),
                (got, want) => panic!("{percent}: got {got:?}, want {want:?}"),
            }
        }
    }
}
