//! The routing table a proxy runs on, as validated plain data.
//!
//! Every source of configuration (the static file today, the control plane
//! later) produces a [`ProxyConfig`]; only validated values reach the
//! snapshot builder, so nothing downstream re-checks them.

mod file;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

pub use file::{parse_config, ConfigError};
pub use mesh_common::duration::HumanDuration;
pub use mesh_common::policy::{Protocol, RetryOn, Transport};
pub use mesh_common::traffic_policy::{RateLimitSpec, RouteSpec};

/// Everything a proxy needs to run: its listeners and its routing table.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProxyConfig {
    pub listen: Listen,
    /// The service of the local app, used to label inbound metrics.
    pub local_service: String,
    /// The version of the local app, used to label inbound metrics.
    pub local_version: String,
    pub services: Vec<ServiceConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    /// A standalone proxy's workload identity from files (under the control
    /// plane, the CA issues it instead). Read once, at start.
    pub identity: Option<IdentityFiles>,
}

impl ProxyConfig {
    /// The config less its services, and the services.
    pub fn into_parts(mut self) -> (ProxyConfig, Vec<ServiceConfig>) {
        let services = std::mem::take(&mut self.services);
        (self, services)
    }
}

/// Certificate (chain, leaf first; its URI SAN is the SPIFFE ID), PKCS#8
/// key and trusted roots, all PEM.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct IdentityFiles {
    pub certificate: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub roots: std::path::PathBuf,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Listen {
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub app: Option<SocketAddr>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub protocol: Protocol,
    /// Covers the whole request up to the response headers, retries included.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    /// Version name to weight; empty means every ready endpoint shares.
    pub split: BTreeMap<String, u32>,
    pub retry: RetryPolicy,
    pub breaker: BreakerPolicy,
    pub endpoints: Vec<EndpointConfig>,
    /// Its sidecars' inbound also takes plaintext (migration); otherwise mTLS only.
    pub permissive: bool,
    /// Services whose sidecars may call it; empty: every mesh identity.
    pub allow_from: Vec<String>,
    /// With no ready endpoint, a request waits this long for one (a
    /// service that scales to zero); zero: it is refused at once.
    #[serde(serialize_with = "serialize_duration")]
    pub hold_when_empty: Duration,
    /// How this proxy reaches the service's peer sidecars.
    pub transport: Transport,
    /// Tried in order before the service's defaults; first match wins.
    pub routes: Vec<RouteSpec>,
    /// Enforced at this service's inbound, by its own sidecars.
    pub rate_limit: Option<RateLimitSpec>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first one included.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    /// Also retry methods that are not idempotent (POST, PATCH; gRPC calls).
    pub non_idempotent: bool,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub base_ejection: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_ejection: Duration,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    pub version: String,
    pub ready: bool,
    /// A mesh sidecar's inbound: reached over mTLS when this proxy has an identity.
    pub meshed: bool,
    /// The sidecar serves QUIC too, at the same port number over UDP.
    pub quic: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UpstreamConfig {
    pub service: String,
    pub listen: SocketAddr,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            on: vec![RetryOn::ConnectFailure],
            non_idempotent: false,
            budget_ratio: 0.2,
            budget_min_per_second: 10,
        }
    }
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
        }
    }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_VERSION: &str = "default";

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    HumanDuration(*d).serialize(s)
}
