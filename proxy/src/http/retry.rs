//! The retry decision, pure: after one try, may the request go again, and
//! on which condition (the counter it is recorded under)? The retry loop
//! (`outbound.rs`) asks, then the budget decides last.

use http::Method;

use crate::config::RetryOn;

/// What came of one try, as the decision sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tried {
    /// No connection could be made: the request never left.
    ConnectFailed,
    /// The connection broke before the answer's body began (the peer died).
    Broken,
    /// An answer came back.
    Answered { status: u16, grpc_unavailable: bool, peer_connect_failed: bool },
}

/// The condition under which the request goes again, or None to return
/// what the try gave. `replayable`: the request may be sent twice (an
/// idempotent method, or the policy allows any) and its body was kept.
/// `attempts_left`: the policy allows another try.
pub fn next_step(tried: Tried, on: &[RetryOn], replayable: bool, attempts_left: bool) -> Option<RetryOn> {
    if !attempts_left {
        return None;
    }
    match tried {
        // The request never left: any request may go again.
        Tried::ConnectFailed => Some(RetryOn::ConnectFailure),
        // The peer may have acted on it: only a replayable request, and
        // only when the policy retries at all.
        Tried::Broken => (replayable && !on.is_empty()).then_some(RetryOn::ConnectFailure),
        Tried::Answered { status, grpc_unavailable, peer_connect_failed } if replayable => {
            retry_reason(on, status, grpc_unavailable, peer_connect_failed)
        }
        Tried::Answered { .. } => None,
    }
}

/// Which retry condition, if any, this response meets. A connect failure
/// arrives as a response when the peer's inbound proxy reports one.
pub fn retry_reason(
    on: &[RetryOn],
    status: u16,
    grpc_unavailable: bool,
    peer_connect_failed: bool,
) -> Option<RetryOn> {
    on.iter().copied().find(|condition| match condition {
        RetryOn::ConnectFailure => peer_connect_failed,
        RetryOn::ServerError => (500..600).contains(&status),
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::Unavailable => grpc_unavailable,
    })
}

pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_try_the_request_goes_again_only_when_it_may() {
        use RetryOn::*;
        let answered =
            |status| Tried::Answered { status, grpc_unavailable: false, peer_connect_failed: false };
        let default: &[RetryOn] = &[ConnectFailure, ServerError];
        // (what the try gave, conditions, replayable, attempts left, the step)
        type Case<'a> = (Tried, &'a [RetryOn], bool, bool, Option<RetryOn>);
        let table: &[Case] = &[
            (Tried::ConnectFailed, default, false, true, Some(ConnectFailure)),
            (Tried::ConnectFailed, &[], false, true, Some(ConnectFailure)),
            (Tried::ConnectFailed, default, true, false, None),
            (Tried::Broken, default, true, true, Some(ConnectFailure)),
            (Tried::Broken, default, false, true, None),
            (Tried::Broken, &[], true, true, None),
            (Tried::Broken, default, true, false, None),
            (answered(503), default, true, true, Some(ServerError)),
            (answered(503), default, false, true, None),
            (answered(503), default, true, false, None),
            (answered(200), default, true, true, None),
            (answered(404), default, true, true, None),
            (answered(500), &[GatewayError], true, true, None),
            (answered(502), &[GatewayError], true, true, Some(GatewayError)),
        ];
        for (tried, on, replayable, left, want) in table {
            assert_eq!(
                next_step(*tried, on, *replayable, *left),
                *want,
                "{tried:?} {on:?} {replayable} {left}"
            );
        }
    }

    #[test]
    fn retry_conditions_match_statuses() {
        use RetryOn::*;
        // (conditions, status, grpc UNAVAILABLE, peer connect failure, expected reason)
        type Case<'a> = (&'a [RetryOn], u16, bool, bool, Option<RetryOn>);
        let table: &[Case] = &[
            (&[ConnectFailure], 503, false, false, None),
            (&[ConnectFailure], 502, false, true, Some(ConnectFailure)),
            (&[ServerError], 502, false, true, Some(ServerError)),
            (&[ConnectFailure, ServerError], 500, false, false, Some(ServerError)),
            (&[ServerError], 200, false, false, None),
            (&[GatewayError], 500, false, false, None),
            (&[GatewayError], 503, false, false, Some(GatewayError)),
            (&[Unavailable], 200, true, false, Some(Unavailable)),
            (&[Unavailable], 200, false, false, None),
        ];
        for (on, status, unavailable, peer, want) in table {
            assert_eq!(retry_reason(on, *status, *unavailable, *peer), *want, "{on:?} {status} {peer}");
        }
    }

    #[test]
    fn idempotent_methods() {
        for (method, want) in
            [(Method::GET, true), (Method::PUT, true), (Method::POST, false), (Method::PATCH, false)]
        {
            assert_eq!(is_idempotent(&method), want, "{method}");
        }
    }
}
