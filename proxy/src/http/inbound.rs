//! Forwarding an inbound request to the local app: one try, no balancing,
//! the caller's protocol kept.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, Version};
use hyper::body::Incoming;

use crate::config::Protocol;
use crate::errors::ProxyError;
use crate::http::body::{CallerBody, CallerBroken, RequestBody, ResponseBody};
use crate::http::hops::MESH_HOPS;
use crate::http::send::{
    authority_for_upstream, build_upstream_request_owned, finish_response, send_http1, send_http2, SendError,
};
use crate::http::upgrade::{is_upgrade, upgrade_on};
use crate::http::{error_response, is_grpc, strip_hop_by_hop};

/// A peer's request body as the inbound takes it: hyper's (TCP) or h3's
/// (QUIC). Generic rather than an enum, so that each path compiles to its
/// own code and the TCP one is what it was.
pub trait InboundBody: Sized + Send + 'static {
    /// Whether a request with this body may be a protocol upgrade (over
    /// HTTP/3 none is: the inbound treats `Upgrade` as any other header).
    const UPGRADES: bool;
    fn into_request_body(self) -> (RequestBody, CallerBroken);
    /// The request as an upgrade takes it; called only when `UPGRADES`.
    fn into_upgrade(request: Request<Self>) -> Request<Incoming>;
}

impl InboundBody for Incoming {
    const UPGRADES: bool = true;

    fn into_request_body(self) -> (RequestBody, CallerBroken) {
        let body = CallerBody::new(self);
        let broken = body.broken_flag();
        (RequestBody::Streaming(body), broken)
    }

    fn into_upgrade(request: Request<Self>) -> Request<Incoming> {
        request
    }
}

impl InboundBody for crate::http::h3_body::H3RequestBody {
    const UPGRADES: bool = false;

    fn into_request_body(self) -> (RequestBody, CallerBroken) {
        let broken = self.broken_flag();
        (RequestBody::Quic(Box::new(self)), broken)
    }

    fn into_upgrade(_: Request<Self>) -> Request<Incoming> {
        unreachable!("HTTP/3 requests are never upgrades (UPGRADES is false)")
    }
}

/// Forwards an inbound request to the local app: one try, no balancing,
/// keeping the caller's protocol (HTTP/2 stays HTTP/2; HTTP/3 goes to the
/// app as HTTP/1.1 unless the app's protocol says otherwise).
pub async fn forward_inbound<B: InboundBody>(
    snapshot: Arc<crate::snapshot::Snapshot>,
    request: Request<B>,
) -> Response<ResponseBody> {
    let inbound = &snapshot.inbound;
    let started = Instant::now();
    let _in_flight = crate::traffic::InFlight::start(&inbound.metrics.in_flight);
    let grpc = is_grpc(request.headers());
    let version = request.version();
    let Some(app) = inbound.app else {
        let error = ProxyError::NoEndpoints;
        inbound.metrics.record(error.status().as_u16(), Some(error), started.elapsed());
        return error_response(error, grpc, "no local app is configured (listen.app)");
    };
    if B::UPGRADES && is_upgrade(&request) {
        // Boxed: upgrades are rare, and their future would enlarge every request's.
        let request = B::into_upgrade(request);
        let timeout = crate::config::DEFAULT_CONNECT_TIMEOUT;
        let (response, error) = Box::pin(upgrade_on(&inbound.state, timeout, request)).await;
        inbound.metrics.record(response.status().as_u16(), error, started.elapsed());
        return response;
    }
    let protocol = match inbound.app_protocol {
        Some(protocol) if protocol != Protocol::Tcp => protocol,
        _ if version == Version::HTTP_2 => Protocol::H2,
        _ => Protocol::Http,
    };
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The app's own calls start counting afresh.
    parts.headers.remove(MESH_HOPS);
    let authority = authority_for_upstream(&parts);
    let (body, caller_broken) = body.into_request_body();
    let upstream_request = build_upstream_request_owned(parts, body, protocol, &authority);
    let (pool, connect_timeout) = (&inbound.state.pool, crate::config::DEFAULT_CONNECT_TIMEOUT);
    let sent = if protocol.is_h2() {
        send_http2(pool, connect_timeout, upstream_request).await.map(|response| (response, None))
    } else {
        send_http1(pool, connect_timeout, upstream_request).await
    };
    let (mut response, error) = match sent {
        Ok((response, release)) => {
            let response = response.map(crate::http::body::UpstreamBody::Hyper);
            (finish_response(response, None, release, &inbound.state.pool), None)
        }
        Err(SendError::Connect(error, _)) => {
            let detail = format!("local app at {app}: {}", error.0);
            (error_response(ProxyError::ConnectFailed, grpc, &detail), Some(ProxyError::ConnectFailed))
        }
        Err(SendError::Broken(error)) if caller_broken.get() => {
            let detail = format!("reading the request body: {error}");
            (error_response(ProxyError::BadRequest, grpc, &detail), Some(ProxyError::BadRequest))
        }
        Err(SendError::Broken(error)) => {
            let detail = format!("local app at {app}: {error}");
            (error_response(ProxyError::ConnectFailed, grpc, &detail), Some(ProxyError::ConnectFailed))
        }
    };
    inbound.metrics.record(response.status().as_u16(), error, started.elapsed());
    *response.version_mut() = version;
    response
}

#[cfg(test)]
mod future_size {
    #[test]
    fn the_inbound_future_stays_small() {
        fn size_of_future<A, B, F>(_f: impl Fn(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let inbound = size_of_future(super::forward_inbound::<hyper::body::Incoming>);
        assert!(inbound <= 2048, "an inbound request's future takes {inbound} bytes");
    }
}
