//! Calls only the leader serves (`policy::Serves::Leader`), received by a
//! follower, are handed on to the leader whole, streams included: a client
//! may stay on whichever server it reached. The follower names the caller
//! it authenticated in two headers; the leader believes them only from a
//! peer that presents a control-plane certificate, which only meshd
//! servers hold (they hold the CA's key, so the headers give them no power
//! they lack). A call that arrives handed on is never handed on again: a
//! server that lost the lead meanwhile answers with the refusal that names
//! the new leader, and the client moves there. The same channels, and the
//! same naming of the caller, let a server ask the others for what only
//! they hold (their proxies' traffic, `Admin.Traffic` with `local`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::transport::Channel;

use super::leader::{Leader, NOT_LEADER};
use super::node_leases::NodeLeases;
use super::tls::ServerTls;
use crate::auth::principal::{self, Principal};
use mesh_common::spiffe::SpiffeId;

/// The SPIFFE ID of the caller a follower authenticated.
pub const FORWARDED_FOR: &str = "mesh-forwarded-for";
/// The serial of that caller's certificate (a user's credential).
pub const FORWARDED_SERIAL: &str = "mesh-forwarded-serial";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The ways from this server to the others sharing its store: to the
/// leader, to hand calls on, and to each server, to gather what only it
/// holds (its proxies' traffic).
pub struct Peers {
    leader: Leader,
    /// This server's own address, as the leader key names servers.
    me: String,
    tls: Arc<ServerTls>,
    pub trust_domain: String,
    channels: Mutex<HashMap<String, Cached>>,
    /// With etcd: a node heard from while the leader cannot be reached
    /// keeps its lease, since it is alive whichever server it reached.
    node_leases: Option<Arc<NodeLeases>>,
}

/// A channel to one server, made with one TLS configuration of meshd's.
struct Cached {
    made_with: Arc<ServerConfig>,
    channel: Channel,
}

impl Peers {
    pub fn new(
        leader: Leader,
        me: String,
        tls: Arc<ServerTls>,
        trust_domain: String,
        node_leases: Option<Arc<NodeLeases>>,
    ) -> Peers {
        Peers { leader, me, tls, trust_domain, channels: Mutex::new(HashMap::new()), node_leases }
    }

    /// A channel to the leader, when this server follows one it knows;
    /// None on the leader, during an election, or when no channel can be
    /// made (the call is then answered here, with the refusal that says so).
    pub fn leader(&self) -> Option<(String, Channel)> {
        let view = self.leader.current();
        let leader = view.leader.filter(|leader| !view.leading && *leader != self.me)?;
        let channel = self.channel_to(&leader)?;
        Some((leader, channel))
    }

    /// A channel to the server at `addr`, over meshd's control-plane
    /// certificate; a new certificate or new roots (a rotation) make a
    /// new one.
    pub fn channel_to(&self, addr: &str) -> Option<Channel> {
        let config = self.tls.config();
        let mut channels = self.channels.lock().expect("peer channels lock");
        if let Some(cached) = channels.get(addr).filter(|c| Arc::ptr_eq(&c.made_with, &config)) {
            return Some(cached.channel.clone());
        }
        let made = self
            .tls
            .to_server()
            .and_then(|tls| mesh_client::channel::connect_lazy(addr, &tls, CONNECT_TIMEOUT));
        match made {
            Ok(channel) => {
                channels.insert(addr.to_owned(), Cached { made_with: config, channel: channel.clone() });
                Some(channel)
            }
            Err(error) => {
                tracing::warn!(server = %addr, %error, "cannot make a channel to another server");
                None
            }
        }
    }
}

impl Peers {
    /// The leader's answer to `request` from `caller`, streamed through.
    /// A leader that cannot be reached (it died; its lease has not yet
    /// run out) is answered as an election is: UNAVAILABLE, marked
    /// not-leader, so agents ask again soon and others retry.
    pub async fn hand_on(
        &self,
        mut channel: Channel,
        leader: String,
        caller: Principal,
        request: http::Request<Body>,
    ) -> http::Response<Body> {
        use tower::Service;
        let called = async {
            std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
            channel.call(request).await
        };
        match called.await {
            Ok(response) => response,
            Err(error) => {
                if let (Principal::Node(node), Some(leases)) = (&caller, &self.node_leases) {
                    leases.keep(node);
                }
                tracing::info!(%leader, %error, "the leader cannot be reached to hand a call on");
                let mut status =
                    tonic::Status::unavailable(format!("the leader {leader} cannot be reached: {error}"));
                status
                    .metadata_mut()
                    .insert(NOT_LEADER.0, tonic::metadata::MetadataValue::from_static(NOT_LEADER.1));
                status.into_http()
            }
        }
    }
}

/// Names `caller` in `headers` for the leader, replacing whatever the
/// client put there.
pub fn name_caller(headers: &mut HeaderMap, caller: &Principal, trust_domain: &str) {
    headers.remove(FORWARDED_FOR);
    headers.remove(FORWARDED_SERIAL);
    let Some((id, serial)) = principal::to_id(caller, trust_domain) else { return };
    if let Ok(id) = HeaderValue::from_str(&id) {
        headers.insert(FORWARDED_FOR, id);
    }
    if let (false, Ok(serial)) = (serial.is_empty(), HeaderValue::from_str(&serial)) {
        headers.insert(FORWARDED_SERIAL, serial);
    }
}

/// The caller a follower named in `headers`: anonymous when it named none,
/// one of another trust domain, or another server.
pub fn named_caller(headers: &HeaderMap, trust_domain: &str) -> Principal {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    SpiffeId::parse_in(text(FORWARDED_FOR), trust_domain)
        .and_then(|id| principal::of_id(id, text(FORWARDED_SERIAL)))
        .filter(|caller| *caller != Principal::ControlPlane)
        .unwrap_or(Principal::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_named_by_a_follower_is_the_same_caller_on_the_leader() {
        let user = Principal::User { name: "ci".into(), serial: "0a1b".into() };
        // (caller the follower authenticated, caller the leader sees)
        let cases = [
            (user.clone(), user),
            (Principal::Node("a".into()), Principal::Node("a".into())),
            (Principal::Workload("web".into()), Principal::Workload("web".into())),
            (Principal::Anonymous, Principal::Anonymous),
            // A server never names itself: its own calls carry no caller.
            (Principal::ControlPlane, Principal::Anonymous),
        ];
        for (caller, seen) in cases {
            // Whatever a client put in the headers is replaced.
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED_FOR, HeaderValue::from_static("spiffe://mesh.local/user/admin"));
            headers.insert(FORWARDED_SERIAL, HeaderValue::from_static("ff"));
            name_caller(&mut headers, &caller, "mesh.local");
            assert_eq!(named_caller(&headers, "mesh.local"), seen, "{caller}");
        }
    }

    #[test]
    fn a_caller_of_another_trust_domain_or_a_server_counts_for_no_one() {
        for id in ["spiffe://other.domain/user/admin", "spiffe://mesh.local/control-plane", "admin", ""] {
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED_FOR, HeaderValue::from_str(id).unwrap());
            assert_eq!(named_caller(&headers, "mesh.local"), Principal::Anonymous, "{id:?}");
        }
    }
}
