//! Forwarding one outbound request: choose an endpoint, send, classify the
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

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::clock;
use crate::config::{RetryOn, Transport};
use crate::errors::ProxyError;
use crate::http::body::{CallerBody, CallerBroken, RequestBody, ResponseBody, UpstreamBody};
use crate::http::deadline::ConnectionTimers;
use crate::http::hops::{count_hop, MAX_HOPS};
use crate::http::retry::{is_idempotent, next_step, Tried};
use crate::http::send::{
    authority_for_upstream, build_upstream_request, build_upstream_request_owned, finish_response,
    first_frame_now, hold_first_frame, retarget, send_http1, send_http2, send_quic_or_tcp, Answered,
    FirstFrame, SendError,
};
use crate::http::{error_response, is_grpc, mark_error, strip_hop_by_hop, MESH_ERROR};
use crate::metrics::HttpMetrics;
use crate::snapshot::{Endpoint, Service};

/// Bodies up to this size are kept so the request can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

thread_local! {
    pub(crate) static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
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

/// The answer of a forwarded request and what to record about it.
struct Outcome<'s> {
    response: Response<ResponseBody>,
    error: Option<ProxyError>,
    metrics: &'s HttpMetrics,
}

/// A request's body as the forward gets it: the caller's stream, or bytes
/// already read (a request that was mirrored, or is itself a copy).
pub enum BodySource {
    Caller(Incoming),
    Read(Option<Bytes>),
}

impl BodySource {
    fn is_end_stream(&self) -> bool {
        match self {
            BodySource::Caller(body) => body.is_end_stream(),
            BodySource::Read(bytes) => bytes.is_none(),
        }
    }
}

/// Forwards an outbound request to `service` and records its metrics,
/// under the service's timeout (timed by one of the connection's timers).
pub fn forward(
    service: Arc<Service>,
    request: Request<Incoming>,
    timers: Arc<ConnectionTimers>,
) -> impl Future<Output = Response<ResponseBody>> {
    let (parts, body) = request.into_parts();
    forward_from(service, parts, BodySource::Caller(body), timers, clock::now_nanos())
}

/// `forward` of a request in parts, whose latency counts from `started`
/// (a `clock::now_nanos` reading: an injected delay before it counts).
pub async fn forward_from(
    service: Arc<Service>,
    parts: Parts,
    body: BodySource,
    timers: Arc<ConnectionTimers>,
    started: u64,
) -> Response<ResponseBody> {
    let grpc = is_grpc(&parts.headers);
    let version = parts.version;
    let mut progress = Progress { waiting_on: None, clock_nanos: started };
    let answered = {
        // Pinned here rather than moved into a timeout wrapper: the tries'
        // future is large, and each move copies it.
        let mut tries = std::pin::pin!(attempts(&service, parts, body, grpc, &mut progress));
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
    mut parts: Parts,
    body: BodySource,
    grpc: bool,
    progress: &mut Progress<'s>,
) -> Outcome<'s> {
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
        let attempts_left = attempt < policy.attempts;
        let next = |tried| next_step(tried, &policy.on, retries_responses, attempts_left);
        progress.waiting_on = Some(endpoint);
        let pending = endpoint.state.ewma.start(now_nanos);
        let (pool, connect_timeout) = (&endpoint.state.pool, service.config.connect_timeout);
        // Two await points rather than one nested future: the two sends
        // then share their space in this future. A peer of a service
        // reached over QUIC takes a third, boxed: opt-in, and its future
        // would enlarge every request's.
        let sent = if endpoint.quic && service.config.transport == Transport::Quic {
            Box::pin(send_quic_or_tcp(pool, connect_timeout, upstream_request, wire, idempotent)).await
        } else if wire.is_h2() {
            send_http2(pool, connect_timeout, upstream_request)
                .await
                .map(|response| (response.map(UpstreamBody::Hyper), None))
        } else {
            send_http1(pool, connect_timeout, upstream_request)
                .await
                .map(|(response, release)| (response.map(UpstreamBody::Hyper), release))
        };
        // While the request may still go again, its answer's headers wait
        // for the body to begin: an endpoint that dies in between is then a
        // broken connection to retry, not an answer cut in the caller's hands.
        let hold = next(Tried::Broken).is_some();
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
                if next(Tried::ConnectFailed).is_some_and(|on| spend_retry(service, on)) {
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
                if next(Tried::Broken).is_some_and(|on| spend_retry(service, on)) {
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
                let answer =
                    Tried::Answered { status: status.as_u16(), grpc_unavailable, peer_connect_failed };
                let response = finish_response(response, held, release, &endpoint.state.pool);
                let mut outcome = Outcome { response, error: None, metrics: &endpoint.metrics };
                let Some(on) = next(answer) else {
                    return outcome;
                };
                if spend_retry(service, on) {
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

/// Takes a retry from the service's budget, counted under its condition.
fn spend_retry(service: &Service, on: RetryOn) -> bool {
    let counter = match on {
        RetryOn::Unavailable => &service.retry_metrics.unavailable,
        RetryOn::ConnectFailure => &service.retry_metrics.connect_failure,
        RetryOn::ServerError | RetryOn::GatewayError => &service.retry_metrics.server_error,
    };
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

async fn prepare_body(
    body: BodySource,
    parts: &Parts,
    keep_for_replay: bool,
) -> Result<PreparedBody, hyper::Error> {
    let body = match body {
        BodySource::Read(bytes) => return Ok(PreparedBody::Replayable(bytes)),
        BodySource::Caller(body) => body,
    };
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

#[cfg(test)]
mod future_size {
    //! Every request's future is moved a few times (into hyper, into its
    //! task); each move copies it whole. Rare paths (new connections,
    //! upgrades, retries' state) are boxed to keep it small.

    #[test]
    fn the_outbound_future_stays_small() {
        fn size_of_future<A, B, C, F>(_f: impl Fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let outbound = size_of_future(super::forward);
        // 2 544 before answers were held for their first body frame: the
        // await on a body slow to begin keeps about 180 bytes more.
        assert!(outbound <= 2752, "an outbound request's future takes {outbound} bytes");
    }
}
