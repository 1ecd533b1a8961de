//! Upgrades (WebSocket and the like): forwarded on a connection of their
//! own and, once the endpoint agrees, spliced. Never retried: the caller
//! may already be streaming.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::clock;
use crate::endpoint::EndpointState;
use crate::errors::ProxyError;
use crate::http::body::{CallerBody, RequestBody, ResponseBody};
use crate::http::error_response;
use crate::http::outbound::RNG;
use crate::http::strip_hop_by_hop;
use crate::snapshot::Service;

/// Whether a request asks to switch protocols on its HTTP/1 connection.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Forwards an upgrade (WebSocket and the like) on its own connection and,
/// when the endpoint agrees with 101, splices the two connections. Upgrades
/// are never retried: the caller may already be streaming.
pub async fn forward_upgrade(service: Arc<Service>, request: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let chosen =
        RNG.with(|rng| service.choose(&[], clock::now_millis(), clock::now_nanos(), &mut *rng.borrow_mut()));
    let endpoint = match chosen {
        Ok(chosen) => chosen.endpoint,
        Err(error) => {
            service.unrouted_metrics.record(error.status().as_u16(), Some(error), started.elapsed());
            return error_response(error, false, &format!("service {:?}", service.config.name));
        }
    };
    let (response, error) = upgrade_on(&endpoint.state, service.config.connect_timeout, request).await;
    endpoint.metrics.record(response.status().as_u16(), error, started.elapsed());
    response
}

/// Forwards an upgrade to one endpoint's state (shared with inbound).
pub async fn upgrade_on(
    state: &EndpointState,
    connect_timeout: std::time::Duration,
    mut request: Request<Incoming>,
) -> (Response<ResponseBody>, Option<ProxyError>) {
    let downstream = hyper::upgrade::on(&mut request);
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers.clone();
    let upgrade = headers.remove(header::UPGRADE);
    strip_hop_by_hop(&mut headers);
    let mut upstream_request = Request::new(RequestBody::Streaming(CallerBody::new(body)));
    *upstream_request.method_mut() = parts.method;
    *upstream_request.uri_mut() =
        Uri::from(parts.uri.path_and_query().cloned().unwrap_or(PathAndQuery::from_static("/")));
    *upstream_request.headers_mut() = headers;
    if let Some(upgrade) = upgrade {
        upstream_request.headers_mut().insert(header::UPGRADE, upgrade);
        upstream_request.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut sender = match state.pool.connect_http1(connect_timeout).await {
        Ok(sender) => sender,
        Err(error) => {
            return (
                error_response(ProxyError::ConnectFailed, false, &error.0.to_string()),
                Some(ProxyError::ConnectFailed),
            )
        }
    };
    let mut response = match sender.send_request(upstream_request).await {
        Ok(response) => response,
        Err(error) => {
            return (
                error_response(ProxyError::ConnectFailed, false, &error.to_string()),
                Some(ProxyError::ConnectFailed),
            )
        }
    };
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(down), Ok(up)) = (downstream.await, upstream.await) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up)).await;
            }
        });
    }
    let (parts, body) = response.into_parts();
    (
        Response::from_parts(
            parts,
            ResponseBody::upstream(crate::http::body::UpstreamBody::Hyper(body), None, None),
        ),
        None,
    )
}
