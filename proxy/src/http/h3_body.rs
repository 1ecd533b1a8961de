//! A peer's request body as it arrives over HTTP/3: data frames, then
//! trailers (gRPC needs them), read through h3's polling calls so that it
//! streams to the local app like an HTTP/2 body does.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};

use crate::http::body::{BoxError, CallerBroken};

type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

pub struct H3RequestBody {
    stream: RecvStream,
    data_done: bool,
    finished: bool,
    broken: Arc<AtomicBool>,
}

impl H3RequestBody {
    pub fn new(stream: RecvStream) -> H3RequestBody {
        H3RequestBody { stream, data_done: false, finished: false, broken: Arc::default() }
    }

    /// What tells, after a send failed, whether the peer's stream broke.
    pub fn broken_flag(&self) -> CallerBroken {
        CallerBroken::new(self.broken.clone())
    }

    fn fail(&mut self, error: h3::error::StreamError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.broken.store(true, Ordering::Relaxed);
        self.finished = true;
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

impl Body for H3RequestBody {
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
            match std::task::ready!(this.stream.poll_recv_data(cx)) {
                Ok(Some(mut data)) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Ok(None) => this.data_done = true,
                Err(error) => return this.fail(error),
            }
        }
        match std::task::ready!(this.stream.poll_recv_trailers(cx)) {
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
