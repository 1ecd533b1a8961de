//! Body types of the request path, as enums rather than boxes so the hot
//! path does not allocate for them.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::endpoint::pool::{ConnPool, Http1Sender};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to an endpoint: either bytes kept for replay
/// (so the request can be retried) or the caller's stream (which cannot).
pub enum RequestBody {
    Buffered(Option<Bytes>),
    Streaming(CallerBody),
    /// A peer's request over QUIC (HTTP/3), on its way to the local app.
    /// Boxed: rare beside the others, and larger.
    Quic(Box<crate::http::h3_body::H3RequestBody>),
}

/// The caller's body streaming to an endpoint. A failure to read it (bad
/// chunk framing, a caller gone mid-upload) is the caller's fault; it is
/// noted here so that the sender does not hold it against the endpoint.
pub struct CallerBody {
    incoming: Incoming,
    /// None for a body that is empty from the start (most requests): it
    /// cannot break, and the request allocates nothing for it.
    broken: Option<Arc<AtomicBool>>,
}

impl CallerBody {
    pub fn new(incoming: Incoming) -> CallerBody {
        let broken = (!incoming.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        CallerBody { incoming, broken }
    }

    /// A flag that turns true once reading the caller's body failed.
    pub fn broken_flag(&self) -> CallerBroken {
        CallerBroken(self.broken.clone())
    }
}

/// Whether the caller's body broke off, seen after the body was sent away.
#[derive(Clone)]
pub struct CallerBroken(Option<Arc<AtomicBool>>);

impl CallerBroken {
    /// `None`: a body that is never judged (it cannot be the caller's fault).
    pub fn new(flag: Option<Arc<AtomicBool>>) -> CallerBroken {
        CallerBroken(flag)
    }

    pub fn get(&self) -> bool {
        self.0.as_ref().is_some_and(|broken| broken.load(Ordering::Relaxed))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Streaming(caller) => {
                let polled = Pin::new(&mut caller.incoming).poll_frame(cx);
                if let (Poll::Ready(Some(Err(_))), Some(broken)) = (&polled, &caller.broken) {
                    broken.store(true, Ordering::Relaxed);
                }
                boxed_error(polled)
            }
            RequestBody::Quic(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Buffered(bytes) => bytes.is_none(),
            RequestBody::Streaming(caller) => caller.incoming.is_end_stream(),
            RequestBody::Quic(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Buffered(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Buffered(None) => SizeHint::with_exact(0),
            RequestBody::Streaming(caller) => caller.incoming.size_hint(),
            RequestBody::Quic(_) => SizeHint::default(),
        }
    }
}

/// A response body's first frame, read before its headers were passed on.
/// Trailers are boxed: they rarely come first, and a header map inline
/// would enlarge every response.
pub enum HeldFrame {
    Data(Bytes),
    Trailers(Box<HeaderMap>),
}

impl HeldFrame {
    pub fn new(frame: Frame<Bytes>) -> Option<HeldFrame> {
        match frame.into_data() {
            Ok(data) => Some(HeldFrame::Data(data)),
            Err(frame) => frame.into_trailers().ok().map(|t| HeldFrame::Trailers(Box::new(t))),
        }
    }

    fn into_frame(self) -> Frame<Bytes> {
        match self {
            HeldFrame::Data(data) => Frame::data(data),
            HeldFrame::Trailers(trailers) => Frame::trailers(*trailers),
        }
    }
}

/// A response body going back to the caller. An HTTP/1 connection goes back
/// to its pool only once its response body has been read to the end.
pub struct ResponseBody {
    /// The body's first frame, read before the headers were passed on.
    held: Option<HeldFrame>,
    inner: ResponseInner,
    release: Option<(Arc<ConnPool>, Http1Sender)>,
}

enum ResponseInner {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

/// A hyper body's frame with its error boxed, as bodies of either kind
/// (hyper's or h3's) report it. Boxed only when there is an error.
fn boxed_error(
    polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    polled.map(|frame| frame.map(|result| result.map_err(BoxError::from)))
}

/// An endpoint's answer body: hyper's (HTTP/1.1 or HTTP/2 over TCP), or
/// h3's (HTTP/3 over QUIC, boxed: rare beside the other, and larger).
pub enum UpstreamBody {
    Hyper(Incoming),
    Quic(Box<crate::http::h3_body::H3ResponseBody>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(incoming) => boxed_error(Pin::new(incoming).poll_frame(cx)),
            UpstreamBody::Quic(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(incoming) => incoming.is_end_stream(),
            UpstreamBody::Quic(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(incoming) => incoming.size_hint(),
            UpstreamBody::Quic(body) => body.size_hint(),
        }
    }
}

impl ResponseBody {
    /// An endpoint's answer; `held` is its first frame if it was read ahead.
    pub fn upstream(
        body: UpstreamBody,
        held: Option<HeldFrame>,
        release: Option<(Arc<ConnPool>, Http1Sender)>,
    ) -> Self {
        let mut body = ResponseBody { held, inner: ResponseInner::Upstream(body), release };
        body.release_if_done();
        body
    }

    pub fn local(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let inner = ResponseInner::Local(if bytes.is_empty() { None } else { Some(bytes) });
        ResponseBody { held: None, inner, release: None }
    }

    pub fn empty() -> Self {
        ResponseBody { held: None, inner: ResponseInner::Local(None), release: None }
    }

    /// Whether the connection has delivered the whole body (a held frame
    /// may still be waiting for the caller).
    fn read_to_end(&self) -> bool {
        match &self.inner {
            ResponseInner::Local(bytes) => bytes.is_none(),
            ResponseInner::Upstream(incoming) => incoming.is_end_stream(),
        }
    }

    fn release_if_done(&mut self) {
        if self.read_to_end() {
            if let Some((pool, sender)) = self.release.take() {
                pool.put_http1(sender);
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.held.take() {
            return Poll::Ready(Some(Ok(frame.into_frame())));
        }
        let polled = match &mut this.inner {
            ResponseInner::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseInner::Upstream(incoming) => Pin::new(incoming).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => {
                if let Some((pool, sender)) = this.release.take() {
                    pool.put_http1(sender);
                }
            }
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            // A broken body means a broken connection: never reuse it.
            Poll::Ready(Some(Err(_))) => this.release = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.read_to_end()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = match &self.inner {
            ResponseInner::Local(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ResponseInner::Local(None) => SizeHint::with_exact(0),
            ResponseInner::Upstream(incoming) => incoming.size_hint(),
        };
        let held = match &self.held {
            Some(HeldFrame::Data(data)) => data.len() as u64,
            _ => return rest,
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}
