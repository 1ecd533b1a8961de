//! Injected faults: the answer to an aborted request, and the delay, as a
//! tower layer in front of the forward. Whether a request gets either is
//! decided by its route (`routed.rs`); these only carry it out.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use http::{Response, StatusCode};
use mesh_common::traffic_policy::{percent_text, AbortFault};
use tower::{Layer, Service, ServiceExt};

use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::error_response;

/// The answer to an aborted request: the route's status (or gRPC
/// status), marked as the mesh's own.
pub fn abort_response(abort: &AbortFault, route: &str, grpc: bool) -> Response<ResponseBody> {
    let detail = format!("route {route:?} aborts {} % of its requests", percent_text(abort.per_million));
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

/// Holds a request back for a while before the service below sees it,
/// and marks the answer: it is the app's, so not `x-mesh-error` (that
/// reads as a failure), but `x-mesh-fault: delay`.
pub struct DelayLayer(pub Duration);

impl<S> Layer<S> for DelayLayer {
    type Service = Delay<S>;

    fn layer(&self, inner: S) -> Delay<S> {
        Delay { delay: self.0, inner }
    }
}

#[derive(Clone)]
pub struct Delay<S> {
    delay: Duration,
    inner: S,
}

impl<S, R> Service<R> for Delay<S>
where
    S: Service<R, Response = Response<ResponseBody>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        let (delay, inner) = (self.delay, self.inner.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut response = inner.oneshot(request).await?;
            response.headers_mut().insert("x-mesh-fault", HeaderValue::from_static("delay"));
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aborts_map_http_statuses_to_grpc_ones() {
        // (HTTP status, gRPC status)
        let table = [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (500, 2),
            (418, 2),
        ];
        for (http, grpc) in table {
            assert_eq!(super::grpc_status_of(http), grpc, "{http}");
        }
    }
}
