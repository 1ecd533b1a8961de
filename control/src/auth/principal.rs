//! The caller of a gRPC method, from the client certificate its TLS
//! connection presented (already verified against the trust roots).

use std::net::SocketAddr;

use mesh_common::spiffe::{SpiffeId, Subject};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// No client certificate (or one that names nobody of this mesh).
    Anonymous,
    /// An operator: `spiffe://<domain>/user/<name>`; the serial tells a
    /// revoked or replaced credential from the current one.
    User { name: String, serial: String },
    /// A node agent: `spiffe://<domain>/node/<name>`.
    Node(String),
    /// A sidecar: `spiffe://<domain>/service/<service>`.
    Workload(String),
    /// Another meshd server: it calls only to hand on a call it received
    /// (a follower to the leader), naming that call's caller.
    ControlPlane,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("an anonymous caller"),
            Principal::User { name, .. } => write!(f, "user {name:?}"),
            Principal::Node(name) => write!(f, "node {name:?}"),
            Principal::Workload(service) => write!(f, "a sidecar of service {service:?}"),
            Principal::ControlPlane => f.write_str("another meshd server"),
        }
    }
}

/// What meshd knows of a gRPC connection: tonic puts it into every
/// request's extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub principal: Principal,
}

/// The SPIFFE ID of a user.
pub fn user_id(trust_domain: &str, name: &str) -> String {
    SpiffeId::user(trust_domain, name).to_string()
}

/// The SPIFFE ID of a node.
pub fn node_id(trust_domain: &str, name: &str) -> String {
    SpiffeId::node(trust_domain, name).to_string()
}

/// The SPIFFE ID meshd presents when it calls a node's agent (logs).
pub fn control_plane_id(trust_domain: &str) -> String {
    SpiffeId::control_plane(trust_domain).to_string()
}

/// The principal a verified certificate (DER) names in `trust_domain`.
pub fn of_certificate(der: &[u8], trust_domain: &str) -> Principal {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Principal::Anonymous };
    let serial = mesh_client::pem::serial_of(&cert);
    mesh_client::pem::uri_names_of(&cert)
        .iter()
        .find_map(|uri| SpiffeId::parse_in(uri, trust_domain).and_then(|id| of_id(id, &serial)))
        .unwrap_or(Principal::Anonymous)
}

/// The caller a SPIFFE ID names.
pub fn of_id(id: SpiffeId, serial: &str) -> Option<Principal> {
    match id.subject {
        Subject::User(name) => Some(Principal::User { name, serial: serial.to_owned() }),
        Subject::Node(name) => Some(Principal::Node(name)),
        Subject::Service(name) => Some(Principal::Workload(name)),
        Subject::ControlPlane => Some(Principal::ControlPlane),
    }
}

/// The SPIFFE ID and credential serial that name `principal` to another
/// server; None for an anonymous caller (and for meshd itself, which
/// never hands on its own calls).
pub fn to_id(principal: &Principal, trust_domain: &str) -> Option<(String, String)> {
    match principal {
        Principal::User { name, serial } => Some((user_id(trust_domain, name), serial.clone())),
        Principal::Node(name) => Some((node_id(trust_domain, name), String::new())),
        Principal::Workload(service) => {
            Some((SpiffeId::service(trust_domain, service).to_string(), String::new()))
        }
        Principal::Anonymous | Principal::ControlPlane => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spiffe_id_names_one_kind_of_caller() {
        let user = |n: &str| Some(Principal::User { name: n.into(), serial: "0a".into() });
        let cases = [
            ("user/ci", user("ci")),
            ("node/a", Some(Principal::Node("a".into()))),
            ("service/web", Some(Principal::Workload("web".into()))),
            ("control-plane", Some(Principal::ControlPlane)),
        ];
        for (path, expected) in cases {
            let id = SpiffeId::parse(&format!("spiffe://mesh.local/{path}")).unwrap();
            let principal = of_id(id, "0a");
            assert_eq!(principal, expected, "{path}");
            // What names a caller to another server names the same caller there.
            let principal = principal.unwrap();
            if let Some((id, serial)) = to_id(&principal, "mesh.local") {
                let back = of_id(SpiffeId::parse_in(&id, "mesh.local").unwrap(), &serial);
                assert_eq!(back, Some(principal), "{path}");
            }
        }
    }
}
