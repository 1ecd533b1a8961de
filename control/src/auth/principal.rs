//! The caller of a gRPC method, from the client certificate its TLS
//! connection presented (already verified against the trust roots).

use std::net::SocketAddr;

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
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("an anonymous caller"),
            Principal::User { name, .. } => write!(f, "user {name:?}"),
            Principal::Node(name) => write!(f, "node {name:?}"),
            Principal::Workload(service) => write!(f, "a sidecar of service {service:?}"),
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
    format!("spiffe://{trust_domain}/user/{name}")
}

/// The SPIFFE ID of a node.
pub fn node_id(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/node/{name}")
}

/// The SPIFFE ID meshd presents when it calls a node's agent (logs).
pub fn control_plane_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/control-plane")
}

/// The principal a verified certificate (DER) names in `trust_domain`.
pub fn of_certificate(der: &[u8], trust_domain: &str) -> Principal {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Principal::Anonymous };
    let serial: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Principal::Anonymous };
    let prefix = format!("spiffe://{trust_domain}/");
    for name in &san.value.general_names {
        let x509_parser::extensions::GeneralName::URI(uri) = name else { continue };
        if let Some(principal) = uri.strip_prefix(&prefix).and_then(|path| of_path(path, &serial)) {
            return principal;
        }
    }
    Principal::Anonymous
}

/// `user/NAME`, `node/NAME` or `service/NAME`.
fn of_path(path: &str, serial: &str) -> Option<Principal> {
    let (kind, name) = path.split_once('/')?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let name = name.to_owned();
    match kind {
        "user" => Some(Principal::User { name, serial: serial.to_owned() }),
        "node" => Some(Principal::Node(name)),
        "service" => Some(Principal::Workload(name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spiffe_path_names_one_kind_of_caller() {
        let user = |n: &str| Some(Principal::User { name: n.into(), serial: "0a".into() });
        let cases = [
            ("user/ci", user("ci")),
            ("node/a", Some(Principal::Node("a".into()))),
            ("service/web", Some(Principal::Workload("web".into()))),
            ("service/", None),
            ("service/web/extra", None),
            ("group/x", None),
            ("user", None),
        ];
        for (path, expected) in cases {
            assert_eq!(of_path(path, "0a"), expected, "{path}");
        }
    }
}
