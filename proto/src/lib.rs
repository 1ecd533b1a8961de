//! Generated protobuf types and gRPC stubs of the mesh, and the
//! conversions of their enums to the typed values in `mesh-common`.

/// The echo workload's gRPC API (`mesh.echo.v1`).
pub mod echo {
    pub mod v1 {
        tonic::include_proto!("mesh.echo.v1");
    }
}

/// The control plane's APIs (`mesh.v1`): registry, discovery and admin.
pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("mesh.v1");

        /// meshd's side of Discovery: it sends `RoutingUpdateWire`, which
        /// proxies decode as `RoutingUpdate`.
        pub mod wire {
            include!(concat!(env!("OUT_DIR"), "/mesh.v1.Discovery.rs"));
        }
    }
}

/// The standard gRPC health-checking API (`grpc.health.v1`).
pub mod health {
    pub mod v1 {
        tonic::include_proto!("grpc.health.v1");
    }
}

/// Routes and rate limits to their messages and back.
pub mod traffic_policy;

/// Conversions between the wire's enums and the typed values every
/// program uses inside: done once, here, at the edge.
pub mod convert {
    use mesh_common::policy::{Protocol, RetryOn, Transport};

    use crate::mesh::v1 as pb;

    pub fn protocol_to_pb(protocol: Protocol) -> i32 {
        let wire = match protocol {
            Protocol::Http => pb::Protocol::Http,
            Protocol::H2 => pb::Protocol::H2,
            Protocol::Grpc => pb::Protocol::Grpc,
            Protocol::Tcp => pb::Protocol::Tcp,
        };
        wire as i32
    }

    /// A protocol off the wire; an unknown or unspecified value is an error
    /// that names it (a newer sender).
    pub fn protocol_from_pb(value: i32) -> Result<Protocol, String> {
        match pb::Protocol::try_from(value) {
            Ok(pb::Protocol::Http) => Ok(Protocol::Http),
            Ok(pb::Protocol::H2) => Ok(Protocol::H2),
            Ok(pb::Protocol::Grpc) => Ok(Protocol::Grpc),
            Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
            _ => Err(format!("unknown protocol value {value}")),
        }
    }

    pub fn transport_to_pb(transport: Transport) -> i32 {
        let wire = match transport {
            Transport::Tcp => pb::Transport::Tcp,
            Transport::Quic => pb::Transport::Quic,
        };
        wire as i32
    }

    pub fn transport_from_pb(value: i32) -> Result<Transport, String> {
        match pb::Transport::try_from(value) {
            Ok(pb::Transport::Tcp) => Ok(Transport::Tcp),
            Ok(pb::Transport::Quic) => Ok(Transport::Quic),
            _ => Err(format!("unknown transport value {value}")),
        }
    }

    pub fn retry_on_to_pb(condition: RetryOn) -> i32 {
        let wire = match condition {
            RetryOn::ConnectFailure => pb::RetryOn::ConnectFailure,
            RetryOn::ServerError => pb::RetryOn::ServerError,
            RetryOn::GatewayError => pb::RetryOn::GatewayError,
            RetryOn::Unavailable => pb::RetryOn::Unavailable,
        };
        wire as i32
    }

    pub fn retry_on_from_pb(value: i32) -> Result<RetryOn, String> {
        match pb::RetryOn::try_from(value) {
            Ok(pb::RetryOn::ConnectFailure) => Ok(RetryOn::ConnectFailure),
            Ok(pb::RetryOn::ServerError) => Ok(RetryOn::ServerError),
            Ok(pb::RetryOn::GatewayError) => Ok(RetryOn::GatewayError),
            Ok(pb::RetryOn::Unavailable) => Ok(RetryOn::Unavailable),
            _ => Err(format!("unknown retry condition value {value}")),
        }
    }

    /// The name users see for a state or kind: `INSTANCE_STATE_RUNNING`
    /// becomes `running`.
    fn short_name(full: &str, prefix: &str) -> String {
        full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
    }

    pub fn instance_state_name(state: pb::InstanceState) -> String {
        short_name(state.as_str_name(), "INSTANCE_STATE_")
    }

    pub fn job_state_name(state: pb::JobState) -> String {
        short_name(state.as_str_name(), "JOB_STATE_")
    }

    pub fn job_kind_name(kind: pb::JobKind) -> String {
        short_name(kind.as_str_name(), "JOB_KIND_")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_value_crosses_the_wire_and_back() {
            for protocol in Protocol::ALL {
                assert_eq!(protocol_from_pb(protocol_to_pb(protocol)), Ok(protocol));
            }
            for transport in Transport::ALL {
                assert_eq!(transport_from_pb(transport_to_pb(transport)), Ok(transport));
            }
            for condition in RetryOn::ALL {
                assert_eq!(retry_on_from_pb(retry_on_to_pb(condition)), Ok(condition));
            }
            assert!(protocol_from_pb(0).is_err(), "unspecified is not a protocol");
            assert_eq!(retry_on_from_pb(99), Err("unknown retry condition value 99".into()));
            assert_eq!(instance_state_name(pb::InstanceState::Running), "running");
            assert_eq!(job_state_name(pb::JobState::Complete), "complete");
            assert_eq!(job_kind_name(pb::JobKind::Batch), "batch");
        }
    }
}
