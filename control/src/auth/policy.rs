//! Every gRPC method of meshd and what its caller must be, in one table;
//! and the decision for one call. Pure.

use super::principal::Principal;

/// An operator's role; each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Also shifts traffic, runs and stops jobs, registers endpoints.
    Operator,
    /// Also manages users, join tokens, identity and policies.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role: viewer, operator or admin")),
        }
    }
}

/// What a method's caller must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Anyone who completes the TLS handshake: the request itself carries
    /// the proof (a token, or a certificate and a request signed by its key).
    Public,
    /// A node agent; the handler checks it speaks only of itself.
    Node,
    /// A sidecar with a workload certificate, or an operator (a proxy run
    /// by hand, outside the scheduler).
    Proxy,
    /// A user with this role or a higher one.
    Role(Role),
    /// A node (an agent waits for convergence as it drains), or a user
    /// with this role.
    NodeOrRole(Role),
    /// Another meshd server asking in its own name (the leader's
    /// autoscaler reads every server's traffic), or a user with this role.
    ServerOrRole(Role),
}

use Requirement::{Node, Proxy, Public};
use Role::{Admin, Operator, Viewer};

/// Which server answers a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// Every server: what it reads is in the shared store, or in its
    /// watch of it, and its writes are transactions on the store.
    Any,
    /// The leader: the scheduler's placements, node liveness, tokens in
    /// memory, the signing key's rotation. A follower hands the call on.
    Leader,
}

use Serves::{Any, Leader};

/// Every method meshd serves, who may call it and which server answers
/// it. A method not listed is refused.
pub const METHODS: &[(&str, Requirement, Serves)] = &[
    ("/mesh.v1.Registry/Register", Requirement::Role(Operator), Any),
    ("/mesh.v1.Registry/Deregister", Requirement::Role(Operator), Any),
    ("/mesh.v1.Nodes/Enroll", Public, Leader),
    ("/mesh.v1.Nodes/Join", Node, Leader),
    ("/mesh.v1.Nodes/Heartbeat", Node, Leader),
    ("/mesh.v1.Identity/IssueToken", Node, Leader),
    ("/mesh.v1.Identity/Sign", Public, Leader),
    ("/mesh.v1.Identity/Renew", Public, Any),
    ("/mesh.v1.Identity/TrustBundle", Public, Any),
    ("/mesh.v1.Identity/RotateRoot", Requirement::Role(Admin), Leader),
    ("/mesh.v1.Jobs/Run", Requirement::Role(Operator), Any),
    ("/mesh.v1.Jobs/Stop", Requirement::Role(Operator), Any),
    ("/mesh.v1.Jobs/RolloutStatus", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Jobs/SetRollout", Requirement::Role(Operator), Leader),
    ("/mesh.v1.Jobs/Promote", Requirement::Role(Operator), Leader),
    ("/mesh.v1.Jobs/Status", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Jobs/List", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Jobs/ListInstances", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Jobs/Logs", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Jobs/ScrapeProxies", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Discovery/Subscribe", Proxy, Any),
    ("/mesh.v1.Admin/ListServices", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Admin/ListEndpoints", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Admin/ListProxies", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Admin/SetSplit", Requirement::Role(Operator), Any),
    ("/mesh.v1.Admin/ClearSplit", Requirement::Role(Operator), Any),
    ("/mesh.v1.Admin/ListSplits", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Admin/ApplyTrafficPolicy", Requirement::Role(Operator), Any),
    ("/mesh.v1.Admin/ListTrafficPolicy", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Admin/DeleteRoute", Requirement::Role(Operator), Any),
    ("/mesh.v1.Admin/DeleteRateLimit", Requirement::Role(Operator), Any),
    ("/mesh.v1.Admin/SetPolicy", Requirement::Role(Admin), Any),
    ("/mesh.v1.Admin/WaitConverged", Requirement::NodeOrRole(Viewer), Any),
    ("/mesh.v1.Admin/Status", Requirement::NodeOrRole(Viewer), Any),
    ("/mesh.v1.Admin/ListNodes", Requirement::Role(Viewer), Leader),
    ("/mesh.v1.Admin/Traffic", Requirement::ServerOrRole(Viewer), Any),
    ("/mesh.v1.Access/WhoAmI", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Access/ListUsers", Requirement::Role(Admin), Any),
    ("/mesh.v1.Access/CreateUser", Requirement::Role(Admin), Any),
    ("/mesh.v1.Access/RevokeUser", Requirement::Role(Admin), Any),
    ("/mesh.v1.Access/RenewCredential", Requirement::Role(Viewer), Any),
    ("/mesh.v1.Access/CreateJoinToken", Requirement::Role(Admin), Leader),
];

/// The requirement of the method at `path` (`/package.Service/Method`).
pub fn requirement(path: &str) -> Option<Requirement> {
    METHODS.iter().find(|(method, ..)| *method == path).map(|(_, requirement, _)| *requirement)
}

/// Which server answers the method at `path`; Any for one not listed (the
/// gate refuses it anyway).
pub fn serves(path: &str) -> Serves {
    METHODS.iter().find(|(method, ..)| *method == path).map_or(Any, |(.., serves)| *serves)
}

/// Why a call is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The caller is not known: no credential, or one revoked.
    Unauthenticated(String),
    /// The caller is known and may not do this.
    PermissionDenied(String),
}

/// Decides one call of `path` by `principal`; `role_of` gives a user's
/// current role, or why the credential no longer counts.
pub fn decide(
    path: &str,
    principal: &Principal,
    role_of: impl Fn(&str, &str) -> Result<Role, String>,
) -> Result<(), Denial> {
    let Some(requirement) = requirement(path) else {
        return Err(Denial::PermissionDenied(format!("{path} is not a method meshd serves to anyone")));
    };
    let needs = |what: &str| {
        match principal {
        Principal::Anonymous => Denial::Unauthenticated(format!(
            "{path} needs {what}; this call presented no mesh credential (give meshctl --credentials FILE or set MESH_CREDENTIALS)"
        )),
        other => Denial::PermissionDenied(format!("{path} needs {what}; the caller is {other}")),
    }
    };
    match (requirement, principal) {
        (Public, _) => Ok(()),
        (Node, Principal::Node(_)) => Ok(()),
        (Node, _) => Err(needs("a node's certificate")),
        (Proxy, Principal::Workload(_)) => Ok(()),
        (Proxy, Principal::User { name, serial }) => {
            check_role(path, name, role_of(name, serial).map_err(Denial::Unauthenticated)?, Operator)
        }
        (Proxy, _) => Err(needs("a sidecar's workload certificate or an operator's credential")),
        (Requirement::NodeOrRole(_), Principal::Node(_)) => Ok(()),
        (Requirement::ServerOrRole(_), Principal::ControlPlane) => Ok(()),
        (
            Requirement::Role(needed) | Requirement::NodeOrRole(needed) | Requirement::ServerOrRole(needed),
            Principal::User { name, serial },
        ) => check_role(path, name, role_of(name, serial).map_err(Denial::Unauthenticated)?, needed),
        (
            Requirement::Role(needed) | Requirement::NodeOrRole(needed) | Requirement::ServerOrRole(needed),
            _,
        ) => Err(needs(&format!("a user credential with the {} role", needed.name()))),
    }
}

fn check_role(path: &str, name: &str, has: Role, needed: Role) -> Result<(), Denial> {
    if has >= needed {
        return Ok(());
    }
    let command = path.rsplit('/').next().unwrap_or(path);
    Err(Denial::PermissionDenied(format!(
        "{command} needs the {} role; your credential is {} {name:?}",
        needed.name(),
        has.name()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Principal {
        Principal::User { name: name.into(), serial: "01".into() }
    }

    /// The users of these tests: "v" viewer, "o" operator, "a" admin; "gone" was revoked.
    fn role_of(name: &str, _serial: &str) -> Result<Role, String> {
        match name {
            "v" => Ok(Viewer),
            "o" => Ok(Operator),
            "a" => Ok(Admin),
            _ => Err(format!("the credential of {name:?} was revoked")),
        }
    }

    #[test]
    fn each_caller_gets_what_its_role_allows() {
        let anonymous = Principal::Anonymous;
        let node = Principal::Node("a".into());
        let sidecar = Principal::Workload("web".into());
        let (v, o, a, gone) = (user("v"), user("o"), user("a"), user("gone"));
        let server = Principal::ControlPlane;
        let ok = || Ok(());
        let unauth = "unauthenticated";
        let denied = "denied";
        // (method, caller, expected: ok, or the kind of refusal)
        let cases: Vec<(&str, &Principal, Result<(), &str>)> = vec![
            ("/mesh.v1.Admin/SetSplit", &anonymous, Err(unauth)),
            ("/mesh.v1.Admin/SetSplit", &v, Err(denied)),
            ("/mesh.v1.Admin/SetSplit", &o, ok()),
            ("/mesh.v1.Admin/SetSplit", &gone, Err(unauth)),
            ("/mesh.v1.Admin/SetSplit", &node, Err(denied)),
            ("/mesh.v1.Admin/SetPolicy", &o, Err(denied)),
            ("/mesh.v1.Admin/SetPolicy", &a, ok()),
            ("/mesh.v1.Admin/ListServices", &v, ok()),
            ("/mesh.v1.Admin/ListServices", &sidecar, Err(denied)),
            ("/mesh.v1.Jobs/Run", &v, Err(denied)),
            ("/mesh.v1.Jobs/Run", &o, ok()),
            ("/mesh.v1.Nodes/Heartbeat", &node, ok()),
            ("/mesh.v1.Admin/WaitConverged", &node, ok()),
            ("/mesh.v1.Admin/WaitConverged", &sidecar, Err(denied)),
            ("/mesh.v1.Nodes/Heartbeat", &a, Err(denied)),
            ("/mesh.v1.Nodes/Heartbeat", &anonymous, Err(unauth)),
            ("/mesh.v1.Identity/IssueToken", &sidecar, Err(denied)),
            ("/mesh.v1.Identity/Sign", &anonymous, ok()),
            ("/mesh.v1.Discovery/Subscribe", &sidecar, ok()),
            ("/mesh.v1.Discovery/Subscribe", &o, ok()),
            ("/mesh.v1.Discovery/Subscribe", &v, Err(denied)),
            ("/mesh.v1.Discovery/Subscribe", &anonymous, Err(unauth)),
            ("/mesh.v1.Access/CreateUser", &o, Err(denied)),
            ("/mesh.v1.Access/CreateUser", &a, ok()),
            ("/mesh.v1.Admin/NotAMethod", &a, Err(denied)),
            // Another server, asking in its own name: only for traffic.
            ("/mesh.v1.Admin/Traffic", &server, ok()),
            ("/mesh.v1.Admin/Traffic", &v, ok()),
            ("/mesh.v1.Admin/Traffic", &sidecar, Err(denied)),
            ("/mesh.v1.Admin/ListServices", &server, Err(denied)),
            ("/mesh.v1.Jobs/Run", &server, Err(denied)),
        ];
        for (path, caller, expected) in cases {
            let got = decide(path, caller, role_of).map_err(|denial| match denial {
                Denial::Unauthenticated(_) => unauth,
                Denial::PermissionDenied(_) => denied,
            });
            assert_eq!(got, expected, "{path} by {caller}");
        }
    }

    /// Every rpc in the protocol file has a row, and every row an rpc: a
    /// new method cannot be added without saying who may call it.
    #[test]
    fn the_table_covers_every_method_of_the_protocol() {
        let proto =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/mesh/v1/mesh.proto"))
                .expect("the protocol file");
        let mut declared = Vec::new();
        let mut service = None;
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_owned);
            } else if let (Some(rest), Some(service)) = (line.strip_prefix("rpc "), &service) {
                let method = rest.split('(').next().unwrap().trim();
                declared.push(format!("/mesh.v1.{service}/{method}"));
            }
        }
        let mut listed: Vec<String> = METHODS.iter().map(|(path, ..)| path.to_string()).collect();
        declared.sort();
        listed.sort();
        assert_eq!(declared, listed);
    }

    #[test]
    fn a_refusal_names_what_is_missing() {
        let Err(Denial::PermissionDenied(message)) = decide("/mesh.v1.Jobs/Run", &user("v"), role_of) else {
            panic!("a viewer runs no job")
        };
        assert_eq!(message, "Run needs the operator role; your credential is viewer \"v\"");
        let Err(Denial::Unauthenticated(message)) =
            decide("/mesh.v1.Jobs/List", &Principal::Anonymous, role_of)
        else {
            panic!("anonymous lists nothing")
        };
        assert!(message.contains("MESH_CREDENTIALS"), "{message}");
    }
}
