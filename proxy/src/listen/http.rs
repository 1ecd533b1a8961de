//! HTTP listeners: outbound (routes by authority), per-upstream (one fixed
//! service) and inbound (to the local app). HTTP/1.1 and HTTP/2 with prior
//! knowledge are told apart by the connection preface.
//!
//! On shutdown a listener stops accepting, sends GOAWAY on HTTP/2
//! connections, closes HTTP/1 connections after their request in flight,
//! and returns once every connection has finished.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::deadline::ConnectionTimers;
use crate::http::inbound::forward_inbound;
use crate::http::outbound::forward;
use crate::http::route::{has_several_hosts, routing_authority, service_name};
use crate::http::routed::Routed;
use crate::http::upgrade::{forward_upgrade, is_upgrade};
use crate::http::{error_response, is_grpc};
use crate::listen::drain::Drain;
use crate::listen::request_line::FirstLineLimit;
use crate::listen::{next_connection, ConnectionLimits, ShutdownSignal, Slots};
use crate::proxy::Proxy;

/// Which requests a listener serves.
#[derive(Clone)]
pub enum Role {
    /// The app's calls to any service, named by the request's authority.
    Outbound,
    /// The app's calls through a per-upstream port: always this service.
    Upstream(Arc<str>),
    /// Peers' calls to the local app.
    Inbound,
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_HANDSHAKE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// One connection to a meshed inbound listener: a TLS hello goes through
/// the mTLS handshake (peer certificate from the trust bundle required);
/// anything else is plaintext, served only if the local service is set
/// permissive and otherwise answered 403 `authz-denied`.
async fn serve_meshed_inbound(
    stream: tokio::net::TcpStream,
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    drain: Arc<Drain>,
    first_byte_within: std::time::Duration,
) {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(first_byte_within, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    // Each request is checked against the local service's policy in force,
    // so a change of permissive or allow-from applies to the next request
    // of every open connection, kept-alive ones included.
    let service = |proxy: Arc<Proxy>, plaintext: bool, caller: Option<Arc<str>>| {
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let refusal = if plaintext && !proxy.local_service_permissive() {
                Some("this inbound port takes mTLS from mesh proxies only".to_owned())
            } else {
                proxy.refuse_caller(caller.as_deref())
            };
            match refusal {
                Some(detail) => {
                    let grpc = is_grpc(request.headers());
                    Handled::answer(authz_denied(&proxy, caller.as_deref(), &detail, grpc))
                }
                None => handle_inbound(&proxy, caller.as_deref(), request),
            }
        })
    };
    if first[0] != TLS_HANDSHAKE {
        let stream = FirstLineLimit::new(stream);
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(stream), service(proxy, true, None));
        let _ = drain.watch(connection.into_owned()).await;
        return;
    }
    let Some(tls) = proxy.long_lived.tls.load_full() else { return };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    let accepted = tokio::time::timeout(TLS_HANDSHAKE_WITHIN, acceptor.accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => {
            tls.record_handshake(crate::tls::Side::Inbound, true);
            stream
        }
        Ok(Err(error)) => {
            tls.record_handshake(crate::tls::Side::Inbound, false);
            tracing::info!(%error, "refused a TLS peer");
            return;
        }
        Err(_) => {
            tls.record_handshake(crate::tls::Side::Inbound, false);
            return;
        }
    };
    // The caller is who its certificate names.
    let caller = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| crate::tls::uri_names(cert).into_iter().next())
        .map(Arc::<str>::from);
    let connection =
        builder.serve_connection_with_upgrades(TokioIo::new(stream), service(proxy, false, caller));
    let _ = drain.watch(connection.into_owned()).await;
}

/// Streams one HTTP/2 connection may have open at once (hyper's default).
const MAX_CONCURRENT_STREAMS: u32 = 200;

pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    role: Role,
    limits: ConnectionLimits,
    mut shutdown: ShutdownSignal,
) {
    let drain = Arc::new(Drain::default());
    let slots = Slots::new(&limits);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Peers get 30 s to send a request's headers (slow-loris). The local
    // app on the loopback-only outbound side is trusted, and a header timer
    // costs a timer-wheel entry and an allocation on every request.
    let header_read_timeout = match role {
        Role::Inbound => Some(std::time::Duration::from_secs(30)),
        Role::Outbound | Role::Upstream(_) => None,
    };
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout);
    // A caller may cancel every stream it has open at once (its own client
    // went away), and on a lossy link the requests and their cancels arrive
    // in one burst, before any was taken up. h2's default of 20 such streams
    // (its rapid-reset guard) answered that with GOAWAY, failing the
    // caller's other requests; twice the stream limit still bounds it.
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(2 * MAX_CONCURRENT_STREAMS as usize);
    loop {
        let Some(stream) = next_connection(&listener, &mut shutdown).await else { break };
        let Some(slot) = slots.take(&proxy.long_lived.metrics) else {
            tracing::debug!("listener full: a new connection is closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        if matches!(role, Role::Inbound) && proxy.needs_identity.load(std::sync::atomic::Ordering::Acquire) {
            // A meshed inbound: mTLS from peers, plaintext only when permissive.
            let serving = serve_meshed_inbound(
                stream,
                proxy.clone(),
                builder.clone(),
                drain.clone(),
                limits.first_byte_within,
            );
            tokio::spawn(async move {
                serving.await;
                drop(slot);
            });
            continue;
        }
        let proxy = proxy.clone();
        match &role {
            Role::Inbound => {
                let service =
                    hyper::service::service_fn(move |request| handle_inbound(&proxy, None, request));
                let (builder, drain) = (builder.clone(), drain.clone());
                tokio::spawn(async move {
                    // A peer that connects and says nothing holds no slot for long.
                    let mut first = [0u8; 1];
                    let peeked =
                        tokio::time::timeout(limits.first_byte_within, stream.peek(&mut first)).await;
                    if matches!(peeked, Ok(Ok(1))) {
                        spawn_connection(&builder, &drain, stream, service, slot);
                    }
                });
            }
            Role::Outbound => {
                let timers = Arc::new(ConnectionTimers::default());
                let service = hyper::service::service_fn(move |request| {
                    handle_outbound(&proxy, None, &timers, request)
                });
                spawn_connection(&builder, &drain, stream, service, slot);
            }
            Role::Upstream(name) => {
                let (name, timers) = (name.clone(), Arc::new(ConnectionTimers::default()));
                let service = hyper::service::service_fn(move |request| {
                    handle_outbound(&proxy, Some(&name), &timers, request)
                });
                spawn_connection(&builder, &drain, stream, service, slot);
            }
        }
    }
    drop(listener);
    drain.start().await;
}

fn spawn_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    drain: &Arc<Drain>,
    stream: tokio::net::TcpStream,
    service: S,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let stream = FirstLineLimit::new(stream);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
    let connection = drain.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
        drop(slot);
    });
}

pin_project_lite::pin_project! {
    /// A request's answer: made at once, or the forwarding future held
    /// inline. Routing is done before any future exists, so the future
    /// hyper keeps per request is the forwarding one and nothing wraps it
    /// (a wrapping async block would copy it once more per request).
    #[project = HandledProjection]
    pub enum Handled<F> {
        Answered { response: Option<Response<ResponseBody>> },
        Forwarding { #[pin] future: F },
        // Rare paths (protocol upgrades) keep their own future on the heap.
        Boxed { future: Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>> },
    }
}

impl<F> Handled<F> {
    fn answer(response: Response<ResponseBody>) -> Self {
        Handled::Answered { response: Some(response) }
    }
}

impl<F: Future<Output = Response<ResponseBody>>> Future for Handled<F> {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            HandledProjection::Answered { response } => response.take().expect("polled after completion"),
            HandledProjection::Forwarding { future } => std::task::ready!(future.poll(cx)),
            HandledProjection::Boxed { future } => std::task::ready!(future.as_mut().poll(cx)),
        };
        Poll::Ready(Ok(response))
    }
}

/// The 400 for a request with several `Host` headers. The connection is
/// closed after it: a peer that frames requests this way is not trusted
/// to frame the next one right.
fn several_hosts_answer(grpc: bool) -> Response<ResponseBody> {
    let mut response = error_response(ProxyError::BadRequest, grpc, "more than one Host header");
    response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// Peers' calls to the local app, from `caller` (its SPIFFE ID; `None`
/// for plaintext).
fn handle_inbound(
    proxy: &Proxy,
    caller: Option<&str>,
    request: Request<Incoming>,
) -> Handled<impl Future<Output = Response<ResponseBody>>> {
    let snapshot = arc_swap::Guard::into_inner(proxy.table.load());
    if has_several_hosts(request.headers()) {
        let error = ProxyError::BadRequest;
        snapshot.inbound.metrics.record(error.status().as_u16(), Some(error), Default::default());
        return Handled::answer(several_hosts_answer(is_grpc(request.headers())));
    }
    if let Some(answer) = over_rate_limit(&snapshot, caller, || is_grpc(request.headers())) {
        return Handled::answer(answer);
    }
    Handled::Forwarding { future: forward_inbound(snapshot, request) }
}

/// The 403 for a caller the local service's policy refuses, counted. The
/// TCP and the QUIC inbound both answer with it.
pub(crate) fn authz_denied(
    proxy: &Proxy,
    caller: Option<&str>,
    detail: &str,
    grpc: bool,
) -> Response<ResponseBody> {
    proxy.long_lived.metrics.record_authz_denied(caller.unwrap_or("plaintext"));
    error_response(ProxyError::AuthzDenied, grpc, detail)
}

/// The 429 (counted) when the local service's rate limit refuses a
/// request from `caller`; `None` when it is admitted or there is no limit.
pub(crate) fn over_rate_limit(
    snapshot: &crate::snapshot::Snapshot,
    caller: Option<&str>,
    grpc: impl FnOnce() -> bool,
) -> Option<Response<ResponseBody>> {
    let refused = snapshot.inbound.rate_limit.as_ref()?.admit(caller, crate::clock::now_nanos()).err()?;
    let error = ProxyError::RateLimited;
    snapshot.inbound.metrics.record(error.status().as_u16(), Some(error), Default::default());
    Some(rate_limited_answer(refused, grpc()))
}

/// The 429 for a request over a rate limit, with when to come back.
fn rate_limited_answer(refused: crate::policy::rate_limit::Refused, grpc: bool) -> Response<ResponseBody> {
    let detail = match refused.limit {
        crate::policy::rate_limit::Limit::Overall => "the service's rate limit for all callers is reached",
        crate::policy::rate_limit::Limit::Caller => "the service's rate limit for this caller is reached",
    };
    let mut response = error_response(ProxyError::RateLimited, grpc, detail);
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(refused.retry_after_secs));
    response
}

/// The app's calls: to the service its authority names, or to `fixed` (a
/// per-upstream port).
fn handle_outbound(
    proxy: &Arc<Proxy>,
    fixed: Option<&str>,
    timers: &Arc<ConnectionTimers>,
    request: Request<Incoming>,
) -> Handled<impl Future<Output = Response<ResponseBody>>> {
    let snapshot = proxy.table.load();
    // One lookup of Host serves both the check for several and the routing.
    let Ok(authority) = routing_authority(&request) else {
        let error = ProxyError::BadRequest;
        snapshot.unknown_service_metrics.record(error.status().as_u16(), Some(error), Default::default());
        return Handled::answer(several_hosts_answer(is_grpc(request.headers())));
    };
    let name = match fixed {
        Some(name) => name,
        None => match authority {
            Some(authority) => service_name(authority),
            None => {
                let error = ProxyError::UnknownService;
                snapshot.unknown_service_metrics.record(
                    error.status().as_u16(),
                    Some(error),
                    Default::default(),
                );
                let grpc = is_grpc(request.headers());
                return Handled::answer(error_response(
                    error,
                    grpc,
                    "the request names no service (no Host)",
                ));
            }
        },
    };
    let Some(service) = snapshot.services.get(name).cloned() else {
        let error = ProxyError::UnknownService;
        snapshot.unknown_service_metrics.record(error.status().as_u16(), Some(error), Default::default());
        let detail = format!("no service {name:?} in routing table version {}", snapshot.version);
        return Handled::answer(error_response(error, is_grpc(request.headers()), &detail));
    };
    drop(snapshot);
    if crate::http::hold::should_hold(&service) {
        let (proxy, timers) = (proxy.clone(), timers.clone());
        let held = crate::http::hold::hold_then_forward(proxy, service, request, timers);
        return Handled::Boxed { future: Box::pin(held) };
    }
    if is_upgrade(&request) {
        return Handled::Boxed { future: Box::pin(forward_upgrade(service, request)) };
    }
    if let Some(routes) = &service.routes {
        return match crate::http::routed::route(&service, routes, request, timers) {
            Routed::Forward(target, request) => {
                Handled::Forwarding { future: forward(target, request, timers.clone()) }
            }
            Routed::Answer(response) => Handled::answer(response),
            Routed::Boxed(future) => Handled::Boxed { future },
        };
    }
    {
        Handled::Forwarding { future: forward(service, request, timers.clone()) }
    }
}
