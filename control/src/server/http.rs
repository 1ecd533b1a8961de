//! The control plane's HTTP admin listener: `/metrics`, `/ready`, and
//! `/prometheus/targets` (Prometheus HTTP service discovery).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::jobs::Scheduler;
use crate::server::{prometheus_sd, ControlPlane};

pub async fn serve(listener: TcpListener, control: Arc<ControlPlane>, scheduler: Arc<Scheduler>) {
    let own = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (control, scheduler, own) = (control.clone(), scheduler.clone(), own.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (control, scheduler, own) = (control.clone(), scheduler.clone(), own.clone());
                async move {
                    let (status, body) = match request.uri().path() {
                        "/metrics" => (StatusCode::OK, control.metrics.render()),
                        "/prometheus/targets" => {
                            let targets =
                                prometheus_sd::targets(&own, &control.proxies(), &scheduler.instances_now());
                            (StatusCode::OK, targets.to_string())
                        }
                        // Not ready while the store refuses writes: every change would fail.
                        "/ready" if !control.store().writable() => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the store cannot be written (see meshd's log)\n".to_owned(),
                        ),
                        "/ready" => (StatusCode::OK, "ready\n".to_owned()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "not found; try /metrics, /ready or /prometheus/targets\n".to_owned(),
                        ),
                    };
                    // Prometheus takes service discovery answers only as JSON.
                    let json = request.uri().path() == "/prometheus/targets";
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    if json {
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
