//! Forwarding one HTTP request: choose an endpoint, send, classify the
//! answer, retry within the policy and the budget, all under the service's
//! timeout. This is the hot path; it reads the snapshot it was given and
//! touches only atomics of shared state.
//!
//! How it fails: a request the proxy cannot place gets the contract's
//! error (`no-endpoints`, `breaker-open`, `connect-failed`, `timeout`);
//! an upstream failure that cannot be retried is passed through as is.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::clock;
use crate::config::{Protocol, RetryOn};
use crate::errors::ProxyError;
use crate::http::body::{CallerBody, CallerBroken, HeldFrame, RequestBody, ResponseBody};
use crate::http::deadline::ConnectionTimers;
use crate::http::hops::{count_hop, MAX_HOPS, MESH_HOPS};
use crate::http::pool::{ConnPool, ConnectError, Http1Sender};
use crate::http::{error_response, is_grpc, mark_error, strip_hop_by_hop, MESH_ERROR};
use crate::metrics::HttpMetrics;
use crate::snapshot::{Endpoint, EndpointState, Service};

/// Bodies up to this size are kept so the request can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// The request body as the retry loop sees it.
enum PreparedBody {
    /// Kept in memory: every try gets a copy.
    Replayable(Option<Bytes>),
    /// The caller's stream: only one try can send it.
    Streaming(Option<CallerBody>),
}

impl PreparedBody {
    fn is_replayable(&self) -> bool {
        matches!(self, PreparedBody::Replayable(_))
    }

    /// What tells, after a send failed, whether the caller's stream broke.
    fn caller_broken(&self) -> Option<CallerBroken> {
        match self {
            PreparedBody::Streaming(Some(body)) => Some(body.broken_flag()),
            _ => None,
        }
    }

    fn for_attempt(&mut self) -> Option<RequestBody> {
        match self {
            PreparedBody::Replayable(bytes) => Some(RequestBody::Buffered(bytes.clone())),
            PreparedBody::Streaming(body) => body.take().map(RequestBody::Streaming),
        }
    }
}

/// Why sending on an endpoint failed.
enum SendError {
    /// No connection could be made; the request never left and comes back.
    Connect(ConnectError, Box<Request<RequestBody>>),
    /// The connection broke after the request was (maybe partly) sent.
    Broken(hyper::Error),
}

/// The answer of a forwarded request and what to record about it.
struct Outcome<'s> {
    response: Response<ResponseBody>,
    error: Option<ProxyError>,
    metrics: &'s HttpMetrics,
}

/// Forwards an outbound request to `service` and records its metrics,
/// under the service's timeout (timed by one of the connection's timers).
pub async fn forward(
    service: Arc<Service>,
    request: Request<Incoming>,
    timers: Arc<ConnectionTimers>,
) -> Response<ResponseBody> {
    let started = clock::now_nanos();
    let grpc = is_grpc(request.headers());
    let version = request.version();
    let mut progress = Progress { waiting_on: None, clock_nanos: started };
    let answered = {
        // Pinned here rather than moved into a timeout wrapper: the tries'
        // future is large, and each move copies it.
        let mut tries = std::pin::pin!(attempts(&service, request, grpc, &mut progress));
        let deadline = tokio::time::Instant::from_std(clock::instant_of(started)) + service.config.timeout;
        let mut timer = timers.arm(deadline);
        let answered = std::future::poll_fn(|cx| match tries.as_mut().poll(cx) {
            Poll::Ready(outcome) => Poll::Ready(Some(outcome)),
            Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
        })
        .await;
        timers.disarm(timer);
        answered
    };
    let waiting_on = progress.waiting_on;
    let (outcome, finished) = match answered {
        Some(outcome) => (outcome, progress.clock_nanos),
        None => {
            if let Some(endpoint) = waiting_on {
                record_failure(endpoint, &service);
            }
            let detail = format!("no answer within {}", humantime::format_duration(service.config.timeout));
            let outcome = Outcome {
                response: error_response(ProxyError::Timeout, grpc, &detail),
                error: Some(ProxyError::Timeout),
                metrics: waiting_on.map_or(&*service.unrouted_metrics, |e| &*e.metrics),
            };
            (outcome, clock::now_nanos())
        }
    };
    let Outcome { mut response, error, metrics } = outcome;
    let elapsed = std::time::Duration::from_nanos(finished.saturating_sub(started));
    metrics.record(response.status().as_u16(), error, elapsed);
    *response.version_mut() = version;
    response
}

/// Where the tries stand, shared with the timeout around them.
struct Progress<'s> {
    /// The endpoint a try is waiting on, so a timeout can be held against it.
    waiting_on: Option<&'s Endpoint>,
    /// The last clock reading, so that one reading serves several uses.
    clock_nanos: u64,
}

/// The request as each try needs it: kept whole when a response may be
/// retried, otherwise moved into the single request that goes out (a
/// connect failure hands that request back for the next try).
enum Template {
    Keep(Parts),
    Move(Option<Parts>),
}

async fn attempts<'s>(
    service: &'s Service,
    request: Request<Incoming>,
    grpc: bool,
    progress: &mut Progress<'s>,
) -> Outcome<'s> {
    let (mut parts, body) = request.into_parts();
    let body_to_read = !body.is_end_stream();
    strip_hop_by_hop(&mut parts.headers);
    if !count_hop(&mut parts.headers) {
        let detail = format!("the request made {MAX_HOPS} proxy hops without reaching an app");
        let response = error_response(ProxyError::LoopDetected, grpc, &detail);
        let metrics = &service.unrouted_metrics;
        return Outcome { response, error: Some(ProxyError::LoopDetected), metrics };
    }
    let policy = &service.config.retry;
    let idempotent = policy.non_idempotent || is_idempotent(&parts.method);
    // Any condition can come back as a response: even a connect failure,
    // when the peer's inbound proxy could not reach its app.
    let retries_responses = idempotent && policy.attempts > 1;
    let mut body = match prepare_body(body, &parts, retries_responses).await {
        Ok(body) => body,
        Err(e) => {
            let response =
                error_response(ProxyError::BadRequest, grpc, &format!("reading the request body: {e}"));
            let metrics = &service.unrouted_metrics;
            return Outcome { response, error: Some(ProxyError::BadRequest), metrics };
        }
    };
    let retries_responses = retries_responses && body.is_replayable();
    let caller_broken = body.caller_broken();
    // A body read took time; otherwise the forward's start reading holds.
    let mut now_nanos = if body_to_read { clock::now_nanos() } else { progress.clock_nanos };
    service.budget.record_request(clock::millis_of(now_nanos) / 1000);
    let protocol = service.config.protocol;
    // An HTTP/1.1 upstream reuses the caller's Host as is; only HTTP/2 (or
    // a request without Host) needs the authority parsed out.
    let mut authority = if protocol.is_h2() || !parts.headers.contains_key(header::HOST) {
        authority_for_upstream(&parts)
    } else {
        None
    };
    let mut template = if retries_responses { Template::Keep(parts) } else { Template::Move(Some(parts)) };
    // What only a retry needs lives on the heap, so the future every
    // request carries (and moves) stays small.
    let mut returned: Option<Box<Request<RequestBody>>> = None;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_failure: Option<Box<Outcome<'s>>> = None;
    for attempt in 1..=policy.attempts {
        let now_ms = clock::millis_of(now_nanos);
        let chosen = RNG.with(|rng| service.choose(&tried, now_ms, now_nanos, &mut *rng.borrow_mut()));
        let endpoint = match chosen {
            Ok(chosen) => chosen.endpoint,
            Err(error) => {
                return last_failure.map(|o| *o).unwrap_or_else(|| Outcome {
                    response: error_response(error, grpc, &format!("service {:?}", service.config.name)),
                    error: Some(error),
                    metrics: &service.unrouted_metrics,
                })
            }
        };
        // What goes on the wire: HTTP/2 to a peer sidecar over mTLS, whatever the app speaks.
        let wire = endpoint.state.pool.wire_protocol(protocol);
        if wire.is_h2() && authority.is_none() {
            if let Template::Keep(parts) | Template::Move(Some(parts)) = &template {
                authority = authority_for_upstream(parts);
            }
        }
        let upstream_request = match (returned.take(), &mut template) {
            // A request handed back may go to an endpoint of another kind.
            (Some(request), _) => retarget(*request, wire, &authority),
            (None, Template::Keep(parts)) => match body.for_attempt() {
                Some(attempt_body) => build_upstream_request(parts, attempt_body, wire, &authority),
                None => break,
            },
            (None, Template::Move(parts)) => match (parts.take(), body.for_attempt()) {
                (Some(parts), Some(attempt_body)) => {
                    build_upstream_request_owned(parts, attempt_body, wire, &authority)
                }
                _ => break,
            },
        };
        let may_retry = attempt < policy.attempts;
        progress.waiting_on = Some(endpoint);
        let pending = endpoint.state.ewma.start(now_nanos);
        let (pool, connect_timeout) = (&endpoint.state.pool, service.config.connect_timeout);
        // Two await points rather than one nested future: the two sends
        // then share their space in this future.
        let sent = if wire.is_h2() {
            send_http2(pool, connect_timeout, upstream_request).await.map(|response| (response, None))
        } else {
            send_http1(pool, connect_timeout, upstream_request).await
        };
        // While the request may still go again, its answer's headers wait
        // for the body to begin: an endpoint that dies in between is then a
        // broken connection to retry, not an answer cut in the caller's hands.
        let hold = retries_responses && may_retry && !policy.on.is_empty();
        let sent = match sent {
            Ok((response, release)) => {
                let answered = Answered { response, release, held: None };
                match if hold { first_frame_now(answered) } else { FirstFrame::Here(answered) } {
                    FirstFrame::Here(answered) => Ok(answered),
                    FirstFrame::Broken(error) => Err(SendError::Broken(error)),
                    // Boxed: rare, and its timer would enlarge every request's future.
                    FirstFrame::Later(answered) => Box::pin(hold_first_frame(answered)).await,
                }
            }
            Err(error) => Err(error),
        };
        now_nanos = clock::now_nanos();
        pending.finish(now_nanos);
        progress.waiting_on = None;
        progress.clock_nanos = now_nanos;
        match sent {
            Err(SendError::Connect(error, request)) => {
                record_failure(endpoint, service);
                returned = Some(request);
                if may_retry && spend_retry(service, &service.retry_metrics.connect_failure) {
                    tried.push(endpoint.addr);
                    continue;
                }
                let detail = format!("{}: {}", endpoint.addr, error.0);
                return Outcome {
                    response: error_response(ProxyError::ConnectFailed, grpc, &detail),
                    error: Some(ProxyError::ConnectFailed),
                    metrics: &endpoint.metrics,
                };
            }
            Err(SendError::Broken(error)) if caller_broken.as_ref().is_some_and(CallerBroken::get) => {
                // The caller's body broke off: the caller's fault, not the endpoint's.
                let detail = format!("reading the request body: {error}");
                return Outcome {
                    response: error_response(ProxyError::BadRequest, grpc, &detail),
                    error: Some(ProxyError::BadRequest),
                    metrics: &endpoint.metrics,
                };
            }
            Err(SendError::Broken(error)) => {
                record_failure(endpoint, service);
                let detail = format!("{}: {error}", endpoint.addr);
                let outcome = Outcome {
                    response: error_response(ProxyError::ConnectFailed, grpc, &detail),
                    error: Some(ProxyError::ConnectFailed),
                    metrics: &endpoint.metrics,
                };
                // The connection broke before an answer (the peer died): an
                // idempotent request may go again, under any retry condition.
                let retryable = retries_responses && !policy.on.is_empty();
                if retryable && may_retry && spend_retry(service, &service.retry_metrics.connect_failure) {
                    last_failure = Some(Box::new(outcome));
                    tried.push(endpoint.addr);
                    continue;
                }
                return outcome;
            }
            Ok(Answered { response, release, held }) => {
                let status = response.status();
                let grpc_unavailable = response.headers().get("grpc-status").is_some_and(|s| s == "14");
                // The peer's inbound proxy could not reach its app: the app never saw the request.
                let peer_connect_failed = status == http::StatusCode::BAD_GATEWAY
                    && response
                        .headers()
                        .get(MESH_ERROR)
                        .is_some_and(|v| v.as_bytes() == ProxyError::ConnectFailed.reason().as_bytes());
                // A loop is the mesh's configuration, not the endpoint's health.
                let peer_loop = status == http::StatusCode::LOOP_DETECTED
                    && response
                        .headers()
                        .get(MESH_ERROR)
                        .is_some_and(|v| v.as_bytes() == ProxyError::LoopDetected.reason().as_bytes());
                if peer_loop {
                    let response = finish_response(response, held, release, &endpoint.state.pool);
                    let error = Some(ProxyError::LoopDetected);
                    return Outcome { response, error, metrics: &endpoint.metrics };
                }
                if status.is_server_error() {
                    record_failure(endpoint, service);
                } else {
                    endpoint.state.breaker.record_success();
                }
                let reason = retry_reason(&policy.on, status.as_u16(), grpc_unavailable, peer_connect_failed);
                let response = finish_response(response, held, release, &endpoint.state.pool);
                let mut outcome = Outcome { response, error: None, metrics: &endpoint.metrics };
                let Some(reason) = reason.filter(|_| retries_responses && may_retry) else {
                    return outcome;
                };
                let counter = match reason {
                    RetryOn::Unavailable => &service.retry_metrics.unavailable,
                    RetryOn::ConnectFailure => &service.retry_metrics.connect_failure,
                    _ => &service.retry_metrics.server_error,
                };
                if spend_retry(service, counter) {
                    last_failure = Some(Box::new(outcome));
                    tried.push(endpoint.addr);
                    continue;
                }
                mark_error(&mut outcome.response, ProxyError::RetryBudgetExhausted);
                outcome.error = Some(ProxyError::RetryBudgetExhausted);
                return outcome;
            }
        }
    }
    last_failure.map(|o| *o).unwrap_or_else(|| Outcome {
        response: error_response(ProxyError::NoEndpoints, grpc, "no try could be made"),
        error: Some(ProxyError::NoEndpoints),
        metrics: &service.unrouted_metrics,
    })
}

fn spend_retry(service: &Service, counter: &std::sync::atomic::AtomicU64) -> bool {
    let policy = &service.config.retry;
    let spent = service.budget.try_spend_retry(
        clock::now_millis() / 1000,
        policy.budget_ratio,
        policy.budget_min_per_second,
    );
    if spent {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    spent
}

fn record_failure(endpoint: &Endpoint, service: &Service) {
    if endpoint.state.breaker.record_failure(clock::now_millis(), &service.config.breaker) {
        endpoint.state.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %service.config.name, endpoint = %endpoint.addr, "endpoint ejected by its circuit breaker");
    }
}

/// Which retry condition, if any, this response meets. A connect failure
/// arrives as a response when the peer's inbound proxy reports one.
pub fn retry_reason(
    on: &[RetryOn],
    status: u16,
    grpc_unavailable: bool,
    peer_connect_failed: bool,
) -> Option<RetryOn> {
    on.iter().copied().find(|condition| match condition {
        RetryOn::ConnectFailure => peer_connect_failed,
        RetryOn::ServerError => (500..600).contains(&status),
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::Unavailable => grpc_unavailable,
    })
}

pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn prepare_body(
    body: Incoming,
    parts: &Parts,
    keep_for_replay: bool,
) -> Result<PreparedBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(PreparedBody::Replayable(None));
    }
    let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        Some(length) if keep_for_replay && length <= MAX_REPLAY_BODY => {
            let bytes = body.collect().await?.to_bytes();
            Ok(PreparedBody::Replayable(if bytes.is_empty() { None } else { Some(bytes) }))
        }
        _ => Ok(PreparedBody::Streaming(Some(CallerBody::new(body)))),
    }
}

/// The authority the upstream sees: the one the caller used.
fn authority_for_upstream(parts: &Parts) -> Option<Authority> {
    if let Some(authority) = parts.uri.authority() {
        return Some(authority.clone());
    }
    parts.headers.get(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok())
}

/// Builds a try's request from kept parts. The headers parsed from the
/// caller go out and a copy stays behind: hyper reuses the sent map to
/// parse the answer, and a copy has no spare capacity (it would grow twice
/// per response).
fn build_upstream_request(
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
fn build_upstream_request_owned(
    parts: Parts,
    body: RequestBody,
    protocol: Protocol,
    authority: &Option<Authority>,
) -> Request<RequestBody> {
    retarget(Request::from_parts(parts, body), protocol, authority)
}

/// Sets the version, URI form and host for the upstream's protocol: origin
/// form and `Host` for HTTP/1.1, absolute URI (`:authority`) for HTTP/2.
fn retarget(
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
async fn send_http2(
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
                None => return Err(SendError::Broken(error.into_error())),
            },
        }
    }
    let error = std::io::Error::other("the HTTP/2 connection closed twice before the request could be sent");
    Err(SendError::Connect(ConnectError(error), Box::new(request)))
}

/// Sends on a pooled HTTP/1 connection. One that the server closed
/// meanwhile hands the request back, and it goes out on a fresh
/// connection without counting as a retry.
async fn send_http1(
    pool: &ConnPool,
    connect_timeout: std::time::Duration,
    request: Request<RequestBody>,
) -> Result<(Response<Incoming>, Option<Http1Sender>), SendError> {
    let request = match pool.take_http1() {
        Some(mut sender) => match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, Some(sender))),
            Err(mut error) => match error.take_message() {
                Some(unsent) => unsent,
                None => return Err(SendError::Broken(error.into_error())),
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
        Err(error) => Err(SendError::Broken(error.into_error())),
    }
}

/// An endpoint's answer as the retry loop gets it.
struct Answered {
    response: Response<Incoming>,
    /// The HTTP/1 connection it came on, pooled again once the body is read.
    release: Option<Http1Sender>,
    /// The body's first frame, read ahead while the request could go again.
    held: Option<HeldFrame>,
}

/// How long an answer's headers wait for its body to begin. An answer that
/// begins later (a stream, a long poll) is passed on as it comes, and can
/// no longer be retried once it has.
pub const FIRST_FRAME_HOLD: std::time::Duration = std::time::Duration::from_millis(200);

/// What an answer's body showed at once.
enum FirstFrame {
    /// Its first frame (held) or its end came with the headers.
    Here(Answered),
    /// The connection broke before the body began.
    Broken(hyper::Error),
    /// Nothing yet.
    Later(Answered),
}

/// Reads the body's first frame ahead if it is already here (most bodies
/// arrive with their headers), without a timer or a wake-up. Owned in and
/// out, so the request's future keeps no answer across an await.
fn first_frame_now(mut answered: Answered) -> FirstFrame {
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
async fn hold_first_frame(mut answered: Answered) -> Result<Answered, SendError> {
    match tokio::time::timeout(FIRST_FRAME_HOLD, answered.response.body_mut().frame()).await {
        Ok(Some(Ok(frame))) => answered.held = HeldFrame::new(frame),
        Ok(Some(Err(error))) => return Err(SendError::Broken(error)),
        Ok(None) | Err(_) => {}
    }
    Ok(answered)
}

fn finish_response(
    response: Response<Incoming>,
    held: Option<HeldFrame>,
    release: Option<Http1Sender>,
    pool: &Arc<ConnPool>,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let release = release.map(|sender| (pool.clone(), sender));
    Response::from_parts(parts, ResponseBody::upstream(body, held, release))
}

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
    (Response::from_parts(parts, ResponseBody::upstream(body, None, None)), None)
}

/// Forwards an inbound request to the local app: one try, no balancing,
/// keeping the caller's protocol (HTTP/2 stays HTTP/2).
pub async fn forward_inbound(
    snapshot: Arc<crate::snapshot::Snapshot>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let inbound = &snapshot.inbound;
    let started = Instant::now();
    let grpc = is_grpc(request.headers());
    let version = request.version();
    let Some(app) = inbound.app else {
        let error = ProxyError::NoEndpoints;
        inbound.metrics.record(error.status().as_u16(), Some(error), started.elapsed());
        return error_response(error, grpc, "no local app is configured (listen.app)");
    };
    if is_upgrade(&request) {
        // Boxed: upgrades are rare, and their future would enlarge every request's.
        let (response, error) =
            Box::pin(upgrade_on(&inbound.state, crate::config::DEFAULT_CONNECT_TIMEOUT, request)).await;
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
    let body = CallerBody::new(body);
    let caller_broken = body.broken_flag();
    let upstream_request =
        build_upstream_request_owned(parts, RequestBody::Streaming(body), protocol, &authority);
    let (pool, connect_timeout) = (&inbound.state.pool, crate::config::DEFAULT_CONNECT_TIMEOUT);
    let sent = if protocol.is_h2() {
        send_http2(pool, connect_timeout, upstream_request).await.map(|response| (response, None))
    } else {
        send_http1(pool, connect_timeout, upstream_request).await
    };
    let (mut response, error) = match sent {
        Ok((response, release)) => (finish_response(response, None, release, &inbound.state.pool), None),
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
mod tests {
    use super::*;

    #[test]
    fn retry_conditions_match_statuses() {
        use RetryOn::*;
        // (conditions, status, grpc UNAVAILABLE, peer connect failure, expected reason)
        type Case<'a> = (&'a [RetryOn], u16, bool, bool, Option<RetryOn>);
        let table: &[Case] = &[
            (&[ConnectFailure], 503, false, false, None),
            (&[ConnectFailure], 502, false, true, Some(ConnectFailure)),
            (&[ServerError], 502, false, true, Some(ServerError)),
            (&[ConnectFailure, ServerError], 500, false, false, Some(ServerError)),
            (&[ServerError], 200, false, false, None),
            (&[GatewayError], 500, false, false, None),
            (&[GatewayError], 503, false, false, Some(GatewayError)),
            (&[Unavailable], 200, true, false, Some(Unavailable)),
            (&[Unavailable], 200, false, false, None),
        ];
        for (on, status, unavailable, peer, want) in table {
            assert_eq!(retry_reason(on, *status, *unavailable, *peer), *want, "{on:?} {status} {peer}");
        }
    }

    #[test]
    fn idempotent_methods() {
        for (method, want) in
            [(Method::GET, true), (Method::PUT, true), (Method::POST, false), (Method::PATCH, false)]
        {
            assert_eq!(is_idempotent(&method), want, "{method}");
        }
    }
}
#[cfg(test)]
mod future_sizes {
    //! Every request's future is moved a few times (into hyper, into its
    //! task); each move copies it whole. Rare paths (new connections,
    //! upgrades, retries' state) are boxed to keep it small.

    fn size_of_future<A, B, C, F>(_f: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_request_futures_stay_small() {
        let outbound = size_of_future(super::forward);
        // 2 544 before answers were held for their first body frame: the
        // await on a body slow to begin keeps about 180 bytes more.
        assert!(outbound <= 2752, "an outbound request's future takes {outbound} bytes");
        let inbound = size_of_future(|s, r, ()| super::forward_inbound(s, r));
        assert!(inbound <= 2048, "an inbound request's future takes {inbound} bytes");
    }
}
