//! The HTTP request path: naming the service, forwarding with retries and
//! timeouts, and the proxy's own error answers.

pub mod body;
pub mod deadline;
pub mod fault;
pub mod h3_body;
pub mod hold;
pub mod hops;
pub mod inbound;
pub mod mirror;
pub mod outbound;
pub mod retry;
pub mod route;
pub mod routed;
pub mod send;
pub mod upgrade;

#[cfg(test)]
mod outbound_tests;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;

use crate::errors::ProxyError;
use body::ResponseBody;

/// Headers that describe one connection, not the message, and so must not
/// be forwarded (RFC 9110 §7.6.1), as bits of a mask. `TE` is one too,
/// except `te: trailers`, which HTTP/2 allows and gRPC needs.
const CONNECTION: u8 = 1;
const KEEP_ALIVE: u8 = 2;
const PROXY_CONNECTION: u8 = 4;
const TRANSFER_ENCODING: u8 = 8;
const UPGRADE: u8 = 16;
const TE: u8 = 32;

/// Which hop-by-hop header `name` is, if any. Standard names compare as
/// enum values; only other names compare as text (and by length first).
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        CONNECTION
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING
    } else if name == header::UPGRADE {
        UPGRADE
    } else if name == header::TE {
        TE
    } else {
        match name.as_str() {
            "keep-alive" => KEEP_ALIVE,
            "proxy-connection" => PROXY_CONNECTION,
            _ => 0,
        }
    }
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (a handful) finds what to drop; a removal by
    // name hashes, so only the names present are removed.
    let present = headers.keys().fold(0, |present, name| present | hop_by_hop_bit(name));
    if present == 0 {
        return;
    }
    if present & CONNECTION != 0 {
        remove_connection(headers);
    }
    if present & KEEP_ALIVE != 0 {
        headers.remove("keep-alive");
    }
    if present & PROXY_CONNECTION != 0 {
        headers.remove("proxy-connection");
    }
    if present & TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present & UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
    if present & TE != 0 && headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Removes `Connection` and the headers it names as hop-by-hop, with one
/// lookup. The common tokens (`keep-alive`, `close`, `upgrade`) name no
/// header, so the usual `Connection: keep-alive` costs no allocation.
fn remove_connection(headers: &mut HeaderMap) {
    let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) else { return };
    let (_, values) = entry.remove_entry_mult();
    let mut named = Vec::new();
    for value in values {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            let common = ["keep-alive", "close", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t));
            if !common && !token.is_empty() {
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pub(crate) const MESH_ERROR: HeaderName = HeaderName::from_static("x-mesh-error");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_the_rest_kept() {
        // (headers in, headers that must remain)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let table: &[Case] = &[
            (&[("connection", "keep-alive"), ("keep-alive", "timeout=5"), ("x-a", "1")], &["x-a"]),
            (&[("connection", "close, x-secret"), ("x-secret", "s"), ("x-b", "2")], &["x-b"]),
            (&[("transfer-encoding", "chunked"), ("upgrade", "h2c"), ("te", "gzip")], &[]),
            (&[("te", "trailers"), ("content-type", "application/grpc")], &["te", "content-type"]),
        ];
        for (input, kept) in table {
            let mut headers = HeaderMap::new();
            for (name, value) in *input {
                headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            strip_hop_by_hop(&mut headers);
            let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
            left.sort_unstable();
            let mut want = kept.to_vec();
            want.sort_unstable();
            assert_eq!(left, want, "{input:?}");
        }
    }
}
