//! The HTTP request path: naming the service, forwarding with retries and
//! timeouts, and the proxy's own error answers.

pub mod body;
pub mod forward;
pub mod pool;
pub mod route;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::errors::ProxyError;
use body::ResponseBody;

/// Headers that describe one connection, not the message, and so must not
/// be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

const MESH_ERROR: HeaderName = HeaderName::from_static("x-mesh-error");

/// The proxy's own answer for an error: an HTTP status with a short text,
/// or for gRPC callers a trailers-only response carrying `grpc-status`.
pub fn error_response(error: ProxyError, grpc: bool, detail: &str) -> Response<ResponseBody> {
    let reason = HeaderValue::from_static(error.reason());
    if grpc {
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(error.grpc_status())));
        if let Ok(message) = HeaderValue::from_str(&format!("{}: {detail}", error.reason())) {
            headers.insert("grpc-message", message);
        }
        headers.insert(MESH_ERROR, reason);
        return response;
    }
    let mut response = Response::new(ResponseBody::local(format!("{}: {detail}\n", error.reason())));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(MESH_ERROR, reason);
    response
}

/// Marks an upstream response that is passed through despite an error,
/// such as the last failure when the retry budget ran out.
pub fn mark_error(response: &mut Response<ResponseBody>, error: ProxyError) {
    response.headers_mut().insert(MESH_ERROR, HeaderValue::from_static(error.reason()));
}

pub fn status_of(response: &Response<ResponseBody>) -> StatusCode {
    response.status()
}
