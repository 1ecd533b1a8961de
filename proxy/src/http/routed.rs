//! The outbound path of a service that has routes: find the route, then
//! inject its fault, copy the request to its mirror, and forward to its
//! backends. A route with none of the extras costs a match and nothing
//! else: its request is forwarded as any other, to the route's backends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use mesh_common::traffic_policy::{percent_text, AbortFault};
use rand::Rng;

use crate::clock;
use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::deadline::ConnectionTimers;
use crate::http::outbound::{forward_from, BodySource, MAX_REPLAY_BODY, RNG};
use crate::http::{error_response, is_grpc};
use crate::policy::routes::{Mirror, Route, Routes};
use crate::snapshot::Service;

/// What to do with a request to a service that has routes.
pub enum Routed {
    /// Forward it, as any request, to this service (a route's backends,
    /// or the service itself when no route matched).
    Forward(Arc<Service>, Request<Incoming>),
    /// Answer it now (an injected abort).
    Answer(Response<ResponseBody>),
    /// A delay or a mirror: a future of its own.
    Boxed(Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>),
}

/// A copy's answer is read up to this much, so its connection can be reused.
const MIRROR_ANSWER_READ: usize = 1024 * 1024;

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
        let response = abort_response(abort, route, is_grpc(request.headers()));
        let error = Some(ProxyError::InjectedFault);
        service.unrouted_metrics.record(response.status().as_u16(), error, Duration::ZERO);
        return Routed::Answer(response);
    }
    let delay = fault.and_then(|f| f.delay.as_ref()).filter(|d| happens(d.per_million));
    let mirror = route.mirror.as_ref().filter(|m| happens(m.per_million));
    if delay.is_none() && mirror.is_none() {
        return Routed::Forward(route.target.clone(), request);
    }
    let started = clock::now_nanos();
    if delay.is_some() {
        route.metrics.delayed.fetch_add(1, Ordering::Relaxed);
    }
    let delay = delay.map(|d| Duration::from_millis(d.duration_ms));
    let (target, timers) = (route.target.clone(), timers.clone());
    let copy = mirror.map(|m| MirrorTask { mirror: m.clone_handles(), metrics: route.metrics.clone() });
    let future = async move {
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let (parts, body) = request.into_parts();
        let body = match copy {
            Some(copy) => match copy.send(&parts, body).await {
                Ok(body) => body,
                Err(response) => return response,
            },
            None => BodySource::Caller(body),
        };
        forward_from(target, parts, body, timers, started).await
    };
    Routed::Boxed(Box::pin(future))
}

/// The answer to an aborted request: the route's status (or gRPC status),
/// marked as the mesh's own.
fn abort_response(abort: &AbortFault, route: &Route, grpc: bool) -> Response<ResponseBody> {
    let detail =
        format!("route {:?} aborts {} % of its requests", route.name, percent_text(abort.per_million));
    let mut response = error_response(ProxyError::InjectedFault, grpc, &detail);
    if grpc {
        let code = abort.grpc_status.unwrap_or_else(|| grpc_status_of(abort.status));
        response.headers_mut().insert("grpc-status", HeaderValue::from(u16::from(code)));
    } else {
        *response.status_mut() =
            StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }
    response
}

/// The gRPC status that goes with an HTTP status, as gRPC's own HTTP
/// mapping has it.
fn grpc_status_of(status: u16) -> u8 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

impl Mirror {
    fn clone_handles(&self) -> Mirror {
        Mirror {
            target: self.target.clone(),
            per_million: self.per_million,
            max_in_flight: self.max_in_flight,
            in_flight: self.in_flight.clone(),
            timers: self.timers.clone(),
        }
    }
}

struct MirrorTask {
    mirror: Mirror,
    metrics: Arc<crate::policy::routes::RouteMetrics>,
}

/// Gives back a mirror's slot when its copy is done.
struct Slot(Arc<std::sync::atomic::AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MirrorTask {
    /// Starts the copy, when the mirror has room and the body can be
    /// copied, and returns the body for the primary request. The copy runs
    /// on its own task: nothing the primary does waits for it.
    async fn send(self, parts: &Parts, body: Incoming) -> Result<BodySource, Response<ResponseBody>> {
        let MirrorTask { mirror, metrics } = self;
        let length =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let copyable = body.is_end_stream() || length.is_some_and(|l| l <= MAX_REPLAY_BODY);
        if !copyable {
            metrics.mirror_body.fetch_add(1, Ordering::Relaxed);
            return Ok(BodySource::Caller(body));
        }
        if mirror.in_flight.fetch_add(1, Ordering::Relaxed) >= mirror.max_in_flight {
            mirror.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics.mirror_busy.fetch_add(1, Ordering::Relaxed);
            return Ok(BodySource::Caller(body));
        }
        let slot = Slot(mirror.in_flight.clone());
        let bytes: Option<Bytes> = if body.is_end_stream() {
            None
        } else {
            match body.collect().await {
                Ok(collected) => Some(collected.to_bytes()).filter(|b| !b.is_empty()),
                Err(error) => {
                    let grpc = is_grpc(&parts.headers);
                    return Err(error_response(
                        ProxyError::BadRequest,
                        grpc,
                        &format!("reading the request body: {error}"),
                    ));
                }
            }
        };
        metrics.mirrored.fetch_add(1, Ordering::Relaxed);
        let mut copy = Request::new(());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        copy.headers_mut().insert("x-mesh-mirrored", HeaderValue::from_static("1"));
        let (copy, ()) = copy.into_parts();
        let body_copy = BodySource::Read(bytes.clone());
        tokio::spawn(async move {
            let response =
                forward_from(mirror.target, copy, body_copy, mirror.timers, clock::now_nanos()).await;
            // Read to the end (within a bound) so that the connection goes back to its pool.
            let body = response.into_body();
            if body.size_hint().lower() <= MIRROR_ANSWER_READ as u64 {
                let _ = Limited::new(body, MIRROR_ANSWER_READ).collect().await;
            }
            drop(slot);
        });
        Ok(BodySource::Read(bytes))
    }
}
