//! Holding a request for a service that has no ready instance (one that
//! scales to zero): it waits, bounded in time and in count, for a routing
//! table in which an endpoint is ready, then goes out as any other.
//!
//! Held requests count as the service's outbound requests in flight, so
//! the traffic summary tells meshd that callers wait: that is what starts
//! an instance. Only services whose policy sets `hold_when_empty` take
//! this path; every other request never reaches it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use crate::errors::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::deadline::ConnectionTimers;
use crate::http::{error_response, is_grpc};
use crate::proxy::Proxy;
use crate::snapshot::Service;
use crate::traffic::InFlight;

/// Requests one proxy holds for one service at most; beyond, the next is
/// refused at once rather than queued without end.
pub const MAX_HELD: i64 = 1000;

/// Whether a request to `service` should wait for an endpoint.
pub fn should_hold(service: &Service) -> bool {
    !service.config.hold_when_empty.is_zero() && !service.any_ready()
}

/// Waits until `service` has a ready endpoint in the proxy's table, then
/// forwards; answers 503 `no-endpoints` with the reason when the hold
/// ends first, or when too many requests already wait.
pub async fn hold_then_forward(
    proxy: Arc<Proxy>,
    service: Arc<Service>,
    request: Request<Incoming>,
    timers: Arc<ConnectionTimers>,
) -> http::Response<ResponseBody> {
    let started = std::time::Instant::now();
    let grpc = is_grpc(request.headers());
    let name = service.config.name.clone();
    let hold = service.config.hold_when_empty;
    let refuse = |service: &Service, detail: String| {
        let error = ProxyError::NoEndpoints;
        service.unrouted_metrics.record(error.status().as_u16(), Some(error), started.elapsed());
        error_response(error, grpc, &detail)
    };
    let waiting = &service.unrouted_metrics.in_flight;
    if waiting.load(Ordering::Relaxed) >= MAX_HELD {
        return refuse(&service, format!("{MAX_HELD} requests already wait for an instance of {name:?}"));
    }
    let ready = {
        let _held = InFlight::start(waiting);
        // Subscribed before the table is read again: a swap in between is not missed.
        let mut changes = proxy.table_changes.subscribe();
        let deadline = tokio::time::Instant::from_std(started + hold);
        loop {
            match proxy.table.load().services.get(name.as_str()) {
                None => {
                    break Err(format!("service {name:?} left the routing table while its request waited"))
                }
                Some(current) if current.any_ready() => break Ok(current.clone()),
                Some(_) => {}
            }
            if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                let within = humantime::format_duration(hold);
                break Err(format!("no instance of {name:?} became ready within {within}"));
            }
        }
    };
    match ready {
        Ok(service) => {
            tracing::debug!(service = %name, held = ?started.elapsed(), "an instance is ready; forwarding");
            super::outbound::forward(service, request, timers).await
        }
        Err(why) => refuse(&service, why),
    }
}
