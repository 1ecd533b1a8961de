//! Running under the control plane: subscribe to routing updates, turn the
//! newest known state into a `ProxyConfig`, apply it through the same
//! atomic swap as a file reload, and acknowledge or refuse each version.
//! While the control plane is unreachable the proxy keeps serving its last
//! table and reconnects with jittered backoff, resuming from its version.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::discovery_client::DiscoveryClient;
use mesh_proto::mesh::v1::subscribe_request::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{
    BreakerPolicy, EndpointConfig, Listen, Protocol, ProxyConfig, RetryOn, RetryPolicy, ServiceConfig,
    UpstreamConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
};
use crate::listen::{shutdown_started, ShutdownSignal};
use crate::proxy::Proxy;

/// Who this proxy is and what it listens on; fixed for its life.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    pub control: String,
    pub proxy_id: String,
    pub service: String,
    pub version: String,
    pub listen: Listen,
    pub upstreams: Vec<UpstreamConfig>,
    /// The protocol each upstream port was started with, once they are:
    /// they start after the first table says which protocol each serves.
    pub upstream_protocols: Arc<OnceLock<BTreeMap<String, Protocol>>>,
    /// The admin listener as bound, told to the control plane for `meshctl top`.
    pub admin_addr: String,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(options: ControlOptions, proxy: Arc<Proxy>, mut shutdown: ShutdownSignal) {
    // The control plane's view, which can be ahead of the applied table
    // when an update was refused.
    let mut routes: BTreeMap<String, pb::ServiceRoute> = BTreeMap::new();
    let mut backoff = MIN_BACKOFF;
    loop {
        let session = session(&options, &proxy, &mut routes);
        let received = tokio::select! {
            result = session => match result {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(control = %options.control, %error, "control plane stream lost; serving the last table");
                    false
                }
            },
            _ = shutdown_started(&mut shutdown) => return,
        };
        if received {
            backoff = MIN_BACKOFF;
        }
        // Full jitter, so that proxies cut off together do not return together.
        let pause = rand::rng().random_range(Duration::ZERO..=backoff);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {},
            _ = shutdown_started(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription; returns whether any update arrived.
async fn session(
    options: &ControlOptions,
    proxy: &Proxy,
    routes: &mut BTreeMap<String, pb::ServiceRoute>,
) -> Result<bool, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", options.control))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (acks, outgoing) = mpsc::channel(8);
    let have_version = proxy.control_version();
    let hello = pb::Hello {
        proxy_id: options.proxy_id.clone(),
        service: options.service.clone(),
        have_version,
        admin_addr: options.admin_addr.clone(),
        bundle_version: proxy.bundle_version(),
    };
    let _ = acks.send(pb::SubscribeRequest { message: Some(Message::Hello(hello)) }).await;
    let mut updates = DiscoveryClient::new(channel)
        .subscribe(ReceiverStream::new(outgoing))
        .await
        .map_err(|e| format!("subscribe: {}", e.message()))?
        .into_inner();
    let mut received = false;
    let mut identity_changes = proxy.identity_changes.subscribe();
    loop {
        let update = tokio::select! {
            update = updates.message() => update.map_err(|e| format!("stream: {}", e.message()))?,
            // A new certificate (a renewal under a new root, say) is reported
            // as a repeated ack, so the control plane knows which root it is from.
            changed = identity_changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let ack = pb::Ack {
                    version: proxy.control_version(),
                    applied: true,
                    error: String::new(),
                    certificate_root: proxy.certificate_root(),
                    bundle_version: proxy.bundle_version(),
                };
                if acks.send(pb::SubscribeRequest { message: Some(Message::Ack(ack)) }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(update) = update else { break };
        received = true;
        if update.full {
            routes.clear();
        }
        for route in update.services {
            routes.insert(route.name.clone(), route);
        }
        for name in &update.removed_services {
            routes.remove(name);
        }
        let bundle = match update.bundle.map(crate::identity::TrustBundle::from_pb) {
            Some(bundle) => proxy.apply_bundle(bundle).map_err(|e| format!("trust bundle: {e}")),
            None => Ok(()),
        };
        let ack = match bundle.and_then(|()| to_config(routes, options)) {
            Ok(config) => {
                proxy.apply_control(config, update.version);
                tracing::info!(version = update.version, "routing table from the control plane applied");
                pb::Ack {
                    version: update.version,
                    applied: true,
                    error: String::new(),
                    certificate_root: proxy.certificate_root(),
                    bundle_version: proxy.bundle_version(),
                }
            }
            Err(error) => {
                tracing::warn!(version = update.version, %error, "routing update refused; the table in force stays");
                pb::Ack {
                    version: update.version,
                    applied: false,
                    error,
                    certificate_root: proxy.certificate_root(),
                    bundle_version: proxy.bundle_version(),
                }
            }
        };
        // This ack reports the certificate in force; no repeat is needed.
        identity_changes.borrow_and_update();
        if acks.send(pb::SubscribeRequest { message: Some(Message::Ack(ack)) }).await.is_err() {
            break;
        }
    }
    Ok(received)
}

/// The config for the control plane's view, or why this proxy cannot run it.
pub fn to_config(
    routes: &BTreeMap<String, pb::ServiceRoute>,
    options: &ControlOptions,
) -> Result<ProxyConfig, String> {
    let services = routes.values().map(service_config).collect::<Result<Vec<_>, _>>()?;
    // An upstream port's listener was started for one protocol; a change
    // between opaque TCP and HTTP needs a restart of the proxy.
    for (service, started_as) in options.upstream_protocols.get().into_iter().flatten() {
        let now = services.iter().find(|s| &s.name == service).map_or(Protocol::Http, |s| s.protocol);
        if (now == Protocol::Tcp) != (*started_as == Protocol::Tcp) {
            return Err(format!(
                "service {service:?} changed protocol to {now:?}, but its upstream port serves {started_as:?}; restart the proxy to change it"
            ));
        }
    }
    Ok(ProxyConfig {
        listen: options.listen.clone(),
        local_service: options.service.clone(),
        local_version: options.version.clone(),
        services,
        upstreams: options.upstreams.clone(),
        identity: None,
    })
}

fn service_config(route: &pb::ServiceRoute) -> Result<ServiceConfig, String> {
    let name = &route.name;
    let policy = route.policy.clone().unwrap_or_default();
    let protocol = match policy.protocol.as_deref().unwrap_or("http") {
        "http" => Protocol::Http,
        "h2" => Protocol::H2,
        "grpc" => Protocol::Grpc,
        "tcp" => Protocol::Tcp,
        other => return Err(format!("service {name:?}: unknown protocol {other:?}")),
    };
    let positive = |field: &str, value: Option<u64>, default: Duration| match value {
        Some(0) => Err(format!("service {name:?}: {field} must be longer than zero")),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    };
    let mut retry = RetryPolicy::default();
    if let Some(attempts) = policy.retry_attempts {
        if !(1..=10).contains(&attempts) {
            return Err(format!("service {name:?}: retry attempts must be from 1 to 10, got {attempts}"));
        }
        retry.attempts = attempts;
    }
    if !policy.retry_on.is_empty() {
        retry.on = policy
            .retry_on
            .iter()
            .map(|on| match on.as_str() {
                "connect-failure" => Ok(RetryOn::ConnectFailure),
                "5xx" => Ok(RetryOn::ServerError),
                "gateway-error" => Ok(RetryOn::GatewayError),
                "unavailable" => Ok(RetryOn::Unavailable),
                other => Err(format!("service {name:?}: unknown retry condition {other:?}")),
            })
            .collect::<Result<_, _>>()?;
    }
    retry.non_idempotent = policy.retry_non_idempotent.unwrap_or(retry.non_idempotent);
    retry.budget_ratio = policy.retry_budget_ratio.unwrap_or(retry.budget_ratio);
    retry.budget_min_per_second = policy.retry_budget_min_per_second.unwrap_or(retry.budget_min_per_second);
    let mut breaker = BreakerPolicy::default();
    breaker.consecutive_failures =
        policy.breaker_consecutive_failures.unwrap_or(breaker.consecutive_failures);
    breaker.base_ejection =
        policy.breaker_base_ejection_ms.map_or(breaker.base_ejection, Duration::from_millis);
    breaker.max_ejection = policy.breaker_max_ejection_ms.map_or(breaker.max_ejection, Duration::from_millis);
    let endpoints = route
        .endpoints
        .iter()
        .map(|e| {
            let addr: SocketAddr = e
                .addr
                .parse()
                .map_err(|_| format!("service {name:?}: endpoint address {:?} is not IP:port", e.addr))?;
            Ok(EndpointConfig { addr, version: e.version.clone(), ready: e.ready, meshed: e.meshed })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ServiceConfig {
        name: name.clone(),
        protocol,
        timeout: positive("timeout", policy.timeout_ms, DEFAULT_TIMEOUT)?,
        connect_timeout: positive("connect timeout", policy.connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT)?,
        split: route.split.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        retry,
        breaker,
        endpoints,
        permissive: policy.permissive.unwrap_or(false),
        allow_from: policy
            .allow_from
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}
