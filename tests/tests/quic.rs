//! QUIC between sidecars (HTTP/3). The inbound: a sidecar with a workload
//! identity serves peers on UDP at its inbound port's number, with the
//! same mTLS as on TCP; a peer with a mesh certificate is answered by the
//! local app (HTTP/1.1 and gRPC, trailers included), a stranger's
//! certificate, or none, is refused at the handshake. The caller: a
//! service with `transport = "quic"` is reached over HTTP/3 (HTTP/1.1,
//! h2c and gRPC apps, grpcio's four kinds of call with their statuses;
//! upgrades stay on TCP), and over TCP in the same try
//! when the peer has no QUIC; an impostor is refused; a connection closed
//! when idle resumes its TLS session. Between two hosts (network
//! namespaces): with UDP dropped by iptables every request goes over TCP,
//! also when UDP breaks under an open connection, and QUIC comes back with
//! UDP; with 1 % and 3 % of packets dropped, 32 concurrent requests on one
//! connection all succeed over either transport, and their p99 is reported.

use std::future::poll_fn;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use mesh_proto::echo::v1::echo_client::EchoClient;
use mesh_proto::echo::v1::{EchoReply, EchoRequest};
use mesh_tests::metrics::scrape;
use mesh_tests::process::{Echo, Proxy};
use mesh_tests::TempDir;
use prost::Message;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// A CA and the certificates it signs, as PEM.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.clone().self_signed(&key).unwrap().pem();
        Ca { pem, issuer: rcgen::Issuer::new(params, key) }
    }

    /// (certificate PEM, PKCS#8 key PEM) naming `spiffe://mesh.local/service/<service>`.
    fn leaf(&self, service: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let uri = format!("spiffe://mesh.local/service/{service}");
        params.subject_alt_names =
            vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(uri).unwrap())];
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// The callee: mesh-proxy with an identity, its inbound before `app`.
fn callee(dir: &TempDir, ca: &Ca, app: &str, protocol: &str) -> Proxy {
    callee_as(dir, ca, app, protocol, "backend", &[])
}

/// A callee holding `identity`'s certificate, with extra flags.
fn callee_as(dir: &TempDir, ca: &Ca, app: &str, protocol: &str, identity: &str, flags: &[&str]) -> Proxy {
    let (cert, key) = ca.leaf(identity);
    let (cert_path, key_path) = (dir.path(&format!("{identity}.pem")), dir.path(&format!("{identity}.key")));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
    let config = format!(
        "service = \"backend\"\n[listen]\ninbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\napp = \"{app}\"\n\n\
         [identity]\ncertificate = \"{}\"\nkey = \"{}\"\nroots = \"{}\"\n\n\
         [[services]]\nname = \"backend\"\nprotocol = \"{protocol}\"\n",
        cert_path.display(),
        key_path.display(),
        dir.path("ca.pem").display()
    );
    let path = dir.path(&format!("callee-{protocol}-{identity}-{}.toml", flags.len()));
    std::fs::write(&path, config).unwrap();
    Proxy::start_args(&path, flags)
}

/// The caller: mesh-proxy as `frontend`, with each (service, protocol,
/// peer inbound, announced as serving QUIC) reached with
/// `transport = "quic"` and one try per
/// request (a fallback must happen within the try, not by a retry), and
/// an upstream port per service.
fn caller(dir: &TempDir, ca: &Ca, services: &[(&str, &str, &str)]) -> Proxy {
    caller_with(dir, ca, services, &[])
}

/// The caller, started with extra flags.
fn caller_with(dir: &TempDir, ca: &Ca, services: &[(&str, &str, &str)], flags: &[&str]) -> Proxy {
    let (cert, key) = ca.leaf("frontend");
    std::fs::write(dir.path("frontend.pem"), cert).unwrap();
    std::fs::write(dir.path("frontend.key"), key).unwrap();
    std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
    let mut config = format!(
        "service = \"frontend\"\n[listen]\noutbound = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [identity]\ncertificate = \"{}\"\nkey = \"{}\"\nroots = \"{}\"\n",
        dir.path("frontend.pem").display(),
        dir.path("frontend.key").display(),
        dir.path("ca.pem").display()
    );
    for (name, protocol, peer) in services {
        config.push_str(&format!(
            "\n[[services]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ntransport = \"quic\"\nretry = {{ attempts = 1 }}\n\
             endpoints = [ {{ addr = \"{peer}\", version = \"v1\", meshed = true, quic = true }} ]\n\
             [[upstreams]]\nservice = \"{name}\"\nlisten = \"127.0.0.1:0\"\n"
        ));
    }
    let path = dir.path("caller.toml");
    std::fs::write(&path, config).unwrap();
    Proxy::start_args(&path, flags)
}

/// Accepts the server's certificate as it is: these tests judge the
/// callee's checks of its caller, not the caller's of the callee.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// An HTTP/3 connection to `addr` presenting `identity` (certificate and
/// key PEM), or no certificate at all.
async fn connect(addr: SocketAddr, identity: Option<(String, String)>) -> Result<Sender, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut crypto = match identity {
        Some((cert, key)) => {
            let chain = mesh_client::pem::certificates(&cert).unwrap();
            let key = mesh_client::pem::private_key(&key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint.connect(addr, "backend.mesh").map_err(|e| e.to_string())?;
    let connection = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
        .await
        .map_err(|_| "no handshake within 10s".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut driver, sender) =
        h3::client::new(h3_quinn::Connection::new(connection)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move { poll_fn(|cx| driver.poll_close(cx)).await });
    Ok(sender)
}

/// Sends one request; returns (status, headers, body, trailers).
async fn exchange(
    sender: &mut Sender,
    request: Request<()>,
    body: Option<Bytes>,
) -> (http::StatusCode, http::HeaderMap, Vec<u8>, Option<http::HeaderMap>) {
    let mut stream = sender.send_request(request).await.unwrap();
    if let Some(body) = body {
        stream.send_data(body).await.unwrap();
    }
    stream.finish().await.unwrap();
    let response = stream.recv_response().await.unwrap();
    let mut received = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        received.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let trailers = stream.recv_trailers().await.unwrap();
    (response.status(), response.headers().clone(), received, trailers)
}

fn quic_addr(proxy: &Proxy) -> SocketAddr {
    proxy.process.field("quic").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_peer_reaches_the_app_over_http3_and_a_stranger_is_refused() {
    let dir = TempDir::new("quic-inbound");
    let ca = Ca::new();
    let echo = Echo::start("v1", &[]);
    let proxy = callee(&dir, &ca, &echo.addr, "http");
    let addr = quic_addr(&proxy);
    assert_eq!(
        addr.port(),
        proxy.inbound().parse::<SocketAddr>().unwrap().port(),
        "UDP on the TCP port's number"
    );

    let mut sender = connect(addr, Some(ca.leaf("frontend"))).await.expect("a mesh peer connects");
    let (status, headers, body, _) =
        exchange(&mut sender, Request::get("https://backend/hello").body(()).unwrap(), None).await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-version").and_then(|v| v.to_str().ok()), Some("v1"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("/hello"), "the app saw the path: {text}");
    // A body streams to the app.
    let request =
        Request::post("https://backend/order").header("content-type", "text/plain").body(()).unwrap();
    let (status, _, body, _) = exchange(&mut sender, request, Some(Bytes::from_static(b"two books"))).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_bytes"], 9, "the app got the whole body: {seen}");

    // A certificate from another CA, and no certificate: refused at the handshake.
    let stranger = Ca::new();
    for (who, identity) in
        [("a stranger's certificate", Some(stranger.leaf("frontend"))), ("no certificate", None)]
    {
        let refused = match connect(addr, identity).await {
            Err(error) => error,
            Ok(mut sender) => {
                // TLS 1.3 judges the client's certificate after the client's side is done.
                match sender.send_request(Request::get("https://backend/").body(()).unwrap()).await {
                    Ok(mut stream) => match stream.recv_response().await {
                        Ok(response) => panic!("{who}: answered {}", response.status()),
                        Err(error) => error.to_string(),
                    },
                    Err(error) => error.to_string(),
                }
            }
        };
        eprintln!("{who}: {refused}");
    }
    // The callee counts a refusal when its side of the handshake ends,
    // which may be just after the client saw it.
    let admin = proxy.admin();
    let metrics = mesh_tests::eventually("both refusals counted", std::time::Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let metrics = scrape(&admin).await;
            let failed =
                metrics.sum("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", "failed")]);
            (failed >= 2.0).then_some(metrics)
        }
    })
    .await;
    let handshakes =
        |result| metrics.sum("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", result)]);
    assert_eq!((handshakes("ok"), handshakes("failed")), (1.0, 2.0));
    assert_eq!(metrics.sum("mesh_http_requests_total", &[("direction", "inbound"), ("code", "200")]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_http3_reaches_a_grpc_app_with_its_trailers() {
    let dir = TempDir::new("quic-grpc");
    let ca = Ca::new();
    let echo = Echo::start("v2", &[]);
    let proxy = callee(&dir, &ca, &echo.addr, "grpc");
    let mut sender = connect(quic_addr(&proxy), Some(ca.leaf("frontend"))).await.unwrap();
    // (request, gRPC status the answer's trailers carry)
    for (message, fail_with_code, status) in [("ping", 0, "0"), ("nope", 5, "5")] {
        let payload =
            EchoRequest { message: message.into(), fail_with_code, ..Default::default() }.encode_to_vec();
        let mut framed = BytesMut::new();
        framed.extend_from_slice(&[0]);
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(&payload);
        let request = Request::post("https://backend/mesh.echo.v1.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (status_code, headers, body, trailers) =
            exchange(&mut sender, request, Some(framed.freeze())).await;
        assert_eq!(status_code, 200);
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(grpc_status.as_deref(), Some(status), "{message}: {headers:?} {trailers:?}");
        if status == "0" {
            let reply = EchoReply::decode(&body[5..]).unwrap();
            assert_eq!((reply.message.as_str(), reply.version.as_str()), ("ping", "v2"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_reached_over_quic_carries_http_and_grpc_and_falls_back_to_tcp() {
    let dir = TempDir::new("quic-outbound");
    let ca = Ca::new();
    let echo = Echo::start("v1", &[]);
    let http = callee(&dir, &ca, &echo.addr, "http");
    let grpc = callee_as(&dir, &ca, &echo.addr, "grpc", "grpc-backend", &[]);
    let h2 = callee_as(&dir, &ca, &echo.addr, "h2", "h2-backend", &[]);
    let no_quic = callee_as(&dir, &ca, &echo.addr, "http", "tcp-only", &["--no-quic-inbound"]);
    let impostor = callee_as(&dir, &ca, &echo.addr, "http", "other", &[]);
    let caller = caller(
        &dir,
        &ca,
        &[
            ("backend", "http", &http.inbound()),
            ("grpc-backend", "grpc", &grpc.inbound()),
            ("h2-backend", "h2", &h2.inbound()),
            ("tcp-only", "http", &no_quic.inbound()),
            ("impersonated", "http", &impostor.inbound()),
        ],
    );
    let client = mesh_tests::client::http1();
    let quic_requests = |admin: String, direction: &'static str| async move {
        scrape(&admin).await.sum("mesh_quic_requests_total", &[("direction", direction)])
    };

    // HTTP/1.1 from the app, HTTP/3 between the sidecars, every request.
    for _ in 0..20 {
        let answer =
            mesh_tests::client::get(&client, &caller.upstream("backend"), "backend", "/q").await.unwrap();
        assert_eq!((answer.status.as_u16(), answer.header("x-version")), (200, Some("v1")), "{answer:?}");
    }
    let answer =
        mesh_tests::client::post_once(&client, &caller.upstream("backend"), "backend").await.unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        (answer.status.as_u16(), seen["body_bytes"].as_u64()),
        (200, Some(28)),
        "the body crossed whole: {seen}"
    );
    assert_eq!(quic_requests(caller.admin(), "outbound").await, 21.0);
    assert_eq!(quic_requests(http.admin(), "inbound").await, 21.0);

    // gRPC, unary and streaming, with its trailers.
    let mut echo_client =
        EchoClient::connect(format!("http://{}", caller.upstream("grpc-backend"))).await.unwrap();
    let reply =
        echo_client.unary(EchoRequest { message: "over quic".into(), ..Default::default() }).await.unwrap();
    assert_eq!(reply.get_ref().message, "over quic");
    let mut stream = echo_client
        .server_stream(EchoRequest { message: "s".into(), count: 3, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        sequences.push(reply.sequence);
    }
    assert_eq!(sequences, [0, 1, 2]);
    let error = echo_client.unary(EchoRequest { fail_with_code: 5, ..Default::default() }).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "a gRPC status crosses in the trailers");
    assert_eq!(quic_requests(grpc.admin(), "inbound").await, 3.0);

    // An h2c app, called with HTTP/2 prior knowledge: HTTP/3 between the sidecars.
    for _ in 0..3 {
        let request =
            Request::get("http://h2-backend/h2").body(http_body_util::Full::new(Bytes::new())).unwrap();
        let answer = mesh_tests::client::h2_prior_knowledge(&caller.outbound(), request).await.unwrap();
        let seen: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!((answer.status.as_u16(), seen["path"].as_str()), (200, Some("/h2")), "{seen}");
    }
    assert_eq!(quic_requests(h2.admin(), "inbound").await, 3.0);

    // An upgrade (WebSocket) has no HTTP/3 form: it crosses over mTLS on
    // TCP, and its bytes flow both ways after the switch.
    let sent_before = quic_requests(caller.admin(), "outbound").await;
    let mut stream = tokio::net::TcpStream::connect(caller.upstream("backend")).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut byte)).await;
        assert_eq!(read.unwrap().unwrap(), 1, "closed early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream.write_all(b"ping over tcp").await.unwrap();
    let mut echoed = [0u8; 13];
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping over tcp");
    assert_eq!(quic_requests(caller.admin(), "outbound").await, sent_before);
    drop(stream);

    // A peer without QUIC: the first request waits out the QUIC handshake,
    // then goes over TCP in the same try; the next ones go over TCP at once.
    for _ in 0..5 {
        let answer =
            mesh_tests::client::get(&client, &caller.upstream("tcp-only"), "tcp-only", "/t").await.unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let metrics = scrape(&caller.admin()).await;
    assert_eq!(metrics.sum("mesh_quic_fallbacks_total", &[]), 1.0);
    assert_eq!(quic_requests(caller.admin(), "outbound").await, 27.0, "none of them over QUIC");

    // A peer holding another service's identity: refused over QUIC, and over TCP.
    let answer = mesh_tests::client::get(&client, &caller.upstream("impersonated"), "impersonated", "/")
        .await
        .unwrap();
    assert_eq!(
        (answer.status.as_u16(), answer.header("x-mesh-error")),
        (502, Some("connect-failed")),
        "{answer:?}"
    );
    assert_eq!(scrape(&caller.admin()).await.sum("mesh_quic_fallbacks_total", &[]), 2.0);
    assert_eq!(quic_requests(impostor.admin(), "inbound").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_streaming_both_ways_crosses_two_sidecars_over_quic() {
    // A real grpcio client and server: unary, server, client and
    // bidirectional streaming, trailers and an error status.
    let dir = TempDir::new("quic-grpcio");
    let ca = Ca::new();
    let server = mesh_tests::grpcio::start_server();
    let callee = callee_as(&dir, &ca, &mesh_tests::grpcio::server_addr(&server), "grpc", "pyecho", &[]);
    let caller = caller(&dir, &ca, &[("pyecho", "grpc", &callee.inbound())]);
    let target = caller.upstream("pyecho");
    tokio::task::spawn_blocking(move || mesh_tests::grpcio::assert_calls_intact(&target, "pyecho"))
        .await
        .unwrap();

    // Every call went over QUIC: none over TCP, no fallback.
    let caller_metrics = scrape(&caller.admin()).await;
    let calls = caller_metrics.sum("mesh_http_requests_total", &[("direction", "outbound")]);
    let over_quic =
        scrape(&callee.admin()).await.sum("mesh_quic_requests_total", &[("direction", "inbound")]);
    assert!(calls >= 5.0, "five kinds of call: {calls}");
    assert_eq!(over_quic, calls, "calls the callee took over QUIC");
    assert_eq!(caller_metrics.sum("mesh_quic_fallbacks_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_when_idle_resumes_its_tls_session_when_reopened() {
    let dir = TempDir::new("quic-resume");
    let ca = Ca::new();
    let echo = Echo::start("v1", &[]);
    let callee = callee(&dir, &ca, &echo.addr, "http");
    let caller =
        caller_with(&dir, &ca, &[("backend", "http", &callee.inbound())], &["--upstream-idle-timeout", "1s"]);
    let client = mesh_tests::client::http1();
    let upstream = caller.upstream("backend");
    let open = |admin: String, direction: &'static str| async move {
        scrape(&admin).await.sum("mesh_quic_connections_open", &[("direction", direction)])
    };
    let handshakes = |admin: String| async move {
        let metrics = scrape(&admin).await;
        (
            metrics.sum("mesh_tls_handshakes_total", &[("direction", "inbound"), ("result", "ok")]),
            metrics.sum("mesh_tls_resumed_total", &[]),
        )
    };

    let answer = mesh_tests::client::get(&client, &upstream, "backend", "/").await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(handshakes(callee.admin()).await, (1.0, 0.0), "a first handshake in full");
    assert_eq!((open(caller.admin(), "outbound").await, open(callee.admin(), "inbound").await), (1.0, 1.0));

    // Idle for a second: the caller closes the connection, and both ends see it gone.
    mesh_tests::eventually("the idle QUIC connection closes", std::time::Duration::from_secs(15), || async {
        let both = (open(caller.admin(), "outbound").await, open(callee.admin(), "inbound").await);
        (both == (0.0, 0.0)).then_some(())
    })
    .await;

    // The next request reopens it, resuming the session: no certificates cross.
    let answer = mesh_tests::client::get(&client, &upstream, "backend", "/").await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(handshakes(callee.admin()).await, (2.0, 1.0), "the second handshake resumed");
    let metrics = scrape(&caller.admin()).await;
    assert_eq!(
        (
            metrics.sum("mesh_quic_requests_total", &[("direction", "outbound")]),
            metrics.sum("mesh_quic_fallbacks_total", &[])
        ),
        (2.0, 0.0),
        "both requests over QUIC"
    );
}

/// Runs `program args` inside `host`'s network namespace; its stdout.
fn in_host(host: &mesh_tests::netns::Host, program: &str, args: &[&str]) -> String {
    let output =
        host.command(std::path::Path::new(program)).args(args).output().expect("run in the namespace");
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The sum of `name`'s samples on a proxy's /metrics, read inside `host`.
fn metric_in(host: &mesh_tests::netns::Host, admin: &str, name: &str, label: &str) -> f64 {
    let text = in_host(host, "/usr/bin/curl", &["-s", &format!("http://{admin}/metrics")]);
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two hosts (network namespaces on a bridge): on `callee`, mesh-echo
/// behind a sidecar holding `backend`'s identity.
struct TwoHosts {
    dir: TempDir,
    /// Dropped last: the namespaces go with it.
    _lab: mesh_tests::netns::Lab,
    caller_host: mesh_tests::netns::Host,
    callee_host: mesh_tests::netns::Host,
    callee: Proxy,
    _echo: mesh_tests::process::Process,
}

impl TwoHosts {
    fn start(name: &str) -> TwoHosts {
        let dir = TempDir::new(name);
        let ca = Ca::new();
        let mut lab = mesh_tests::netns::Lab::new();
        let (a, b) = (lab.host("caller", 1), lab.host("callee", 2));
        let echo = mesh_tests::process::Process::start_with(b.command(&mesh_tests::bin("mesh-echo")).args([
            "--port",
            "0",
            "--version",
            "v1",
        ]));
        let app = echo.first_line.split_whitespace().nth(3).unwrap().to_owned();
        for name in ["backend", "frontend"] {
            let (cert, key) = ca.leaf(name);
            std::fs::write(dir.path(&format!("{name}.pem")), cert).unwrap();
            std::fs::write(dir.path(&format!("{name}.key")), key).unwrap();
        }
        std::fs::write(dir.path("ca.pem"), &ca.pem).unwrap();
        let callee_config = format!(
            "service = \"backend\"\n[listen]\ninbound = \"{}:0\"\nadmin = \"127.0.0.1:0\"\napp = \"{app}\"\n\n{}\n[[services]]\nname = \"backend\"\n",
            b.ip,
            identity_section(&dir, "backend")
        );
        std::fs::write(dir.path("callee.toml"), callee_config).unwrap();
        let callee = Proxy {
            process: mesh_tests::process::Process::start_with(
                b.command(&mesh_tests::bin("mesh-proxy"))
                    .args(["--config", dir.path("callee.toml").to_str().unwrap()]),
            ),
        };
        TwoHosts { dir, _lab: lab, caller_host: a, callee_host: b, callee, _echo: echo }
    }

    /// A caller sidecar on the caller's host reaching `backend` over
    /// `transport`, one try per request, with extra flags.
    fn caller(&self, transport: &str, flags: &[&str]) -> Proxy {
        let config = format!(
            "service = \"frontend\"\n[listen]\nadmin = \"127.0.0.1:0\"\n\n{}\n\
             [[services]]\nname = \"backend\"\ntransport = \"{transport}\"\nretry = {{ attempts = 1 }}\n\
             endpoints = [ {{ addr = \"{}\", version = \"v1\", meshed = true, quic = true }} ]\n\
             [[upstreams]]\nservice = \"backend\"\nlisten = \"127.0.0.1:0\"\n",
            identity_section(&self.dir, "frontend"),
            self.callee.inbound()
        );
        let path = self.dir.path(&format!("caller-{transport}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut command = self.caller_host.command(&mesh_tests::bin("mesh-proxy"));
        command.args(["--config", path.to_str().unwrap()]).args(flags);
        Proxy { process: mesh_tests::process::Process::start_with(&mut command) }
    }
}

/// The `[identity]` section of a proxy holding `name`'s certificate.
fn identity_section(dir: &TempDir, name: &str) -> String {
    format!(
        "[identity]\ncertificate = \"{}\"\nkey = \"{}\"\nroots = \"{}\"\n",
        dir.path(&format!("{name}.pem")).display(),
        dir.path(&format!("{name}.key")).display(),
        dir.path("ca.pem").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_dropped_between_hosts_requests_go_over_tcp_and_quic_returns_after() {
    let hosts = TwoHosts::start("quic-hosts");
    let (a, b) = (&hosts.caller_host, &hosts.callee_host);
    let caller = hosts.caller("quic", &["--quic-retry-after", "2s"]);
    let (upstream, admin) = (caller.upstream("backend"), caller.admin());
    let call = || {
        in_host(
            a,
            "/usr/bin/curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{upstream}/")],
        )
    };
    let quic_sent = || metric_in(a, &admin, "mesh_quic_requests_total", "outbound");

    // UDP to the callee dropped: every request is answered, over TCP.
    in_host(b, "iptables", &["-A", "INPUT", "-p", "udp", "-j", "DROP"]);
    for i in 0..10 {
        assert_eq!(call(), "200", "request {i} with UDP dropped");
    }
    assert_eq!(quic_sent(), 0.0);
    assert_eq!(
        metric_in(a, &admin, "mesh_quic_fallbacks_total", ""),
        1.0,
        "one try waited out the handshake"
    );

    // UDP back: once the 2 s are over, QUIC carries the requests again.
    in_host(b, "iptables", &["-D", "INPUT", "-p", "udp", "-j", "DROP"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut answered = 0;
    while quic_sent() == 0.0 {
        assert!(std::time::Instant::now() < deadline, "QUIC never came back ({answered} answered over TCP)");
        assert_eq!(call(), "200");
        answered += 1;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for _ in 0..5 {
        assert_eq!(call(), "200");
    }
    assert!(quic_sent() >= 5.0, "QUIC carries the requests again");

    // UDP dropped under the open connection: the request that finds the
    // path silent goes over TCP in the same try, and so do the next ones.
    let (sent_before, fallbacks_before) =
        (quic_sent(), metric_in(a, &admin, "mesh_quic_fallbacks_total", ""));
    in_host(b, "iptables", &["-A", "INPUT", "-p", "udp", "-j", "DROP"]);
    for i in 0..10 {
        assert_eq!(call(), "200", "request {i} after UDP broke under an open connection");
    }
    assert_eq!(quic_sent(), sent_before + 1.0, "one request found the path silent; the rest went over TCP");
    assert!(metric_in(a, &admin, "mesh_quic_fallbacks_total", "") > fallbacks_before);
    drop(caller);
}

/// What a `wrk --latency` run measured: (p50, p99) in milliseconds, and
/// the requests that failed (socket errors and answers other than 2xx/3xx).
fn wrk_summary(output: &str) -> (f64, f64, u64, u64) {
    let millis = |value: &str| -> f64 {
        let split = value.find(|c: char| c.is_ascii_alphabetic()).expect("a unit");
        let (number, unit) = value.split_at(split);
        let number: f64 = number.parse().expect("a number");
        match unit {
            "us" => number / 1000.0,
            "ms" => number,
            "s" => number * 1000.0,
            "m" => number * 60_000.0,
            other => panic!("unit {other} in {output}"),
        }
    };
    let percentile = |label: &str| {
        let line = output.lines().find(|l| l.trim_start().starts_with(label)).expect("wrk --latency");
        millis(line.split_whitespace().nth(1).expect("a latency"))
    };
    let requests = output
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.parse::<u64>().expect("a count")))
        .expect("a request count");
    let non_2xx = output
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("Non-2xx or 3xx responses:").map(|n| n.trim().parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    let socket_errors: u64 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|errors| {
            errors.split(',').filter_map(|e| e.split_whitespace().nth(1)?.parse::<u64>().ok()).sum()
        })
        .unwrap_or(0);
    (percentile("50%"), percentile("99%"), requests, non_2xx + socket_errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_packet_loss_many_streams_on_one_connection_all_succeed_and_p99_is_reported() {
    let hosts = TwoHosts::start("quic-loss");
    let (a, b) = (&hosts.caller_host, &hosts.callee_host);
    let callers = [("quic", hosts.caller("quic", &[])), ("http/2 over tcp", hosts.caller("tcp", &[]))];
    let run = |upstream: &str, seconds: u32| {
        let url = format!("http://{upstream}/");
        let duration = format!("{seconds}s");
        in_host(a, "/usr/bin/wrk", &["-t1", "-c32", "-d", &duration, "--latency", "--timeout", "10s", &url])
    };
    // Warm: both connections open before any loss.
    for (name, caller) in &callers {
        let output = run(&caller.upstream("backend"), 1);
        let (_, _, requests, failed) = wrk_summary(&output);
        assert!(requests > 0 && failed == 0, "{name}: {requests} requests, {failed} failed: {output}");
    }
    let mut report = Vec::new();
    for percent in [1, 3] {
        let probability = format!("{:.2}", f64::from(percent) / 100.0);
        let rule = [
            "INPUT",
            "-i",
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &probability,
            "-j",
            "DROP",
        ];
        for host in [a, b] {
            in_host(host, "iptables", &[&["-A"][..], &rule[..]].concat());
        }
        for (name, caller) in &callers {
            let output = run(&caller.upstream("backend"), 3);
            let (p50, p99, requests, failed) = wrk_summary(&output);
            if failed > 0 {
                // Which errors: the caller's counts of requests by code and error
                // (the proxy's own, and the callee's passed through).
                let metrics =
                    in_host(a, "/usr/bin/curl", &["-s", &format!("http://{}/metrics", caller.admin())]);
                let errors: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with("mesh_http_requests_total") && !l.contains("code=\"200\""))
                    .collect();
                panic!("{name} at {percent} % loss: {failed} failed: {errors:?}\n{output}");
            }
            assert!(requests > 100, "{name} at {percent} % loss: {output}");
            report.push(format!(
                "{percent} % loss, {name}: {requests} requests, p50 {p50:.2} ms, p99 {p99:.2} ms"
            ));
        }
        for host in [a, b] {
            in_host(host, "iptables", &[&["-D"][..], &rule[..]].concat());
        }
    }
    let quic = metric_in(a, &callers[0].1.admin(), "mesh_quic_requests_total", "outbound");
    assert!(quic > 0.0 && metric_in(a, &callers[0].1.admin(), "mesh_quic_fallbacks_total", "") == 0.0);
    // One TCP connection carried the baseline, from the first burst of 32
    // requests through both losses: one handshake.
    let ok = "outbound\",result=\"ok";
    let handshakes = metric_in(a, &callers[1].1.admin(), "mesh_tls_handshakes_total", ok);
    assert_eq!(handshakes, 1.0, "the HTTP/2-over-TCP caller's handshakes");
    eprintln!("32 concurrent requests on one connection between two hosts:\n{}", report.join("\n"));
}
