//! The HTTP side of mesh-echo: echo answers, health paths, the control path
//! and a raw byte echo after an `Upgrade`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::Rng;

use crate::knobs::KnobsUpdate;
use crate::Shared;

pub type EchoBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(bytes: impl Into<Bytes>) -> EchoBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn reply(shared: &Shared, status: StatusCode, body: impl Into<Bytes>) -> Response<EchoBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&shared.version) {
        headers.insert("x-version", v);
    }
    if let Ok(v) = HeaderValue::from_str(&shared.instance) {
        headers.insert("x-instance", v);
    }
    response
}

pub async fn handle(
    shared: Arc<Shared>,
    grpc: tonic::service::Routes,
    request: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    if request.uri().path() == "/_echo/stats" {
        let stats = &shared.stats;
        let body = serde_json::json!({
            "connections": stats.connections.load(Ordering::Relaxed),
            "requests": stats.requests.load(Ordering::Relaxed),
            "in_flight": stats.in_flight.load(Ordering::Relaxed),
        });
        return Ok(reply(&shared, StatusCode::OK, format!("{body}\n")));
    }
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    // Counted down however the request ends, even if the caller goes away.
    let _in_flight = InFlight(&shared.stats.in_flight);
    answer(&shared, grpc, request).await
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn answer(
    shared: &Arc<Shared>,
    grpc: tonic::service::Routes,
    request: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    let shared = shared.clone();
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return Ok(crate::grpc::serve(&shared, grpc, request).await);
    }
    let knobs = shared.knobs.load_full();
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/ready") => {
            let status = if knobs.not_ready { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            return Ok(reply(&shared, status, format!("{{\"ready\":{}}}\n", !knobs.not_ready)));
        }
        (&Method::GET, "/live") => {
            let status = if knobs.not_live { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            return Ok(reply(&shared, status, format!("{{\"live\":{}}}\n", !knobs.not_live)));
        }
        (&Method::GET, "/_echo/config") => {
            let body = serde_json::to_string(&*knobs).unwrap_or_default();
            return Ok(reply(&shared, StatusCode::OK, body));
        }
        (&Method::POST, "/_echo/config") => return Ok(update_knobs(&shared, request).await),
        _ => {}
    }
    if knobs.hang {
        std::future::pending::<()>().await;
    }
    if request.headers().contains_key(header::UPGRADE) {
        return Ok(upgrade_to_raw_echo(&shared, request));
    }
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body_bytes = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => return Ok(reply(&shared, StatusCode::BAD_REQUEST, "{\"error\":\"body\"}\n")),
    };
    let failed = knobs.fail_rate > 0.0 && rand::rng().random::<f64>() < knobs.fail_rate;
    let status = if failed { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    let body = serde_json::json!({
        "method": method,
        "path": path,
        "headers": headers,
        "body_bytes": body_bytes,
        "version": shared.version,
        "instance": shared.instance,
        "message": shared.message,
    });
    Ok(reply(&shared, status, format!("{body}\n")))
}

async fn update_knobs(shared: &Shared, request: Request<Incoming>) -> Response<EchoBody> {
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return reply(shared, StatusCode::BAD_REQUEST, format!("{{\"error\":\"{e}\"}}\n")),
    };
    let update: KnobsUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            let error = serde_json::json!({ "error": e.to_string() });
            return reply(shared, StatusCode::BAD_REQUEST, format!("{error}\n"));
        }
    };
    match shared.knobs.load().updated(update) {
        Ok(next) => {
            let body = serde_json::to_string(&next).unwrap_or_default();
            shared.knobs.store(Arc::new(next));
            reply(shared, StatusCode::OK, body)
        }
        Err(e) => reply(shared, StatusCode::BAD_REQUEST, serde_json::json!({ "error": e }).to_string()),
    }
}

/// Answers an upgrade with 101 and then echoes raw bytes, which is enough to
/// show that a proxy passes upgraded connections through untouched.
fn upgrade_to_raw_echo(shared: &Shared, mut request: Request<Incoming>) -> Response<EchoBody> {
    let protocol = request.headers().get(header::UPGRADE).cloned();
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let (mut reader, mut writer) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        }
    });
    let mut response = reply(shared, StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    response.headers_mut().remove("content-type");
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(protocol) = protocol {
        response.headers_mut().insert(header::UPGRADE, protocol);
    }
    response
}
