//! The agent's node loop: join the control plane, heartbeat at the interval
//! it asks for, join again when it forgets the node (a restart), and
//! reconnect with backoff when it is unreachable.

use std::sync::Arc;
use std::time::Duration;

use mesh_common::backoff::Backoff;
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::nodes_client::NodesClient;

use super::link::{ControlLink, LinkError};
use super::supervisor::Supervisor;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until the process is stopped; returns only on a bad node
/// description (`LinkError::Refused`).
pub async fn run(
    link: Arc<ControlLink>,
    info: pb::NodeInfo,
    supervisor: Arc<Supervisor>,
) -> Result<(), LinkError> {
    let mut announced = false;
    let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
    let server = link.server.clone();
    loop {
        match session(&link, &info, &supervisor, &mut announced).await {
            Err(LinkError::Unreachable(reason)) => {
                tracing::warn!(server = %server, %reason, "control plane unreachable; retrying");
            }
            Err(LinkError::Refused(reason) | LinkError::Local(reason)) => {
                return Err(LinkError::Refused(format!(
                    "the control plane refused node {}: {reason}",
                    info.name
                )))
            }
            Ok(()) => backoff.reset(),
        }
        let pause = backoff.jittered(&mut rand::rng());
        tokio::time::sleep(pause).await;
    }
}

/// A follower refused: the node moves to the leader it named, or while an
/// election is under way asks again soon (the caller's backoff is reset).
fn follow_leader(link: &ControlLink, status: &tonic::Status) -> Result<(), LinkError> {
    if !link.follow_leader(status) {
        tracing::info!(server = %link.current_server(), reason = %status.message(), "waiting for a leader");
    }
    Ok(())
}

/// Joins, then heartbeats until the server forgets the node or sends it
/// to the leader (Ok), or fails.
async fn session(
    link: &ControlLink,
    info: &pb::NodeInfo,
    supervisor: &Supervisor,
    announced: &mut bool,
) -> Result<(), LinkError> {
    let mut client = NodesClient::new(link.channel());
    let reply = match client.join(info.clone()).await {
        Ok(reply) => reply,
        Err(status) if super::link::not_leader(&status) => return follow_leader(link, &status),
        // A refusal is about the node description itself: retrying cannot help.
        Err(status) => {
            return Err(match status.code() {
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied => {
                    LinkError::Refused(status.message().to_owned())
                }
                _ => LinkError::Unreachable(status.message().to_owned()),
            })
        }
    };
    let interval = Duration::from_millis(reply.into_inner().heartbeat_interval_ms.max(50));
    if !*announced {
        // Tests and scripts read this line.
        println!(
            "meshd agent ready name={} advertise_ip={} server={}",
            info.name,
            info.advertise_ip,
            link.current_server()
        );
        *announced = true;
    }
    tracing::info!(node = %info.name, ?interval, "joined the control plane");
    let mut ticker = tokio::time::interval(interval);
    loop {
        // At the interval, or at once when an instance's report changed.
        tokio::select! {
            _ = ticker.tick() => {}
            _ = supervisor.changed.notified() => {}
        }
        let heartbeat = pb::HeartbeatRequest {
            name: info.name.clone(),
            instances: supervisor.reports(),
            certificate_expires_unix_ms: link.certificate_expires_unix_ms(),
            bundle_version: link.bundle_version(),
            certificate_root: link.certificate_root(),
        };
        // A renewed certificate is presented from the next heartbeat on.
        let mut client = NodesClient::new(link.channel());
        let reply = match client.heartbeat(heartbeat).await {
            Ok(reply) => reply.into_inner(),
            Err(status) if super::link::not_leader(&status) => return follow_leader(link, &status),
            Err(status) => return Err(LinkError::Unreachable(status.message().to_owned())),
        };
        link.keep_fresh(reply.bundle_version).await;
        if reply.known {
            supervisor.apply(&reply.assignments);
        } else {
            tracing::info!(node = %info.name, "the control plane forgot this node; joining again");
            return Ok(());
        }
    }
}
