//! Traffic mode (`--traffic SERVICE`): besides serving, mesh-echo calls a
//! service through its sidecar at a steady rate, so a demo has live
//! traffic that a user can watch shift. Requests go to `$MESH_OUTBOUND`
//! (the sidecar's outbound listener) with `Host: SERVICE`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Calls `service` through `outbound` `rate` times a second, forever,
/// printing a tally of the answers every ten seconds.
pub async fn run(outbound: String, service: String, rate: u32) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(Duration::from_secs(10));
    let (mut ok, mut failed) = (0u64, 0u64);
    // One keep-alive connection to the sidecar, made again when it breaks.
    let mut connection: Option<SendRequest<Empty<Bytes>>> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = report.tick() => {
                println!("traffic to {service}: {ok} ok, {failed} failed");
                continue;
            }
        }
        let answer =
            tokio::time::timeout(Duration::from_secs(5), call(&mut connection, &outbound, &service)).await;
        match answer {
            Ok(Ok(status)) if status.is_success() => ok += 1,
            _ => {
                failed += 1;
                connection = None;
            }
        }
    }
}

async fn call(
    connection: &mut Option<SendRequest<Empty<Bytes>>>,
    outbound: &str,
    service: &str,
) -> Result<http::StatusCode, String> {
    if connection.as_ref().is_none_or(|sender| sender.is_closed()) {
        let stream = tokio::net::TcpStream::connect(outbound).await.map_err(|e| e.to_string())?;
        let (sender, driver) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(driver);
        *connection = Some(sender);
    }
    let sender = connection.as_mut().expect("connected above");
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::get("/traffic")
        .header(http::header::HOST, service)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}
