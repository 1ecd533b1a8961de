//! Opaque TCP for upstream ports of `tcp` services: pick an endpoint like
//! HTTP does, try another when a connect fails, then splice bytes both
//! ways. A connection is one unit: it is never retried once bytes flowed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use crate::listen::{next_connection, ShutdownSignal};
use crate::proxy::Proxy;
use crate::{clock, transport};

pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    service: Arc<str>,
    mut shutdown: ShutdownSignal,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            next = next_connection(&listener, &mut shutdown) => match next {
                Some(stream) => stream,
                None => break,
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        connections.spawn(splice(stream, proxy.clone(), service.clone()));
    }
    drop(listener);
    // Connections in flight finish; the caller bounds this with the drain deadline.
    while connections.join_next().await.is_some() {}
}

async fn splice(mut downstream: TcpStream, proxy: Arc<Proxy>, name: Arc<str>) {
    let _ = downstream.set_nodelay(true);
    let Some(service) = proxy.table.load().services.get(name.as_ref()).cloned() else {
        tracing::warn!(service = %name, "tcp connection for a service no longer in the table");
        return;
    };
    let metrics = service.tcp_metrics.clone();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut upstream = None;
    for _ in 0..service.config.retry.attempts.max(1) {
        let chosen = service.choose(&tried, clock::now_millis(), clock::now_nanos(), &mut rand::rng());
        let endpoint = match chosen {
            Ok(chosen) => chosen.endpoint,
            Err(error) => {
                tracing::warn!(service = %name, error = error.reason(), "tcp connection refused");
                return;
            }
        };
        tried.push(endpoint.addr);
        match transport::connect(endpoint.addr, service.config.connect_timeout).await {
            Ok(stream) => {
                endpoint.state.breaker.record_success();
                upstream = Some(stream);
                break;
            }
            Err(error) => {
                tracing::debug!(service = %name, endpoint = %endpoint.addr, %error, "tcp connect failed");
                if endpoint.state.breaker.record_failure(clock::now_millis(), &service.config.breaker) {
                    endpoint.state.ejections.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let Some(mut upstream) = upstream else { return };
    metrics.open.fetch_add(1, Ordering::Relaxed);
    let copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    metrics.open.fetch_sub(1, Ordering::Relaxed);
    if let Ok((from_app, to_app)) = copied {
        metrics.read_bytes.fetch_add(from_app, Ordering::Relaxed);
        metrics.write_bytes.fetch_add(to_app, Ordering::Relaxed);
    }
}
