//! The static TOML routing-table file: parsing and validation.
//!
//! Errors name the line and the field, because the user has to find the
//! mistake in a file that may hold many services.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;

use mesh_common::file_error::{parse_toml, FileError};
use mesh_common::policy::{check_budget_ratio, check_retry_attempts};
use mesh_common::traffic_policy::file::{check_traffic_policy, RawRateLimit, RawRoute};
use serde::Deserialize;
use toml::Spanned;

use super::{
    BreakerPolicy, EndpointConfig, HumanDuration, IdentityFiles, Listen, Protocol, ProxyConfig, RetryOn,
    RetryPolicy, ServiceConfig, UpstreamConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_VERSION,
};

/// A config file that cannot be used, with where and why.
pub type ConfigError = FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: RawListen,
    service: Option<String>,
    version: Option<String>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    identity: Option<RawIdentity>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    rate_limits: Vec<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    certificate: std::path::PathBuf,
    key: std::path::PathBuf,
    roots: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    outbound: Option<SocketAddr>,
    inbound: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    app: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    protocol: Option<Protocol>,
    timeout: Option<Spanned<HumanDuration>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    split: Option<BTreeMap<String, Spanned<Weight>>>,
    retry: Option<RawRetry>,
    breaker: Option<RawBreaker>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    hold_when_empty: Option<HumanDuration>,
    transport: Option<super::Transport>,
}

/// A split weight: a whole number, never negative.
#[derive(Clone, Copy)]
struct Weight(u32);

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        u32::try_from(value).ok().filter(|w| *w <= 1_000_000).map(Weight).ok_or_else(|| {
            serde::de::Error::custom(format!("a weight must be from 0 to 1000000, got {value}"))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<Spanned<u32>>,
    on: Option<Vec<RetryOn>>,
    non_idempotent: Option<bool>,
    budget_ratio: Option<Spanned<f64>>,
    budget_min_per_second: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<Spanned<u32>>,
    base_ejection: Option<HumanDuration>,
    max_ejection: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    addr: SocketAddr,
    version: Option<String>,
    ready: Option<bool>,
    /// A peer sidecar's inbound, reached over mTLS; needs `[identity]`.
    meshed: Option<Spanned<bool>>,
    /// The peer sidecar serves QUIC at the same port number; needs `meshed`.
    quic: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    service: Spanned<String>,
    listen: Spanned<SocketAddr>,
}

/// Parses and validates a config file's text. Nothing is applied here, so a
/// bad file changes nothing.
pub fn parse_config(text: &str) -> Result<ProxyConfig, ConfigError> {
    let raw: RawFile = parse_toml(text)?;
    Validator { text }.validate(raw)
}

struct Validator<'a> {
    text: &'a str,
}

impl Validator<'_> {
    fn error(&self, span: Range<usize>, field: String, message: impl Into<String>) -> ConfigError {
        FileError::at(self.text, Some(span), field, message)
    }

    fn validate(&self, raw: RawFile) -> Result<ProxyConfig, ConfigError> {
        let mut names = HashSet::new();
        let mut services = Vec::with_capacity(raw.services.len());
        for (index, service) in raw.services.into_iter().enumerate() {
            let field = format!("services[{index}]");
            if !names.insert(service.name.get_ref().clone()) {
                return Err(self.error(
                    service.name.span(),
                    format!("{field}.name"),
                    format!("duplicate service {:?}", service.name.get_ref()),
                ));
            }
            services.push(self.service(&field, service, raw.identity.is_some())?);
        }
        self.attach_traffic_policy(&mut services, raw.routes, raw.rate_limits)?;
        let mut upstream_addrs = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (index, upstream) in raw.upstreams.into_iter().enumerate() {
            let field = format!("upstreams[{index}]");
            if !names.contains(upstream.service.get_ref()) {
                return Err(self.error(
                    upstream.service.span(),
                    format!("{field}.service"),
                    format!(
                        "unknown service {:?}; declare it under [[services]]",
                        upstream.service.get_ref()
                    ),
                ));
            }
            // Port 0 asks the kernel for a free port each time: never a clash.
            let addr = *upstream.listen.get_ref();
            if addr.port() != 0 && !upstream_addrs.insert(addr) {
                return Err(self.error(
                    upstream.listen.span(),
                    format!("{field}.listen"),
                    format!("address {} is used by another upstream", upstream.listen.get_ref()),
                ));
            }
            upstreams.push(UpstreamConfig {
                service: upstream.service.into_inner(),
                listen: upstream.listen.into_inner(),
            });
        }
        Ok(ProxyConfig {
            listen: Listen {
                outbound: raw.listen.outbound,
                inbound: raw.listen.inbound,
                admin: raw.listen.admin,
                app: raw.listen.app,
            },
            local_service: raw.service.unwrap_or_else(|| "app".to_owned()),
            local_version: raw.version.unwrap_or_else(|| DEFAULT_VERSION.to_owned()),
            services,
            upstreams,
            identity: raw.identity.map(|i| IdentityFiles {
                certificate: i.certificate,
                key: i.key,
                roots: i.roots,
            }),
        })
    }

    /// Gives each declared service its routes and rate limit; a table for
    /// a service the file does not declare is an error.
    fn attach_traffic_policy(
        &self,
        services: &mut [ServiceConfig],
        routes: Vec<RawRoute>,
        rate_limits: Vec<RawRateLimit>,
    ) -> Result<(), ConfigError> {
        let policy = check_traffic_policy(self.text, routes, rate_limits)?;
        let undeclared = |table: &str, name: &str| {
            let message = format!("service {name:?} is not declared under [[services]]");
            FileError::at(self.text, None, table, message)
        };
        for (name, routes) in policy.routes {
            let service =
                services.iter_mut().find(|s| s.name == name).ok_or_else(|| undeclared("routes", &name))?;
            service.routes = routes;
        }
        for (name, limit) in policy.rate_limits {
            let service = services
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| undeclared("rate_limits", &name))?;
            service.rate_limit = Some(limit);
        }
        Ok(())
    }

    fn service(
        &self,
        field: &str,
        raw: RawService,
        has_identity: bool,
    ) -> Result<ServiceConfig, ConfigError> {
        if raw.name.get_ref().is_empty() {
            return Err(self.error(raw.name.span(), format!("{field}.name"), "a service needs a name"));
        }
        let mut endpoints = Vec::with_capacity(raw.endpoints.len());
        for (index, e) in raw.endpoints.into_iter().enumerate() {
            let meshed =
                match e.meshed {
                    Some(meshed) if *meshed.get_ref() && !has_identity => return Err(self.error(
                        meshed.span(),
                        format!("{field}.endpoints[{index}].meshed"),
                        "mTLS to a peer sidecar needs this proxy's certificate: add an [identity] section",
                    )),
                    Some(meshed) => meshed.into_inner(),
                    None => false,
                };
            let quic = match e.quic {
                Some(quic) if *quic.get_ref() && !meshed => {
                    return Err(self.error(
                        quic.span(),
                        format!("{field}.endpoints[{index}].quic"),
                        "QUIC runs between sidecars: the endpoint needs meshed = true",
                    ))
                }
                Some(quic) => quic.into_inner(),
                None => false,
            };
            endpoints.push(EndpointConfig {
                addr: e.addr,
                version: e.version.unwrap_or_else(|| DEFAULT_VERSION.to_owned()),
                ready: e.ready.unwrap_or(true),
                meshed,
                quic,
            });
        }
        let versions: HashSet<&str> = endpoints.iter().map(|e| e.version.as_str()).collect();
        let mut split = BTreeMap::new();
        if let Some(raw_split) = raw.split {
            let mut total = 0u64;
            let mut first_span = None;
            for (version, weight) in raw_split {
                let span = weight.span();
                first_span.get_or_insert(span.clone());
                if !versions.contains(version.as_str()) {
                    return Err(self.error(
                        span,
                        format!("{field}.split.{version}"),
                        format!(
                            "weight on unknown version {version:?}; this service's endpoints have versions {:?}",
                            sorted(&versions)
                        ),
                    ));
                }
                total += u64::from(weight.get_ref().0);
                split.insert(version, weight.into_inner().0);
            }
            if total == 0 {
                let span = first_span.unwrap_or(raw.name.span());
                return Err(self.error(
                    span,
                    format!("{field}.split"),
                    "the weights add up to 0; no traffic could flow",
                ));
            }
        }
        let retry = self.retry(field, raw.retry)?;
        let breaker = self.breaker(field, raw.breaker)?;
        let timeout = self.positive(field, "timeout", raw.timeout, DEFAULT_TIMEOUT)?;
        let connect_timeout =
            self.positive(field, "connect_timeout", raw.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?;
        Ok(ServiceConfig {
            name: raw.name.into_inner(),
            protocol: raw.protocol.unwrap_or(Protocol::Http),
            timeout,
            connect_timeout,
            split,
            retry,
            breaker,
            endpoints,
            // A static table sets no policy for peers: with an [identity],
            // the inbound takes mTLS from any holder of a trusted certificate.
            permissive: !has_identity,
            allow_from: Vec::new(),
            hold_when_empty: raw.hold_when_empty.map_or(std::time::Duration::ZERO, |d| d.0),
            transport: raw.transport.unwrap_or_default(),
            routes: Vec::new(),
            rate_limit: None,
        })
    }

    fn positive(
        &self,
        field: &str,
        name: &str,
        value: Option<Spanned<HumanDuration>>,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v.get_ref().0.is_zero() => {
                Err(self.error(v.span(), format!("{field}.{name}"), "must be longer than zero"))
            }
            Some(v) => Ok(v.into_inner().0),
        }
    }

    fn retry(&self, field: &str, raw: Option<RawRetry>) -> Result<RetryPolicy, ConfigError> {
        let mut policy = RetryPolicy::default();
        let Some(raw) = raw else { return Ok(policy) };
        if let Some(attempts) = raw.attempts {
            if let Err(message) = check_retry_attempts(*attempts.get_ref()) {
                return Err(self.error(attempts.span(), format!("{field}.retry.attempts"), message));
            }
            policy.attempts = attempts.into_inner();
        }
        if let Some(on) = raw.on {
            policy.on = on;
        }
        if let Some(non_idempotent) = raw.non_idempotent {
            policy.non_idempotent = non_idempotent;
        }
        if let Some(ratio) = raw.budget_ratio {
            if let Err(message) = check_budget_ratio(*ratio.get_ref()) {
                return Err(self.error(ratio.span(), format!("{field}.retry.budget_ratio"), message));
            }
            policy.budget_ratio = ratio.into_inner();
        }
        if let Some(min) = raw.budget_min_per_second {
            policy.budget_min_per_second = min;
        }
        Ok(policy)
    }

    fn breaker(&self, field: &str, raw: Option<RawBreaker>) -> Result<BreakerPolicy, ConfigError> {
        let mut policy = BreakerPolicy::default();
        let Some(raw) = raw else { return Ok(policy) };
        if let Some(failures) = raw.consecutive_failures {
            if *failures.get_ref() == 0 || *failures.get_ref() > 60_000 {
                return Err(self.error(
                    failures.span(),
                    format!("{field}.breaker.consecutive_failures"),
                    "must be from 1 to 60000",
                ));
            }
            policy.consecutive_failures = failures.into_inner();
        }
        if let Some(base) = raw.base_ejection {
            policy.base_ejection = base.0;
        }
        if let Some(max) = raw.max_ejection {
            if max.get_ref().0 < policy.base_ejection {
                return Err(self.error(
                    max.span(),
                    format!("{field}.breaker.max_ejection"),
                    "must not be shorter than base_ejection",
                ));
            }
            policy.max_ejection = max.into_inner().0;
        }
        Ok(policy)
    }
}

fn sorted<'a>(set: &HashSet<&'a str>) -> Vec<&'a str> {
    let mut list: Vec<&str> = set.iter().copied().collect();
    list.sort_unstable();
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listen]
outbound = "127.0.0.1:4140"
admin = "127.0.0.1:4191"

[[services]]
name = "echo"
protocol = "http"
timeout = "2s"
split = { v1 = 90, v2 = 10 }
retry = { attempts = 3, on = ["connect-failure", "5xx"], budget_ratio = 0.2, budget_min_per_second = 10 }
breaker = { consecutive_failures = 7, base_ejection = "1s", max_ejection = "60s" }
endpoints = [
  { addr = "127.0.0.1:9001", version = "v1" },
  { addr = "127.0.0.1:9002", version = "v2", ready = false },
]

[[upstreams]]
service = "echo"
listen = "127.0.0.1:9191"
"#;

    #[test]
    fn the_documented_example_parses() {
        let config = parse_config(GOOD).unwrap();
        let echo = &config.services[0];
        assert_eq!(echo.split.get("v1"), Some(&90));
        assert_eq!(echo.retry.on, vec![RetryOn::ConnectFailure, RetryOn::ServerError]);
        assert_eq!(echo.timeout, std::time::Duration::from_secs(2));
        assert!(!echo.endpoints[1].ready);
        assert_eq!(config.upstreams[0].service, "echo");
    }

    /// Each bad file must fail with the field and line that a user would
    /// have to fix.
    #[test]
    fn bad_files_name_line_and_field() {
        let cases: &[(&str, &str, &str, usize, &str)] = &[
            ("syntax error", "name = \"echo\"", "name = \"echo", 7, "(file)"),
            ("unknown field", "protocol = \"http\"", "protocol = \"http\"\ncolour = \"red\"", 9, "colour"),
            ("negative weight", "v2 = 10 }", "v2 = -10 }", 10, "services[0].split.v2"),
            ("unknown version", "v2 = 10 }", "v3 = 10 }", 10, "services[0].split.v3"),
            ("zero weights", "{ v1 = 90, v2 = 10 }", "{ v1 = 0, v2 = 0 }", 10, "services[0].split"),
            ("bad duration", "timeout = \"2s\"", "timeout = \"2 parsecs\"", 9, "services[0].timeout"),
            (
                "unknown upstream",
                "service = \"echo\"\nlisten",
                "service = \"ghost\"\nlisten",
                19,
                "upstreams[0].service",
            ),
            ("unknown retry condition", "\"5xx\"]", "\"6xx\"]", 11, "services[0].retry.on"),
            (
                "mTLS without a certificate",
                "version = \"v2\", ready = false }",
                "version = \"v2\", ready = false, meshed = true }",
                15,
                "services[0].endpoints[1].meshed",
            ),
            (
                "QUIC to an endpoint that is no sidecar",
                "version = \"v2\", ready = false }",
                "version = \"v2\", ready = false, quic = true }",
                15,
                "services[0].endpoints[1].quic",
            ),
        ];
        for (what, from, to, line, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{what}: the case must change the file");
            let err = parse_config(&text).expect_err(what);
            assert!(err.field.contains(field), "{what}: field {:?} should name {field:?} ({err})", err.field);
            assert_eq!(err.line, Some(*line), "{what}: {err}");
        }
    }

    #[test]
    fn an_identity_section_makes_meshed_endpoints_and_a_strict_inbound() {
        let text = GOOD.replacen(
            "version = \"v2\", ready = false }",
            "version = \"v2\", ready = false, meshed = true }",
            1,
        ) + "\n[identity]\ncertificate = \"/c.pem\"\nkey = \"/k.pem\"\nroots = \"/r.pem\"\n";
        let config = parse_config(&text).unwrap();
        let identity = config.identity.expect("the identity files");
        assert_eq!(identity.key, std::path::PathBuf::from("/k.pem"));
        assert!(config.services[0].endpoints[1].meshed && !config.services[0].endpoints[0].meshed);
        assert!(!config.services[0].permissive, "with an identity, plaintext is refused");
    }

    #[test]
    fn duplicate_service_is_rejected_at_its_second_name() {
        let text = GOOD.replacen(
            "[[upstreams]]",
            "[[services]]\nname = \"echo\"\nendpoints = []\n\n[[upstreams]]",
            1,
        );
        let err = parse_config(&text).unwrap_err();
        assert_eq!(err.field, "services[1].name");
        assert_eq!(err.line, Some(19));
        assert!(err.message.contains("duplicate"), "{err}");
    }

    #[test]
    fn routes_and_rate_limits_attach_to_declared_services_only() {
        let head = "service = \"echo\"\n[listen]\n[[services]]\nname = \"echo\"\nendpoints = [ { addr = \"127.0.0.1:1\", version = \"v1\" } ]\n";
        let route = "[[routes]]\nservice = \"echo\"\nname = \"r\"\nbackends = { v1 = 100 }\n";
        let limit = "[[rate_limits]]\nservice = \"echo\"\nrequests_per_second = 5\n";
        let config = parse_config(&format!("{head}{route}{limit}")).unwrap();
        assert_eq!(config.services[0].routes.len(), 1);
        assert_eq!(config.services[0].rate_limit.as_ref().unwrap().overall.unwrap().requests_per_second, 5);
        // (extra tables, field named, words)
        let table = [
            (route.replace("\"echo\"", "\"api\""), "routes", "\"api\" is not declared"),
            (limit.replace("\"echo\"", "\"api\""), "rate_limits", "\"api\" is not declared"),
            (route.replace("v1 = 100", "v1 = 50"), "routes[0].backends", "add up to 50"),
        ];
        for (extra, field, words) in table {
            let error = parse_config(&format!("{head}{extra}")).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.message.contains(words), "{error}");
        }
    }
}
