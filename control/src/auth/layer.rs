//! The one gate in front of every meshd service: decides each call by the
//! method table before any handler runs, and hands the handler the caller;
//! on a follower, hands a call only the leader serves on to the leader.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tower::{Layer, Service};

use super::policy::{self, Denial, Serves};
use super::principal::{Peer, Principal};
use super::users::Users;
use crate::server::forward::{self, Peers};
use crate::server::ControlPlane;

#[derive(Clone)]
pub struct AuthLayer {
    pub users: Arc<Users>,
    pub control: Arc<ControlPlane>,
    pub peers: Arc<Peers>,
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, gate: self.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    gate: AuthLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>().cloned();
        let mut principal = peer.as_ref().map_or(Principal::Anonymous, |p| p.principal.clone());
        // Another server hands on a call in the name of the caller it
        // names, and it is decided as that caller's; one that names no
        // caller asks in its own name (for its proxies' traffic).
        let handed_on = principal == Principal::ControlPlane;
        if handed_on && request.headers().contains_key(forward::FORWARDED_FOR) {
            principal = forward::named_caller(request.headers(), &self.gate.peers.trust_domain);
        }
        let path = request.uri().path().to_owned();
        let decision =
            policy::decide(&path, &principal, |name, serial| self.gate.users.role_of(name, serial));
        if let Err(denial) = decision {
            let addr = peer.map(|p| p.addr.to_string()).unwrap_or_default();
            self.gate.control.metrics.count_refused_call(matches!(denial, Denial::Unauthenticated(_)));
            let status = match denial {
                Denial::Unauthenticated(message) => {
                    tracing::info!(%path, caller = %principal, %addr, "call refused: unauthenticated");
                    tonic::Status::unauthenticated(message)
                }
                Denial::PermissionDenied(message) => {
                    tracing::warn!(%path, caller = %principal, %addr, "call refused: permission denied");
                    tonic::Status::permission_denied(message)
                }
            };
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if !handed_on && policy::serves(&path) == Serves::Leader {
            if let Some((leader, channel)) = self.gate.peers.leader() {
                let trust_domain = &self.gate.peers.trust_domain;
                forward::name_caller(request.headers_mut(), &principal, trust_domain);
                self.gate.control.metrics.count_handed_on(&path);
                let peers = self.gate.peers.clone();
                return Box::pin(async move {
                    Ok(peers.hand_on(channel, leader, principal, request.map(Body::new)).await)
                });
            }
        }
        request.extensions_mut().insert(principal);
        // The clone that was made ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(request))
    }
}
