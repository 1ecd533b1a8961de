//! Reused connections to one endpoint: idle HTTP/1 connections in a
//! lock-free queue, and one shared multiplexed HTTP/2 connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::http::body::RequestBody;
use crate::transport;

pub type Http1Sender = http1::SendRequest<RequestBody>;
pub type Http2Sender = http2::SendRequest<RequestBody>;

/// Idle HTTP/1 connections kept per endpoint; more are closed when released.
const MAX_IDLE_HTTP1: usize = 256;

pub struct ConnPool {
    addr: SocketAddr,
    idle_http1: ArrayQueue<Http1Sender>,
    http2: ArcSwapOption<Http2Sender>,
}

/// Why no connection could be had.
#[derive(Debug)]
pub struct ConnectError(pub io::Error);

impl ConnPool {
    pub fn new(addr: SocketAddr) -> Self {
        ConnPool { addr, idle_http1: ArrayQueue::new(MAX_IDLE_HTTP1), http2: ArcSwapOption::empty() }
    }

    /// An idle HTTP/1 connection ready for a request, if one is pooled.
    pub fn take_http1(&self) -> Option<Http1Sender> {
        while let Some(sender) = self.idle_http1.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    pub fn put_http1(&self, sender: Http1Sender) {
        if sender.is_ready() {
            // A full queue drops the sender, which closes that connection.
            let _ = self.idle_http1.push(sender);
        }
    }

    pub async fn connect_http1(&self, timeout: Duration) -> Result<Http1Sender, ConnectError> {
        let stream = transport::connect(self.addr, timeout).await.map_err(ConnectError)?;
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| ConnectError(io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    /// The shared HTTP/2 connection, opened on first use and again after it
    /// closes.
    pub async fn http2(&self, timeout: Duration) -> Result<Http2Sender, ConnectError> {
        if let Some(sender) = self.http2.load().as_ref() {
            if !sender.is_closed() {
                return Ok(Http2Sender::clone(sender));
            }
        }
        let stream = transport::connect(self.addr, timeout).await.map_err(ConnectError)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError(io::Error::other(e)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        self.http2.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    pub fn forget_http2(&self) {
        self.http2.store(None);
    }
}
