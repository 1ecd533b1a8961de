//! The inbound over QUIC: HTTP/3 from peer sidecars on UDP, on the number
//! of the inbound's TCP port, with the same mTLS (the proxy's workload
//! certificate; the peer's chained to the trust bundle) and the same
//! checks per request (allow-from, rate limit) as the TCP inbound. Each
//! request goes on to the local app by `forward_inbound`.
//!
//! The socket asks the kernel for large buffers (QUIC drops packets when
//! they overflow) and says once, with the sysctl to change, when the
//! kernel caps them. quinn uses GSO and GRO where the kernel has them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;

use crate::http::body::ResponseBody;
use crate::http::h3_body::H3RequestBody;
use crate::http::inbound::forward_inbound;
use crate::http::{is_grpc, strip_hop_by_hop};
use crate::listen::http::{authz_denied, over_rate_limit};
use crate::listen::ShutdownSignal;
use crate::proxy::Proxy;
use crate::tls::{MeshTls, Side};

/// Peers' requests served over QUIC, for /metrics.
pub static QUIC_SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Where the QUIC inbound is ([`QuicInbound`] as a number): `/ready`
/// waits while it starts and says when it serves, and the agent announces
/// that in discovery.
pub static QUIC_INBOUND: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(QuicInbound::Off as u8);

/// The QUIC inbound's state.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum QuicInbound {
    /// None: not asked for, or it could not start.
    Off = 0,
    /// Its socket is bound; it serves once the proxy holds a certificate.
    Starting = 1,
    Serving = 2,
}

impl QuicInbound {
    pub fn now() -> QuicInbound {
        match QUIC_INBOUND.load(Ordering::Relaxed) {
            1 => QuicInbound::Starting,
            2 => QuicInbound::Serving,
            _ => QuicInbound::Off,
        }
    }

    fn set(self) {
        QUIC_INBOUND.store(self as u8, Ordering::Relaxed);
    }
}
/// Peers' QUIC connections open now, for /metrics.
pub static QUIC_OPEN_INBOUND: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Runs its function when dropped: on every way out of a scope.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// One open connection in a gauge, for as long as it lives.
pub struct OpenConnection(&'static std::sync::atomic::AtomicI64);

impl OpenConnection {
    pub fn count(gauge: &'static std::sync::atomic::AtomicI64) -> OpenConnection {
        gauge.fetch_add(1, Ordering::Relaxed);
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What each UDP socket asks the kernel for, each way.
pub const UDP_BUFFER_BYTES: usize = 2 * 1024 * 1024;
/// A connection with no traffic for this long is closed (the TCP pool's
/// default idle time).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const ALPN_H3: &[u8] = b"h3";
/// How often an open connection proves it is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The QUIC side of `tls`: its server config with ALPN h3.
pub fn server_config(tls: &MeshTls) -> Result<quinn::ServerConfig, String> {
    let mut crypto = (*tls.server).clone();
    crypto.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Both ends' QUIC transport settings: idle connections close when the
/// TCP pool's do, and a caller's keep-alives hold a used one open (and
/// notice a peer that went away) meanwhile.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("a valid idle timeout")));
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport
}

/// A UDP socket at `addr` with buffers as large as the kernel allows, up
/// to `UDP_BUFFER_BYTES`; warns once when the kernel holds them smaller.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let (socket, capped) = bind_udp_asking(addr, UDP_BUFFER_BYTES)?;
    if let Some(granted) = capped {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                receive = granted.receive,
                send = granted.send,
                wanted = UDP_BUFFER_BYTES,
                "the kernel caps UDP socket buffers below what QUIC needs under load; raise them with: {RAISE_UDP_BUFFERS}"
            );
        }
    }
    Ok(socket)
}

/// The command that lifts the kernel's cap on UDP socket buffers.
pub const RAISE_UDP_BUFFERS: &str = "sysctl -w net.core.rmem_max=4194304 net.core.wmem_max=4194304";

/// Buffer sizes the kernel granted, each way, when below what was asked.
#[derive(Debug, PartialEq, Eq)]
pub struct GrantedBuffers {
    pub receive: usize,
    pub send: usize,
}

/// A non-blocking UDP socket at `addr` that asked for `wanted` bytes of
/// buffer each way, and what the kernel granted when it gave less.
fn bind_udp_asking(
    addr: SocketAddr,
    wanted: usize,
) -> std::io::Result<(std::net::UdpSocket, Option<GrantedBuffers>)> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(addr)?;
    let fd = socket.as_raw_fd();
    let mut granted = [0usize; 2];
    for (option, granted) in [libc::SO_RCVBUF, libc::SO_SNDBUF].into_iter().zip(&mut granted) {
        let asked = libc::c_int::try_from(wanted).unwrap_or(libc::c_int::MAX);
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is an open socket; the option values are c_ints of the given size.
        let got = unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, option, (&asked as *const libc::c_int).cast(), size);
            let mut got: libc::c_int = 0;
            let mut len = size;
            libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut got as *mut libc::c_int).cast(), &mut len);
            got
        };
        // Linux reports twice what it keeps for the payload.
        *granted = usize::try_from(got).unwrap_or(0) / 2;
    }
    socket.set_nonblocking(true)?;
    let capped = granted.iter().any(|g| *g < wanted);
    Ok((socket, capped.then_some(GrantedBuffers { receive: granted[0], send: granted[1] })))
}

/// Serves HTTP/3 on `addr` until shutdown, from the moment the proxy holds
/// a certificate; a renewed certificate serves new connections at once.
/// `/ready` waits for it from here when a certificate is expected.
pub fn serve(
    socket: std::net::UdpSocket,
    proxy: Arc<Proxy>,
    shutdown: ShutdownSignal,
) -> impl std::future::Future<Output = ()> {
    let identified = proxy.needs_identity.load(Ordering::Acquire) || proxy.long_lived.tls.load().is_some();
    if identified {
        QuicInbound::Starting.set();
    }
    serve_when_identified(socket, proxy, shutdown)
}

async fn serve_when_identified(socket: std::net::UdpSocket, proxy: Arc<Proxy>, mut shutdown: ShutdownSignal) {
    let _off = OnDrop(|| QuicInbound::Off.set());
    let mut identities = proxy.identity_changes.subscribe();
    let tls = loop {
        if let Some(tls) = proxy.long_lived.tls.load_full() {
            break tls;
        }
        tokio::select! {
            changed = identities.changed() => if changed.is_err() { return },
            _ = crate::listen::shutdown_started(&mut shutdown) => return,
        }
    };
    let config = match server_config(&tls) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(%error, "no QUIC inbound: its TLS config cannot be made");
            return;
        }
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = match quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)
    {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::warn!(%error, "no QUIC inbound: the endpoint cannot start");
            return;
        }
    };
    QuicInbound::Serving.set();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                tokio::spawn(connection(incoming, proxy.clone()));
            }
            changed = identities.changed() => {
                if changed.is_err() { break }
                if let Some(config) = proxy.long_lived.tls.load_full().and_then(|tls| server_config(&tls).ok()) {
                    endpoint.set_server_config(Some(config));
                }
            }
            _ = crate::listen::shutdown_started(&mut shutdown) => break,
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
}

/// One peer's connection: its handshake, then its requests, each on a task.
async fn connection(incoming: quinn::Incoming, proxy: Arc<Proxy>) {
    let tls = proxy.long_lived.tls.load_full();
    let record = |ok| {
        if let Some(tls) = &tls {
            tls.record_handshake(Side::Inbound, ok);
        }
    };
    let connection = match incoming.await {
        Ok(connection) => {
            record(true);
            connection
        }
        Err(error) => {
            record(false);
            tracing::info!(%error, "refused a QUIC peer");
            return;
        }
    };
    // The caller is who its certificate names.
    let caller: Option<Arc<str>> = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|cert| crate::tls::uri_names(cert)))
        .and_then(|names| names.into_iter().next())
        .map(Arc::from);
    let _open = OpenConnection::count(&QUIC_OPEN_INBOUND);
    let mut h3 = match h3::server::Connection::new(h3_quinn::Connection::new(connection)).await {
        Ok(h3) => h3,
        Err(error) => {
            tracing::debug!(%error, "an HTTP/3 connection failed to start");
            return;
        }
    };
    // The connection's requests: when the peer stops sending new ones (it
    // let go of the connection), those in flight finish before it closes.
    let mut requests = tokio::task::JoinSet::new();
    loop {
        // Finished requests are reaped as they go, so the set stays small.
        while requests.try_join_next().is_some() {}
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let (proxy, caller) = (proxy.clone(), caller.clone());
                requests.spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((request, stream)) => serve_request(proxy, caller, request, stream).await,
                        Err(error) => tracing::debug!(%error, "an HTTP/3 request could not be read"),
                    }
                });
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, "an HTTP/3 connection ended");
                break;
            }
        }
    }
    let _ = tokio::time::timeout(IDLE_TIMEOUT, async { while requests.join_next().await.is_some() {} }).await;
}

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// One request: the same checks as on TCP, then the local app, then the
/// answer back on the request's stream (data, then trailers).
async fn serve_request(proxy: Arc<Proxy>, caller: Option<Arc<str>>, request: Request<()>, stream: Stream) {
    let (mut send, recv) = stream.split();
    QUIC_SERVED.fetch_add(1, Ordering::Relaxed);
    let grpc = is_grpc(request.headers());
    let response = match proxy.refuse_caller(caller.as_deref()) {
        Some(detail) => authz_denied(&proxy, caller.as_deref(), &detail, grpc),
        None => {
            let snapshot = arc_swap::Guard::into_inner(proxy.table.load());
            match over_rate_limit(&snapshot, caller.as_deref(), || grpc) {
                Some(answer) => answer,
                None => {
                    let (parts, ()) = request.into_parts();
                    let request = Request::from_parts(parts, H3RequestBody::request(recv));
                    forward_inbound(snapshot, request).await
                }
            }
        }
    };
    if let Err(error) = respond(&mut send, response).await {
        tracing::debug!(%error, "an HTTP/3 answer could not be sent whole");
    }
}

async fn respond(
    send: &mut h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    response: Response<ResponseBody>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, mut body) = response.into_parts();
    // HTTP/3 has no connection-specific headers.
    strip_hop_by_hop(&mut parts.headers);
    send.send_response(Response::from_parts(parts, ())).await?;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => send.send_data(data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    Ok(())
}

#[cfg(test)]
mod udp_buffer_tests {
    use super::*;

    /// The kernel's cap on a socket's buffer one way (`rmem_max`, `wmem_max`).
    fn kernel_cap(sysctl: &str) -> usize {
        let path = format!("/proc/sys/net/core/{sysctl}");
        std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn buffers_under_the_kernel_cap_are_granted_and_over_it_are_reported_capped() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let (_, capped) = bind_udp_asking(local, 64 * 1024).unwrap();
        assert_eq!(capped, None, "64 KiB is under any kernel's cap");
        // Beyond the cap: the kernel grants the cap, and it is reported.
        let (receive_cap, send_cap) = (kernel_cap("rmem_max"), kernel_cap("wmem_max"));
        let over = 2 * receive_cap.max(send_cap) + (1 << 20);
        let (_, capped) = bind_udp_asking(local, over).unwrap();
        let granted = capped.expect("reported as capped");
        assert_eq!(granted, GrantedBuffers { receive: receive_cap, send: send_cap });
        assert!(RAISE_UDP_BUFFERS.contains("net.core.rmem_max"));
    }
}
