//! The Discovery stream: one per proxy. A sender task pushes what the
//! proxy lacks (everything first, then only changed services); a reader
//! task records the proxy's acks. The sender sends the next update only
//! once the proxy has acked the last one (applied or refused), and then
//! diffs against the newest publication: a slow proxy gets one update
//! with everything it missed, not a backlog queued in its stream's
//! window, and a stuck one neither delays others nor costs the server a
//! push per publication.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::subscribe_request::Message;
use mesh_proto::mesh::v1::wire::discovery_server::Discovery;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::publish::{parts, record_sent, Published, PART_BYTES};
use crate::server::ControlPlane;

pub struct DiscoveryService {
    pub control: Arc<ControlPlane>,
}

static STREAMS: AtomicU64 = AtomicU64::new(1);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::RoutingUpdateWire, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(pb::SubscribeRequest { message: Some(Message::Hello(hello)) })) => hello,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("the first message of a subscription must be a Hello")),
        };
        if hello.proxy_id.is_empty() {
            return Err(Status::invalid_argument("Hello.proxy_id must not be empty"));
        }
        let stream = STREAMS.fetch_add(1, Ordering::Relaxed);
        let id = hello.proxy_id.clone();
        self.control.update_proxy(&id, |record| {
            record.service = hello.service.clone();
            record.admin_addr = hello.admin_addr.clone();
            record.connected = true;
            record.stream = stream;
            record.last_contact = Some(SystemTime::now());
            // What the proxy runs on now; versions only grow, even across restarts.
            record.acked_version = hello.have_version;
        });
        let (tx, rx) = mpsc::channel(1);
        let (acked, acks) = watch::channel(hello.have_version);
        let have = Have { version: hello.have_version, bundle: hello.bundle_version };
        tokio::spawn(push(self.control.clone(), id.clone(), have, tx, acks));
        tokio::spawn(read_acks(self.control.clone(), id, stream, inbound, acked));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a proxy said it holds in its Hello.
struct Have {
    version: u64,
    bundle: u64,
}

/// Sends the proxy what it lacks, each time the state changes and the
/// proxy has acked (`acks`: the newest version it acked) what it was sent.
async fn push(
    control: Arc<ControlPlane>,
    id: String,
    have: Have,
    tx: mpsc::Sender<Result<pb::RoutingUpdateWire, Status>>,
    mut acks: watch::Receiver<u64>,
) {
    let mut publications = control.subscribe();
    // The publication the proxy holds, and its services' stamps.
    let mut sent_version = 0;
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent_bundle = have.bundle;
    let mut first = true;
    loop {
        let current: Arc<Published> = publications.borrow_and_update().clone();
        let bundle = current.bundle.as_ref().filter(|b| b.version != sent_bundle);
        if first && have.version == current.version && have.version != 0 && bundle.is_none() {
            // The proxy resumes on the current table: nothing to send.
            sent = current.services.iter().map(|(n, s)| (n.clone(), s.stamp)).collect();
        } else {
            let (changed, removed) = current.since(sent_version, &sent);
            if first || !changed.is_empty() || !removed.is_empty() || bundle.is_some() {
                record_sent(&mut sent, &changed, &removed);
                let encoded_bundle =
                    bundle.map(|b| prost::Message::encode_to_vec(&**b).into()).unwrap_or_default();
                let parts = parts(current.version, first, &changed, removed, encoded_bundle, PART_BYTES);
                if let Some(bundle) = bundle {
                    sent_bundle = bundle.version;
                }
                control.note_push(&id, current.version);
                let bytes = parts.iter().map(prost::Message::encoded_len).sum::<usize>();
                control.metrics.count_push(bytes as u64);
                for part in parts {
                    if tx.send(Ok(part)).await.is_err() {
                        return;
                    }
                }
                // The push ends with the stream: when the proxy's side
                // closes (no more acks) or the server drops the response.
                tokio::select! {
                    acked = acks.wait_for(|acked| *acked >= current.version) => {
                        if acked.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        }
        sent_version = current.version;
        first = false;
        if publications.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps a proxy's traffic summary (rows it left out did not change).
fn record_traffic(control: &ControlPlane, proxy: &str, summary: pb::TrafficSummary) {
    if let Some(peers) = summary.peers {
        let peers = peers.peers.into_iter().map(super::PeerTransport::from_pb).collect();
        control.update_proxy(proxy, |record| record.peers = peers);
    }
    let rows = summary.rows.into_iter().map(|row| {
        let key = crate::traffic::RowKey { inbound: row.inbound, service: row.service, version: row.version };
        let counts = crate::traffic::Counts::from_wire(
            row.requests,
            row.successes,
            &row.status_classes,
            row.mesh_errors,
            row.latency_buckets,
        );
        (key, counts, row.in_flight)
    });
    let now = super::monotonic_ms();
    let mut traffic = control.traffic.lock().expect("traffic lock");
    traffic.record(proxy, now, &summary.latency_bounds_seconds, rows.collect());
}

/// Records acks until the stream ends, then marks the proxy disconnected.
async fn read_acks(
    control: Arc<ControlPlane>,
    id: String,
    stream: u64,
    mut inbound: impl Stream<Item = Result<pb::SubscribeRequest, Status>> + Unpin,
    acked: watch::Sender<u64>,
) {
    while let Some(Ok(message)) = inbound.next().await {
        let ack = match message.message {
            Some(Message::Ack(ack)) => ack,
            Some(Message::Traffic(summary)) => {
                record_traffic(&control, &id, summary);
                continue;
            }
            _ => continue,
        };
        // Proxies repeat their ack on a quiet stream: a refusal is logged once.
        let mut newly_refused = false;
        control.update_proxy(&id, |record| {
            record.last_contact = Some(SystemTime::now());
            record.certificate_root = ack.certificate_root.clone();
            record.bundle_version = ack.bundle_version;
            if ack.applied {
                record.acked_version = ack.version.max(record.acked_version);
                record.rejected = None;
            } else {
                let rejected = Some((ack.version, ack.error.clone()));
                newly_refused = record.rejected != rejected;
                record.rejected = rejected;
            }
            if let Some((version, at)) = record.pushed {
                if ack.version >= version {
                    if ack.version == version {
                        control.metrics.observe_push_to_ack(at.elapsed());
                    }
                    record.pushed = None;
                    record.unacked_since = None;
                }
            }
        });
        if newly_refused {
            tracing::warn!(proxy = %id, version = ack.version, reason = %ack.error, "a proxy refused an update");
        }
        // Applied or refused, the proxy is done with it: the next may go.
        acked.send_if_modified(|newest| {
            let newer = ack.version > *newest;
            *newest = (*newest).max(ack.version);
            newer
        });
    }
    control.update_proxy(&id, |record| {
        // A newer stream of the same proxy may already be connected.
        if record.stream == stream {
            record.connected = false;
        }
    });
}

#[cfg(test)]
mod tests {
    //! The push and the acks in process, on a paused clock: a ControlPlane
    //! on a memory store, and a proxy played by the test (it reads updates
    //! from the push's channel and sends acks into the reader).

    use super::*;
    use crate::state::Change;
    use crate::store::MemoryStore;
    use std::time::Duration;

    fn register(service: &str, addr: &str) -> Change {
        Change::ready_endpoint(service, "v1", addr)
    }

    /// An update as the proxy decodes it.
    fn decoded(update: Option<Result<pb::RoutingUpdateWire, Status>>) -> pb::RoutingUpdate {
        let bytes = prost::Message::encode_to_vec(&update.expect("an update").expect("not an error"));
        prost::Message::decode(bytes.as_slice()).expect("a RoutingUpdate")
    }

    fn ack(version: u64) -> Result<pb::SubscribeRequest, Status> {
        let ack = pb::Ack { version, applied: true, ..Default::default() };
        Ok(pb::SubscribeRequest { message: Some(Message::Ack(ack)) })
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_gets_everything_then_only_what_changed_and_its_acks_converge() {
        let control = ControlPlane::new(Arc::new(MemoryStore::default())).unwrap();
        control.change(register("web", "127.0.0.2:1000")).await.unwrap();
        let both = control.change(register("api", "127.0.0.2:2000")).await.unwrap();
        // The second change goes out a publish window after the first.
        control.subscribe().wait_for(|published| published.version >= both).await.unwrap();
        control.update_proxy("p1", |record| record.connected = true);
        let (tx, mut updates) = mpsc::channel(1);
        let (acked, acked_rx) = watch::channel(0);
        tokio::spawn(push(control.clone(), "p1".into(), Have { version: 0, bundle: 0 }, tx, acked_rx));
        let (acks, acks_in) = mpsc::channel(4);
        tokio::spawn(read_acks(control.clone(), "p1".into(), 0, ReceiverStream::new(acks_in), acked));

        let first = decoded(updates.recv().await);
        assert!(first.full);
        let names: Vec<&str> = first.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);

        // Not acked yet: a wait for that version times out (on the paused clock).
        let (converged, _) = control.wait_converged(first.version, Duration::from_secs(1)).await;
        assert!(!converged, "nothing acked yet");
        acks.send(ack(first.version)).await.unwrap();
        let (converged, proxies) = control.wait_converged(first.version, Duration::from_secs(1)).await;
        assert!(converged, "{proxies:?}");

        // One change: only the service it touched, not the whole table.
        let version = control.change(register("web", "127.0.0.2:1001")).await.unwrap();
        let update = decoded(updates.recv().await);
        assert!(!update.full);
        assert_eq!(update.version, version);
        assert_eq!(update.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["web"]);
        acks.send(ack(version)).await.unwrap();
        assert!(control.wait_converged(version, Duration::from_secs(1)).await.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_proxy_gets_the_newest_state_not_a_backlog() {
        let control = ControlPlane::new(Arc::new(MemoryStore::default())).unwrap();
        control.change(register("web", "127.0.0.2:1000")).await.unwrap();
        let (tx, mut updates) = mpsc::channel(8);
        let (acked, acked_rx) = watch::channel(0);
        tokio::spawn(push(control.clone(), "p1".into(), Have { version: 0, bundle: 0 }, tx, acked_rx));
        let first = decoded(updates.recv().await);
        // Twenty changes while the proxy applies the first update: nothing
        // more is sent before it acks, however much room the stream has.
        let mut last = first.version;
        for port in 1..=20 {
            last = control.change(register("web", &format!("127.0.0.2:{}", 1000 + port))).await.unwrap();
        }
        let waited = tokio::time::timeout(Duration::from_secs(1), updates.recv()).await;
        assert!(waited.is_err(), "an update before the ack: {waited:?}");
        // Then one update with everything it missed.
        acked.send(first.version).unwrap();
        let newest = decoded(updates.recv().await);
        assert_eq!(newest.version, last);
        assert_eq!(newest.services[0].endpoints.len(), 21, "every endpoint registered so far");
        acked.send(newest.version).unwrap();
        let more = tokio::time::timeout(Duration::from_secs(1), updates.recv()).await;
        assert!(more.is_err(), "one update for twenty changes, then nothing: {more:?}");
    }
}
