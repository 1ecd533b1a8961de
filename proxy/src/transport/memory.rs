//! An in-memory network for the proxy's in-process tests. Connections to
//! addresses in 192.0.2.0/24 (TEST-NET-1, which no real host uses) are
//! pipes to a [`Listener`] bound there, or refused when none is: the whole
//! request path then runs on one test runtime, where a paused clock
//! decides every timeout.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Bytes a pipe buffers each way before the writer waits.
const PIPE_BUFFER: usize = 64 * 1024;

type Listeners = Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<DuplexStream>>>;

fn listeners() -> &'static Listeners {
    static LISTENERS: OnceLock<Listeners> = OnceLock::new();
    LISTENERS.get_or_init(Default::default)
}

fn is_in_memory(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[..3] == [192, 0, 2])
}

/// The in-memory address with this last octet and port.
pub fn addr(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, host], port))
}

/// Opens a pipe to the listener at `addr`; None when `addr` is not on
/// the in-memory network.
pub fn dial(addr: SocketAddr) -> Option<io::Result<DuplexStream>> {
    if !is_in_memory(addr) {
        return None;
    }
    let listeners = listeners().lock().expect("in-memory listeners");
    let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens on {addr}"));
    let Some(incoming) = listeners.get(&addr) else {
        return Some(Err(refused()));
    };
    let (near, far) = tokio::io::duplex(PIPE_BUFFER);
    Some(incoming.send(far).map(|()| near).map_err(|_| refused()))
}

/// Accepts the pipes opened to one in-memory address, until dropped.
pub struct Listener {
    addr: SocketAddr,
    incoming: mpsc::UnboundedReceiver<DuplexStream>,
}

impl Listener {
    /// Panics when the address is taken: each test uses its own.
    pub fn bind(addr: SocketAddr) -> Self {
        assert!(is_in_memory(addr), "{addr} is not on the in-memory network");
        let (sender, incoming) = mpsc::unbounded_channel();
        let previous = listeners().lock().expect("in-memory listeners").insert(addr, sender);
        assert!(previous.is_none(), "{addr} is already bound");
        Listener { addr, incoming }
    }

    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.incoming.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        listeners().lock().expect("in-memory listeners").remove(&self.addr);
    }
}

/// A connection to an endpoint in a test build: TCP, or a pipe.
pub enum Stream {
    Tcp(TcpStream),
    Memory(DuplexStream),
}

impl From<TcpStream> for Stream {
    fn from(stream: TcpStream) -> Self {
        Stream::Tcp(stream)
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Memory(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Memory(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Memory(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Memory(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
