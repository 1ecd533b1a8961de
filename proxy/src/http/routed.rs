//! The outbound path of a service that has routes: find the route, decide
//! its fault and its mirror for this request, and forward to the route's
//! backends. A route with neither (or a request that draws neither) costs
//! a match and nothing else: it is forwarded as any request is. Otherwise
//! the extras are tower layers over the forward (`fault.rs`, `mirror.rs`),
//! stacked for this request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use rand::Rng;
use tower::{ServiceBuilder, ServiceExt};

use crate::clock;
use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::deadline::ConnectionTimers;
use crate::http::fault::{abort_response, DelayLayer};
use crate::http::is_grpc;
use crate::http::mirror::MirrorLayer;
use crate::http::outbound::{forward_from, BodySource, RNG};
use crate::policy::routes::Routes;
use crate::snapshot::Service;

type BoxedAnswer = Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>;

/// What to do with a request to a service that has routes.
pub enum Routed {
    /// Forward it, as any request, to this service (a route's backends,
    /// or the service itself when no route matched).
    Forward(Arc<Service>, Request<Incoming>),
    /// Answer it now (an injected abort).
    Answer(Response<ResponseBody>),
    /// A delay or a mirror: the layers over the forward.
    Boxed(BoxedAnswer),
}

/// Whether an event of `per_million` chance happens this time.
fn happens(per_million: u32) -> bool {
    per_million >= 1_000_000 || RNG.with(|rng| rng.borrow_mut().random_range(0..1_000_000) < per_million)
}

pub fn route(
    service: &Arc<Service>,
    routes: &Routes,
    request: Request<Incoming>,
    timers: &Arc<ConnectionTimers>,
) -> Routed {
    let Some(route) = routes.find(request.method(), request.uri(), request.headers()) else {
        return Routed::Forward(service.clone(), request);
    };
    route.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let fault = route.fault.as_ref();
    if let Some(abort) = fault.and_then(|f| f.abort.as_ref()).filter(|a| happens(a.per_million)) {
        route.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        let response = abort_response(abort, &route.name, is_grpc(request.headers()));
        service.unrouted_metrics.record(
            response.status().as_u16(),
            Some(ProxyError::InjectedFault),
            Duration::ZERO,
        );
        return Routed::Answer(response);
    }
    let delay = fault.and_then(|f| f.delay.as_ref()).filter(|d| happens(d.per_million));
    let mirror = route.mirror.as_ref().filter(|m| happens(m.per_million));
    if delay.is_none() && mirror.is_none() {
        return Routed::Forward(route.target.clone(), request);
    }
    if delay.is_some() {
        route.metrics.delayed.fetch_add(1, Ordering::Relaxed);
    }
    let forward =
        Forward { target: route.target.clone(), timers: timers.clone(), started: clock::now_nanos() };
    let stack = ServiceBuilder::new()
        .option_layer(delay.map(|d| DelayLayer(Duration::from_millis(d.duration_ms))))
        .option_layer(mirror.map(|m| MirrorLayer { target: m.clone(), metrics: route.metrics.clone() }))
        .service(forward);
    let (parts, body) = request.into_parts();
    let request = Request::from_parts(parts, BodySource::Caller(body));
    Routed::Boxed(Box::pin(async move {
        match stack.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }))
}

/// The forward as a tower service: the bottom of a route's stack.
#[derive(Clone)]
struct Forward {
    target: Arc<Service>,
    timers: Arc<ConnectionTimers>,
    /// When the request arrived: a delay above counts in its latency.
    started: u64,
}

impl tower::Service<Request<BodySource>> for Forward {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BodySource>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let forwarding = forward_from(self.target.clone(), parts, body, self.timers.clone(), self.started);
        Box::pin(async move { Ok(forwarding.await) })
    }
}
