//! A body as it arrives over HTTP/3, a peer's request (server side) or a
//! peer's answer (client side): data frames, then trailers (gRPC needs
//! them), read through h3's polling calls so that it streams like an
//! HTTP/2 body does.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::StreamError;
use http::HeaderMap;
use http_body::{Body, Frame};

use crate::http::body::{BoxError, CallerBroken};

/// The receiving half of an HTTP/3 request stream.
pub trait H3Recv: Send + Unpin + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>>;
}

pub type ServerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// A peer's answer stream, with a handle on its connection: h3 closes a
/// connection once its last handle is gone, and one the pool has let go
/// of (a renewed certificate opens another) must live until its answers
/// are read.
pub struct ClientRecv {
    stream: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
    _connection: crate::endpoint::pool::QuicSender,
}

impl ClientRecv {
    pub fn new(
        stream: h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
        connection: crate::endpoint::pool::QuicSender,
    ) -> ClientRecv {
        ClientRecv { stream, _connection: connection }
    }
}

impl H3Recv for ServerRecv {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
        self.poll_recv_data(cx).map_ok(|data| data.map(|mut d| d.copy_to_bytes(d.remaining())))
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

impl H3Recv for ClientRecv {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>> {
        self.stream.poll_recv_data(cx).map_ok(|data| data.map(|mut d| d.copy_to_bytes(d.remaining())))
    }

    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, StreamError>> {
        self.stream.poll_recv_trailers(cx)
    }
}

pub struct H3Body<S> {
    stream: S,
    data_done: bool,
    finished: bool,
    /// Only a request body's: it tells a failed send to the app apart
    /// from the peer's stream breaking. An answer needs none.
    broken: Option<Arc<AtomicBool>>,
}

/// A peer's request to the local app.
pub type H3RequestBody = H3Body<ServerRecv>;
/// A peer's answer to this proxy's request.
pub type H3ResponseBody = H3Body<ClientRecv>;

impl<S: H3Recv> H3Body<S> {
    /// An answer's body.
    pub fn new(stream: S) -> H3Body<S> {
        H3Body { stream, data_done: false, finished: false, broken: None }
    }

    /// An answer known to have no body and no trailers: it reports its
    /// end before it is read, so an HTTP/2 caller gets it as one HEADERS
    /// frame ending the stream.
    pub fn ended(stream: S) -> H3Body<S> {
        H3Body { stream, data_done: true, finished: true, broken: None }
    }

    /// A peer's request body, whose breaking `broken_flag` tells.
    pub fn request(stream: S) -> H3Body<S> {
        H3Body { stream, data_done: false, finished: false, broken: Some(Arc::default()) }
    }

    /// What tells, after a send failed, whether this stream broke.
    pub fn broken_flag(&self) -> CallerBroken {
        CallerBroken::new(self.broken.clone())
    }

    fn fail(&mut self, error: StreamError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(broken) = &self.broken {
            broken.store(true, Ordering::Relaxed);
        }
        self.finished = true;
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

impl<S: H3Recv> Body for H3Body<S> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match std::task::ready!(this.stream.poll_data(cx)) {
                Ok(Some(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(None) => this.data_done = true,
                Err(error) => return this.fail(error),
            }
        }
        match std::task::ready!(this.stream.poll_trailers(cx)) {
            Ok(trailers) => {
                this.finished = true;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Err(error) => this.fail(error),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }
}
