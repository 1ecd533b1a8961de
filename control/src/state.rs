//! The mesh's routing state and the changes that can be made to it, as
//! pure data and pure functions: a change is validated and applied here,
//! with no I/O, so every rule is pinned by a table test. The server
//! persists a change and publishes the new state only after `apply`
//! accepted it, so a bad request changes nothing.

use mesh_common::policy::{check_budget_ratio, check_retry_attempts, Protocol, RetryOn, Transport};
use mesh_common::traffic_policy::{RateLimitSpec, RouteSpec, TrafficPolicyFile};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A service's policy as the admin API sets it; `None` keeps the proxy's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub protocol: Option<Protocol>,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub retry_attempts: Option<u32>,
    pub retry_on: Option<Vec<RetryOn>>,
    pub retry_non_idempotent: Option<bool>,
    pub retry_budget_ratio: Option<f64>,
    pub retry_budget_min_per_second: Option<u32>,
    pub breaker_consecutive_failures: Option<u32>,
    pub breaker_base_ejection_ms: Option<u64>,
    pub breaker_max_ejection_ms: Option<u64>,
    #[serde(default)]
    pub permissive: Option<bool>,
    /// Callers allowed by service name; empty: every mesh identity.
    #[serde(default)]
    pub allow_from: Option<Vec<String>>,
    /// With no ready endpoint, callers hold a request this long for one.
    #[serde(default)]
    pub hold_when_empty_ms: Option<u64>,
    /// How callers' sidecars reach this service's sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// Settings for every service that does not set its own: the same on
/// every server (`meshd server --default-transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshDefaults {
    /// How sidecars reach a service's peers when its policy does not say.
    pub transport: Transport,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub version: String,
    pub ready: bool,
    /// Served by a mesh sidecar (the scheduler's instances): mTLS.
    #[serde(default)]
    pub meshed: bool,
    /// Its sidecar serves QUIC at the address's port number (UDP).
    #[serde(default)]
    pub quic: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub policy: Policy,
    pub split: BTreeMap<String, u32>,
    /// Endpoint address to its record.
    pub endpoints: BTreeMap<SocketAddr, EndpointRecord>,
    /// Tried in order before the service's defaults (`meshctl apply -f`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Enforced at the service's own inbound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// The state version in which this service last changed; proxies are
    /// sent a service again only when its stamp moves.
    pub stamp: u64,
}

impl ServiceState {
    fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
            && self.split.is_empty()
            && self.policy == Policy::default()
            && self.routes.is_empty()
            && self.rate_limit.is_none()
    }

    pub fn versions(&self) -> Vec<&str> {
        let mut versions: Vec<&str> = self.endpoints.values().map(|e| e.version.as_str()).collect();
        versions.sort_unstable();
        versions.dedup();
        versions
    }
}

/// Everything proxies route on, with a version that grows with every change.
/// Services sit behind `Arc`s so that a change copies only the service it
/// touches, not the whole table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshState {
    pub version: u64,
    pub services: BTreeMap<String, Arc<ServiceState>>,
}

/// A change requested through the registry or admin API.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Register {
        service: String,
        version: String,
        addr: String,
        ready: bool,
        meshed: bool,
        /// Its sidecar serves QUIC too.
        quic: bool,
        /// Allows a plaintext endpoint beside meshed ones (an admin's choice).
        plaintext_ok: bool,
    },
    Deregister {
        service: String,
        addr: String,
    },
    SetSplit {
        service: String,
        weights: BTreeMap<String, u32>,
    },
    ClearSplit {
        service: String,
    },
    SetPolicy {
        service: String,
        policy: Policy,
    },
    /// A checked routes file: each service it names under `[[routes]]`
    /// gets the file's routes, each under `[[rate_limits]]` its limit; all
    /// at once, or none.
    SetTrafficPolicy(TrafficPolicyFile),
    DeleteRoute {
        service: String,
        name: String,
    },
    DeleteRateLimit {
        service: String,
    },
}

/// Why a change was refused. The message names the field or value at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeError(pub String);

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChangeError {}

fn refuse<T>(message: impl Into<String>) -> Result<T, ChangeError> {
    Err(ChangeError(message.into()))
}

/// Service and version names: what a DNS label allows, so they can appear
/// in hostnames (`web.mesh`) and metric labels.
pub fn check_name(what: &str, name: &str) -> Result<(), ChangeError> {
    mesh_common::name::check_name(what, name).map_err(ChangeError)
}

/// The longest a caller's sidecar may hold a request for an instance.
pub const MAX_HOLD_WHEN_EMPTY_MS: u64 = 600_000;

fn check_policy(policy: &Policy) -> Result<(), ChangeError> {
    for (field, value) in [("timeout", policy.timeout_ms), ("connect-timeout", policy.connect_timeout_ms)] {
        if value == Some(0) {
            return refuse(format!("{field} must be longer than zero"));
        }
    }
    if let Some(attempts) = policy.retry_attempts {
        check_retry_attempts(attempts).map_err(|e| ChangeError(format!("retry-attempts {e}")))?;
    }
    for caller in policy.allow_from.iter().flatten() {
        check_name("allow-from service", caller)?;
    }
    if let Some(ratio) = policy.retry_budget_ratio {
        check_budget_ratio(ratio).map_err(|e| ChangeError(format!("retry-budget-ratio {e}")))?;
    }
    if policy.hold_when_empty_ms.is_some_and(|ms| ms > MAX_HOLD_WHEN_EMPTY_MS) {
        return refuse(
            "hold-when-empty must be at most 10m: a caller should not wait longer for an instance",
        );
    }
    if policy.breaker_consecutive_failures == Some(0) {
        return refuse("breaker-failures must be at least 1");
    }
    if let (Some(base), Some(max)) = (policy.breaker_base_ejection_ms, policy.breaker_max_ejection_ms) {
        if max < base {
            return refuse("breaker-max-ejection must not be shorter than breaker-base-ejection");
        }
    }
    Ok(())
}

/// Merges a policy update into the current one: fields the update sets win.
fn merged(current: &Policy, update: &Policy) -> Policy {
    Policy {
        protocol: update.protocol.or(current.protocol),
        timeout_ms: update.timeout_ms.or(current.timeout_ms),
        connect_timeout_ms: update.connect_timeout_ms.or(current.connect_timeout_ms),
        retry_attempts: update.retry_attempts.or(current.retry_attempts),
        retry_on: update.retry_on.clone().or_else(|| current.retry_on.clone()),
        retry_non_idempotent: update.retry_non_idempotent.or(current.retry_non_idempotent),
        retry_budget_ratio: update.retry_budget_ratio.or(current.retry_budget_ratio),
        retry_budget_min_per_second: update
            .retry_budget_min_per_second
            .or(current.retry_budget_min_per_second),
        breaker_consecutive_failures: update
            .breaker_consecutive_failures
            .or(current.breaker_consecutive_failures),
        breaker_base_ejection_ms: update.breaker_base_ejection_ms.or(current.breaker_base_ejection_ms),
        breaker_max_ejection_ms: update.breaker_max_ejection_ms.or(current.breaker_max_ejection_ms),
        permissive: update.permissive.or(current.permissive),
        allow_from: update.allow_from.clone().or_else(|| current.allow_from.clone()),
        hold_when_empty_ms: update.hold_when_empty_ms.or(current.hold_when_empty_ms),
        transport: update.transport.or(current.transport),
    }
}

impl MeshState {
    /// Validates `change` and returns the state with it applied, one
    /// version later, or the reason it was refused. `self` is untouched.
    pub fn apply(&self, change: &Change) -> Result<MeshState, ChangeError> {
        let mut next = self.clone();
        let version = self.version + 1;
        if let Change::SetTrafficPolicy(file) = change {
            let touched = set_traffic_policy(&mut next, file)?;
            next.version = version;
            for name in touched {
                if let Some(entry) = next.services.get_mut(&name).map(Arc::make_mut) {
                    entry.stamp = version;
                }
            }
            return Ok(next);
        }
        let name = match change {
            Change::Register {
                service,
                version: endpoint_version,
                addr,
                ready,
                meshed,
                quic,
                plaintext_ok,
            } => {
                check_name("service", service)?;
                check_name("version", endpoint_version)?;
                let Ok(addr) = addr.parse::<SocketAddr>() else {
                    return refuse(format!("address {addr:?} is not an IP:port such as 127.0.0.1:8080"));
                };
                if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                    return refuse(format!(
                        "address {addr} cannot be called: an endpoint needs a unicast IP and the port it listens on"
                    ));
                }
                let record = EndpointRecord {
                    version: endpoint_version.clone(),
                    ready: *ready,
                    meshed: *meshed,
                    quic: *quic && *meshed,
                };
                let entry = Arc::make_mut(next.services.entry(service.clone()).or_default());
                let downgrade = !*meshed && entry.endpoints.values().any(|e| e.meshed);
                if downgrade && !*plaintext_ok {
                    return refuse(format!(
                        "service {service:?} is served by mesh sidecars over mTLS; a plaintext endpoint would downgrade its callers (an admin may allow it with --plaintext-ok)"
                    ));
                }
                if let Some(existing) = entry.endpoints.get(&addr) {
                    if *existing == record {
                        // Registering what is already there changes nothing.
                        return Ok(self.clone());
                    }
                    if existing.version != record.version && split_needs(entry, &existing.version, addr) {
                        return refuse(format!(
                            "endpoint {addr} is the last of version {:?}, which the split of {service:?} uses; change the split first",
                            existing.version
                        ));
                    }
                }
                entry.endpoints.insert(addr, record);
                service
            }
            Change::Deregister { service, addr } => {
                let Some(entry) = next.services.get_mut(service).map(Arc::make_mut) else {
                    return refuse(format!("unknown service {service:?}"));
                };
                let Ok(addr) = addr.parse::<SocketAddr>() else {
                    return refuse(format!("address {addr:?} is not an IP:port such as 127.0.0.1:8080"));
                };
                if entry.endpoints.remove(&addr).is_none() {
                    return refuse(format!("service {service:?} has no endpoint {addr}"));
                }
                service
            }
            Change::SetSplit { service, weights } => {
                let Some(entry) = next.services.get_mut(service).map(Arc::make_mut) else {
                    return refuse(format!("unknown service {service:?}"));
                };
                let versions = entry.versions();
                if weights.is_empty() {
                    return refuse("a split needs at least one VERSION=WEIGHT");
                }
                for version in weights.keys() {
                    if !versions.contains(&version.as_str()) {
                        return refuse(format!(
                            "unknown version {version:?} of service {service:?}; its endpoints have versions {versions:?}"
                        ));
                    }
                }
                let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
                if total != 100 {
                    return refuse(format!("the weights add up to {total}; they must add up to 100"));
                }
                entry.split = weights.clone();
                service
            }
            Change::ClearSplit { service } => {
                let Some(entry) = next.services.get_mut(service).map(Arc::make_mut) else {
                    return refuse(format!("unknown service {service:?}"));
                };
                if entry.split.is_empty() {
                    return Ok(self.clone());
                }
                entry.split.clear();
                service
            }
            Change::SetTrafficPolicy(_) => unreachable!("applied above"),
            Change::DeleteRoute { service, name } => {
                let Some(entry) = next.services.get_mut(service).map(Arc::make_mut) else {
                    return refuse(format!("unknown service {service:?}"));
                };
                let before = entry.routes.len();
                entry.routes.retain(|r| &r.name != name);
                if entry.routes.len() == before {
                    let names: Vec<&str> = entry.routes.iter().map(|r| r.name.as_str()).collect();
                    return refuse(format!(
                        "service {service:?} has no route {name:?} (its routes: {names:?})"
                    ));
                }
                service
            }
            Change::DeleteRateLimit { service } => {
                let Some(entry) = next.services.get_mut(service).map(Arc::make_mut) else {
                    return refuse(format!("unknown service {service:?}"));
                };
                if entry.rate_limit.take().is_none() {
                    return refuse(format!("service {service:?} has no rate limit"));
                }
                service
            }
            Change::SetPolicy { service, policy } => {
                check_name("service", service)?;
                check_policy(policy)?;
                let entry = Arc::make_mut(next.services.entry(service.clone()).or_default());
                let policy = merged(&entry.policy, policy);
                check_policy(&policy)?;
                entry.policy = policy;
                service
            }
        };
        next.version = version;
        if let Some(entry) = next.services.get_mut(name).map(Arc::make_mut) {
            entry.stamp = version;
            if entry.is_empty() {
                next.services.remove(name);
            }
        }
        Ok(next)
    }
}

/// Applies a routes file to `state`: every service, version and other
/// service it names must exist. Returns the services it touched.
fn set_traffic_policy(state: &mut MeshState, file: &TrafficPolicyFile) -> Result<Vec<String>, ChangeError> {
    let names = file.routes.keys().chain(file.rate_limits.keys());
    for name in names.clone() {
        if !state.services.contains_key(name) {
            return refuse(format!("unknown service {name:?}: no job or endpoint has it"));
        }
    }
    for (name, routes) in &file.routes {
        let versions = state.services[name].versions();
        for route in routes {
            for version in route.own_versions() {
                if !versions.contains(&version) {
                    return refuse(format!(
                        "route {:?} of {name:?} names version {version:?}; the service's endpoints have versions {versions:?}",
                        route.name
                    ));
                }
            }
            for other in route.other_services() {
                if !state.services.contains_key(other) {
                    return refuse(format!(
                        "route {:?} of {name:?} names unknown service {other:?}",
                        route.name
                    ));
                }
            }
        }
    }
    for (name, routes) in &file.routes {
        Arc::make_mut(state.services.get_mut(name).expect("checked above")).routes = routes.clone();
    }
    for (name, limit) in &file.rate_limits {
        Arc::make_mut(state.services.get_mut(name).expect("checked above")).rate_limit = Some(limit.clone());
    }
    let mut touched: Vec<String> = names.cloned().collect();
    touched.sort();
    touched.dedup();
    Ok(touched)
}

/// Whether moving the endpoint at `addr` out of `version` would leave a
/// split weight on a version with no endpoints at all.
fn split_needs(service: &ServiceState, version: &str, addr: SocketAddr) -> bool {
    service.split.get(version).is_some_and(|w| *w > 0)
        && !service.endpoints.iter().any(|(a, e)| *a != addr && e.version == version)
}

impl Change {
    /// The services a change is about.
    pub fn services(&self) -> Vec<&str> {
        match self {
            Change::Register { service, .. }
            | Change::Deregister { service, .. }
            | Change::SetSplit { service, .. }
            | Change::ClearSplit { service }
            | Change::SetPolicy { service, .. }
            | Change::DeleteRoute { service, .. }
            | Change::DeleteRateLimit { service } => vec![service],
            Change::SetTrafficPolicy(file) => {
                let mut names: Vec<&str> =
                    file.routes.keys().chain(file.rate_limits.keys()).map(String::as_str).collect();
                names.sort_unstable();
                names.dedup();
                names
            }
        }
    }
}

#[cfg(test)]
impl Change {
    /// A ready, plaintext endpoint: what most tests register.
    pub fn ready_endpoint(service: &str, version: &str, addr: &str) -> Change {
        Change::Register {
            service: service.into(),
            version: version.into(),
            addr: addr.into(),
            ready: true,
            meshed: false,
            quic: false,
            plaintext_ok: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(service: &str, version: &str, addr: &str) -> Change {
        Change::ready_endpoint(service, version, addr)
    }

    fn split(service: &str, weights: &[(&str, u32)]) -> Change {
        Change::SetSplit {
            service: service.into(),
            weights: weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
        }
    }

    fn base() -> MeshState {
        let mut state = MeshState::default();
        for change in [register("web", "v1", "127.0.0.1:1"), register("web", "v2", "127.0.0.1:2")] {
            state = state.apply(&change).unwrap();
        }
        state
    }

    #[test]
    fn valid_changes_bump_the_version_and_stamp_the_service() {
        let state = base();
        assert_eq!(state.version, 2);
        let next = state.apply(&split("web", &[("v1", 90), ("v2", 10)])).unwrap();
        assert_eq!(next.version, 3);
        assert_eq!(next.services["web"].stamp, 3);
        assert_eq!(next.services["web"].split["v2"], 10);
        // Registering the same endpoint again is not a change.
        assert_eq!(next.apply(&register("web", "v1", "127.0.0.1:1")).unwrap().version, 3);
    }

    #[test]
    fn bad_changes_are_refused_with_the_reason() {
        let state = base();
        // (change, words the error must contain)
        let table: Vec<(Change, &str)> = vec![
            (split("web", &[("v1", 90), ("v3", 10)]), "unknown version \"v3\""),
            (split("web", &[("v1", 90), ("v2", 20)]), "add up to 110"),
            (split("web", &[("v1", 0), ("v2", 0)]), "add up to 0"),
            (split("web", &[]), "at least one"),
            (split("api", &[("v1", 100)]), "unknown service \"api\""),
            (register("Web!", "v1", "127.0.0.1:3"), "not a valid name"),
            (register("web", "v1", "localhost"), "not an IP:port"),
            (register("web", "v1", "127.0.0.1:0"), "cannot be called"),
            (register("web", "v1", "0.0.0.0:8080"), "cannot be called"),
            (register("web", "v1", "[::]:8080"), "cannot be called"),
            (Change::Deregister { service: "web".into(), addr: "127.0.0.1:9".into() }, "no endpoint"),
            (Change::ClearSplit { service: "api".into() }, "unknown service"),
            (
                Change::SetPolicy {
                    service: "web".into(),
                    policy: Policy { retry_attempts: Some(0), ..Policy::default() },
                },
                "retry-attempts",
            ),
            (
                Change::SetPolicy {
                    service: "web".into(),
                    policy: Policy { retry_budget_ratio: Some(1.5), ..Policy::default() },
                },
                "retry-budget-ratio",
            ),
        ];
        for (change, words) in table {
            let error = state.apply(&change).expect_err(&format!("{change:?} must be refused"));
            assert!(error.0.contains(words), "{change:?}: {error}");
        }
    }

    #[test]
    fn a_split_version_cannot_lose_its_last_endpoint_by_re_registration() {
        let state = base().apply(&split("web", &[("v1", 50), ("v2", 50)])).unwrap();
        let error = state.apply(&register("web", "v1", "127.0.0.1:2")).unwrap_err();
        assert!(error.0.contains("change the split first"), "{error}");
    }

    #[test]
    fn a_plaintext_endpoint_joins_meshed_ones_only_when_allowed() {
        let meshed = |addr: &str| Change::Register {
            service: "pay".into(),
            version: "v1".into(),
            addr: addr.into(),
            ready: true,
            meshed: true,
            quic: false,
            plaintext_ok: false,
        };
        let plain = |addr: &str, plaintext_ok: bool| Change::Register {
            service: "pay".into(),
            version: "v1".into(),
            addr: addr.into(),
            ready: true,
            meshed: false,
            quic: false,
            plaintext_ok,
        };
        let state = MeshState::default().apply(&meshed("127.0.0.1:1")).unwrap();
        // (change, accepted?)
        let cases = [
            (plain("127.0.0.1:9", false), false),
            (plain("127.0.0.1:9", true), true),
            // A meshed endpoint turned plaintext is a downgrade too.
            (plain("127.0.0.1:1", false), false),
            (meshed("127.0.0.1:2"), true),
        ];
        for (change, accepted) in cases {
            let result = state.apply(&change);
            assert_eq!(result.is_ok(), accepted, "{change:?}: {result:?}");
            if let Err(error) = result {
                assert!(error.0.contains("would downgrade its callers"), "{error}");
            }
        }
    }

    #[test]
    fn policies_merge_and_empty_services_disappear() {
        let state = base();
        let timeout = Policy { timeout_ms: Some(2000), ..Policy::default() };
        let retries = Policy { retry_attempts: Some(3), ..Policy::default() };
        let state = state.apply(&Change::SetPolicy { service: "web".into(), policy: timeout }).unwrap();
        let state = state.apply(&Change::SetPolicy { service: "web".into(), policy: retries }).unwrap();
        assert_eq!(state.services["web"].policy.timeout_ms, Some(2000));
        assert_eq!(state.services["web"].policy.retry_attempts, Some(3));

        let mut gone = base();
        for addr in ["127.0.0.1:1", "127.0.0.1:2"] {
            gone = gone.apply(&Change::Deregister { service: "web".into(), addr: addr.into() }).unwrap();
        }
        assert!(gone.services.is_empty());
    }
}

#[cfg(test)]
mod traffic_policy_tests {
    use super::*;
    use mesh_common::traffic_policy::file::parse_traffic_policy;

    fn state() -> MeshState {
        let mut state = MeshState::default();
        for (service, version, addr) in
            [("web", "v1", "127.0.0.1:1"), ("web", "v2", "127.0.0.1:2"), ("api", "v1", "127.0.0.1:3")]
        {
            state = state.apply(&Change::ready_endpoint(service, version, addr)).unwrap();
        }
        state
    }

    fn file(text: &str) -> Change {
        Change::SetTrafficPolicy(parse_traffic_policy(text).unwrap())
    }

    fn route(service: &str, name: &str, backends: &str) -> String {
        format!("[[routes]]\nservice = \"{service}\"\nname = \"{name}\"\nbackends = {backends}\n")
    }

    #[test]
    fn a_routes_file_applies_whole_to_every_service_it_names_or_not_at_all() {
        let limit = "[[rate_limits]]\nservice = \"api\"\nrequests_per_second = 10\n";
        let good = format!(
            "{}{}{limit}",
            route("web", "a", "{ v2 = 100 }"),
            route("web", "b", "{ service = \"api\" }")
        );
        let next = state().apply(&file(&good)).unwrap();
        assert_eq!(next.version, 4);
        let names: Vec<&str> = next.services["web"].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            (next.services["web"].stamp, next.services["api"].stamp),
            (4, 4),
            "both services are sent again"
        );
        assert!(next.services["api"].rate_limit.is_some());
        // A file of routes alone replaces the routes and keeps the limit.
        let next = next.apply(&file(&route("api", "c", "{ v1 = 100 }"))).unwrap();
        assert!(next.services["api"].rate_limit.is_some() && next.services["api"].routes.len() == 1);

        // (file, words of the refusal): each refused whole.
        let table = [
            (format!("{limit}{}", route("web", "a", "{ v3 = 100 }")), "names version \"v3\""),
            (route("web", "a", "{ service = \"nowhere\" }"), "unknown service \"nowhere\""),
            (route("shop", "a", "{ v1 = 100 }"), "unknown service \"shop\""),
            (
                format!(
                    "{}mirror = {{ version = \"v9\", percent = 1 }}\n",
                    route("web", "a", "{ v1 = 100 }")
                ),
                "names version \"v9\"",
            ),
        ];
        for (text, words) in table {
            let error = state().apply(&file(&text)).unwrap_err();
            assert!(error.0.contains(words), "{text}: {error}");
        }
    }

    #[test]
    fn routes_and_limits_are_deleted_by_name() {
        let text = format!(
            "{}[[rate_limits]]\nservice = \"web\"\nrequests_per_second = 5\n",
            route("web", "a", "{ v2 = 100 }")
        );
        let state = state().apply(&file(&text)).unwrap();
        let delete = |name: &str| Change::DeleteRoute { service: "web".into(), name: name.into() };
        assert!(state.apply(&delete("b")).unwrap_err().0.contains("has no route \"b\""));
        let next = state.apply(&delete("a")).unwrap();
        assert!(next.services["web"].routes.is_empty());
        let next = next.apply(&Change::DeleteRateLimit { service: "web".into() }).unwrap();
        assert!(next.services["web"].rate_limit.is_none());
        let again = next.apply(&Change::DeleteRateLimit { service: "web".into() }).unwrap_err();
        assert!(again.0.contains("has no rate limit"), "{again}");
    }
}
