//! A service's routes as a routing table holds them: each route's match
//! compiled, and its backends and mirror made into services of their own
//! (sharing the endpoints, their state and their metrics), so a routed
//! request is forwarded exactly as any other.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};
use mesh_common::traffic_policy::FaultSpec;

use crate::http::deadline::ConnectionTimers;
use crate::policy::matching::CompiledMatch;
use crate::snapshot::Service;

pub struct Routes {
    pub list: Vec<Route>,
}

pub struct Route {
    pub name: Arc<str>,
    pub matcher: CompiledMatch,
    /// Where the route sends: its backends, with its timeout and retries.
    pub target: Arc<Service>,
    pub mirror: Option<Arc<Mirror>>,
    pub fault: Option<FaultSpec>,
    pub metrics: Arc<RouteMetrics>,
}

/// Copies of a share of a route's requests, sent and forgotten.
pub struct Mirror {
    pub target: Arc<Service>,
    pub per_million: u32,
    pub max_in_flight: u32,
    pub in_flight: Arc<AtomicU32>,
    /// The copies' timeouts, apart from any caller's connection.
    pub timers: Arc<ConnectionTimers>,
}

/// Per route, for /metrics.
#[derive(Default)]
pub struct RouteMetrics {
    pub requests: AtomicU64,
    pub delayed: AtomicU64,
    pub aborted: AtomicU64,
    pub mirrored: AtomicU64,
    /// Copies not made because `max_in_flight` were out.
    pub mirror_busy: AtomicU64,
    /// Copies not made because the body streams or is over 64 KiB.
    pub mirror_body: AtomicU64,
}

impl Routes {
    /// The first route whose match the request passes.
    pub fn find(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<&Route> {
        self.list.iter().find(|route| route.matcher.matches(method, uri, headers))
    }
}
