//! Mirroring as a tower layer: a copy of the request goes to the mirror
//! on a task of its own, when the mirror has room and the body can be
//! copied; the request itself goes on to the service below unchanged.
//! Nothing the primary does waits for the copy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service, ServiceExt};

use crate::clock;
use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::outbound::{forward_from, BodySource, MAX_REPLAY_BODY};
use crate::http::{error_response, is_grpc};
use crate::policy::routes::{Mirror as MirrorTarget, RouteMetrics};

/// A copy's answer is read up to this much, so its connection can be reused.
const MIRROR_ANSWER_READ: usize = 1024 * 1024;

#[derive(Clone)]
pub struct MirrorLayer {
    pub target: Arc<MirrorTarget>,
    pub metrics: Arc<RouteMetrics>,
}

impl<S> Layer<S> for MirrorLayer {
    type Service = Mirror<S>;

    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror { layer: self.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Mirror<S> {
    layer: MirrorLayer,
    inner: S,
}

impl<S> Service<Request<BodySource>> for Mirror<S>
where
    S: Service<Request<BodySource>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BodySource>) -> Self::Future {
        let (layer, inner) = (self.layer.clone(), self.inner.clone());
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match copy(&layer, &parts, body).await {
                Ok(body) => body,
                Err(response) => return Ok(response),
            };
            inner.oneshot(Request::from_parts(parts, body)).await
        })
    }
}

/// Gives back a mirror's slot when its copy is done.
struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts the copy, when there is room and the body can be copied, and
/// returns the body for the request itself.
async fn copy(
    layer: &MirrorLayer,
    parts: &Parts,
    body: BodySource,
) -> Result<BodySource, Response<ResponseBody>> {
    let (mirror, metrics) = (&layer.target, &layer.metrics);
    let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let empty = match &body {
        BodySource::Caller(incoming) => incoming.is_end_stream(),
        BodySource::Read(bytes) => bytes.is_none(),
    };
    if !empty && length.is_none_or(|l| l > MAX_REPLAY_BODY) {
        metrics.mirror_body.fetch_add(1, Ordering::Relaxed);
        return Ok(body);
    }
    if mirror.in_flight.fetch_add(1, Ordering::Relaxed) >= mirror.max_in_flight {
        mirror.in_flight.fetch_sub(1, Ordering::Relaxed);
        metrics.mirror_busy.fetch_add(1, Ordering::Relaxed);
        return Ok(body);
    }
    let slot = Slot(mirror.in_flight.clone());
    let bytes: Option<Bytes> = match body {
        BodySource::Read(bytes) => bytes,
        BodySource::Caller(incoming) if incoming.is_end_stream() => None,
        BodySource::Caller(incoming) => match incoming.collect().await {
            Ok(collected) => Some(collected.to_bytes()).filter(|b| !b.is_empty()),
            Err(error) => {
                let detail = format!("reading the request body: {error}");
                return Err(error_response(ProxyError::BadRequest, is_grpc(&parts.headers), &detail));
            }
        },
    };
    metrics.mirrored.fetch_add(1, Ordering::Relaxed);
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    copy.headers_mut().insert("x-mesh-mirrored", HeaderValue::from_static("1"));
    let (copy, ()) = copy.into_parts();
    let (target, timers, copied) =
        (mirror.target.clone(), mirror.timers.clone(), BodySource::Read(bytes.clone()));
    tokio::spawn(async move {
        let response = forward_from(target, copy, copied, timers, clock::now_nanos()).await;
        // Read to the end (within a bound) so that the connection goes back to its pool.
        let body = response.into_body();
        if body.size_hint().lower() <= MIRROR_ANSWER_READ as u64 {
            let _ = Limited::new(body, MIRROR_ANSWER_READ).collect().await;
        }
        drop(slot);
    });
    Ok(BodySource::Read(bytes))
}
