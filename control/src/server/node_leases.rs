//! Node liveness on etcd leases, with a shared store. Nodes heartbeat to
//! the leader, which keeps one lease per node alive with each heartbeat
//! and holds the node's description under it. A node's lease expires a
//! TTL after its last heartbeat, whichever server it reached, and a new
//! leader adopts the leases it finds: it knows at once which nodes are
//! up, can place on them, and stops holding jobs back as soon as each of
//! them has reported its instances, instead of waiting out the start
//! grace.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use mesh_proto::mesh::v1 as pb;
use prost::Message;

use crate::store::{EtcdStore, StoreError};

const PREFIX: &str = "/mesh/nodes/";

pub struct NodeLeases {
    store: Arc<EtcdStore>,
    ttl_seconds: i64,
    /// The renewal stream of each node's lease this server keeps alive.
    renewals: tokio::sync::Mutex<HashMap<String, Renewal>>,
}

struct Renewal {
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

/// How long one renewal may take before its stream counts as broken (its
/// etcd member gone) and a new one is opened.
const RENEWAL_WITHIN: Duration = Duration::from_secs(1);

impl Renewal {
    /// Renews the lease; false when the lease is gone or the stream broke.
    async fn renew(&mut self) -> bool {
        let renewal = async {
            self.keeper.keep_alive().await?;
            self.answers.message().await
        };
        matches!(
            tokio::time::timeout(RENEWAL_WITHIN, renewal).await,
            Ok(Ok(Some(answer))) if answer.ttl() > 0
        )
    }
}

impl NodeLeases {
    /// Leases of `ttl` (whole seconds, at least etcd's minimum of 2).
    pub fn new(store: Arc<EtcdStore>, ttl: Duration) -> Arc<NodeLeases> {
        let ttl_seconds = ttl.as_secs_f64().ceil().max(2.0) as i64;
        Arc::new(NodeLeases { store, ttl_seconds, renewals: Default::default() })
    }

    /// The leader heard from the node `info` describes (`joined`: it said
    /// who it is, which may have changed): its lease is renewed, or made.
    /// Runs in the background: a heartbeat does not wait for etcd.
    pub fn heard(self: &Arc<Self>, info: pb::NodeInfo, joined: bool) {
        let this = self.clone();
        self.store.handle().spawn(async move {
            if let Err(error) = this.renew(&info, joined).await {
                tracing::warn!(node = %info.name, %error, "cannot renew the node's lease in etcd");
                this.store.next_member();
            }
        });
    }

    /// A follower heard from node `name`: its lease, if it has one, is
    /// renewed (a follower makes none: the leader does, when it joins).
    pub fn keep(self: &Arc<Self>, name: &str) {
        let (this, name) = (self.clone(), name.to_owned());
        self.store.handle().spawn(async move {
            if let Err(error) = this.renew_existing(&name).await {
                tracing::warn!(node = %name, %error, "cannot renew the node's lease in etcd");
                this.store.next_member();
            }
        });
    }

    async fn renew_existing(&self, name: &str) -> Result<(), etcd_client::Error> {
        let mut renewals = self.renewals.lock().await;
        if let Some(renewal) = renewals.get_mut(name) {
            if renewal.renew().await {
                return Ok(());
            }
            renewals.remove(name);
        }
        let mut client = self.store.client();
        let existing = client.get(format!("{PREFIX}{name}"), None).await?;
        let Some(lease) = existing.kvs().first().map(|kv| kv.lease()).filter(|lease| *lease != 0) else {
            return Ok(());
        };
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        if answers.message().await?.is_some_and(|answer| answer.ttl() > 0) {
            renewals.insert(name.to_owned(), Renewal { keeper, answers });
        }
        Ok(())
    }

    async fn renew(&self, info: &pb::NodeInfo, joined: bool) -> Result<(), etcd_client::Error> {
        let mut renewals = self.renewals.lock().await;
        if let Some(renewal) = renewals.get_mut(&info.name).filter(|_| !joined) {
            if renewal.renew().await {
                return Ok(());
            }
        }
        renewals.remove(&info.name);
        let key = format!("{PREFIX}{}", info.name);
        let mut client = self.store.client();
        // A lease a former leader kept for this node is adopted.
        let existing = client.get(key.as_str(), None).await?;
        let lease = match existing.kvs().first().map(|kv| kv.lease()).filter(|lease| *lease != 0) {
            Some(lease) if !joined => lease,
            _ => client.lease_grant(self.ttl_seconds, None).await?.id(),
        };
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        let alive = answers.message().await?.is_some_and(|answer| answer.ttl() > 0);
        if !alive {
            // Expired meanwhile: the next heartbeat makes a new one.
            return Ok(());
        }
        if joined || existing.kvs().is_empty() {
            client.put(key, info.encode_to_vec(), Some(PutOptions::new().with_lease(lease))).await?;
        }
        renewals.insert(info.name.clone(), Renewal { keeper, answers });
        Ok(())
    }

    /// Every node whose lease is live: up, as far as the cluster knows.
    pub fn live(&self) -> Result<Vec<pb::NodeInfo>, StoreError> {
        let (_, kvs) = self.store.get_prefix(PREFIX)?;
        Ok(kvs.iter().filter_map(|kv| pb::NodeInfo::decode(kv.value()).ok()).collect())
    }
}
