//! Sending one try to an endpoint: the request built for the wire's
//! protocol, a pooled or new connection, and, while the request may still
//! go again, the answer held until its body begins.

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::task::Poll;

use crate::config::Protocol;
use crate::endpoint::pool::{ConnPool, ConnectError, Http1Sender};
use crate::http::body::{BoxError, HeldFrame, RequestBody, ResponseBody, UpstreamBody};
use crate::http::strip_hop_by_hop;

/// Why sending on an endpoint failed.
pub(crate) enum SendError {
    /// No connection could be made; the request never left and comes back.
    Connect(ConnectError, Box<Request<RequestBody>>),
    /// The connection broke after the request was (maybe partly) sent.
    Broken(BoxError),
}

/// The authority the upstream sees: the one the caller used.
pub(crate) fn authority_for_upstream(parts: &Parts) -> Option<Authority> {
    if let Some(authority) = parts.uri.authority() {
        return Some(authority.clone());
    }
    parts.headers.get(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok())
}

/// Builds a try's request from kept parts. The headers parsed from the
/// caller go out and a copy stays behind: hyper reuses the sent map to
/// parse the answer, and a copy has no spare capacity (it would grow twice
/// per response).
pub(crate) fn build_upstream_request(
    parts: &mut Parts,
    body: RequestBody,
    protocol: Protocol,
    authority: &Option<Authority>,
) -> Request<RequestBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    let copy = parts.headers.clone();
    *request.headers_mut() = std::mem::replace(&mut parts.headers, copy);
    *request.uri_mut() = parts.uri.clone();
    retarget(request, protocol, authority)
}

/// Builds the one request that goes out from the caller's parts, moving
/// them rather than copying.
pub(crate) fn build_upstream_request_owned(
    parts: Parts,
    body: RequestBody,
    protocol: Protocol,
    authority: &Option<Authority>,
) -> Request<RequestBody> {
    retarget(Request::from_parts(parts, body), protocol, authority)
}

/// Sets the version, URI form and host for the upstream's protocol: origin
/// form and `Host` for HTTP/1.1, absolute URI (`:authority`) for HTTP/2.
pub(crate) fn retarget(
    mut request: Request<RequestBody>,
    protocol: Protocol,
    authority: &Option<Authority>,
) -> Request<RequestBody> {
    let path = request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if protocol.is_h2() {
        *request.version_mut() = Version::HTTP_2;
        let mut uri = Uri::builder().scheme(Scheme::HTTP).path_and_query(path.clone());
        if let Some(authority) = authority {
            uri = uri.authority(authority.clone());
            request.headers_mut().remove(header::HOST);
        }
        *request.uri_mut() = uri.build().unwrap_or_else(|_| Uri::from(path));
    } else {
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = Uri::from(path);
        if !request.headers().contains_key(header::HOST) {
            if let Some(host) = authority.as_ref().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                request.headers_mut().insert(header::HOST, host);
            }
        }
    }
    request
}

/// Sends on the endpoint's shared HTTP/2 connection; one that closed
/// meanwhile hands the request back, and it goes out on a new connection.
pub(crate) async fn send_http2(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    mut request: Request<RequestBody>,
) -> Result<Response<Incoming>, SendError> {
    for _ in 0..2 {
        let mut sender = match pool.http2(connect_timeout).await {
            Ok(sender) => sender,
            Err(error) => return Err(SendError::Connect(error, Box::new(request))),
        };
        if sender.ready().await.is_err() {
            pool.forget_http2();
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut error) => match error.take_message() {
                Some(unsent) => {
                    pool.forget_http2();
                    request = unsent;
                }
                None => return Err(SendError::Broken(BoxError::from(error.into_error()))),
            },
        }
    }
    let error = std::io::Error::other("the HTTP/2 connection closed twice before the request could be sent");
    Err(SendError::Connect(ConnectError(error), Box::new(request)))
}

/// Sends on a pooled HTTP/1 connection. One that the server closed
/// meanwhile hands the request back, and it goes out on a fresh
/// connection without counting as a retry.
pub(crate) async fn send_http1(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    request: Request<RequestBody>,
) -> Result<(Response<Incoming>, Option<Http1Sender>), SendError> {
    let request = match pool.take_http1() {
        Some(mut sender) => match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, Some(sender))),
            Err(mut error) => match error.take_message() {
                Some(unsent) => unsent,
                None => return Err(SendError::Broken(BoxError::from(error.into_error()))),
            },
        },
        None => request,
    };
    // Boxed: a new connection is rare, and its future is large.
    Box::pin(send_http1_on_new_connection(pool, connect_timeout, request)).await
}

async fn send_http1_on_new_connection(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    request: Request<RequestBody>,
) -> Result<(Response<Incoming>, Option<Http1Sender>), SendError> {
    let mut sender = match pool.connect_http1(connect_timeout).await {
        Ok(sender) => sender,
        Err(error) => return Err(SendError::Connect(error, Box::new(request))),
    };
    match sender.try_send_request(request).await {
        Ok(response) => Ok((response, Some(sender))),
        Err(error) => Err(SendError::Broken(BoxError::from(error.into_error()))),
    }
}

/// An endpoint's answer as the retry loop gets it.
pub(crate) struct Answered {
    pub response: Response<UpstreamBody>,
    /// The HTTP/1 connection it came on, pooled again once the body is read.
    pub release: Option<Http1Sender>,
    /// The body's first frame, read ahead while the request could go again.
    pub held: Option<HeldFrame>,
}

/// How long an answer's headers wait for its body to begin. An answer that
/// begins later (a stream, a long poll) is passed on as it comes, and can
/// no longer be retried once it has.
pub const FIRST_FRAME_HOLD: std::time::Duration = std::time::Duration::from_millis(200);

/// What an answer's body showed at once.
pub(crate) enum FirstFrame {
    /// Its first frame (held) or its end came with the headers.
    Here(Answered),
    /// The connection broke before the body began.
    Broken(BoxError),
    /// Nothing yet.
    Later(Answered),
}

/// Reads the body's first frame ahead if it is already here (most bodies
/// arrive with their headers), without a timer or a wake-up. Owned in and
/// out, so the request's future keeps no answer across an await.
pub(crate) fn first_frame_now(mut answered: Answered) -> FirstFrame {
    let body = answered.response.body_mut();
    if body.is_end_stream() {
        return FirstFrame::Here(answered);
    }
    // A waker that does nothing: a body not here yet is awaited by
    // `hold_first_frame`, whose poll registers its own.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => {
            answered.held = HeldFrame::new(frame);
            FirstFrame::Here(answered)
        }
        Poll::Ready(Some(Err(error))) => FirstFrame::Broken(error),
        Poll::Ready(None) => FirstFrame::Here(answered),
        Poll::Pending => FirstFrame::Later(answered),
    }
}

/// Waits up to [`FIRST_FRAME_HOLD`] for an answer's body to begin; a body
/// later than that is passed on as it streams.
pub(crate) async fn hold_first_frame(mut answered: Answered) -> Result<Answered, SendError> {
    match tokio::time::timeout(FIRST_FRAME_HOLD, answered.response.body_mut().frame()).await {
        Ok(Some(Ok(frame))) => answered.held = HeldFrame::new(frame),
        Ok(Some(Err(error))) => return Err(SendError::Broken(error)),
        Ok(None) | Err(_) => {}
    }
    Ok(answered)
}

pub(crate) fn finish_response(
    response: Response<UpstreamBody>,
    held: Option<HeldFrame>,
    release: Option<Http1Sender>,
    pool: &Arc<ConnPool>,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let release = release.map(|sender| (pool.clone(), sender));
    Response::from_parts(parts, ResponseBody::upstream(body, held, release))
}

/// Requests sent over QUIC and tries that went to TCP instead, for /metrics.
pub static QUIC_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static QUIC_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One try to a peer of a service reached over QUIC: over HTTP/3, or over
/// TCP (`wire`) when the peer cannot be reached over QUIC now. A request
/// that may be sent twice (`resendable`: idempotent, or allowed by the
/// retry policy) also goes over TCP when the QUIC path fell silent under it.
pub(crate) async fn send_quic_or_tcp(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    request: Request<RequestBody>,
    wire: Protocol,
    resendable: bool,
) -> Result<(Response<UpstreamBody>, Option<Http1Sender>), SendError> {
    match try_quic(pool, connect_timeout, request, resendable).await {
        QuicTry::Sent(sent) => sent.map(|response| (response, None)),
        QuicTry::Unreachable(request) if wire.is_h2() => send_http2(pool, connect_timeout, request)
            .await
            .map(|response| (response.map(UpstreamBody::Hyper), None)),
        QuicTry::Unreachable(request) => send_http1(pool, connect_timeout, request)
            .await
            .map(|(response, release)| (response.map(UpstreamBody::Hyper), release)),
    }
}

/// A try over QUIC: an answer (or a failure after the request left), or
/// the request handed back because the peer cannot be reached over QUIC
/// now; it then goes over TCP, in the same try.
pub(crate) enum QuicTry {
    Sent(Result<Response<UpstreamBody>, SendError>),
    Unreachable(Request<RequestBody>),
}

/// Tries `request` over the peer's HTTP/3 connection, opening it first if
/// this request is the one to (others go over TCP meanwhile).
pub(crate) async fn try_quic(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    request: Request<RequestBody>,
    resendable: bool,
) -> QuicTry {
    use crate::endpoint::pool::QuicRoute;
    use std::sync::atomic::Ordering;
    let (sender, connection) = match pool.quic_route(crate::clock::now_millis()) {
        QuicRoute::Ready(sender, connection) => (sender, connection),
        QuicRoute::Open => match pool.open_quic(connect_timeout).await {
            Ok(opened) => opened,
            Err(_) => {
                QUIC_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                return QuicTry::Unreachable(request);
            }
        },
        QuicRoute::Tcp => return QuicTry::Unreachable(request),
    };
    // A copy to send over TCP if the path falls silent: only of a request
    // whose body is in memory and that may be sent twice.
    let copy = match request.body() {
        RequestBody::Buffered(bytes) if resendable => Some(copy_request(&request, bytes.clone())),
        _ => None,
    };
    QUIC_SENT.fetch_add(1, Ordering::Relaxed);
    match send_quic(sender, &connection, request).await {
        Ok(response) => QuicTry::Sent(Ok(response)),
        Err(QuicSendError::Silent) => {
            // Nothing came back from the peer: the path is broken (UDP
            // blocked on the way). The peer goes over TCP for a while.
            tracing::info!(peer = %connection.remote_address(), "the QUIC path fell silent; TCP for a while");
            pool.quic_failed();
            match copy {
                Some(copy) => {
                    QUIC_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    QuicTry::Unreachable(copy)
                }
                None => {
                    let error =
                        std::io::Error::other("no packet from the peer over QUIC: the path is broken");
                    QuicTry::Sent(Err(SendError::Broken(Box::new(error))))
                }
            }
        }
        Err(QuicSendError::Broken(error)) => {
            // A connection that timed out lost its path: TCP for a while.
            // One closed otherwise is let go (the next request opens
            // another); a stream reset leaves the connection as it is.
            match connection.close_reason() {
                Some(quinn::ConnectionError::TimedOut) => {
                    tracing::info!(peer = %connection.remote_address(), "a QUIC connection timed out under a request; TCP for a while");
                    pool.quic_failed();
                }
                Some(_) => pool.forget_quic(&connection),
                None => {}
            }
            QuicTry::Sent(Err(error))
        }
    }
}

/// A request's method, target, headers and in-memory body, copied.
fn copy_request(request: &Request<RequestBody>, body: Option<bytes::Bytes>) -> Request<RequestBody> {
    let mut copy = Request::new(RequestBody::Buffered(body));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// How a request over HTTP/3 failed.
enum QuicSendError {
    /// No packet came from the peer while the request waited.
    Silent,
    /// The connection or stream failed.
    Broken(SendError),
}

/// How long a request over QUIC waits for a first packet from its peer
/// before the path counts as broken. A live peer acknowledges what it
/// gets within its ACK delay (25 ms) and a round trip; the margin covers
/// lost packets and a busy machine, for a wrong verdict costs the peer
/// its QUIC for a while.
fn silence_window(rtt: std::time::Duration) -> std::time::Duration {
    (rtt * 4 + std::time::Duration::from_millis(300)).min(std::time::Duration::from_secs(2))
}

/// Sends a request over HTTP/3: its head, then its body on a task of its
/// own (so the answer may begin while the body streams), and waits for
/// the answer's head. A request that heard nothing at all from the peer
/// within the silence window gives up: on a working path the peer's
/// acknowledgements would have come long before.
async fn send_quic(
    mut sender: crate::endpoint::pool::QuicSender,
    connection: &quinn::Connection,
    request: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, QuicSendError> {
    let broken = |error: h3::error::StreamError| QuicSendError::Broken(SendError::Broken(Box::new(error)));
    let (mut parts, body) = request.into_parts();
    // HTTP/3 names the authority and scheme in pseudo-headers, not in Host.
    let authority = authority_for_upstream(&parts);
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::Uri::builder().scheme("https").path_and_query(path);
    if let Some(authority) = authority {
        uri = uri.authority(authority);
    }
    parts.uri = uri.build().map_err(|e| QuicSendError::Broken(SendError::Broken(Box::new(e))))?;
    parts.version = http::Version::HTTP_3;
    parts.headers.remove(header::HOST);
    let heard = connection.stats().udp_rx.datagrams;
    let stream = sender.send_request(Request::from_parts(parts, ())).await.map_err(broken)?;
    let (mut send, mut recv) = stream.split();
    if body.is_end_stream() {
        // A peer that answered before this end reached it stops the
        // request's stream, and finishing it then fails: the answer is
        // still on its way, and a broken stream fails reading it anyway.
        let _ = send.finish().await;
    } else {
        tokio::spawn(async move {
            let mut body = std::pin::pin!(body);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    // The caller's body broke off: so does the stream.
                    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                    return;
                };
                let sent = match frame.into_data() {
                    Ok(data) => send.send_data(data).await,
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => send.send_trailers(trailers).await,
                        Err(_) => Ok(()),
                    },
                };
                if sent.is_err() {
                    return;
                }
            }
            let _ = send.finish().await;
        });
    }
    let response = {
        let mut response = std::pin::pin!(recv.recv_response());
        match tokio::time::timeout(silence_window(connection.rtt()), response.as_mut()).await {
            Ok(response) => response,
            Err(_) if connection.stats().udp_rx.datagrams == heard => return Err(QuicSendError::Silent),
            Err(_) => response.await,
        }
    }
    .map_err(broken)?;
    let recv = crate::http::h3_body::ClientRecv::new(recv, sender);
    // HTTP/3 ends a stream apart from its HEADERS frame, and an answer
    // that only said so later would reach an HTTP/2 caller as HEADERS
    // then an empty DATA frame: gRPC clients (grpcio) take a Trailers-Only
    // answer in that shape for a stream with no status.
    let body = if is_grpc_trailers_only(response.headers()) {
        crate::http::h3_body::H3ResponseBody::ended(recv)
    } else {
        crate::http::h3_body::H3ResponseBody::new(recv)
    };
    Ok(response.map(|()| UpstreamBody::Quic(Box::new(body))))
}

/// Whether an answer is gRPC's Trailers-Only form: its status in the
/// headers, and by gRPC's protocol nothing after them.
fn is_grpc_trailers_only(headers: &http::HeaderMap) -> bool {
    crate::http::is_grpc(headers) && headers.contains_key("grpc-status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_grpc_answer_with_its_status_in_the_headers_is_trailers_only() {
        let cases: [(&[(&str, &str)], bool); 5] = [
            (&[("content-type", "application/grpc"), ("grpc-status", "5")], true),
            (&[("content-type", "application/grpc+proto"), ("grpc-status", "0")], true),
            // The status comes later, in the trailers.
            (&[("content-type", "application/grpc")], false),
            // Not gRPC: a header of that name means nothing.
            (&[("content-type", "text/plain"), ("grpc-status", "5")], false),
            (&[("grpc-status", "5")], false),
        ];
        for (headers, expected) in cases {
            let map: http::HeaderMap = headers
                .iter()
                .map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v)))
                .collect();
            assert_eq!(is_grpc_trailers_only(&map), expected, "{headers:?}");
        }
    }
}
