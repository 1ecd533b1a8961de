//! `Jobs.Logs`: meshd reads an instance's output from the agent of its
//! node, over TLS with meshd's client certificate (the agent serves no one
//! else), and streams it to the caller, whose role the gate has checked.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_client::ClientTls;
use mesh_proto::mesh::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

pub type LogStream = ReceiverStream<Result<pb::LogChunk, Status>>;

const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// GET `path` from the agent listening on `addr`, over mTLS.
async fn agent_get(
    tls: ClientTls,
    addr: &str,
    path: String,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let config = tls.config_for(b"http/1.1").map_err(|e| e.to_string())?;
    let connect = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // The verifier checks the node's SPIFFE ID, not this name.
        let name = rustls::pki_types::ServerName::try_from("agent.mesh").expect("a valid name");
        tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| e.to_string())
    };
    let stream = tokio::time::timeout(CONNECT_WITHIN, connect)
        .await
        .map_err(|_| "no TLS handshake in time".to_owned())??;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let get = http::Request::get(path).header(http::header::HOST, addr).body(Empty::<bytes::Bytes>::new());
    sender.send_request(get.map_err(|e| e.to_string())?).await.map_err(|e| e.to_string())
}

/// A sidecar's metrics, through the agent of its node at `agent` (the
/// sidecar's admin port listens on that node's loopback).
pub async fn proxy_metrics(tls: ClientTls, agent: &str, admin: &str) -> Result<String, String> {
    let response = agent_get(tls, agent, format!("/proxy-metrics?admin={admin}")).await?;
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body).into_owned();
    match status.is_success() {
        true => Ok(text),
        false => Err(format!("the agent at {agent}: {status}: {}", text.trim())),
    }
}

/// A proxy's metrics fetched by meshd itself, for a proxy no agent runs
/// (started by hand, on a host meshd reaches).
pub async fn direct_metrics(admin: &str) -> Result<String, String> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let get = http::Request::get("/metrics?detail=full")
            .header(http::header::HOST, admin)
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(get).await.map_err(|e| e.to_string())?;
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(CONNECT_WITHIN, fetch).await.map_err(|_| format!("{admin}: no answer in time"))?
}

/// Opens the log of `request.instance` at the agent listening on `addr`.
pub async fn fetch(tls: ClientTls, addr: &str, request: &pb::LogsRequest) -> Result<LogStream, Status> {
    let unreachable = |e: String| Status::unavailable(format!("the logs at {addr}: {e}"));
    let path = format!("/logs/{}?stream={}&follow={}", request.instance, request.stream, request.follow);
    let response = agent_get(tls, addr, path).await.map_err(unreachable)?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = String::from_utf8_lossy(&text).trim().to_owned();
        return Err(match status {
            http::StatusCode::NOT_FOUND => Status::not_found(message),
            http::StatusCode::BAD_REQUEST => Status::invalid_argument(message),
            _ => Status::unavailable(format!("the logs at {addr}: {status}: {message}")),
        });
    }
    let (chunks, stream) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let chunk = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Ok(pb::LogChunk { data: data.to_vec() }),
                    Err(_) => continue,
                },
                Err(error) => Err(Status::unavailable(format!("the logs stream broke: {error}"))),
            };
            let failed = chunk.is_err();
            // The caller left: stop reading, which ends a follow at the agent.
            if chunks.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(stream))
}
