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

/// Joins, then heartbeats until the server forgets the node (Ok) or fails.
async fn session(
    link: &ControlLink,
    info: &pb::NodeInfo,
    supervisor: &Supervisor,
    announced: &mut bool,
) -> Result<(), LinkError> {
    let server = &link.server;
    let mut client = NodesClient::new(link.channel());
    // A refusal is about the node description itself: retrying cannot help.
    let reply = client.join(info.clone()).await.map_err(|status| match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied => {
            LinkError::Refused(status.message().to_owned())
        }
        _ => LinkError::Unreachable(status.message().to_owned()),
    })?;
    let interval = Duration::from_millis(reply.into_inner().heartbeat_interval_ms.max(50));
    if !*announced {
        // Tests and scripts read this line.
        println!("meshd agent ready name={} advertise_ip={} server={server}", info.name, info.advertise_ip);
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
        };
        // A renewed certificate is presented from the next heartbeat on.
        let mut client = NodesClient::new(link.channel());
        let reply = client
            .heartbeat(heartbeat)
            .await
            .map_err(|e| LinkError::Unreachable(e.message().to_owned()))?
            .into_inner();
        link.keep_fresh(reply.bundle_version).await;
        if reply.known {
            supervisor.apply(&reply.assignments);
        } else {
            tracing::info!(node = %info.name, "the control plane forgot this node; joining again");
            return Ok(());
        }
    }
}
