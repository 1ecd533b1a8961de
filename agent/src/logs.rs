//! The agent's log endpoint: instance output lives on the node that ran
//! it, so the agent serves it (the address is in the node's registration)
//! to meshd alone, over TLS with the node's certificate and meshd's client
//! certificate required; `meshctl logs` reads it through meshd, which
//! checks the caller's role.
//!
//! `GET /logs/<instance>?stream=stdout|stderr[&follow=true]`: the file as it
//! is, then (with follow) what is appended, until the caller hangs up.
//!
//! `GET /proxy-metrics?admin=127.0.0.1:PORT`: the /metrics of a sidecar on
//! this node, whose admin port listens on loopback only, for meshd to
//! gather (`meshctl top` and `check` across hosts). Loopback addresses
//! only: the agent fetches nothing elsewhere for anyone.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

use tokio_rustls::TlsAcceptor;

use super::instance::instance_dir;
use super::link::ControlLink;

/// How long a follow may last, so no loop runs unbounded.
const FOLLOW_AT_MOST: Duration = Duration::from_secs(3600);

/// How long a caller has for its TLS handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Serves the logs under `data_dir` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, data_dir: PathBuf, link: Arc<ControlLink>) {
    let data_dir = Arc::new(data_dir);
    loop {
        let Ok((stream, addr)) = listener.accept().await else { continue };
        let (data_dir, link) = (data_dir.clone(), link.clone());
        tokio::spawn(async move {
            // Built per connection: it follows the node certificate's renewals.
            let config = match link.server_tls() {
                Ok(config) => config,
                Err(error) => return tracing::warn!(%error, "logs: no TLS configuration"),
            };
            let accepted =
                tokio::time::timeout(HANDSHAKE_WITHIN, TlsAcceptor::from(config).accept(stream)).await;
            let Ok(Ok(stream)) = accepted else {
                return tracing::info!(%addr, "logs: a TLS handshake failed");
            };
            let meshd = mesh_common::spiffe::SpiffeId::control_plane(&link.trust_domain()).to_string();
            let leaf = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
            if !leaf.is_some_and(|leaf| mesh_client::pem::uri_names(leaf).contains(&meshd)) {
                return tracing::warn!(%addr, "logs: a caller that is not meshd was refused");
            }
            let service = hyper::service::service_fn(move |request| handle(data_dir.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, message: String) -> Response<Body> {
    let body = Full::new(Bytes::from(message + "\n")).map_err(|never| match never {}).boxed();
    Response::builder().status(status).body(body).expect("a valid response")
}

/// Which log a request asks for: (instance, stream, follow), or why it is bad.
pub fn parse_request(path: &str, query: Option<&str>) -> Result<(String, String, bool), String> {
    let instance = path.strip_prefix("/logs/").ok_or("the path is /logs/<instance>")?;
    let valid = !instance.is_empty()
        && instance.len() <= 128
        && instance.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!("{instance:?} is not an instance id"));
    }
    let (mut stream, mut follow) = ("stdout".to_owned(), false);
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("stream", value @ ("stdout" | "stderr"))) => stream = value.to_owned(),
            Some(("follow", value @ ("true" | "false"))) => follow = value == "true",
            _ => return Err(format!("unknown parameter {pair:?} (stream=stdout|stderr, follow=true|false)")),
        }
    }
    Ok((instance.to_owned(), stream, follow))
}

/// The sidecar admin address a metrics request names, if it is one on
/// this node's loopback.
pub fn parse_metrics_request(query: Option<&str>) -> Result<std::net::SocketAddr, String> {
    let admin = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("admin="))
        .ok_or("the query is admin=127.0.0.1:PORT")?;
    let addr: std::net::SocketAddr = admin.parse().map_err(|_| format!("{admin:?} is not IP:port"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address: sidecar admin ports listen on loopback"));
    }
    Ok(addr)
}

async fn proxy_metrics(query: Option<&str>) -> Response<Body> {
    let addr = match parse_metrics_request(query) {
        Ok(addr) => addr,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let get = Request::get("/metrics?detail=full")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(get).await.map_err(|e| e.to_string())?;
        response.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), fetch).await {
        Ok(Ok(body)) => Response::new(Full::new(body).map_err(|never| match never {}).boxed()),
        Ok(Err(e)) => text(StatusCode::BAD_GATEWAY, format!("the sidecar at {addr}: {e}")),
        Err(_) => {
            text(StatusCode::GATEWAY_TIMEOUT, format!("the sidecar at {addr} did not answer within 2s"))
        }
    }
}

async fn handle(data_dir: Arc<PathBuf>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if request.uri().path() == "/proxy-metrics" {
        return Ok(proxy_metrics(request.uri().query()).await);
    }
    let (instance, stream, follow) = match parse_request(request.uri().path(), request.uri().query()) {
        Ok(parsed) => parsed,
        Err(message) => return Ok(text(StatusCode::BAD_REQUEST, message)),
    };
    let path = instance_dir(&data_dir, &instance).join(format!("app.{stream}.log"));
    // Never through a symlink: the agent runs as root, and a link planted
    // in an instance's folder could point anywhere.
    let mut file = match super::files::read_no_follow(&path).map(tokio::fs::File::from_std) {
        Ok(file) => file,
        Err(_) => {
            return Ok(text(StatusCode::NOT_FOUND, format!("no {stream} log for instance {instance} here")))
        }
    };
    if !follow {
        let mut content = Vec::new();
        if let Err(e) = file.read_to_end(&mut content).await {
            return Ok(text(StatusCode::INTERNAL_SERVER_ERROR, format!("reading {}: {e}", path.display())));
        }
        let body = Full::new(Bytes::from(content)).map_err(|never| match never {}).boxed();
        return Ok(Response::new(body));
    }
    // Follow: send what there is, then poll for more until the caller leaves.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + FOLLOW_AT_MOST;
        let mut buffer = vec![0u8; 16 * 1024];
        while tokio::time::Instant::now() < deadline {
            match file.read(&mut buffer).await {
                Ok(0) => {
                    if sender.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // A truncated file starts over.
                    if let (Ok(position), Ok(meta)) = (file.stream_position().await, file.metadata().await) {
                        if meta.len() < position {
                            let _ = file.seek(std::io::SeekFrom::Start(0)).await;
                        }
                    }
                }
                Ok(n) => {
                    if sender.send(Ok(Frame::data(Bytes::copy_from_slice(&buffer[..n])))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(receiver)).boxed();
    Ok(Response::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_an_instance_and_a_stream() {
        // (path, query, expected)
        type Case<'a> = (&'a str, Option<&'a str>, Result<(&'a str, &'a str, bool), &'a str>);
        let cases: &[Case] = &[
            ("/logs/web-0", None, Ok(("web-0", "stdout", false))),
            ("/logs/web-0", Some("stream=stderr&follow=true"), Ok(("web-0", "stderr", true))),
            ("/logs/../etc", None, Err("not an instance id")),
            ("/logs/", None, Err("not an instance id")),
            ("/other", None, Err("/logs/<instance>")),
            ("/logs/web-0", Some("stream=syslog"), Err("unknown parameter")),
        ];
        for (path, query, expected) in cases {
            let got = parse_request(path, *query);
            match (got, expected) {
                (Ok((i, s, f)), Ok((ei, es, ef))) => assert_eq!((i.as_str(), s.as_str(), f), (*ei, *es, *ef)),
                (Err(message), Err(part)) => assert!(message.contains(part), "{path}: {message}"),
                (got, _) => panic!("{path} {query:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn metrics_are_fetched_only_from_loopback() {
        // (query, Ok(address) or a part of the refusal)
        let cases: &[(Option<&str>, Result<&str, &str>)] = &[
            (Some("admin=127.0.0.1:9000"), Ok("127.0.0.1:9000")),
            (Some("admin=[::1]:9000"), Ok("[::1]:9000")),
            (Some("admin=10.0.0.5:9000"), Err("not a loopback address")),
            (Some("admin=metadata.internal:80"), Err("not IP:port")),
            (None, Err("admin=127.0.0.1:PORT")),
        ];
        for (query, expected) in cases {
            match (parse_metrics_request(*query), expected) {
                (Ok(addr), Ok(want)) => assert_eq!(addr.to_string(), *want),
                (Err(message), Err(part)) => assert!(message.contains(part), "{query:?}: {message}"),
                (got, _) => panic!("{query:?}: {got:?}"),
            }
        }
    }
}
