//! Running under the control plane: subscribe to routing updates, turn the
//! newest known state into a `ProxyConfig`, apply it through the same
//! atomic swap as a file reload, and acknowledge or refuse each version.
//! While the control plane is unreachable the proxy keeps serving its last
//! table and reconnects with jittered backoff, resuming from its version.

use mesh_common::backoff::Backoff;
use mesh_common::policy::check_retry_attempts;
use mesh_proto::convert::{protocol_from_pb, retry_on_from_pb, transport_from_pb};
use mesh_proto::traffic_policy::{rate_limit_from_pb, route_from_pb};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::discovery_client::DiscoveryClient;
use mesh_proto::mesh::v1::subscribe_request::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{
    BreakerPolicy, EndpointConfig, Listen, Protocol, RetryPolicy, ServiceConfig, UpstreamConfig,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT,
};
use crate::listen::{shutdown_started, ShutdownSignal};
use crate::proxy::{Proxy, Update};
use crate::snapshot::Change;

/// Who this proxy is and what it listens on; fixed for its life.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    pub control: crate::control_tls::ControlAccess,
    pub proxy_id: String,
    /// The control plane's servers, first the one this proxy's id chooses,
    /// then the one that answered last: kept across reconnections.
    pub servers: Arc<mesh_client::ServerList>,
    pub service: String,
    pub version: String,
    pub listen: Listen,
    pub upstreams: Vec<UpstreamConfig>,
    /// The protocol each upstream port was started with, once they are:
    /// they start after the first table says which protocol each serves.
    pub upstream_protocols: Arc<OnceLock<BTreeMap<String, Protocol>>>,
    /// The admin listener as bound, told to the control plane for `meshctl top`.
    pub admin_addr: String,
    /// How often the current ack is repeated on a quiet stream.
    pub keepalive: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(options: ControlOptions, proxy: Arc<Proxy>, mut shutdown: ShutdownSignal) {
    // The control plane's view, which can be ahead of the table in force
    // when a service's route was refused.
    let mut routes = Routes::default();
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        let session = session(&options, &proxy, &mut routes);
        let received = tokio::select! {
            result = session => match result {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(control = %options.control.addr, %error, "control plane stream lost; serving the last table");
                    false
                }
            },
            _ = shutdown_started(&mut shutdown) => return,
        };
        if received {
            backoff.reset();
        }
        let pause = backoff.jittered(&mut rand::rng());
        tokio::select! {
            _ = tokio::time::sleep(pause) => {},
            _ = shutdown_started(&mut shutdown) => return,
        }
    }
}

/// The control plane's routes as received, and why any of them cannot run
/// here.
#[derive(Default)]
pub struct Routes {
    pub received: BTreeMap<String, pb::ServiceRoute>,
    pub refused: BTreeMap<String, String>,
}

/// Why a subscription ended. Whatever it was, the proxy serves its last
/// table and subscribes again after a backoff.
#[derive(Debug)]
enum SessionEnd {
    /// The proxy is stopping.
    Stopping,
    /// meshd could not be reached, or the TLS to reach it is unusable.
    Client(mesh_client::ClientError),
    /// The subscription was refused, or the stream broke.
    Stream(&'static str, tonic::Status),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Stopping => f.write_str("the proxy is stopping"),
            SessionEnd::Client(error) => error.fmt(f),
            SessionEnd::Stream(what, status) => write!(f, "{what}: {}", status.message()),
        }
    }
}

impl From<mesh_client::ClientError> for SessionEnd {
    fn from(error: mesh_client::ClientError) -> Self {
        SessionEnd::Client(error)
    }
}

/// One subscription; returns whether any update arrived.
/// How often a proxy tells meshd what its traffic has been.
const TRAFFIC_SUMMARY_EVERY: Duration = Duration::from_secs(1);

async fn session(
    options: &ControlOptions,
    proxy: &Arc<Proxy>,
    routes: &mut Routes,
) -> Result<bool, SessionEnd> {
    // A sidecar given a token subscribes with the certificate it brings.
    if proxy.needs_identity.load(std::sync::atomic::Ordering::Acquire) && proxy.identity.load().is_none() {
        let mut changes = proxy.identity_changes.subscribe();
        while proxy.identity.load().is_none() {
            if changes.changed().await.is_err() {
                return Err(SessionEnd::Stopping);
            }
        }
    }
    let tls = options.control.authenticated(proxy)?;
    let channel = mesh_client::connect_to(options.servers.clone(), &tls, Duration::from_secs(2)).await?;
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
        .map_err(|status| SessionEnd::Stream("subscribe", status))?
        .into_inner();
    let mut received = false;
    let mut parts: Vec<pb::RoutingUpdate> = Vec::new();
    // Why the table in force differs from the control plane's, if it does.
    let mut refused = refusals(routes);
    let mut identity_changes = proxy.identity_changes.subscribe();
    let mut keepalive = tokio::time::interval(options.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await;
    // Each stream starts its summaries afresh: the server may be another.
    let mut summarizer = crate::traffic::Summarizer::default();
    let mut summary_tick = tokio::time::interval(TRAFFIC_SUMMARY_EVERY);
    summary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let update = tokio::select! {
            update = updates.message() => update.map_err(|status| SessionEnd::Stream("stream", status))?,
            // A new certificate (a renewal under a new root, say) is reported
            // as a repeated ack, so the control plane knows which root it is
            // from; on a quiet stream the ack is repeated now and then, so
            // the control plane sees the stream is alive.
            changed = identity_changes.changed() => {
                if changed.is_err() {
                    break;
                }
                if acks.send(repeated_ack(proxy, &refused)).await.is_err() {
                    break;
                }
                continue;
            }
            _ = keepalive.tick() => {
                if acks.send(repeated_ack(proxy, &refused)).await.is_err() {
                    break;
                }
                continue;
            }
            _ = summary_tick.tick() => {
                let summary = summarizer.next(&proxy.long_lived.metrics, &proxy.table.load());
                if acks.send(pb::SubscribeRequest { message: Some(Message::Traffic(summary)) }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(update) = update else { break };
        received = true;
        let Some((update, touched)) = take_part(routes, &mut parts, update, options) else { continue };
        let bundle = match update.bundle.map(crate::identity::TrustBundle::from_pb) {
            Some(bundle) => proxy.apply_bundle(bundle).map_err(|e| format!("trust bundle: {e}")),
            None => Ok(()),
        };
        let ack = match bundle {
            Ok(()) => {
                let change = convert_off_thread(routes, touched, options).await;
                proxy.apply_off_thread(Update::Services(change), Some(update.version)).await;
                refused = refusals(routes);
                if refused.is_empty() {
                    tracing::info!(version = update.version, "routing table from the control plane applied");
                } else {
                    tracing::warn!(version = update.version, error = %refused, "routing update applied except for refused services, which keep their last route");
                }
                pb::Ack {
                    version: update.version,
                    applied: refused.is_empty(),
                    error: refused.clone(),
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

/// Takes one part of an update. A large update comes in parts: none is
/// taken until the last one is here (`parts` holds the others, and a new
/// stream starts with none), so a stream cut between parts leaves the
/// table as it was. At the last part, merges them all into the view and
/// returns the update's version and bundle, and the services it touched.
fn take_part(
    routes: &mut Routes,
    parts: &mut Vec<pb::RoutingUpdate>,
    part: pb::RoutingUpdate,
    options: &ControlOptions,
) -> Option<(pb::RoutingUpdate, BTreeSet<String>)> {
    let more = part.more;
    parts.push(part);
    if more {
        return None;
    }
    let mut touched = BTreeSet::new();
    // A whole table also checks services gone from it whose upstream port
    // serves opaque TCP.
    if parts.iter().any(|part| part.full) {
        touched
            .extend(options.upstream_protocols.get().into_iter().flat_map(|started| started.keys().cloned()));
    }
    let update = merge_parts(&mut routes.received, parts, &mut touched);
    Some((update, touched))
}

/// Takes an update's parts into `received` (service → route), in order,
/// adds the names of the services it sets or removes to `touched` (all of
/// them, before and after, for a whole table), and returns what the update
/// says besides the routes: its version and bundle.
fn merge_parts(
    received: &mut BTreeMap<String, pb::ServiceRoute>,
    parts: &mut Vec<pb::RoutingUpdate>,
    touched: &mut BTreeSet<String>,
) -> pb::RoutingUpdate {
    let mut last = pb::RoutingUpdate::default();
    for mut part in parts.drain(..) {
        if part.full {
            touched.extend(std::mem::take(received).into_keys());
        }
        for route in part.services.drain(..) {
            touched.insert(route.name.clone());
            received.insert(route.name.clone(), route);
        }
        for name in &part.removed_services {
            touched.insert(name.clone());
            received.remove(name);
        }
        last = part;
    }
    last
}

/// Why the table in force differs from the control plane's view, for acks.
fn refusals(routes: &Routes) -> String {
    routes.refused.values().map(String::as_str).collect::<Vec<_>>().join("; ")
}

/// The ack for the table in force, sent again.
fn repeated_ack(proxy: &Proxy, refused: &str) -> pb::SubscribeRequest {
    let ack = pb::Ack {
        version: proxy.control_version(),
        applied: refused.is_empty(),
        error: refused.to_owned(),
        certificate_root: proxy.certificate_root(),
        bundle_version: proxy.bundle_version(),
    };
    pb::SubscribeRequest { message: Some(Message::Ack(ack)) }
}

/// `to_change` on the blocking pool: a whole table walks every route, and
/// the threads serving requests must not wait for it. The routes go there
/// by value and come back.
async fn convert_off_thread(
    routes: &mut Routes,
    touched: BTreeSet<String>,
    options: &ControlOptions,
) -> Change {
    let (mut taken, options) = (std::mem::take(routes), options.clone());
    let converted = tokio::task::spawn_blocking(move || {
        let change = to_change(&mut taken, &touched, &options);
        (taken, change)
    })
    .await;
    match converted {
        Ok((back, change)) => {
            *routes = back;
            change
        }
        // A panic in the conversion is a bug; it goes on as such.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The change to the table in force that the `touched` services of the
/// control plane's view make, recording in `routes.refused` why any of
/// them cannot run here. A refused service keeps the route it last ran
/// with (none, if it never ran), so one bad route holds back only itself.
pub fn to_change(routes: &mut Routes, touched: &BTreeSet<String>, options: &ControlOptions) -> Change {
    let upstream_protocols = options.upstream_protocols.get();
    let mut change = Change::default();
    for name in touched {
        let started_as = upstream_protocols.and_then(|started| started.get(name));
        let checked = match routes.received.get(name) {
            Some(route) => service_config(route).and_then(|service| {
                check_upstream_protocol(name, service.protocol, started_as).map(|()| Some(service))
            }),
            // A service gone from the view while its upstream port serves
            // TCP would turn that port into an HTTP one: it keeps its route.
            None => check_upstream_protocol(name, Protocol::Http, started_as).map(|()| None),
        };
        match checked {
            Ok(Some(service)) => {
                routes.refused.remove(name);
                change.set.push(service);
            }
            // Removing a service the table does not have changes nothing.
            Ok(None) => {
                routes.refused.remove(name);
                change.removed.push(name.clone());
            }
            Err(error) => {
                routes.refused.insert(name.clone(), error);
            }
        }
    }
    change
}

/// An upstream port's listener was started for one protocol; a change
/// between opaque TCP and HTTP needs a restart of the proxy.
fn check_upstream_protocol(
    service: &str,
    now: Protocol,
    started_as: Option<&Protocol>,
) -> Result<(), String> {
    match started_as {
        Some(started_as) if (now == Protocol::Tcp) != (*started_as == Protocol::Tcp) => Err(format!(
            "service {service:?} changed protocol to {now}, but its upstream port serves {started_as}; restart the proxy to change it"
        )),
        _ => Ok(()),
    }
}

fn service_config(route: &pb::ServiceRoute) -> Result<ServiceConfig, String> {
    let name = &route.name;
    let policy = route.policy.clone().unwrap_or_default();
    let protocol = match policy.protocol {
        Some(value) => protocol_from_pb(value).map_err(|e| format!("service {name:?}: {e}"))?,
        None => Protocol::Http,
    };
    let positive = |field: &str, value: Option<u64>, default: Duration| match value {
        Some(0) => Err(format!("service {name:?}: {field} must be longer than zero")),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default),
    };
    let mut retry = RetryPolicy::default();
    if let Some(attempts) = policy.retry_attempts {
        check_retry_attempts(attempts).map_err(|e| format!("service {name:?}: retry attempts {e}"))?;
        retry.attempts = attempts;
    }
    if !policy.retry_on.is_empty() {
        retry.on = policy
            .retry_on
            .iter()
            .map(|on| retry_on_from_pb(*on).map_err(|e| format!("service {name:?}: {e}")))
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
            Ok(EndpointConfig {
                addr,
                version: e.version.clone(),
                ready: e.ready,
                meshed: e.meshed,
                quic: e.quic && e.meshed,
            })
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
        allow_from: policy.allow_from.map(|allow| allow.services).unwrap_or_default(),
        hold_when_empty: Duration::from_millis(policy.hold_when_empty_ms.unwrap_or(0)),
        transport: match policy.transport {
            Some(value) => transport_from_pb(value).map_err(|e| format!("service {name:?}: {e}"))?,
            None => Default::default(),
        },
        routes: route
            .routes
            .iter()
            .map(|r| {
                let spec = route_from_pb(r)?;
                // A match that would not compile is refused here, not skipped later.
                crate::policy::matching::CompiledMatch::compile(&spec.matches)
                    .map_err(|e| format!("route {:?}: {e}", spec.name))?;
                Ok(spec)
            })
            .map(|r: Result<_, String>| r.map_err(|e| format!("service {name:?}: {e}")))
            .collect::<Result<_, _>>()?,
        rate_limit: route.rate_limit.as_ref().map(rate_limit_from_pb),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, protocol: &str, retry_attempts: Option<u32>) -> pb::ServiceRoute {
        // A name this proxy does not know goes out as a value it does not
        // know either, as from a newer control plane.
        let protocol = Some(protocol.parse().map_or(99, mesh_proto::convert::protocol_to_pb));
        let policy = pb::Policy { protocol, retry_attempts, ..Default::default() };
        pb::ServiceRoute { name: name.into(), policy: Some(policy), ..Default::default() }
    }

    fn options(upstream_protocols: BTreeMap<String, Protocol>) -> ControlOptions {
        ControlOptions {
            control: crate::control_tls::ControlAccess::with_roots("", ""),
            proxy_id: "p".into(),
            servers: mesh_client::ServerList::parse("127.0.0.1:7400").unwrap(),
            service: "client".into(),
            version: "v1".into(),
            listen: Listen { outbound: None, inbound: None, admin: None, app: None },
            upstreams: Vec::new(),
            upstream_protocols: Arc::new(OnceLock::from(upstream_protocols)),
            admin_addr: String::new(),
            keepalive: Duration::from_secs(10),
        }
    }

    #[test]
    fn an_update_in_parts_is_taken_whole_and_in_order() {
        let names = |routes: &Routes| routes.received.keys().cloned().collect::<Vec<_>>();
        let part = |full: bool, services: &[&str], removed: &[&str], more: bool| pb::RoutingUpdate {
            version: 5,
            full,
            services: services.iter().map(|name| route(name, "http", None)).collect(),
            removed_services: removed.iter().map(|name| name.to_string()).collect(),
            bundle: None,
            more,
        };
        let options = options(BTreeMap::from([("db".to_owned(), Protocol::Tcp)]));
        let mut routes = Routes::default();
        routes.received.insert("old".to_owned(), route("old", "http", None));
        let mut parts = Vec::new();
        // A whole table in three parts: nothing is taken before the last,
        // which replaces what was there.
        assert!(take_part(&mut routes, &mut parts, part(true, &["a"], &[], true), &options).is_none());
        assert!(take_part(&mut routes, &mut parts, part(false, &["b"], &[], true), &options).is_none());
        assert_eq!(names(&routes), ["old"], "the view waits for the last part");
        let (update, touched) = take_part(&mut routes, &mut parts, part(false, &["c"], &[], false), &options)
            .expect("the last part");
        assert_eq!((update.version, names(&routes)), (5, vec!["a".into(), "b".into(), "c".into()]));
        assert!(parts.is_empty());
        let whole = ["old", "a", "b", "c", "db"].map(String::from);
        assert_eq!(
            touched,
            BTreeSet::from(whole),
            "a whole table touches what was and is, and TCP upstreams"
        );
        // A change in two parts: the removal comes with the last. Only what
        // it names is touched.
        assert!(take_part(&mut routes, &mut parts, part(false, &["d"], &[], true), &options).is_none());
        let (_, touched) = take_part(&mut routes, &mut parts, part(false, &["b"], &["a"], false), &options)
            .expect("the last part");
        assert_eq!(names(&routes), ["b", "c", "d"]);
        assert_eq!(touched, BTreeSet::from(["a", "b", "d"].map(String::from)));
    }

    #[test]
    fn a_refused_route_holds_back_only_its_own_service() {
        let options = options(BTreeMap::from([("db".to_owned(), Protocol::Tcp)]));
        let mut routes = Routes::default();
        let long_lived = crate::snapshot::LongLived::default();
        let settings = crate::config::parse_config("[listen]\n").unwrap();
        let mut table = long_lived.build(settings, None);
        let protocol_of = |table: &crate::snapshot::Snapshot, name: &str| {
            table.services.get(name).map(|s| (s.config.protocol, s.config.retry.attempts))
        };
        // (routes received, refused services, expected (protocol, attempts) of web and db)
        type Step =
            (Vec<pb::ServiceRoute>, Vec<&'static str>, Option<(Protocol, u32)>, Option<(Protocol, u32)>);
        let steps: Vec<Step> = vec![
            (
                vec![route("web", "http", Some(2)), route("db", "tcp", None)],
                vec![],
                Some((Protocol::Http, 2)),
                Some((Protocol::Tcp, 3)),
            ),
            // db turns HTTP under a TCP port: refused, db keeps its route; web's change applies.
            (
                vec![route("web", "http", Some(4)), route("db", "http", None)],
                vec!["db"],
                Some((Protocol::Http, 4)),
                Some((Protocol::Tcp, 3)),
            ),
            // A later change to web alone still applies; db stays refused.
            (
                vec![route("web", "http", Some(5))],
                vec!["db"],
                Some((Protocol::Http, 5)),
                Some((Protocol::Tcp, 3)),
            ),
            // db back to TCP: everything applies.
            (vec![route("db", "tcp", Some(1))], vec![], Some((Protocol::Http, 5)), Some((Protocol::Tcp, 1))),
            // A service that never ran and cannot run stays out.
            (
                vec![route("new", "quic", None)],
                vec!["new"],
                Some((Protocol::Http, 5)),
                Some((Protocol::Tcp, 1)),
            ),
        ];
        for (i, (received, refused, web, db)) in steps.into_iter().enumerate() {
            let touched = received.iter().map(|route| route.name.clone()).collect();
            for route in received {
                routes.received.insert(route.name.clone(), route);
            }
            let change = to_change(&mut routes, &touched, &options);
            table = long_lived.next(Some(&table), table.settings.clone(), change, None);
            let errors: Vec<(&String, &String)> = routes.refused.iter().collect();
            assert_eq!(errors.len(), refused.len(), "step {i}: {errors:?}");
            for ((service, error), expected) in errors.iter().zip(&refused) {
                assert_eq!(service, expected, "step {i}");
                assert!(error.contains(&format!("{expected:?}")), "step {i}: {error}");
            }
            assert_eq!(protocol_of(&table, "web"), web, "step {i}");
            assert_eq!(protocol_of(&table, "db"), db, "step {i}");
            assert_eq!(protocol_of(&table, "new"), None, "step {i}");
        }
    }
}
