//! The admin listener: `/metrics`, `/ready`, `/live`, `/config`.

use crate::listen::quic::QuicInbound;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::clock;
use crate::metrics::Detail;
use crate::proxy::Proxy;

/// Serves until the process exits: during a drain `/ready` answers 503 and
/// `/metrics` keeps counting, so the admin listener does not stop early.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(&proxy, request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(proxy: &Proxy, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let snapshot = proxy.table.load();
            let upstream = proxy.long_lived.upstream_connections();
            let body = proxy.long_lived.metrics.render(
                &snapshot.endpoint_counts(clock::now_millis()),
                snapshot.version,
                upstream,
                Detail::from_query(request.uri().query()),
            );
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/ready" if proxy.draining.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/ready" if proxy.needs_identity.load(Ordering::Acquire) && proxy.identity.load().is_none() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "waiting for a certificate\n")
        }
        "/ready" if !proxy.has_table.load(Ordering::Acquire) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "waiting for a routing table from the control plane\n")
        }
        "/ready" if QuicInbound::now() == QuicInbound::Starting => {
            text(StatusCode::SERVICE_UNAVAILABLE, "starting the QUIC inbound\n")
        }
        "/ready" => {
            let mut response = text(StatusCode::OK, "ready\n");
            // The agent announces an endpoint's QUIC in discovery from this.
            if QuicInbound::now() == QuicInbound::Serving {
                response.headers_mut().insert("x-mesh-quic", HeaderValue::from_static("1"));
            }
            response
        }
        "/live" => text(StatusCode::OK, "live\n"),
        "/config" => {
            let snapshot = proxy.table.load();
            let mut config = serde_json::json!(&*snapshot.settings);
            let mut services: Vec<_> = snapshot.services.values().map(|s| &s.config).collect();
            services.sort_by(|a, b| a.name.cmp(&b.name));
            config["services"] = serde_json::json!(services);
            let body = serde_json::json!({ "version": snapshot.version, "config": config });
            let mut response = text(StatusCode::OK, format!("{body:#}\n"));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /ready, /live or /config\n"),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
