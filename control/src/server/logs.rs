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

/// Opens the log of `request.instance` at the agent listening on `addr`.
pub async fn fetch(tls: ClientTls, addr: &str, request: &pb::LogsRequest) -> Result<LogStream, Status> {
    let unreachable = |e: String| Status::unavailable(format!("the logs at {addr}: {e}"));
    let config = tls.config_for(b"http/1.1").map_err(Status::internal)?;
    let connect = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // The verifier checks the node's SPIFFE ID, not this name.
        let name = rustls::pki_types::ServerName::try_from("agent.mesh").expect("a valid name");
        tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| e.to_string())
    };
    let stream = tokio::time::timeout(CONNECT_WITHIN, connect)
        .await
        .map_err(|_| unreachable("no TLS handshake in time".into()))?
        .map_err(unreachable)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let path = format!("/logs/{}?stream={}&follow={}", request.instance, request.stream, request.follow);
    let get = http::Request::get(path).header(http::header::HOST, addr).body(Empty::<bytes::Bytes>::new());
    let response = sender
        .send_request(get.map_err(|e| Status::internal(e.to_string()))?)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
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
