//! With a shared store, every server's proxies are everyone's to count:
//! each server writes the records of the proxies connected to it under
//! one etcd key of its own, held by a lease (a dead server's records go
//! when its lease does), and watches the other servers' keys. So
//! `meshctl status` and `--wait` count every proxy, whichever server it
//! is connected to.
//!
//! A server rewrites its key at most every `FLUSH` while acks come in,
//! and every `REFRESH` anyway; a proxy's ack reaches the other servers
//! within about `FLUSH` plus one etcd write.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{ControlPlane, ProxyRecord, STALL_AFTER};
use crate::store::EtcdStore;

const PREFIX: &str = "/mesh/proxies/";
const FLUSH: Duration = Duration::from_millis(50);
const REFRESH: Duration = Duration::from_secs(2);
/// A dead server's proxies stop counting this long after it stopped.
const LEASE_TTL_SECONDS: i64 = 5;
const RETRY: Duration = Duration::from_millis(200);

/// One proxy's record as other servers read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Shared {
    service: String,
    admin_addr: String,
    acked_version: u64,
    rejected: Option<(u64, String)>,
    connected: bool,
    stalled: bool,
    certificate_root: String,
    bundle_version: u64,
    #[serde(default)]
    peers: Vec<super::PeerTransport>,
    /// Left out of the comparison that decides whether to rewrite.
    last_contact_unix_ms: u64,
}

impl Shared {
    fn of(record: &ProxyRecord) -> Shared {
        let last_contact_unix_ms = record
            .last_contact
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        Shared {
            service: record.service.clone(),
            admin_addr: record.admin_addr.clone(),
            acked_version: record.acked_version,
            rejected: record.rejected.clone(),
            connected: record.connected,
            stalled: record.stalled(),
            certificate_root: record.certificate_root.clone(),
            bundle_version: record.bundle_version,
            peers: record.peers.clone(),
            last_contact_unix_ms,
        }
    }

    fn record(self, server: &str) -> ProxyRecord {
        // A stalled proxy is one whose update has waited past STALL_AFTER.
        let waited = STALL_AFTER * 2;
        ProxyRecord {
            service: self.service,
            admin_addr: self.admin_addr,
            acked_version: self.acked_version,
            rejected: self.rejected,
            last_contact: Some(UNIX_EPOCH + Duration::from_millis(self.last_contact_unix_ms)),
            connected: self.connected,
            pushed: None,
            unacked_since: self.stalled.then(|| std::time::Instant::now().checked_sub(waited)).flatten(),
            stream: 0,
            certificate_root: self.certificate_root,
            bundle_version: self.bundle_version,
            server: server.to_owned(),
            peers: self.peers,
        }
    }

    fn same_but_contact(&self, other: &Shared) -> bool {
        Shared { last_contact_unix_ms: 0, ..self.clone() }
            == Shared { last_contact_unix_ms: 0, ..other.clone() }
    }
}

/// Starts sharing this server's proxies as `me` and following the others'.
pub fn share(control: Arc<ControlPlane>, store: Arc<EtcdStore>, me: String) {
    let handle = store.handle();
    handle.spawn(publish(control.clone(), store.clone(), me.clone()));
    handle.spawn(follow(control, store, me));
}

async fn publish(control: Arc<ControlPlane>, store: Arc<EtcdStore>, me: String) {
    loop {
        if let Err(error) = publish_under_lease(&control, &store, &me).await {
            tracing::warn!(%error, "cannot share this server's proxies through etcd; trying again");
            store.next_member();
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn publish_under_lease(
    control: &ControlPlane,
    store: &EtcdStore,
    me: &str,
) -> Result<(), etcd_client::Error> {
    let mut client = store.client();
    let lease = client.lease_grant(LEASE_TTL_SECONDS, None).await?.id();
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
    let key = format!("{PREFIX}{me}");
    let mut written: Option<BTreeMap<String, Shared>> = None;
    let mut last_write = Instant::now();
    let mut last_renewal = Instant::now();
    loop {
        tokio::time::sleep(FLUSH).await;
        if last_renewal.elapsed() >= Duration::from_secs(1) {
            keeper.keep_alive().await?;
            match renewals.message().await? {
                Some(renewed) if renewed.ttl() > 0 => last_renewal = Instant::now(),
                _ => return Ok(()),
            }
        }
        let changed = control.local_changed.swap(false, Ordering::Relaxed);
        if !changed && written.is_some() && last_write.elapsed() < REFRESH {
            continue;
        }
        let now: BTreeMap<String, Shared> =
            control.local_proxies().iter().map(|(id, record)| (id.clone(), Shared::of(record))).collect();
        let same = written.as_ref().is_some_and(|before| {
            before.len() == now.len()
                && before.iter().zip(&now).all(|((a, x), (b, y))| a == b && x.same_but_contact(y))
        });
        if same && last_write.elapsed() < REFRESH {
            continue;
        }
        let value = serde_json::to_vec(&now).expect("proxy records serialize");
        client.put(key.clone(), value, Some(PutOptions::new().with_lease(lease))).await?;
        written = Some(now);
        last_write = Instant::now();
    }
}

async fn follow(control: Arc<ControlPlane>, store: Arc<EtcdStore>, me: String) {
    loop {
        if let Err(error) = follow_once(&control, &store, &me).await {
            tracing::warn!(%error, "lost the other servers' proxies; reading them again");
            store.next_member();
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn follow_once(control: &ControlPlane, store: &EtcdStore, me: &str) -> Result<(), etcd_client::Error> {
    let mut client = store.client();
    let mut listing = client.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
    let revision = listing.take_header().map_or(0, |h| h.revision());
    for kv in listing.kvs() {
        apply(control, me, kv.key(), Some(kv.value()));
    }
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut watch = client.watch(PREFIX, Some(options)).await?;
    while let Some(response) = watch.message().await? {
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let value = (event.event_type() == EventType::Put).then(|| kv.value());
            apply(control, me, kv.key(), value);
        }
    }
    Ok(())
}

fn apply(control: &ControlPlane, me: &str, key: &[u8], value: Option<&[u8]>) {
    let server = String::from_utf8_lossy(&key[PREFIX.len().min(key.len())..]).into_owned();
    if server == me {
        return;
    }
    let records: Option<HashMap<String, ProxyRecord>> =
        match value.map(serde_json::from_slice::<BTreeMap<String, Shared>>) {
            None => None,
            Some(Ok(records)) => {
                Some(records.into_iter().map(|(id, shared)| (id, shared.record(&server))).collect())
            }
            Some(Err(error)) => {
                tracing::warn!(%server, %error, "another server's proxy records are unreadable");
                return;
            }
        };
    control.set_remote_proxies(&server, records);
}
