//! The Discovery stream: one per proxy. A sender task pushes what the
//! proxy lacks (everything first, then only changed services); a reader
//! task records the proxy's acks. The sender holds at most one update in
//! flight and always diffs against the newest publication, so a stuck
//! proxy neither delays others nor makes the server buffer its backlog.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::discovery_server::Discovery;
use mesh_proto::mesh::v1::subscribe_request::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::publish::{diff, Published};
use crate::server::ControlPlane;

pub struct DiscoveryService {
    pub control: Arc<ControlPlane>,
}

static STREAMS: AtomicU64 = AtomicU64::new(1);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::RoutingUpdate, Status>> + Send>>;

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
        let have = Have { version: hello.have_version, bundle: hello.bundle_version };
        tokio::spawn(push(self.control.clone(), id.clone(), have, tx));
        tokio::spawn(read_acks(self.control.clone(), id, stream, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What a proxy said it holds in its Hello.
struct Have {
    version: u64,
    bundle: u64,
}

/// Sends the proxy what it lacks, each time the state changes.
async fn push(
    control: Arc<ControlPlane>,
    id: String,
    have: Have,
    tx: mpsc::Sender<Result<pb::RoutingUpdate, Status>>,
) {
    let mut publications = control.subscribe();
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
            let (changed, removed) = diff(&sent, &current);
            if first || !changed.is_empty() || !removed.is_empty() || bundle.is_some() {
                let update = pb::RoutingUpdate {
                    version: current.version,
                    full: first,
                    services: changed.iter().map(|s| pb::ServiceRoute::clone(&s.route)).collect(),
                    removed_services: removed,
                    bundle: bundle.map(|b| pb::Bundle::clone(b)),
                };
                if let Some(bundle) = bundle {
                    sent_bundle = bundle.version;
                }
                control.update_proxy(&id, |record| {
                    let now = Instant::now();
                    record.pushed = Some((current.version, now));
                    record.unacked_since.get_or_insert(now);
                });
                control.metrics.count_push(prost::Message::encoded_len(&update) as u64);
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                sent = current.services.iter().map(|(n, s)| (n.clone(), s.stamp)).collect();
            }
        }
        first = false;
        if publications.changed().await.is_err() {
            return;
        }
    }
}

/// Records acks until the stream ends, then marks the proxy disconnected.
async fn read_acks(
    control: Arc<ControlPlane>,
    id: String,
    stream: u64,
    mut inbound: Streaming<pb::SubscribeRequest>,
) {
    while let Some(Ok(message)) = inbound.next().await {
        let Some(Message::Ack(ack)) = message.message else { continue };
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
    }
    control.update_proxy(&id, |record| {
        // A newer stream of the same proxy may already be connected.
        if record.stream == stream {
            record.connected = false;
        }
    });
}
