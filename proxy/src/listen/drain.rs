//! Graceful shutdown of a listener's connections: when draining starts,
//! every open connection is asked to finish (GOAWAY for HTTP/2, close
//! after the request in flight for HTTP/1), and the listener waits until
//! all are gone.
//!
//! Cheaper per request than a watch channel polled on every wake-up: a
//! connection registers its task's waker once, and each poll reads one
//! atomic flag.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    next_id: AtomicU64,
    /// The wakers of open connections, by id; taken by `start`.
    open: Mutex<HashMap<u64, Waker>>,
    /// Signalled each time a connection ends while draining.
    ended: Notify,
}

impl Drain {
    /// Wraps a connection so that it finishes gracefully once draining starts.
    pub fn watch<C: GracefulConnection>(self: &Arc<Self>, connection: C) -> Watched<C> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.lock().expect("drain lock").insert(id, Waker::noop().clone());
        Watched { connection, drain: self.clone(), id, waker: None, asked: false }
    }

    /// Asks every connection to finish and waits until all have.
    pub async fn start(&self) {
        let wakers: Vec<Waker> = {
            let open = self.open.lock().expect("drain lock");
            self.started.store(true, Ordering::Release);
            open.values().cloned().collect()
        };
        wakers.into_iter().for_each(Waker::wake);
        loop {
            let ended = self.ended.notified();
            if self.open.lock().expect("drain lock").is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Records where to wake this connection; false once draining started.
    fn register(&self, id: u64, waker: &Waker) -> bool {
        let mut open = self.open.lock().expect("drain lock");
        if self.started.load(Ordering::Acquire) {
            return false;
        }
        open.insert(id, waker.clone());
        true
    }
}

pin_project_lite::pin_project! {
    /// A connection that finishes gracefully when its listener drains.
    pub struct Watched<C> {
        #[pin]
        connection: C,
        drain: Arc<Drain>,
        id: u64,
        // The waker registered last: a task's waker rarely changes, so the
        // lock is taken about once per connection.
        waker: Option<Waker>,
        asked: bool,
    }

    impl<C> PinnedDrop for Watched<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.drain.open.lock().expect("drain lock").remove(this.id);
            if this.drain.started.load(Ordering::Acquire) {
                this.drain.ended.notify_waiters();
            }
        }
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.asked {
            let mut draining = this.drain.started.load(Ordering::Acquire);
            if !draining && !this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                if this.drain.register(*this.id, cx.waker()) {
                    *this.waker = Some(cx.waker().clone());
                } else {
                    draining = true;
                }
            }
            if draining {
                *this.asked = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        this.connection.poll(cx)
    }
}
