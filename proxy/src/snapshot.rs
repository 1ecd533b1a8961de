//! The routing snapshot: every service with its policies, endpoints, their
//! health and their metric handles, built off the hot path from a validated
//! config and published whole with one atomic swap. A new snapshot builds
//! only the services an update changes and shares the rest with the one
//! before it.
//!
//! State that must outlive a table swap (latency estimates, breakers,
//! pooled connections, retry budgets) lives in [`LongLived`] and is shared
//! by consecutive snapshots, so a reload never resets a breaker or drops a
//! pooled connection to an endpoint that stays.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::balance::breaker::Availability;
use crate::balance::{pick_p2c, pick_weighted};
use crate::config::{Protocol, ProxyConfig, ServiceConfig};
use crate::endpoint::pool::MeshPeer;
use crate::endpoint::EndpointState;
use crate::errors::ProxyError;
use crate::metrics::{Direction, EndpointCount, HttpMetrics, Metrics, RetryMetrics, TcpMetrics};
use crate::policy::matching::CompiledMatch;
use crate::policy::rate_limit::RateLimiter;
use crate::policy::routes::{Mirror, Route, Routes};
use crate::retry_budget::RetryBudget;
use mesh_common::traffic_policy::{Backends, MirrorTarget, RouteRetry, RouteSpec};

#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub version: Arc<str>,
    pub ready: bool,
    /// A mesh sidecar, reached over mTLS; part of its long-lived state's key.
    pub meshed: bool,
    /// Its sidecar announced QUIC: a service reached over QUIC tries it.
    pub quic: bool,
    pub state: Arc<EndpointState>,
    pub metrics: Arc<HttpMetrics>,
}

/// Endpoints that share a split weight: one version, or with no split, all.
#[derive(Clone)]
pub struct Group {
    pub endpoints: Vec<Endpoint>,
}

pub struct Service {
    pub config: ServiceConfig,
    pub groups: Vec<Group>,
    pub weights: Vec<u32>,
    pub budget: Arc<RetryBudget>,
    pub retry_metrics: Arc<RetryMetrics>,
    /// For answers made before any endpoint was chosen.
    pub unrouted_metrics: Arc<HttpMetrics>,
    pub tcp_metrics: Arc<TcpMetrics>,
    /// Tried before the service's own groups; `None` for most services,
    /// whose requests then pay one test for this.
    pub routes: Option<Box<Routes>>,
}

/// The local app behind the inbound listener.
pub struct Inbound {
    pub app: Option<SocketAddr>,
    /// What the local app speaks, when the table names its service; peers
    /// may call over HTTP/2 (always, over mTLS) whatever the app speaks.
    pub app_protocol: Option<Protocol>,
    pub state: Arc<EndpointState>,
    pub metrics: Arc<HttpMetrics>,
    pub tcp_metrics: Arc<TcpMetrics>,
    /// The local service's rate limit, when it has one.
    pub rate_limit: Option<Arc<RateLimiter>>,
}

/// Services by name. FNV rather than SipHash: every request looks its
/// service up, and the keys come from the control plane, not from callers.
/// Shared names and services make a copy of the map a copy of pointers.
pub type ServiceMap = fnv::FnvHashMap<Arc<str>, Arc<Service>>;

pub struct Snapshot {
    pub version: u64,
    /// The config the table was built from, less its services: those are
    /// built one by one into `services`, and only the changed ones are
    /// built again.
    pub settings: Arc<ProxyConfig>,
    pub services: ServiceMap,
    pub inbound: Inbound,
    /// For requests naming a service the table does not have.
    pub unknown_service_metrics: Arc<HttpMetrics>,
}

/// A chosen endpoint, and whether it is the single probe of an ejected one.
pub struct Chosen<'a> {
    pub endpoint: &'a Endpoint,
    pub probe: bool,
}

impl Service {
    /// A service that sends to `groups` under `base`'s policy and handles,
    /// less what a route overrides: what a route's backends or mirror are.
    pub fn derived(
        base: &Service,
        name: &str,
        (groups, weights): (Vec<Group>, Vec<u32>),
        timeout_ms: Option<u64>,
        retry: Option<&RouteRetry>,
    ) -> Arc<Service> {
        let b = &base.config;
        let mut config = ServiceConfig {
            name: name.to_owned(),
            protocol: b.protocol,
            timeout: timeout_ms.map_or(b.timeout, std::time::Duration::from_millis),
            connect_timeout: b.connect_timeout,
            split: Default::default(),
            retry: b.retry.clone(),
            breaker: b.breaker.clone(),
            endpoints: Vec::new(),
            permissive: b.permissive,
            allow_from: Vec::new(),
            hold_when_empty: std::time::Duration::ZERO,
            transport: b.transport,
            routes: Vec::new(),
            rate_limit: None,
        };
        if let Some(retry) = retry {
            config.retry.attempts = retry.attempts;
            config.retry.on = retry.on.clone();
        }
        Arc::new(Service {
            config,
            groups,
            weights,
            budget: base.budget.clone(),
            retry_metrics: base.retry_metrics.clone(),
            unrouted_metrics: base.unrouted_metrics.clone(),
            tcp_metrics: base.tcp_metrics.clone(),
            routes: None,
        })
    }

    /// Whether any endpoint is ready, ejected or not.
    pub fn any_ready(&self) -> bool {
        self.groups.iter().any(|g| g.endpoints.iter().any(|e| e.ready))
    }

    /// Chooses an endpoint for one try, avoiding the endpoints in `tried`
    /// when another is available. Fails with `no-endpoints` when nothing is
    /// ready, or `breaker-open` when everything ready is ejected.
    pub fn choose(
        &self,
        tried: &[SocketAddr],
        now_ms: u64,
        now_nanos: u64,
        rng: &mut impl Rng,
    ) -> Result<Chosen<'_>, ProxyError> {
        let usable = |group: &Group| {
            group
                .endpoints
                .iter()
                .any(|e| e.ready && e.state.breaker.load().availability(now_ms) != Availability::Ejected)
        };
        let Some(group_index) = pick_weighted(&self.weights, |i| usable(&self.groups[i]), rng) else {
            return Err(if self.any_ready() { ProxyError::BreakerOpen } else { ProxyError::NoEndpoints });
        };
        let endpoints = &self.groups[group_index].endpoints;
        // An endpoint whose ejection is over gets exactly one probe request.
        for endpoint in endpoints {
            if endpoint.ready
                && !tried.contains(&endpoint.addr)
                && endpoint.state.breaker.try_claim_probe(now_ms, &self.config.breaker)
            {
                return Ok(Chosen { endpoint, probe: true });
            }
        }
        let available = |i: usize| {
            let e = &endpoints[i];
            e.ready && e.state.breaker.load().availability(now_ms) == Availability::Available
        };
        let cost = |i: usize| endpoints[i].state.ewma.cost(now_nanos);
        let fresh =
            pick_p2c(endpoints.len(), |i| available(i) && !tried.contains(&endpoints[i].addr), cost, rng);
        match fresh.or_else(|| pick_p2c(endpoints.len(), available, cost, rng)) {
            Some(i) => Ok(Chosen { endpoint: &endpoints[i], probe: false }),
            None => Err(ProxyError::BreakerOpen),
        }
    }
}

/// State that outlives routing tables, keyed by what identifies it.
/// An endpoint's long-lived state is keyed by service, address, and
/// whether it is a mesh sidecar (reached over mTLS).
type EndpointKey = (String, SocketAddr, bool);

#[derive(Default)]

pub struct LongLived {
    endpoints: Mutex<HashMap<EndpointKey, Arc<EndpointState>>>,
    /// The proxy's mTLS configuration once it holds a certificate; pools
    /// of mesh endpoints read it when they connect.
    pub tls: Arc<arc_swap::ArcSwapOption<crate::tls::MeshTls>>,
    /// The QUIC client socket every peer's pool shares.
    quic: Arc<crate::endpoint::pool::QuicClient>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    /// Rate limiters by service: kept while their limit stays the same, so
    /// a table change for another reason does not refill the buckets.
    limiters: Mutex<HashMap<String, Arc<RateLimiter>>>,
    pub metrics: Metrics,
    next_version: AtomicU64,
    /// The proxy's own listening addresses: an endpoint at one of them
    /// would send requests round in a loop, so it never gets traffic.
    own_listeners: Mutex<Vec<SocketAddr>>,
}

/// Connections to endpoints the proxy holds open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamConnections {
    pub idle_http1: usize,
    pub http2: usize,
}

/// Whether `endpoint` is one of the proxy's own listeners: the same port on
/// the same address, or on any local address when the listener is bound
/// to all of them.
pub fn is_own_listener(own: &[SocketAddr], endpoint: SocketAddr) -> bool {
    own.iter().any(|listener| {
        listener.port() == endpoint.port()
            && (listener.ip() == endpoint.ip()
                || (listener.ip().is_unspecified()
                    && (endpoint.ip().is_loopback() || endpoint.ip().is_unspecified())))
    })
}

impl LongLived {
    /// Closes every endpoint's connections idle for `ticks` of the idle
    /// clock (see `endpoint::pool`) and returns how many. The map's lock is
    /// held only to copy the list, never while a pool is swept.
    pub fn close_idle(&self, ticks: u32) -> usize {
        let states: Vec<Arc<EndpointState>> =
            self.endpoints.lock().expect("long-lived lock").values().cloned().collect();
        states.iter().map(|state| state.pool.close_idle(ticks)).sum()
    }

    /// Connections to endpoints held open now: pooled idle HTTP/1 ones and
    /// shared HTTP/2 ones, for /metrics.
    pub fn upstream_connections(&self) -> UpstreamConnections {
        let endpoints = self.endpoints.lock().expect("long-lived lock");
        let mut held = UpstreamConnections::default();
        for state in endpoints.values() {
            held.idle_http1 += state.pool.idle_http1_count();
            held.http2 += usize::from(state.pool.has_http2());
        }
        held
    }

    /// Records a listener the proxy bound, for tables built from now on.
    pub fn add_own_listener(&self, addr: SocketAddr) {
        self.own_listeners.lock().expect("long-lived lock").push(addr);
    }

    fn endpoint(&self, service: &str, addr: SocketAddr, meshed: bool) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().expect("long-lived lock");
        map.entry((service.to_owned(), addr, meshed))
            .or_insert_with(|| {
                let mesh = meshed.then(|| MeshPeer {
                    service: service.to_owned(),
                    tls: self.tls.clone(),
                    quic: self.quic.clone(),
                });
                Arc::new(EndpointState::new(addr, mesh))
            })
            .clone()
    }

    /// Builds the first table, from a whole config. The version is the
    /// control plane's when it sent the table, else the next local one.
    pub fn build(&self, config: ProxyConfig, version: Option<u64>) -> Snapshot {
        let (settings, services) = config.into_parts();
        self.next(None, Arc::new(settings), Change { set: services, removed: Vec::new() }, version)
    }

    /// Builds the table that follows `previous` once `change` is applied.
    /// Only the services the change names are built; every other one is
    /// the previous table's, shared as it is, so an update costs what it
    /// changes plus one copy of the index of names. Endpoint state of
    /// endpoints the change takes away is dropped here, closing their idle
    /// connections.
    pub fn next(
        &self,
        previous: Option<&Snapshot>,
        settings: Arc<ProxyConfig>,
        change: Change,
        version: Option<u64>,
    ) -> Snapshot {
        let version = match version {
            Some(version) => {
                self.next_version.store(version, Ordering::Relaxed);
                version
            }
            None => self.next_version.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let mut services = previous.map(|p| p.services.clone()).unwrap_or_default();
        for name in &change.removed {
            if let Some(gone) = services.remove(name.as_str()) {
                self.forget_endpoints(&gone, None);
            }
        }
        let own = self.own_listeners(&settings);
        let mut changed: HashSet<String> = change.removed.iter().cloned().collect();
        for config in change.set {
            changed.insert(config.name.clone());
            let name: Arc<str> = Arc::from(config.name.as_str());
            let service = self.build_service(config, &own, &services);
            if let Some(replaced) = services.insert(name, service.clone()) {
                self.forget_endpoints(&replaced, Some(&service));
            }
        }
        // Routes to other services hold those services' endpoints: a
        // service whose routes name a changed one is built again from the
        // finished map (the few with such routes; most have none).
        let dependents: Vec<ServiceConfig> = services
            .values()
            .filter(|s| s.config.routes.iter().any(|r| r.other_services().any(|o| changed.contains(o))))
            .map(|s| s.config.clone())
            .collect();
        for config in dependents {
            let service = self.build_service(config, &own, &services);
            services.insert(Arc::from(service.config.name.as_str()), service);
        }
        let inbound = self.inbound(&settings, &services, previous.map(|p| &p.inbound));
        Snapshot {
            version,
            settings,
            services,
            inbound,
            unknown_service_metrics: self.metrics.http(Direction::Outbound, "", ""),
        }
    }

    /// The listeners this proxy has bound or will bind.
    fn own_listeners(&self, settings: &ProxyConfig) -> Vec<SocketAddr> {
        let mut own = self.own_listeners.lock().expect("long-lived lock").clone();
        let listen = &settings.listen;
        let configured = [listen.outbound, listen.inbound, listen.admin].into_iter().flatten();
        let upstreams = settings.upstreams.iter().map(|u| u.listen);
        own.extend(configured.chain(upstreams).filter(|addr| addr.port() != 0));
        own
    }

    fn build_service(
        &self,
        config: ServiceConfig,
        own: &[SocketAddr],
        services: &ServiceMap,
    ) -> Arc<Service> {
        let name = config.name.as_str();
        let endpoint = |e: &crate::config::EndpointConfig| {
            let loops = is_own_listener(own, e.addr);
            if loops {
                tracing::warn!(service = name, endpoint = %e.addr, "an endpoint is this proxy's own listener; it gets no traffic");
            }
            let (ready, state) = (e.ready && !loops, self.endpoint(name, e.addr, e.meshed));
            state.announce(ready);
            Endpoint {
                addr: e.addr,
                version: Arc::from(e.version.as_str()),
                ready,
                meshed: e.meshed,
                quic: e.quic,
                state,
                metrics: self.metrics.http(Direction::Outbound, name, &e.version),
            }
        };
        let all: Vec<Endpoint> = config.endpoints.iter().map(endpoint).collect();
        let (groups, weights) = if config.split.is_empty() {
            (vec![Group { endpoints: all.clone() }], vec![1])
        } else {
            config.split.iter().map(|(version, weight)| (version_group(&all, version), *weight)).unzip()
        };
        let budget =
            self.budgets.lock().expect("long-lived lock").entry(name.to_owned()).or_default().clone();
        let mut service = Service {
            groups,
            weights,
            budget,
            retry_metrics: self.metrics.retries(name),
            unrouted_metrics: self.metrics.http(Direction::Outbound, name, ""),
            tcp_metrics: self.metrics.tcp(Direction::Outbound, name),
            routes: None,
            config,
        };
        if !service.config.routes.is_empty() {
            let list = service
                .config
                .routes
                .iter()
                .map(|spec| self.build_route(&service, &all, spec, services))
                .collect();
            service.routes = Some(Box::new(Routes { list }));
        }
        Arc::new(service)
    }

    /// One route of `service` (whose endpoints are `all`), its backends
    /// and mirror resolved against `services`.
    fn build_route(
        &self,
        service: &Service,
        all: &[Endpoint],
        spec: &RouteSpec,
        services: &ServiceMap,
    ) -> Route {
        let name = service.config.name.as_str();
        let versions = |weights: &mut dyn Iterator<Item = (&String, u32)>| -> (Vec<Group>, Vec<u32>) {
            weights.map(|(version, weight)| (version_group(all, version), weight)).unzip()
        };
        // Another service as it is in the table; a service the table does
        // not have yet has no endpoints, and its requests get `no-endpoints`.
        let other = |other: &str, retry: Option<&RouteRetry>| match services.get(other) {
            Some(found) => {
                let groups = (found.groups.clone(), found.weights.clone());
                Service::derived(found, other, groups, spec.timeout_ms, retry)
            }
            None => Service::derived(service, other, (Vec::new(), Vec::new()), spec.timeout_ms, retry),
        };
        let target = match &spec.backends {
            Backends::Versions(weights) => {
                let groups = versions(&mut weights.iter().map(|(v, w)| (v, *w)));
                Service::derived(service, name, groups, spec.timeout_ms, spec.retry.as_ref())
            }
            Backends::Service(other_name) => other(other_name, spec.retry.as_ref()),
        };
        // A copy is tried once: mirroring must not multiply load on retries.
        let once = RouteRetry { attempts: 1, on: Vec::new() };
        let mirror = spec.mirror.as_ref().map(|mirror| {
            let target = match &mirror.target {
                MirrorTarget::Version(version) => {
                    let version = version.clone();
                    let groups = versions(&mut std::iter::once((&version, 1)));
                    Service::derived(service, name, groups, spec.timeout_ms, Some(&once))
                }
                MirrorTarget::Service(other_name) => other(other_name, Some(&once)),
            };
            Arc::new(Mirror {
                target,
                per_million: mirror.per_million,
                max_in_flight: mirror.max_in_flight,
                in_flight: Default::default(),
                timers: Default::default(),
            })
        });
        let matcher = CompiledMatch::compile(&spec.matches).unwrap_or_else(|error| {
            // Checked before it reached the table; should it fail anyway, the route matches nothing.
            tracing::warn!(service = name, route = %spec.name, %error, "a route's match does not compile; it is skipped");
            CompiledMatch::never()
        });
        Route {
            name: Arc::from(spec.name.as_str()),
            matcher,
            target,
            mirror,
            fault: spec.fault.clone(),
            metrics: self.metrics.route(name, &spec.name),
        }
    }

    /// Drops the long-lived state of `old`'s endpoints that its successor
    /// (`None` when the service is gone) no longer has.
    fn forget_endpoints(&self, old: &Service, new: Option<&Service>) {
        let name = old.config.name.as_str();
        let keys = |service: &Service| -> HashSet<(SocketAddr, bool)> {
            service.config.endpoints.iter().map(|e| (e.addr, e.meshed)).collect()
        };
        let kept = new.map(keys).unwrap_or_default();
        let mut endpoints = self.endpoints.lock().expect("long-lived lock");
        for (addr, meshed) in keys(old) {
            if !kept.contains(&(addr, meshed)) {
                endpoints.remove(&(name.to_owned(), addr, meshed));
            }
        }
    }

    /// The local app's side, rebuilt with every table: it is one endpoint.
    fn inbound(&self, settings: &ProxyConfig, services: &ServiceMap, previous: Option<&Inbound>) -> Inbound {
        let app = settings.listen.app;
        if let Some(old) = previous.and_then(|p| p.app).filter(|old| Some(*old) != app) {
            self.endpoints.lock().expect("long-lived lock").remove(&(String::new(), old, false));
        }
        let state = match app {
            Some(app) => self.endpoint("", app, false),
            None => Arc::new(EndpointState::new(SocketAddr::from(([127, 0, 0, 1], 0)), None)),
        };
        let local = services.get(settings.local_service.as_str());
        Inbound {
            app,
            app_protocol: local.map(|s| s.config.protocol),
            rate_limit: self
                .rate_limiter(&settings.local_service, local.and_then(|s| s.config.rate_limit.as_ref())),
            state,
            metrics: self.metrics.http(Direction::Inbound, &settings.local_service, &settings.local_version),
            tcp_metrics: self.metrics.tcp(Direction::Inbound, &settings.local_service),
        }
    }
}

/// The endpoints of `all` that belong to `version`.
fn version_group(all: &[Endpoint], version: &str) -> Group {
    Group { endpoints: all.iter().filter(|e| &*e.version == version).cloned().collect() }
}

impl LongLived {
    /// The rate limiter for `service`'s `spec`: the one in use while the
    /// spec stays the same, so its buckets keep their state.
    fn rate_limiter(
        &self,
        service: &str,
        spec: Option<&mesh_common::traffic_policy::RateLimitSpec>,
    ) -> Option<Arc<RateLimiter>> {
        let mut limiters = self.limiters.lock().expect("long-lived lock");
        let Some(spec) = spec else {
            limiters.remove(service);
            return None;
        };
        if let Some(limiter) = limiters.get(service).filter(|l| l.spec == *spec) {
            return Some(limiter.clone());
        }
        let limiter = Arc::new(RateLimiter::new(spec.clone(), self.metrics.rate_limit(service)));
        limiters.insert(service.to_owned(), limiter.clone());
        Some(limiter)
    }
}

/// What an update changes in a routing table: services added or replaced,
/// and services removed. A service it does not name stays as it is.
#[derive(Debug, Default)]
pub struct Change {
    pub set: Vec<ServiceConfig>,
    pub removed: Vec<String>,
}

impl Change {
    /// The change that turns `table`'s services into `services`: those
    /// that are new or differ, and the names that are gone. Comparing
    /// walks the whole table; only what differs is built.
    pub fn between(table: &Snapshot, services: Vec<ServiceConfig>) -> Change {
        let wanted: HashSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let removed = table
            .services
            .keys()
            .filter(|name| !wanted.contains(&***name))
            .map(|name| name.to_string())
            .collect();
        let set = services
            .into_iter()
            .filter(|s| table.services.get(s.name.as_str()).is_none_or(|old| old.config != *s))
            .collect();
        Change { set, removed }
    }
}

impl Snapshot {
    /// Rows for the `mesh_endpoints` gauges, per service and version.
    pub fn endpoint_counts(&self, now_ms: u64) -> Vec<EndpointCount<'_>> {
        let mut rows: Vec<EndpointCount<'_>> = Vec::new();
        let mut names: Vec<&Arc<str>> = self.services.keys().collect();
        names.sort();
        for name in names {
            let service = &self.services[name];
            for endpoint in service.groups.iter().flat_map(|g| &g.endpoints) {
                let index =
                    match rows.iter().position(|r| r.service == &**name && r.version == &*endpoint.version) {
                        Some(index) => index,
                        None => {
                            rows.push(EndpointCount {
                                service: name,
                                version: &endpoint.version,
                                ready: 0,
                                ejected: 0,
                                ejections_total: 0,
                            });
                            rows.len() - 1
                        }
                    };
                let row = &mut rows[index];
                let breaker = endpoint.state.breaker.load();
                if breaker.is_ejected() {
                    row.ejected += 1;
                } else if endpoint.ready && breaker.availability(now_ms) == Availability::Available {
                    row.ready += 1;
                }
                row.ejections_total += endpoint.state.ejections.load(Ordering::Relaxed);
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use crate::config::{BreakerPolicy, RetryOn};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn snapshot(endpoints: &str, split: &str) -> Snapshot {
        let text =
            format!("[listen]\n[[services]]\nname = \"echo\"\n{split}\nendpoints = [\n{endpoints}\n]\n");
        LongLived::default().build(parse_config(&text).unwrap(), None)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn eject(endpoint: &Endpoint, now_ms: u64) {
        let policy = BreakerPolicy { consecutive_failures: 1, ..BreakerPolicy::default() };
        endpoint.state.breaker.record_failure(now_ms, &policy);
    }

    #[test]
    fn choose_prefers_untried_endpoints_and_falls_back_to_tried_ones() {
        let table = snapshot(
            "{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\" }, { addr = \"127.0.0.1:3\" }",
            "",
        );
        let service = &table.services["echo"];
        let mut rng = StdRng::seed_from_u64(3);
        // (tried, endpoints that may be chosen)
        let cases: &[(&[u16], &[u16])] =
            &[(&[], &[1, 2, 3]), (&[1], &[2, 3]), (&[1, 2], &[3]), (&[1, 2, 3], &[1, 2, 3])];
        for (tried, allowed) in cases {
            let tried: Vec<SocketAddr> = tried.iter().map(|p| addr(*p)).collect();
            for _ in 0..50 {
                let chosen = service.choose(&tried, 10, 10, &mut rng).unwrap();
                assert!(allowed.contains(&chosen.endpoint.addr.port()), "tried {tried:?}");
            }
        }
    }

    #[test]
    fn choose_names_why_nothing_can_be_chosen() {
        let none_ready = snapshot("{ addr = \"127.0.0.1:1\", ready = false }", "");
        let mut rng = StdRng::seed_from_u64(3);
        let result = none_ready.services["echo"].choose(&[], 10, 10, &mut rng).err();
        assert_eq!(result, Some(ProxyError::NoEndpoints));

        let all_ejected =
            snapshot("{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\", ready = false }", "");
        let service = &all_ejected.services["echo"];
        eject(&service.groups[0].endpoints[0], 10);
        assert_eq!(service.choose(&[], 20, 20, &mut rng).err(), Some(ProxyError::BreakerOpen));
        // Once the ejection is over, one request probes; the next waits for it.
        let later = 10 + 1_000;
        let probe = service.choose(&[], later, later, &mut rng).unwrap();
        assert!(probe.probe);
        assert_eq!(service.choose(&[], later, later, &mut rng).err(), Some(ProxyError::BreakerOpen));
    }

    #[test]
    fn a_version_without_available_endpoints_fails_over() {
        let table = snapshot(
            "{ addr = \"127.0.0.1:1\", version = \"v1\" }, { addr = \"127.0.0.1:2\", version = \"v2\", ready = false }",
            "split = { v1 = 10, v2 = 90 }",
        );
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..100 {
            let chosen = table.services["echo"].choose(&[], 10, 10, &mut rng).unwrap();
            assert_eq!(&*chosen.endpoint.version, "v1");
        }
    }

    #[test]
    fn endpoint_state_survives_a_rebuild_and_leaves_with_its_endpoint() {
        let long_lived = LongLived::default();
        let text =
            |endpoints: &str| format!("[listen]\n[[services]]\nname = \"echo\"\nendpoints = [{endpoints}]\n");
        let first = long_lived.build(
            parse_config(&text("{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\" }")).unwrap(),
            None,
        );
        eject(&first.services["echo"].groups[0].endpoints[0], 10);
        let second = reload(&long_lived, &first, &text("{ addr = \"127.0.0.1:1\" }"));
        assert!(
            second.services["echo"].groups[0].endpoints[0].state.breaker.load().is_ejected(),
            "kept across reload"
        );
        assert_eq!(second.version, first.version + 1);
        assert_eq!(long_lived.endpoints.lock().unwrap().len(), 1, "the removed endpoint's state is dropped");
    }

    /// The table after `previous` for a whole config, as a file reload makes it.
    fn reload(long_lived: &LongLived, previous: &Snapshot, text: &str) -> Snapshot {
        let (settings, services) = parse_config(text).unwrap().into_parts();
        long_lived.next(Some(previous), Arc::new(settings), Change::between(previous, services), None)
    }

    #[test]
    fn an_update_builds_only_the_services_it_changes() {
        let service = |name: &str, port: u16| {
            format!("[[services]]\nname = \"{name}\"\nendpoints = [{{ addr = \"127.0.0.1:{port}\" }}]\n")
        };
        let table = |services: &[(&str, u16)]| {
            let services: String = services.iter().map(|(name, port)| service(name, *port)).collect();
            format!("[listen]\n{services}")
        };
        let long_lived = LongLived::default();
        let mut previous =
            long_lived.build(parse_config(&table(&[("a", 1), ("b", 2), ("c", 3)])).unwrap(), None);
        // (next table: (service, endpoint port), services built anew, services removed)
        type Step<'a> = (&'a [(&'a str, u16)], &'a [&'a str], &'a [&'a str]);
        let steps: &[Step] = &[
            (&[("a", 1), ("b", 2), ("c", 3)], &[], &[]),
            (&[("a", 1), ("b", 5), ("c", 3)], &["b"], &[]),
            (&[("a", 1), ("b", 5)], &[], &["c"]),
            (&[("d", 4), ("a", 1), ("b", 5)], &["d"], &[]),
            (&[("a", 6), ("b", 5), ("d", 7)], &["a", "d"], &[]),
        ];
        for (i, (services, built, removed)) in steps.iter().enumerate() {
            let (_, configs) = parse_config(&table(services)).unwrap().into_parts();
            let change = Change::between(&previous, configs);
            let mut set: Vec<&str> = change.set.iter().map(|s| s.name.as_str()).collect();
            set.sort();
            let gone: Vec<&str> = change.removed.iter().map(String::as_str).collect();
            assert_eq!((&set[..], &gone[..]), (*built, *removed), "step {i}");
            let next = long_lived.next(Some(&previous), previous.settings.clone(), change, None);
            for (name, _) in services.iter() {
                let shared =
                    previous.services.get(*name).is_some_and(|old| Arc::ptr_eq(old, &next.services[*name]));
                assert_eq!(shared, !built.contains(name), "step {i}: service {name}");
            }
            let mut names: Vec<&str> = next.services.keys().map(|name| &**name).collect();
            names.sort();
            let mut expected: Vec<&str> = services.iter().map(|(name, _)| *name).collect();
            expected.sort();
            assert_eq!(names, expected, "step {i}");
            // Long-lived state is kept for exactly the endpoints in the table.
            assert_eq!(long_lived.endpoints.lock().unwrap().len(), services.len(), "step {i}");
            previous = next;
        }
    }

    #[test]
    fn endpoints_at_the_proxys_own_listeners_are_recognised() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [addr("127.0.0.1:4140"), addr("0.0.0.0:4143")];
        // (endpoint, one of ours?)
        let table = [
            ("127.0.0.1:4140", true),
            ("127.0.0.2:4140", false),
            ("127.0.0.1:4141", false),
            ("127.0.0.5:4143", true),
            ("0.0.0.0:4143", true),
            ("10.0.0.7:4143", false),
        ];
        for (endpoint, expected) in table {
            assert_eq!(is_own_listener(&own, addr(endpoint)), expected, "{endpoint}");
        }
    }

    #[test]
    fn routes_send_to_their_versions_or_another_service_with_their_own_policy() {
        let text = |other_port: u16| {
            format!(
                "[listen]\n\
                 [[services]]\nname = \"echo\"\nsplit = {{ v1 = 100 }}\nendpoints = [ {{ addr = \"127.0.0.1:1\", version = \"v1\" }}, {{ addr = \"127.0.0.1:2\", version = \"v2\" }} ]\n\
                 [[services]]\nname = \"other\"\nendpoints = [ {{ addr = \"127.0.0.1:{other_port}\" }} ]\n\
                 [[routes]]\nservice = \"echo\"\nname = \"canary\"\nbackends = {{ v2 = 100 }}\ntimeout = \"250ms\"\nretry = {{ attempts = 4, on = [\"5xx\"] }}\n\
                 [[routes]]\nservice = \"echo\"\nname = \"away\"\nbackends = {{ service = \"other\" }}\n"
            )
        };
        let long_lived = LongLived::default();
        let first = long_lived.build(parse_config(&text(3)).unwrap(), None);
        let routes = &first.services["echo"].routes.as_ref().unwrap().list;
        let canary = &routes[0].target;
        let ports = |service: &Service| -> Vec<u16> {
            service.groups.iter().flat_map(|g| &g.endpoints).map(|e| e.addr.port()).collect()
        };
        assert_eq!(ports(canary), [2], "the route's version only");
        assert_eq!(canary.config.timeout, std::time::Duration::from_millis(250));
        assert_eq!(
            (canary.config.retry.attempts, canary.config.retry.on.clone()),
            (4, vec![RetryOn::ServerError])
        );
        assert!(Arc::ptr_eq(&canary.budget, &first.services["echo"].budget), "the service's retry budget");
        let away = &routes[1].target;
        assert_eq!((away.config.name.as_str(), ports(away)), ("other", vec![3]));
        assert_eq!(away.config.timeout, crate::config::DEFAULT_TIMEOUT, "no timeout of its own: the other's");
        // The other service moves: the route follows, though echo itself did not change.
        let second = reload(&long_lived, &first, &text(4));
        let away = &second.services["echo"].routes.as_ref().unwrap().list[1].target;
        assert_eq!(ports(away), [4]);
        // A service without routes has none to test.
        assert!(second.services["other"].routes.is_none());
    }
}
