//! Reused connections to one endpoint: idle HTTP/1 connections in a
//! lock-free queue, one shared multiplexed HTTP/2 connection, and for a
//! peer sidecar whose service is reached over QUIC, one shared HTTP/3
//! connection. A mesh endpoint (a peer's sidecar) is reached over mTLS and
//! HTTP/2 (or HTTP/3) whatever the app speaks, once this proxy holds a
//! certificate.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::Protocol;
use crate::http::body::RequestBody;
use crate::tls::MeshTls;
use crate::transport;

pub type Http1Sender = http1::SendRequest<RequestBody>;
pub type Http2Sender = http2::SendRequest<RequestBody>;

/// Idle HTTP/1 connections kept per endpoint; more are closed when
/// released. Each slot costs 40 bytes once the endpoint is used.
const MAX_IDLE_HTTP1: usize = 64;

/// The idle clock: a count the sweeper moves on once per [`IDLE_TICK`].
/// Connections note it when they go idle (a relaxed load, not a clock
/// read), and the sweeper closes those idle for the configured time.
static IDLE_CLOCK: AtomicU32 = AtomicU32::new(0);

/// How often the sweeper looks for idle connections.
pub const IDLE_TICK: Duration = Duration::from_secs(1);

fn idle_now() -> u32 {
    IDLE_CLOCK.load(Ordering::Relaxed)
}

/// Moves the idle clock on one tick; the sweeper's alone to call.
pub fn advance_idle_clock() {
    IDLE_CLOCK.fetch_add(1, Ordering::Relaxed);
}

pub struct ConnPool {
    addr: SocketAddr,
    /// Made when a connection is released and none is pooled, and dropped
    /// by the sweep that finds it empty: most endpoints of a large table are
    /// idle, and an empty queue of this size is most of an endpoint's memory.
    idle_http1: ArcSwapOption<ArrayQueue<IdleHttp1>>,
    http2: ArcSwapOption<SharedHttp2>,
    /// Held by the one request opening the shared HTTP/2 connection; the
    /// others that found none wait for it instead of each opening their own.
    http2_opening: tokio::sync::Mutex<()>,
    /// Failed attempts to open it: a request that waited and sees this
    /// moved fails with the attempt rather than making its own.
    http2_failures: AtomicU32,
    quic: ArcSwapOption<SharedQuic>,
    /// One request opens the QUIC connection; the others meanwhile go over TCP.
    quic_opening: AtomicBool,
    /// Until then (`clock::now_millis`) QUIC to this peer failed: TCP only.
    quic_down_until_ms: AtomicU64,
    mesh: Option<MeshPeer>,
}

pub type QuicSender = h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>;

/// QUIC connections this proxy opened to peers, open now, for /metrics.
pub static QUIC_OPEN_OUTBOUND: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// HTTP/3's code for a connection closed without error (RFC 9114, 8.1).
const H3_NO_ERROR: u32 = 0x100;

/// How long a peer whose QUIC failed is reached over TCP alone before
/// QUIC is tried again (`--quic-retry-after`), in milliseconds.
static QUIC_RETRY_AFTER_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets how long a peer whose QUIC failed is reached over TCP alone.
pub fn set_quic_retry_after(after: Duration) {
    QUIC_RETRY_AFTER_MS.store(after.as_millis() as u64, Ordering::Relaxed);
}

/// The shared HTTP/3 connection, as `SharedHttp2` is for HTTP/2.
struct SharedQuic {
    sender: QuicSender,
    connection: quinn::Connection,
    tls: Option<Arc<MeshTls>>,
    last_used: AtomicU32,
}

/// A QUIC connection being opened; dropped, it lets the next request open one.
struct Opening<'a>(&'a AtomicBool);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where QUIC to a peer stands, for `meshctl status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuicState {
    /// An HTTP/3 connection is open.
    Open,
    /// QUIC failed lately: TCP until it is tried again.
    Failed,
    /// No connection now; the next request opens one.
    Closed,
}

/// How one request reaches a peer whose service asks for QUIC.
pub enum QuicRoute {
    /// Over the open HTTP/3 connection.
    Ready(QuicSender, quinn::Connection),
    /// This request opens the connection (`open_quic`).
    Open,
    /// Over TCP: QUIC failed lately, another request is opening it, or
    /// the endpoint is not a peer sidecar.
    Tcp,
}

/// The proxy's QUIC client socket, bound on first use and shared by every
/// endpoint's pool.
#[derive(Default)]
pub struct QuicClient {
    endpoint: std::sync::OnceLock<Option<quinn::Endpoint>>,
}

impl QuicClient {
    fn endpoint(&self) -> Option<&quinn::Endpoint> {
        let bind = || {
            let socket = crate::listen::quic::bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)))
                .map_err(|error| tracing::warn!(%error, "no QUIC client: no UDP socket"))
                .ok()?;
            let runtime = Arc::new(quinn::TokioRuntime);
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(|error| tracing::warn!(%error, "no QUIC client"))
                .ok()
        };
        self.endpoint.get_or_init(bind).as_ref()
    }
}

/// A pooled HTTP/1 connection and the idle-clock tick it was released at.
struct IdleHttp1 {
    sender: Http1Sender,
    since: u32,
}

/// The shared HTTP/2 connection and the mTLS configuration it was opened
/// with. Once this proxy's certificate is renewed (or its trust bundle
/// changes) the configuration is a new one and the next request opens a
/// new connection: a renewed certificate is presented in a handshake at
/// once, not when a long-lived connection happens to close. Requests in
/// flight finish on the old connection, which closes when they are done.
struct SharedHttp2 {
    sender: Http2Sender,
    tls: Option<Arc<MeshTls>>,
    /// The idle-clock tick of its last request.
    last_used: AtomicU32,
}

/// A peer sidecar: the service whose identity it must hold, and where this
/// proxy's mTLS configuration appears.
pub struct MeshPeer {
    pub service: String,
    pub tls: Arc<ArcSwapOption<MeshTls>>,
    pub quic: Arc<QuicClient>,
}

/// Why no connection could be had.
#[derive(Debug)]
pub struct ConnectError(pub io::Error);

impl ConnPool {
    pub fn new(addr: SocketAddr, mesh: Option<MeshPeer>) -> Self {
        ConnPool {
            addr,
            idle_http1: ArcSwapOption::empty(),
            http2: ArcSwapOption::empty(),
            http2_opening: tokio::sync::Mutex::new(()),
            http2_failures: AtomicU32::new(0),
            quic: ArcSwapOption::empty(),
            quic_opening: AtomicBool::new(false),
            quic_down_until_ms: AtomicU64::new(0),
            mesh,
        }
    }

    /// The mTLS configuration to reach this endpoint with, when it is a
    /// mesh sidecar and this proxy has a certificate.
    fn mtls(&self) -> Option<Arc<MeshTls>> {
        self.mesh.as_ref()?.tls.load_full()
    }

    /// What requests to this endpoint go out as: the service's protocol, or
    /// HTTP/2 to a peer sidecar reached over mTLS.
    pub fn wire_protocol(&self, protocol: Protocol) -> Protocol {
        if !protocol.is_h2() && self.mtls().is_some() {
            Protocol::H2
        } else {
            protocol
        }
    }

    /// An idle HTTP/1 connection ready for a request, if one is pooled.
    pub fn take_http1(&self) -> Option<Http1Sender> {
        let idle = self.idle_http1.load();
        let idle = idle.as_ref()?;
        while let Some(IdleHttp1 { sender, .. }) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    pub fn put_http1(&self, sender: Http1Sender) {
        if !sender.is_ready() {
            return;
        }
        let entry = IdleHttp1 { sender, since: idle_now() };
        if let Some(idle) = self.idle_http1.load().as_ref() {
            // A full queue hands the entry back; dropping it closes that connection.
            let _ = idle.push(entry);
            return;
        }
        let queue = Arc::new(ArrayQueue::new(MAX_IDLE_HTTP1));
        let _ = queue.push(entry);
        // Another release may have made a queue meanwhile: the
        // connection goes into that one instead.
        let made = self.idle_http1.compare_and_swap(&None::<Arc<_>>, Some(queue.clone()));
        if let Some(other) = made.as_ref() {
            if let Some(entry) = queue.pop() {
                let _ = other.push(entry);
            }
        }
    }

    /// Closes the connections idle for `ticks` of the idle clock or more:
    /// pooled HTTP/1 connections, and the shared HTTP/2 connection once no
    /// request has used it for that long (requests still on it finish).
    /// Returns how many it closed.
    pub fn close_idle(&self, ticks: u32) -> usize {
        let now = idle_now();
        let mut closed = 0;
        if let Some(idle) = self.idle_http1.load_full() {
            // Bounded: each pooled connection is looked at once.
            for _ in 0..idle.len() {
                let Some(entry) = idle.pop() else { break };
                if now.wrapping_sub(entry.since) < ticks && entry.sender.is_ready() {
                    // A full queue (requests released meanwhile) drops it.
                    let _ = idle.push(entry);
                } else {
                    closed += 1;
                }
            }
            // An empty queue goes. A connection released into it at this
            // very moment goes with it, closed early: rare, and harmless.
            if idle.is_empty() {
                self.idle_http1.compare_and_swap(&idle, None);
            }
        }
        let stale = self
            .http2
            .load()
            .as_ref()
            .is_some_and(|shared| now.wrapping_sub(shared.last_used.load(Ordering::Relaxed)) >= ticks);
        if stale {
            self.http2.store(None);
            closed += 1;
        }
        let stale_quic = self
            .quic
            .load()
            .as_ref()
            .is_some_and(|shared| now.wrapping_sub(shared.last_used.load(Ordering::Relaxed)) >= ticks);
        if stale_quic {
            if let Some(shared) = self.quic.swap(None) {
                shared.connection.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"idle");
                closed += 1;
            }
        }
        closed
    }

    /// Connections this endpoint holds open and unused now (for tests and metrics).
    pub fn idle_http1_count(&self) -> usize {
        self.idle_http1.load().as_ref().map_or(0, |idle| idle.len())
    }

    /// Whether the idle queue is allocated (it goes when a sweep empties it).
    #[cfg(test)]
    pub(crate) fn has_idle_queue(&self) -> bool {
        self.idle_http1.load().is_some()
    }

    /// Whether the shared HTTP/2 connection is open.
    pub fn has_http2(&self) -> bool {
        self.http2.load().as_ref().is_some_and(|shared| !shared.sender.is_closed())
    }

    pub async fn connect_http1(&self, timeout: Duration) -> Result<Http1Sender, ConnectError> {
        let stream = transport::connect(self.addr, timeout).await.map_err(ConnectError)?;
        match (self.mtls(), &self.mesh) {
            // A peer sidecar: only upgrades come here (requests share its
            // HTTP/2 connection), and they go over mTLS like the rest.
            (Some(tls), Some(peer)) => {
                let carries = transport::Carries::Http1Upgrade;
                let stream = transport::connect_tls(stream, &tls, &peer.service, carries, timeout)
                    .await
                    .map_err(ConnectError)?;
                handshake_http1(stream).await
            }
            _ => handshake_http1(stream).await,
        }
    }

    /// The shared HTTP/2 connection, opened on first use and again after it
    /// closes.
    pub async fn http2(&self, timeout: Duration) -> Result<Http2Sender, ConnectError> {
        if let Some(sender) = self.open_http2_sender() {
            return Ok(sender);
        }
        // Boxed: the connect and TLS handshake futures are large, and every
        // request's future would carry (and move) them inline otherwise.
        Box::pin(self.open_http2_once(timeout)).await
    }

    /// The shared connection's sender, when it is open and was opened with
    /// the mTLS configuration in force.
    fn open_http2_sender(&self) -> Option<Http2Sender> {
        let guard = self.http2.load();
        let shared = guard.as_ref()?;
        if shared.sender.is_closed() || !self.opened_with_current_tls(shared) {
            return None;
        }
        // Written only when the tick moved: no shared write per request.
        let now = idle_now();
        if shared.last_used.load(Ordering::Relaxed) != now {
            shared.last_used.store(now, Ordering::Relaxed);
        }
        Some(shared.sender.clone())
    }

    /// Opens the shared connection, or waits for the request opening it
    /// and shares its outcome: a burst of requests to a peer makes one
    /// connection (and one TLS handshake), not one each.
    async fn open_http2_once(&self, timeout: Duration) -> Result<Http2Sender, ConnectError> {
        let failures = self.http2_failures.load(Ordering::Acquire);
        let _opening = self.http2_opening.lock().await;
        if let Some(sender) = self.open_http2_sender() {
            return Ok(sender);
        }
        if self.http2_failures.load(Ordering::Acquire) != failures {
            let error = io::Error::other("the connection opened for this request's burst failed");
            return Err(ConnectError(error));
        }
        let opened = self.open_http2(timeout).await;
        if opened.is_err() {
            self.http2_failures.fetch_add(1, Ordering::Release);
        }
        opened
    }

    async fn open_http2(&self, timeout: Duration) -> Result<Http2Sender, ConnectError> {
        let stream = transport::connect(self.addr, timeout).await.map_err(ConnectError)?;
        let opened_with = self.mtls();
        let sender = match (opened_with.clone(), &self.mesh) {
            (Some(tls), Some(peer)) => {
                let carries = transport::Carries::Http2;
                let stream = transport::connect_tls(stream, &tls, &peer.service, carries, timeout)
                    .await
                    .map_err(ConnectError)?;
                handshake_http2(stream).await?
            }
            _ => handshake_http2(stream).await?,
        };
        let last_used = AtomicU32::new(idle_now());
        self.http2.store(Some(Arc::new(SharedHttp2 { sender: sender.clone(), tls: opened_with, last_used })));
        Ok(sender)
    }

    /// Whether a shared connection was opened with the mTLS configuration
    /// in force (always, for endpoints that are not mesh sidecars).
    fn opened_with_current_tls(&self, shared: &SharedHttp2) -> bool {
        let Some(peer) = &self.mesh else { return true };
        let current = peer.tls.load();
        match (current.as_ref(), &shared.tls) {
            (Some(now), Some(then)) => Arc::ptr_eq(now, then),
            (None, None) => true,
            _ => false,
        }
    }

    pub fn forget_http2(&self) {
        self.http2.store(None);
    }

    /// How a request to this peer goes when its service asks for QUIC.
    pub fn quic_route(&self, now_ms: u64) -> QuicRoute {
        if self.mesh.is_none() || now_ms < self.quic_down_until_ms.load(Ordering::Relaxed) {
            return QuicRoute::Tcp;
        }
        if let Some(shared) = self.quic.load().as_ref() {
            if shared.connection.close_reason().is_none() && self.opened_quic_with_current_tls(shared) {
                let now = idle_now();
                if shared.last_used.load(Ordering::Relaxed) != now {
                    shared.last_used.store(now, Ordering::Relaxed);
                }
                return QuicRoute::Ready(shared.sender.clone(), shared.connection.clone());
            }
        }
        if self.quic_opening.swap(true, Ordering::AcqRel) {
            QuicRoute::Tcp
        } else {
            QuicRoute::Open
        }
    }

    /// Opens the shared HTTP/3 connection (after `QuicRoute::Open`). When it
    /// cannot be had, the peer is reached over TCP for a while (30 s by
    /// default, `--quic-retry-after`).
    pub async fn open_quic(
        &self,
        timeout: Duration,
    ) -> Result<(QuicSender, quinn::Connection), ConnectError> {
        // Cleared however this ends: a request dropped mid-handshake (its
        // caller gone) must not leave the peer on TCP for good.
        let _opening = Opening(&self.quic_opening);
        let opened = self.try_open_quic(timeout).await;
        if let Err(error) = &opened {
            tracing::info!(peer = %self.addr, error = %error.0, "QUIC to a peer failed; TCP for a while");
            self.quic_failed();
        }
        opened
    }

    /// Marks QUIC to this peer as failed: TCP for a while. The connection
    /// is closed, so requests waiting on it fail now rather than at its
    /// idle timeout.
    pub fn quic_failed(&self) {
        let until = crate::clock::now_millis() + QUIC_RETRY_AFTER_MS.load(Ordering::Relaxed);
        self.quic_down_until_ms.store(until, Ordering::Relaxed);
        if let Some(shared) = self.quic.swap(None) {
            shared.connection.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"path failed");
        }
    }

    /// Lets go of `connection` if it is the shared one (it closed): the
    /// next request opens another.
    pub fn forget_quic(&self, connection: &quinn::Connection) {
        let current = self.quic.load_full();
        if current.as_ref().is_some_and(|shared| shared.connection.stable_id() == connection.stable_id()) {
            self.quic.compare_and_swap(&current, None);
        }
    }

    async fn try_open_quic(
        &self,
        timeout: Duration,
    ) -> Result<(QuicSender, quinn::Connection), ConnectError> {
        let fail = |message: String| ConnectError(io::Error::other(message));
        let peer = self.mesh.as_ref().ok_or_else(|| fail("not a mesh peer".to_owned()))?;
        let tls = peer.tls.load_full().ok_or_else(|| fail("no certificate yet".to_owned()))?;
        let config = tls.quic_client.clone().ok_or_else(|| fail("no QUIC client config".to_owned()))?;
        let endpoint = peer.quic.endpoint().ok_or_else(|| fail("no QUIC client socket".to_owned()))?;
        let server_name = format!("{}.mesh", peer.service);
        let connecting =
            endpoint.connect_with(config, self.addr, &server_name).map_err(|e| fail(e.to_string()))?;
        let connection = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(connection)) => {
                tls.record_handshake(crate::tls::Side::Outbound, true);
                connection
            }
            Ok(Err(error)) => {
                tls.record_handshake(crate::tls::Side::Outbound, false);
                return Err(fail(format!("QUIC handshake: {error}")));
            }
            Err(_) => {
                return Err(fail(format!("no QUIC handshake within {}", humantime::format_duration(timeout))))
            }
        };
        let started = h3::client::new(h3_quinn::Connection::new(connection.clone()));
        let (mut driver, sender) = match tokio::time::timeout(timeout, started).await {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => return Err(fail(format!("HTTP/3: {error}"))),
            Err(_) => return Err(fail("HTTP/3 did not start in time".to_owned())),
        };
        let open = crate::listen::quic::OpenConnection::count(&QUIC_OPEN_OUTBOUND);
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            drop(open);
        });
        let last_used = AtomicU32::new(idle_now());
        let shared =
            SharedQuic { sender: sender.clone(), connection: connection.clone(), tls: Some(tls), last_used };
        self.quic.store(Some(Arc::new(shared)));
        Ok((sender, connection))
    }

    fn opened_quic_with_current_tls(&self, shared: &SharedQuic) -> bool {
        let Some(peer) = &self.mesh else { return false };
        match (peer.tls.load().as_ref(), &shared.tls) {
            (Some(now), Some(then)) => Arc::ptr_eq(now, then),
            _ => false,
        }
    }

    /// Where QUIC to this peer stands now.
    pub fn quic_state(&self, now_ms: u64) -> QuicState {
        if self.quic.load().as_ref().is_some_and(|shared| shared.connection.close_reason().is_none()) {
            QuicState::Open
        } else if now_ms < self.quic_down_until_ms.load(Ordering::Relaxed) {
            QuicState::Failed
        } else {
            QuicState::Closed
        }
    }
}

/// An HTTP/1.1 client connection over `stream` (plain or TLS), driven by
/// its own task, which hands the connection over if an upgrade succeeds.
async fn handshake_http1<S>(stream: S) -> Result<Http1Sender, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError(io::Error::other(e)))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

/// An HTTP/2 client connection over `stream` (plain or TLS), driven by its own task.
async fn handshake_http2<S>(stream: S) -> Result<Http2Sender, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError(io::Error::other(e)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod quic_opening_tests {
    use super::*;

    /// A mesh identity from a throwaway CA, as a sidecar holds one.
    fn mesh_tls(dir: &std::path::Path) -> MeshTls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.clone().self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let uri = rcgen::string::Ia5String::try_from("spiffe://mesh.local/service/caller").unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        std::fs::write(dir.join("cert.pem"), leaf.signed_by(&key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
        let files = crate::config::IdentityFiles {
            certificate: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            roots: dir.join("ca.pem"),
        };
        let identity = crate::identity::from_files(&files).unwrap();
        MeshTls::new(&identity, Default::default()).unwrap()
    }

    #[tokio::test]
    async fn a_request_dropped_while_opening_quic_lets_the_next_one_open_it() {
        let dir = std::env::temp_dir().join(format!("quic-opening-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A peer whose UDP swallows everything: the handshake never ends.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tls = Arc::new(ArcSwapOption::from(Some(Arc::new(mesh_tls(&dir)))));
        let peer = MeshPeer { service: "callee".into(), tls, quic: Arc::new(QuicClient::default()) };
        let pool = ConnPool::new(silent.local_addr().unwrap(), Some(peer));

        assert!(matches!(pool.quic_route(0), QuicRoute::Open));
        assert!(matches!(pool.quic_route(0), QuicRoute::Tcp), "one request opens; the others go over TCP");
        // The opening request's caller goes away mid-handshake.
        let opening = pool.open_quic(Duration::from_secs(10));
        assert!(tokio::time::timeout(Duration::from_millis(100), opening).await.is_err());
        assert!(matches!(pool.quic_route(0), QuicRoute::Open), "the next request opens QUIC again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod http2_opening_tests {
    use super::*;

    /// `count` requests at once asking `pool` for its HTTP/2 connection.
    async fn burst(
        pool: &Arc<ConnPool>,
        count: usize,
        timeout: Duration,
    ) -> Vec<Result<Http2Sender, ConnectError>> {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..count {
            let pool = pool.clone();
            requests.spawn(async move { pool.http2(timeout).await });
        }
        requests.join_all().await
    }

    /// Connections waiting in a listener's accept queue.
    fn queued(listener: &std::net::TcpListener) -> usize {
        listener.set_nonblocking(true).unwrap();
        std::iter::from_fn(|| listener.accept().ok()).take(1000).count()
    }

    #[tokio::test]
    async fn a_burst_of_requests_to_an_http2_endpoint_opens_one_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pool = Arc::new(ConnPool::new(listener.local_addr().unwrap(), None));
        let opened = burst(&pool, 32, Duration::from_secs(5)).await;
        assert!(opened.iter().all(Result::is_ok), "every request has a sender");
        assert_eq!(queued(&listener), 1, "one connection, shared");
    }

    // The paused clock moves on only while every task waits: the timings
    // below are the connect timeouts', whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn when_the_opening_fails_the_requests_waiting_on_it_fail_with_it() {
        // A listener whose accept queue (backlog 0: one connection) is full
        // drops new SYNs: a connect to it times out.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _filler = std::net::TcpStream::connect(addr).unwrap();
        let pool = Arc::new(ConnPool::new(addr, None));
        let timeout = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let opened = burst(&pool, 8, timeout).await;
        assert!(opened.iter().all(Result::is_err), "no connection could be had");
        // One timeout, not one after another for each waiting request.
        assert!(started.elapsed() < 2 * timeout, "took {:?}", started.elapsed());
        // The next request tries again.
        let again = tokio::time::timeout(Duration::from_millis(100), pool.http2(timeout)).await;
        assert!(again.is_err(), "a new attempt, waiting on the full queue");
    }
}
