//! One leader among the servers that share a store, for what must happen
//! once: the scheduler's placements, node liveness decisions, CA rotation,
//! rollouts. With the embedded store the one server is always the leader.
//!
//! With etcd, a server leads while it holds the leader key under a lease
//! of its own. It stops acting as leader as soon as it has not renewed
//! the lease for the lease's time less a margin, which is before etcd can
//! expire it and let another server win; and every write it makes as the
//! leader is fenced by the lease in the store, so a leader that stalled
//! past that point cannot write either.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::etcd::LEADER_KEY;
use crate::store::EtcdStore;

/// Who leads, as this server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Leadership {
    /// Whether this server leads now.
    pub leading: bool,
    /// The leader's gRPC address, when one is known.
    pub leader: Option<String>,
    /// Bumped each time this server becomes the leader.
    pub term: u64,
}

#[derive(Clone)]
pub struct Leader {
    view: watch::Receiver<Leadership>,
    /// A sole leader's view never changes; its sender is kept so that the
    /// view stays open.
    _fixed: Option<Arc<watch::Sender<Leadership>>>,
}

/// Between two attempts to reach etcd for the election.
const FOLLOWER_POLL: Duration = Duration::from_millis(200);
/// How long a follower trusts a quiet watch of the leader key.
const FOLLOWER_RECHECK: Duration = Duration::from_secs(5);

impl Leader {
    /// The only server: always the leader.
    pub fn sole(me: &str) -> Leader {
        let (fixed, view) =
            watch::channel(Leadership { leading: true, leader: Some(me.to_owned()), term: 1 });
        Leader { view, _fixed: Some(Arc::new(fixed)) }
    }

    /// Campaigns for the leader key in `store` as `me` (its gRPC address),
    /// with a lease of `ttl`, for as long as the process runs.
    pub fn elect(store: Arc<EtcdStore>, me: String, ttl: Duration) -> Leader {
        let (tx, view) = watch::channel(Leadership::default());
        let handle = store.handle();
        handle.spawn(campaign(store, me, ttl, tx));
        Leader { view, _fixed: None }
    }

    pub fn leading(&self) -> bool {
        self.view.borrow().leading
    }

    pub fn current(&self) -> Leadership {
        self.view.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.view.clone()
    }

    /// Ok on the leader; on a follower, the answer that sends the caller
    /// to the leader: agents and meshctl move there and ask again.
    pub fn require(&self) -> Result<(), tonic::Status> {
        let view = self.view.borrow();
        if view.leading {
            return Ok(());
        }
        let mut status = match &view.leader {
            Some(leader) => {
                tonic::Status::unavailable(format!("this server is not the leader; ask the leader, {leader}"))
            }
            None => tonic::Status::unavailable(
                "no server is the leader yet (an election is under way); try again",
            ),
        };
        status.metadata_mut().insert(NOT_LEADER.0, tonic::metadata::MetadataValue::from_static(NOT_LEADER.1));
        if let Some(value) = view.leader.as_deref().and_then(|l| l.parse().ok()) {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        Err(status)
    }
}

/// The metadata of a follower's refusal that names the leader.
pub const LEADER_METADATA: &str = "mesh-leader";

/// The metadata that marks a call only the leader serves, refused because
/// this server is not it (or cannot reach it): ask again.
pub const NOT_LEADER: (&str, &str) = ("mesh-failure", "not-leader");

async fn campaign(store: Arc<EtcdStore>, me: String, ttl: Duration, view: watch::Sender<Leadership>) {
    let mut term = 0;
    loop {
        match try_lead(&store, &me, ttl, &view, &mut term).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "the leader election could not reach etcd; trying again");
                store.next_member();
                step_down(&store, &view, None);
                tokio::time::sleep(FOLLOWER_POLL).await;
            }
        }
    }
}

fn step_down(store: &EtcdStore, view: &watch::Sender<Leadership>, leader: Option<String>) {
    store.set_leader_lease(None);
    view.send_if_modified(|current| {
        let next = Leadership { leading: false, leader: leader.clone(), term: current.term };
        let changed = *current != next;
        if current.leading {
            tracing::warn!("this server is no longer the leader");
        }
        *current = next;
        changed
    });
}

/// One round: take the key if it is free and lead until the lease is
/// lost, or follow the leader there is until its key goes away.
async fn try_lead(
    store: &EtcdStore,
    me: &str,
    ttl: Duration,
    view: &watch::Sender<Leadership>,
    term: &mut u64,
) -> Result<(), etcd_client::Error> {
    let mut client = store.client();
    let lease = client.lease_grant(ttl.as_secs().max(1) as i64, None).await?.id();
    let free = Compare::create_revision(LEADER_KEY, CompareOp::Equal, 0);
    let take = TxnOp::put(LEADER_KEY, me, Some(PutOptions::new().with_lease(lease)));
    let txn = Txn::new().when(vec![free]).and_then(vec![take]).or_else(vec![TxnOp::get(LEADER_KEY, None)]);
    let won = client.txn(txn).await?.succeeded();
    if !won {
        let _ = client.lease_revoke(lease).await;
        return follow(store, view).await;
    }
    *term += 1;
    store.set_leader_lease(Some(lease));
    view.send_replace(Leadership { leading: true, leader: Some(me.to_owned()), term: *term });
    tracing::info!(term = *term, "this server is the leader");
    let result = hold(store, lease, ttl).await;
    step_down(store, view, None);
    let _ = client.lease_revoke(lease).await;
    result
}

/// Keeps the lease alive, through another member when one fails;
/// returns once the lease may be lost.
async fn hold(store: &EtcdStore, lease: i64, ttl: Duration) -> Result<(), etcd_client::Error> {
    // Safe until this long after the last renewal was sent.
    let margin = (ttl / 4).max(Duration::from_millis(300));
    let mut safe_until = Instant::now() + ttl.saturating_sub(margin);
    let mut renewing = None;
    loop {
        if Instant::now() >= safe_until {
            tracing::warn!("the leader's lease was not renewed in time");
            return Ok(());
        }
        let (keeper, answers) = match &mut renewing {
            Some(stream) => stream,
            None => {
                let mut client = store.client();
                match tokio::time::timeout_at(safe_until, client.lease_keep_alive(lease)).await {
                    Ok(Ok(stream)) => renewing.insert(stream),
                    Ok(Err(_)) => {
                        store.next_member();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(_) => continue,
                }
            }
        };
        let sent = Instant::now();
        let renewal = async {
            keeper.keep_alive().await?;
            answers.message().await
        };
        match tokio::time::timeout_at(safe_until, renewal).await {
            Ok(Ok(Some(renewed))) if renewed.ttl() > 0 => safe_until = sent + ttl.saturating_sub(margin),
            Ok(Ok(Some(_))) => {
                tracing::warn!("the leader's lease expired");
                return Ok(());
            }
            Ok(Ok(None) | Err(_)) => {
                // That member failed: renew through another.
                renewing = None;
                store.next_member();
                continue;
            }
            Err(_) => continue,
        }
        let next = (Instant::now() + ttl / 4).min(safe_until);
        tokio::time::sleep_until(next).await;
    }
}

/// Follows the current leader until its key is gone: watched, so a
/// follower campaigns as soon as etcd expires a dead leader's lease.
async fn follow(store: &EtcdStore, view: &watch::Sender<Leadership>) -> Result<(), etcd_client::Error> {
    let mut client = store.client();
    let mut response = client.get(LEADER_KEY, None).await?;
    let revision = response.take_header().map_or(0, |h| h.revision());
    let Some(kv) = response.kvs().first() else { return Ok(()) };
    step_down(store, view, Some(String::from_utf8_lossy(kv.value()).into_owned()));
    let options = WatchOptions::new().with_start_revision(revision + 1);
    let mut watch = client.watch(LEADER_KEY, Some(options)).await?;
    loop {
        // A watch that stays quiet is checked against a fresh read now and then.
        let Ok(message) = tokio::time::timeout(FOLLOWER_RECHECK, watch.message()).await else {
            return Ok(());
        };
        let Some(response) = message? else { return Ok(()) };
        for event in response.events() {
            match (event.event_type(), event.kv()) {
                (EventType::Put, Some(kv)) => {
                    step_down(store, view, Some(String::from_utf8_lossy(kv.value()).into_owned()))
                }
                _ => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(leading: bool, leader: Option<&str>) -> Leader {
        let view = Leadership { leading, leader: leader.map(str::to_owned), term: 1 };
        let (fixed, view) = watch::channel(view);
        Leader { view, _fixed: Some(Arc::new(fixed)) }
    }

    #[test]
    fn a_follower_refuses_leader_calls_and_names_the_leader() {
        // (leading?, leader seen, refused?, leader named in the metadata)
        let cases = [
            (true, Some("10.0.0.1:7400"), false, None),
            (false, Some("10.0.0.2:7400"), true, Some("10.0.0.2:7400")),
            (false, None, true, None),
        ];
        for (i, (leading, leader, refused, named)) in cases.into_iter().enumerate() {
            match seen(leading, leader).require() {
                Ok(()) => assert!(!refused, "case {i}: refused"),
                Err(status) => {
                    assert!(refused, "case {i}: not refused");
                    assert_eq!(status.code(), tonic::Code::Unavailable, "case {i}");
                    let failure = status.metadata().get("mesh-failure").and_then(|v| v.to_str().ok());
                    assert_eq!(failure, Some("not-leader"), "case {i}");
                    let leader = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok());
                    assert_eq!(leader, named, "case {i}");
                }
            }
        }
    }
}
