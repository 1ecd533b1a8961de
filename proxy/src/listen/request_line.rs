//! A limit on the first request line of a plaintext connection. hyper
//! answers a head that outgrows its read buffer with 431, even when it is
//! the request line (the URI) that is too long; RFC 9110 (15.5.15) says
//! 414. This wrapper watches a connection's first line: once it passes
//! `MAX_REQUEST_LINE` without ending, the caller gets `414` with
//! `x-mesh-error: bad-request`, the rest of what it sends is read and
//! dropped (bounded in bytes and time, so the answer is not lost to a
//! reset), and hyper sees the connection end. After the first line the
//! wrapper only passes bytes through.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest request line accepted; hyper's own URI limit is 64 KiB.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// How much of a refused request is read and dropped, and for how long.
const DRAIN_BYTES: usize = 4 * 1024 * 1024;
const DRAIN_FOR: Duration = Duration::from_secs(2);

const REFUSAL: &[u8] = b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\nx-mesh-error: bad-request\r\nconnection: close\r\ncontent-length: 42\r\n\r\nbad-request: the request line is too long\n";

pub struct FirstLineLimit<T> {
    inner: T,
    state: State,
}

enum State {
    /// Still in the first line; so many bytes of it seen.
    Scanning(usize),
    Passing,
    /// Writing the refusal; so many bytes of it written.
    Refusing(usize),
    Draining {
        left: usize,
        until: Pin<Box<tokio::time::Sleep>>,
    },
    Done,
}

impl<T> FirstLineLimit<T> {
    pub fn new(inner: T) -> FirstLineLimit<T> {
        FirstLineLimit { inner, state: State::Scanning(0) }
    }
}

/// What a read of `fresh` bytes, after `seen` bytes of a first line without
/// its end, means: the line ended (pass on), goes on (new count), or is too
/// long. Pure.
#[derive(Debug, PartialEq, Eq)]
pub enum LineProgress {
    Ended,
    Continues(usize),
    TooLong,
}

pub fn progress(seen: usize, fresh: &[u8]) -> LineProgress {
    match fresh.iter().position(|b| *b == b'\n') {
        Some(at) if seen + at <= MAX_REQUEST_LINE => LineProgress::Ended,
        Some(_) => LineProgress::TooLong,
        None if seen + fresh.len() > MAX_REQUEST_LINE => LineProgress::TooLong,
        None => LineProgress::Continues(seen + fresh.len()),
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstLineLimit<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Passing => return Pin::new(&mut this.inner).poll_read(cx, buf),
                State::Scanning(seen) => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    match progress(*seen, &buf.filled()[before..]) {
                        LineProgress::Ended => this.state = State::Passing,
                        LineProgress::Continues(now) => *seen = now,
                        LineProgress::TooLong => {
                            // hyper never sees these bytes; it sees the end instead.
                            buf.set_filled(before);
                            this.state = State::Refusing(0);
                            continue;
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Refusing(written) => {
                    while *written < REFUSAL.len() {
                        match ready!(Pin::new(&mut this.inner).poll_write(cx, &REFUSAL[*written..])) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => *written += n,
                        }
                    }
                    let _ = ready!(Pin::new(&mut this.inner).poll_flush(cx));
                    let until = Box::pin(tokio::time::sleep(DRAIN_FOR));
                    this.state = State::Draining { left: DRAIN_BYTES, until };
                }
                State::Draining { left, until } => {
                    if until.as_mut().poll(cx).is_ready() || *left == 0 {
                        this.state = State::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut sink = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sink)) {
                        Ok(()) if !sink.filled().is_empty() => {
                            *left = left.saturating_sub(sink.filled().len());
                        }
                        _ => this.state = State::Done,
                    }
                }
                // The end of the connection, as far as hyper can tell.
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstLineLimit<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_is_measured_across_reads() {
        let long = vec![b'a'; MAX_REQUEST_LINE];
        // (seen before, bytes read, progress)
        let table: [(usize, &[u8], LineProgress); 6] = [
            (0, b"GET / HTTP/1.1\r\nHost: web\r\n", LineProgress::Ended),
            (0, b"GET /aaaa", LineProgress::Continues(9)),
            (9, b"aa HTTP/1.1\r\n", LineProgress::Ended),
            (0, &long, LineProgress::Continues(MAX_REQUEST_LINE)),
            (MAX_REQUEST_LINE, b"a", LineProgress::TooLong),
            (MAX_REQUEST_LINE - 1, b"aa\n", LineProgress::TooLong),
        ];
        for (seen, fresh, expected) in table {
            assert_eq!(progress(seen, fresh), expected, "{seen} + {} bytes", fresh.len());
        }
    }

    #[test]
    fn the_refusal_says_414_and_its_length_is_right() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 "));
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    }
}
