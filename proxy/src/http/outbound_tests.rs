//! The retry loop in-process: a caller, the outbound path and a scripted
//! app, joined by in-memory pipes on one runtime whose clock is paused, so
//! every timeout and hold fires at its exact time and no test waits for
//! real time to pass.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use crate::config::parse_config;
use crate::http::deadline::ConnectionTimers;
use crate::http::outbound::forward;
use crate::http::send::FIRST_FRAME_HOLD;
use crate::http::MESH_ERROR;
use crate::snapshot::{LongLived, Service};
use crate::transport::memory;

/// What the scripted app does with one request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// 200 with the body "ok".
    Ok,
    /// This status, with an empty body.
    Status(u16),
    /// 200 and its headers at once; after the wait, the body "ok".
    BodyAfter(Duration),
    /// 200 and its headers at once; after the wait, the connection is cut
    /// before the body.
    CutAfter(Duration),
    /// Never answers.
    Hang,
}

/// A body sent after a wait, or a connection cut instead of it.
struct ScriptedBody {
    wait: Option<Pin<Box<Sleep>>>,
    cut: bool,
    done: bool,
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(wait) = self.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            self.wait = None;
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.done = true;
        if self.cut {
            return Poll::Ready(Some(Err(io::Error::other("the app's connection was cut"))));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ok")))))
    }
}

/// Serves the script at an in-memory address: the n-th request gets the
/// n-th answer, and the last answer repeats. Returns the count of requests
/// the app saw.
fn start_app(host: u8, script: &'static [Answer]) -> Arc<AtomicUsize> {
    start_app_counting(host, script).0
}

/// `start_app`, also returning the count of connections it accepted.
fn start_app_counting(host: u8, script: &'static [Answer]) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut listener = memory::Listener::bind(memory::addr(host, 80));
    let (counter, connections) = (seen.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Some(pipe) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            let app = service_fn(move |_request: Request<Incoming>| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let answer = script[n.min(script.len() - 1)];
                async move {
                    let (status, wait, cut) = match answer {
                        Answer::Ok => (200, None, false),
                        Answer::Status(status) => (status, None, false),
                        Answer::BodyAfter(wait) => (200, Some(wait), false),
                        Answer::CutAfter(wait) => (200, Some(wait), true),
                        Answer::Hang => std::future::pending().await,
                    };
                    let body = ScriptedBody {
                        wait: wait.map(|wait| Box::pin(tokio::time::sleep(wait))),
                        cut,
                        done: status != 200,
                    };
                    let length = if status == 200 { "2" } else { "0" };
                    let response = Response::builder().status(status).header("content-length", length);
                    Ok::<_, io::Error>(response.body(body).expect("a valid response"))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(pipe), app),
            );
        }
    });
    (seen, accepted)
}

/// The service `echo` with one endpoint at the in-memory `host`.
fn service(host: u8, policy: &str) -> Arc<Service> {
    let endpoint = memory::addr(host, 80);
    let text = format!(
        "[listen]\n[[services]]\nname = \"echo\"\ntimeout = \"2s\"\n{policy}\nendpoints = [{{ addr = \"{endpoint}\" }}]\n"
    );
    let config = parse_config(&text).expect("a valid config");
    LongLived::default().build(config, None).services["echo"].clone()
}

/// What the caller got: the status, the `x-mesh-error`, the body (or why it
/// broke off) and how long it all took on the test's clock.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    mesh_error: Option<String>,
    body: Result<Bytes, String>,
    took: Duration,
}

/// Sends one request through the outbound path, as an app would.
async fn call(service: Arc<Service>, method: Method) -> Got {
    let started = Instant::now();
    let (caller_end, proxy_end) = tokio::io::duplex(64 * 1024);
    let timers = Arc::new(ConnectionTimers::default());
    let outbound = service_fn(move |request| {
        let (service, timers) = (service.clone(), timers.clone());
        async move { Ok::<_, io::Error>(forward(service, request, timers).await) }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(proxy_end), outbound),
    );
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(caller_end)).await.expect("caller handshake");
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "echo")
        .header("content-length", "4")
        .body(Full::new(Bytes::from_static(b"ping")))
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("an answer from the proxy");
    let status = response.status();
    let mesh_error = response.headers().get(MESH_ERROR).map(|v| v.to_str().unwrap_or("?").to_owned());
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).map_err(|e| e.to_string());
    Got { status, mesh_error, body, took: started.elapsed() }
}

const GOOD: &str =
    "retry = { attempts = 2, on = [\"5xx\"], budget_ratio = 0.2, budget_min_per_second = 100 }";
const NO_BUDGET: &str =
    "retry = { attempts = 2, on = [\"5xx\"], budget_ratio = 0.0, budget_min_per_second = 0 }";
const NO_RETRY: &str = "retry = { attempts = 1 }";

/// A wait shorter than the hold, and one longer.
const SOON: Duration = Duration::from_millis(50);
const LATE: Duration = Duration::from_millis(300);

struct Case {
    name: &'static str,
    method: Method,
    policy: &'static str,
    script: &'static [Answer],
    status: u16,
    mesh_error: Option<&'static str>,
    /// The body the caller reads whole, or None when it must break off.
    body: Option<&'static [u8]>,
    /// Requests the app saw.
    tries: usize,
    /// Retries recorded under `5xx`.
    retried_5xx: u64,
    /// How long the caller waited, at least.
    took_at_least: Duration,
}

fn cases() -> Vec<Case> {
    let case = |name, method, policy, script, status, body: Option<&'static [u8]>, tries, retried_5xx| Case {
        name,
        method,
        policy,
        script,
        status,
        mesh_error: None,
        body,
        tries,
        retried_5xx,
        took_at_least: Duration::ZERO,
    };
    vec![
        case(
            "a 503 goes again",
            Method::GET,
            GOOD,
            &[Answer::Status(503), Answer::Ok],
            200,
            Some(b"ok"),
            2,
            1,
        ),
        case(
            "a POST's 503 does not",
            Method::POST,
            GOOD,
            &[Answer::Status(503), Answer::Ok],
            503,
            Some(b""),
            1,
            0,
        ),
        case("tries are bounded", Method::GET, GOOD, &[Answer::Status(503)], 503, Some(b""), 2, 1),
        case(
            "no retry policy, no retry",
            Method::GET,
            NO_RETRY,
            &[Answer::Status(503), Answer::Ok],
            503,
            Some(b""),
            1,
            0,
        ),
        Case {
            mesh_error: Some("retry-budget-exhausted"),
            ..case(
                "an empty budget stops a retry",
                Method::GET,
                NO_BUDGET,
                &[Answer::Status(503), Answer::Ok],
                503,
                Some(b""),
                1,
                0,
            )
        },
        // The answer's headers were held for its body; the cut is a broken
        // try, and the caller never sees it.
        case(
            "an answer cut before its body goes again",
            Method::GET,
            GOOD,
            &[Answer::CutAfter(SOON), Answer::Ok],
            200,
            Some(b"ok"),
            2,
            0,
        ),
        // A POST is not held: its headers pass at once, and the cut reaches the caller.
        case(
            "a POST's cut answer reaches the caller",
            Method::POST,
            GOOD,
            &[Answer::CutAfter(SOON), Answer::Ok],
            200,
            None,
            1,
            0,
        ),
        Case {
            took_at_least: LATE,
            ..case(
                "a body later than the hold streams whole",
                Method::GET,
                GOOD,
                &[Answer::BodyAfter(LATE)],
                200,
                Some(b"ok"),
                1,
                0,
            )
        },
        // Past the hold the headers have gone on: a cut then cannot be retried.
        Case {
            took_at_least: LATE,
            ..case(
                "a cut after the hold reaches the caller",
                Method::GET,
                GOOD,
                &[Answer::CutAfter(LATE), Answer::Ok],
                200,
                None,
                1,
                0,
            )
        },
        Case {
            mesh_error: Some("timeout"),
            took_at_least: Duration::from_secs(2),
            ..case(
                "a hung app times out at the service's timeout",
                Method::GET,
                GOOD,
                &[Answer::Hang],
                504,
                None,
                1,
                0,
            )
        },
    ]
}

/// A runtime whose clock stands still until every task waits. One per
/// case: the proxy times requests from its own (real) clock, so a paused
/// clock that earlier cases had moved on would place deadlines early.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime")
}

#[test]
fn the_retry_loop_follows_its_policy() {
    assert!(LATE > FIRST_FRAME_HOLD && SOON < FIRST_FRAME_HOLD, "the late answers must come after the hold");
    for (n, case) in cases().into_iter().enumerate() {
        paused_runtime().block_on(async {
            let host = 10 + n as u8;
            let seen = start_app(host, case.script);
            let service = service(host, case.policy);
            let name = case.name;
            // On the paused clock: a request the proxy never ends fails the test at once.
            let got =
                tokio::time::timeout(Duration::from_secs(60), call(service.clone(), case.method.clone()))
                    .await
                    .unwrap_or_else(|_| panic!("{name}: no answer within a minute"));
            assert_eq!(got.status.as_u16(), case.status, "{name}: {got:?}");
            assert_eq!(got.mesh_error.as_deref(), case.mesh_error, "{name}: {got:?}");
            match case.body {
                Some(body) => assert_eq!(got.body.as_deref().ok(), Some(body), "{name}: {got:?}"),
                None if case.status == 504 => {}
                None => assert!(got.body.is_err(), "{name}: the body should break off: {got:?}"),
            }
            assert_eq!(seen.load(Ordering::SeqCst), case.tries, "{name}: requests the app saw");
            assert_eq!(
                service.retry_metrics.server_error.load(Ordering::Relaxed),
                case.retried_5xx,
                "{name}"
            );
            assert!(got.took >= case.took_at_least, "{name}: took {:?}", got.took);
            // Nothing waits longer than the script asks: the clock only moves for timers.
            assert!(
                got.took < case.took_at_least + Duration::from_millis(100),
                "{name}: took {:?}",
                got.took
            );
        });
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_goes_again_then_is_reported() {
    // Nothing listens at host 9.
    let service =
        service(9, "retry = { attempts = 3, on = [\"connect-failure\"], budget_min_per_second = 100 }");
    let got = call(service.clone(), Method::POST).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
    assert_eq!(got.mesh_error.as_deref(), Some("connect-failed"));
    assert!(got.body.as_ref().is_ok_and(|b| String::from_utf8_lossy(b).contains("192.0.2.9:80")), "{got:?}");
    // A request that never left may go again, whatever its method.
    assert_eq!(service.retry_metrics.connect_failure.load(Ordering::Relaxed), 2);
}

#[test]
fn a_connection_idle_for_the_idle_time_is_closed_and_a_busy_one_stays() {
    use crate::endpoint::pool::advance_idle_clock;
    paused_runtime().block_on(async {
        let (seen, accepted) = start_app_counting(40, &[Answer::Ok]);
        let service = service(40, NO_RETRY);
        let pool = service.groups[0].endpoints[0].state.pool.clone();
        assert_eq!(pool.idle_http1_count(), 0, "nothing is pooled before the first request");
        for _ in 0..2 {
            assert_eq!(call(service.clone(), Method::GET).await.status, StatusCode::OK);
        }
        // The second request reused the first one's connection, which is pooled again.
        assert_eq!((seen.load(Ordering::SeqCst), accepted.load(Ordering::SeqCst)), (2, 1));
        assert_eq!(pool.idle_http1_count(), 1);
        // Idle for fewer ticks than the limit: kept.
        advance_idle_clock();
        advance_idle_clock();
        pool.close_idle(3);
        assert_eq!(pool.idle_http1_count(), 1, "closed before its idle time");
        advance_idle_clock();
        pool.close_idle(3);
        assert_eq!(pool.idle_http1_count(), 0, "still pooled after its idle time");
        assert!(!pool.has_idle_queue(), "the emptied queue is kept: an idle endpoint's memory stays");
        // The next request opens a new connection, pooled in a new queue.
        assert_eq!(call(service.clone(), Method::GET).await.status, StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_http1_count(), 1);
    });
}
