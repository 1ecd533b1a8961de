//! Traffic shifting and policy: `meshctl split` and `meshctl policy`, with
//! `--wait` for every proxy to apply the change.

use std::time::Duration;

use mesh_proto::convert::{protocol_to_pb, retry_on_to_pb};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::cli::{PolicyArgs, Wait};
use crate::failure::Failure;
use crate::session::Session;

pub async fn split(
    session: &Session,
    service: String,
    weights: Vec<(String, u32)>,
    clear: bool,
    wait: Wait,
) -> Result<(), Failure> {
    let mut admin = AdminClient::new(session.channel.clone());
    let version = if clear {
        admin.clear_split(pb::ServiceName { service: service.clone() }).await?.into_inner().version
    } else {
        let weights = distinct_versions(weights)?;
        admin.set_split(pb::SetSplitRequest { service: service.clone(), weights }).await?.into_inner().version
    };
    println!("split of {service} set (version {version})");
    wait_for(&mut admin, version, &wait).await
}

pub async fn policy(
    session: &Session,
    service: String,
    policy: PolicyArgs,
    wait: Wait,
) -> Result<(), Failure> {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    let policy = pb::Policy {
        protocol: policy.protocol.map(protocol_to_pb),
        timeout_ms: ms(policy.timeout),
        connect_timeout_ms: ms(policy.connect_timeout),
        retry_attempts: policy.retry_attempts,
        retry_on: policy.retry_on.unwrap_or_default().into_iter().map(retry_on_to_pb).collect(),
        retry_non_idempotent: policy.retry_non_idempotent,
        retry_budget_ratio: policy.retry_budget_ratio,
        retry_budget_min_per_second: policy.retry_budget_min_per_second,
        breaker_consecutive_failures: policy.breaker_failures,
        breaker_base_ejection_ms: ms(policy.breaker_base_ejection),
        breaker_max_ejection_ms: ms(policy.breaker_max_ejection),
        permissive: policy.permissive,
        allow_from: if policy.allow_all_mesh {
            Some(pb::AllowFrom { services: Vec::new() })
        } else {
            policy.allow_from.map(|services| pb::AllowFrom { services })
        },
        hold_when_empty_ms: ms(policy.hold_when_empty),
        transport: policy.transport.map(mesh_proto::convert::transport_to_pb),
    };
    let mut admin = AdminClient::new(session.channel.clone());
    let request = pb::SetPolicyRequest { service: service.clone(), policy: Some(policy) };
    let version = admin.set_policy(request).await?.into_inner().version;
    println!("policy of {service} set (version {version})");
    wait_for(&mut admin, version, &wait).await
}

/// The weights by version, refusing a version given twice.
fn distinct_versions(weights: Vec<(String, u32)>) -> Result<std::collections::HashMap<String, u32>, Failure> {
    let mut by_version = std::collections::HashMap::new();
    for (version, weight) in weights {
        if by_version.insert(version.clone(), weight).is_some() {
            return Err(Failure(format!("version {version:?} is given twice; give each version once"), 2));
        }
    }
    Ok(by_version)
}

pub async fn wait_for(admin: &mut AdminClient<Channel>, version: u64, wait: &Wait) -> Result<(), Failure> {
    if !wait.wait {
        return Ok(());
    }
    let request = pb::WaitRequest { version, timeout_ms: wait.timeout.as_millis() as u64 };
    let convergence = admin.wait_converged(request).await?.into_inner();
    let connected = convergence.proxies.iter().filter(|p| p.connected && !p.stalled).count();
    if convergence.converged {
        println!(
            "all {connected} connected proxies applied version {version} in {} ms",
            convergence.waited_ms
        );
        for stalled in convergence.proxies.iter().filter(|p| p.stalled) {
            println!(
                "not waited for: {} (service {}) is stalled at version {}",
                stalled.proxy_id, stalled.service, stalled.acked_version
            );
        }
        return Ok(());
    }
    let lagging: Vec<String> = convergence
        .proxies
        .iter()
        .filter(|p| p.connected && p.acked_version < version)
        .map(|p| {
            let reason = if p.rejected_version >= version && !p.rejected_reason.is_empty() {
                format!(", refused: {}", p.rejected_reason)
            } else {
                String::new()
            };
            format!("  {} (service {}, at version {}{reason})", p.proxy_id, p.service, p.acked_version)
        })
        .collect();
    Err(Failure(
        format!(
            "version {version} did not reach every proxy within {}; lagging:\n{}",
            humantime::format_duration(wait.timeout),
            lagging.join("\n")
        ),
        3,
    ))
}
