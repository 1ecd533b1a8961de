//! meshd's gRPC connections as they are accepted: at most so many open at
//! once, and one that sends nothing or does not finish its TLS handshake
//! within a deadline is closed, so idle sockets cannot take every file
//! descriptor. Each admitted connection carries its caller (`Peer`), from
//! the client certificate it presented.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::tls::ServerTls;
use super::ControlPlane;
use crate::auth::principal::{self, Peer, Principal};

/// What the gRPC listener allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub first_byte_within: Duration,
}

/// How connections are told apart: the TLS in force and whose mesh it is.
#[derive(Clone)]
pub struct Gate {
    pub tls: Arc<ServerTls>,
    pub trust_domain: String,
    pub control: Arc<ControlPlane>,
}

/// An accepted connection that has completed its TLS handshake, holding
/// its slot until it closes.
pub struct Admitted {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    _slot: OwnedSemaphorePermit,
}

/// Accepts on `listener` and yields the connections that are admitted.
/// Accepting stops once the server drops the stream.
pub fn admit(listener: TcpListener, limits: Limits, gate: Gate) -> ReceiverStream<std::io::Result<Admitted>> {
    let (admitted, stream) = mpsc::channel(64);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = admitted.closed() => return,
            };
            let (stream, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: the listener goes on.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    max = limits.max_connections,
                    "gRPC listener full: a new connection is closed"
                );
                continue;
            };
            // Updates and acks are small messages that must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let admitted = admitted.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(gate.tls.config());
                let handshake = tokio::time::timeout(limits.first_byte_within, acceptor.accept(stream)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        gate.control.metrics.count_handshake_failure();
                        tracing::info!(%addr, %error, "TLS handshake on the gRPC port failed");
                        return;
                    }
                    Err(_) => return,
                };
                let principal = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map_or(Principal::Anonymous, |leaf| principal::of_certificate(leaf, &gate.trust_domain));
                let peer = Peer { addr, principal };
                let _ = admitted.send(Ok(Admitted { stream, peer, _slot: slot })).await;
            });
        }
    });
    ReceiverStream::new(stream)
}

impl Connected for Admitted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
