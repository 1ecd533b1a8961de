//! The control plane's HTTP admin listener: `/metrics` and `/ready`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::ControlPlane;

pub async fn serve(listener: TcpListener, control: Arc<ControlPlane>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let control = control.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let control = control.clone();
                async move {
                    let (status, body) = match request.uri().path() {
                        "/metrics" => (StatusCode::OK, control.metrics.render()),
                        // Not ready while the store refuses writes: every change would fail.
                        "/ready" if !control.store().writable() => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: the store cannot be written (see meshd's log)\n".to_owned(),
                        ),
                        "/ready" => (StatusCode::OK, "ready\n".to_owned()),
                        _ => (StatusCode::NOT_FOUND, "not found; try /metrics or /ready\n".to_owned()),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
