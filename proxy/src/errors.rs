//! Errors the proxy makes itself, as the contract names them: each has a
//! reason (sent in `x-mesh-error` and used as the `error` metric label), an
//! HTTP status, and a gRPC status for gRPC callers.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    UnknownService,
    NoEndpoints,
    BreakerOpen,
    ConnectFailed,
    Timeout,
    /// The upstream's last response is passed through with this label.
    RetryBudgetExhausted,
    AuthzDenied,
    /// The request itself could not be read or forwarded (bad framing, a
    /// body that broke off); not in the contract's table, answered with 400.
    BadRequest,
    /// The request went round proxies without reaching an app (an
    /// endpoint that points back at a proxy); answered with 508.
    LoopDetected,
    /// A route's fault injection aborted the request, with the route's status.
    InjectedFault,
    /// The service's inbound rate limit refused the request; answered 429.
    RateLimited,
}

impl ProxyError {
    pub const ALL: [ProxyError; 11] = [
        ProxyError::UnknownService,
        ProxyError::NoEndpoints,
        ProxyError::BreakerOpen,
        ProxyError::ConnectFailed,
        ProxyError::Timeout,
        ProxyError::RetryBudgetExhausted,
        ProxyError::AuthzDenied,
        ProxyError::BadRequest,
        ProxyError::LoopDetected,
        ProxyError::InjectedFault,
        ProxyError::RateLimited,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::UnknownService => "unknown-service",
            ProxyError::NoEndpoints => "no-endpoints",
            ProxyError::BreakerOpen => "breaker-open",
            ProxyError::ConnectFailed => "connect-failed",
            ProxyError::Timeout => "timeout",
            ProxyError::RetryBudgetExhausted => "retry-budget-exhausted",
            ProxyError::AuthzDenied => "authz-denied",
            ProxyError::BadRequest => "bad-request",
            ProxyError::LoopDetected => "loop-detected",
            ProxyError::InjectedFault => "injected-fault",
            ProxyError::RateLimited => "rate-limited",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UnknownService => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints | ProxyError::BreakerOpen => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectFailed => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // Only used when there was no upstream response to pass through.
            ProxyError::RetryBudgetExhausted => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AuthzDenied => StatusCode::FORBIDDEN,
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::LoopDetected => StatusCode::LOOP_DETECTED,
            // The route's own status replaces it.
            ProxyError::InjectedFault => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The gRPC status code a gRPC caller receives instead of the HTTP status.
    pub fn grpc_status(self) -> u8 {
        match self {
            ProxyError::UnknownService => 12, // UNIMPLEMENTED
            ProxyError::NoEndpoints
            | ProxyError::BreakerOpen
            | ProxyError::ConnectFailed
            | ProxyError::RetryBudgetExhausted => 14, // UNAVAILABLE
            ProxyError::Timeout => 4,         // DEADLINE_EXCEEDED
            ProxyError::AuthzDenied => 7,     // PERMISSION_DENIED
            ProxyError::BadRequest => 3,      // INVALID_ARGUMENT
            ProxyError::LoopDetected => 9,    // FAILED_PRECONDITION: a misconfigured mesh
            ProxyError::InjectedFault => 14,  // UNAVAILABLE, unless the route names one
            ProxyError::RateLimited => 8,     // RESOURCE_EXHAUSTED
        }
    }

    /// Index for per-error metric arrays; 0 is "no error".
    pub fn metric_index(self) -> usize {
        ProxyError::ALL.iter().position(|e| *e == self).unwrap_or(0) + 1
    }
}
