//! Between the internal state and the protobuf messages.

#[cfg(test)]
use mesh_common::policy::Protocol;
use mesh_common::policy::RetryOn;
use mesh_proto::convert::{
    protocol_from_pb, protocol_to_pb, retry_on_from_pb, retry_on_to_pb, transport_from_pb, transport_to_pb,
};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::traffic_policy::{rate_limit_to_pb, route_to_pb};

use crate::state::{MeshDefaults, Policy, ServiceState};

/// A service's routing entry as proxies get it; a policy that names no
/// transport gets the mesh's default.
pub fn route(name: &str, service: &ServiceState, defaults: &MeshDefaults) -> pb::ServiceRoute {
    let mut policy = policy_to_pb(&service.policy);
    if service.policy.transport.is_none() {
        policy.transport = Some(transport_to_pb(defaults.transport));
    }
    pb::ServiceRoute {
        name: name.to_owned(),
        policy: Some(policy),
        split: service.split.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        endpoints: service
            .endpoints
            .iter()
            .map(|(addr, e)| pb::Endpoint {
                service: name.to_owned(),
                version: e.version.clone(),
                addr: addr.to_string(),
                ready: e.ready,
                meshed: e.meshed,
                quic: e.quic,
            })
            .collect(),
        routes: service.routes.iter().map(route_to_pb).collect(),
        rate_limit: service.rate_limit.as_ref().map(rate_limit_to_pb),
    }
}

pub fn policy_to_pb(policy: &Policy) -> pb::Policy {
    pb::Policy {
        protocol: policy.protocol.map(protocol_to_pb),
        timeout_ms: policy.timeout_ms,
        connect_timeout_ms: policy.connect_timeout_ms,
        retry_attempts: policy.retry_attempts,
        retry_on: policy.retry_on.iter().flatten().copied().map(retry_on_to_pb).collect(),
        retry_non_idempotent: policy.retry_non_idempotent,
        retry_budget_ratio: policy.retry_budget_ratio,
        retry_budget_min_per_second: policy.retry_budget_min_per_second,
        breaker_consecutive_failures: policy.breaker_consecutive_failures,
        breaker_base_ejection_ms: policy.breaker_base_ejection_ms,
        breaker_max_ejection_ms: policy.breaker_max_ejection_ms,
        permissive: policy.permissive,
        allow_from: policy.allow_from.as_ref().map(|services| pb::AllowFrom { services: services.clone() }),
        hold_when_empty_ms: policy.hold_when_empty_ms,
        transport: policy.transport.map(transport_to_pb),
    }
}

/// A policy off the wire; an enum value this server does not know is an
/// error that names it.
pub fn policy_from_pb(policy: &pb::Policy) -> Result<Policy, String> {
    let retry_on: Vec<RetryOn> =
        policy.retry_on.iter().map(|v| retry_on_from_pb(*v)).collect::<Result<_, _>>()?;
    Ok(Policy {
        protocol: policy.protocol.map(protocol_from_pb).transpose()?,
        timeout_ms: policy.timeout_ms,
        connect_timeout_ms: policy.connect_timeout_ms,
        retry_attempts: policy.retry_attempts,
        retry_on: (!retry_on.is_empty()).then_some(retry_on),
        retry_non_idempotent: policy.retry_non_idempotent,
        retry_budget_ratio: policy.retry_budget_ratio,
        retry_budget_min_per_second: policy.retry_budget_min_per_second,
        breaker_consecutive_failures: policy.breaker_consecutive_failures,
        breaker_base_ejection_ms: policy.breaker_base_ejection_ms,
        breaker_max_ejection_ms: policy.breaker_max_ejection_ms,
        permissive: policy.permissive,
        allow_from: policy.allow_from.as_ref().map(|allow| allow.services.clone()),
        hold_when_empty_ms: policy.hold_when_empty_ms,
        transport: policy.transport.map(transport_from_pb).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_survive_the_round_trip() {
        let policies = [
            Policy::default(),
            Policy { allow_from: Some(vec![]), ..Policy::default() },
            Policy { timeout_ms: Some(2000), retry_attempts: Some(3), ..Policy::default() },
            Policy { protocol: Some(Protocol::Grpc), ..Policy::default() },
            Policy { transport: Some(mesh_common::policy::Transport::Quic), ..Policy::default() },
            Policy {
                retry_on: Some(vec![RetryOn::ServerError]),
                retry_budget_ratio: Some(0.0),
                retry_budget_min_per_second: Some(0),
                breaker_consecutive_failures: Some(5),
                breaker_max_ejection_ms: Some(10_000),
                permissive: Some(true),
                allow_from: Some(vec!["frontend".into(), "admin".into()]),
                ..Policy::default()
            },
        ];
        for policy in policies {
            assert_eq!(policy_from_pb(&policy_to_pb(&policy)), Ok(policy));
        }
        // A value this server does not know is refused with its name, not dropped.
        let newer = pb::Policy { retry_on: vec![1, 42], ..Default::default() };
        assert_eq!(policy_from_pb(&newer), Err("unknown retry condition value 42".to_owned()));
    }
}
