//! SPIFFE IDs of the mesh: who a certificate names.
//!
//! `spiffe://<trust domain>/service/<service>` for a sidecar,
//! `/node/<name>` for a node agent, `/user/<name>` for an operator and
//! `/control-plane` for meshd when it calls an agent.

use std::fmt;

/// What a SPIFFE ID of the mesh names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Service(String),
    Node(String),
    User(String),
    ControlPlane,
}

/// A parsed SPIFFE ID of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub subject: Subject,
}

impl SpiffeId {
    pub fn service(trust_domain: &str, service: &str) -> SpiffeId {
        SpiffeId { trust_domain: trust_domain.to_owned(), subject: Subject::Service(service.to_owned()) }
    }

    pub fn node(trust_domain: &str, name: &str) -> SpiffeId {
        SpiffeId { trust_domain: trust_domain.to_owned(), subject: Subject::Node(name.to_owned()) }
    }

    pub fn user(trust_domain: &str, name: &str) -> SpiffeId {
        SpiffeId { trust_domain: trust_domain.to_owned(), subject: Subject::User(name.to_owned()) }
    }

    pub fn control_plane(trust_domain: &str) -> SpiffeId {
        SpiffeId { trust_domain: trust_domain.to_owned(), subject: Subject::ControlPlane }
    }

    /// Parses `spiffe://DOMAIN/KIND/NAME` (or `/control-plane`); None for
    /// anything else, including IDs of kinds the mesh does not issue.
    pub fn parse(text: &str) -> Option<SpiffeId> {
        let (trust_domain, path) = text.strip_prefix("spiffe://")?.split_once('/')?;
        if trust_domain.is_empty() {
            return None;
        }
        let subject = match path.split_once('/') {
            None if path == "control-plane" => Subject::ControlPlane,
            Some((kind, name)) if !name.is_empty() && !name.contains('/') => match kind {
                "service" => Subject::Service(name.to_owned()),
                "node" => Subject::Node(name.to_owned()),
                "user" => Subject::User(name.to_owned()),
                _ => return None,
            },
            _ => return None,
        };
        Some(SpiffeId { trust_domain: trust_domain.to_owned(), subject })
    }

    /// Parses `text` if it is an ID of `trust_domain`.
    pub fn parse_in(text: &str, trust_domain: &str) -> Option<SpiffeId> {
        SpiffeId::parse(text).filter(|id| id.trust_domain == trust_domain)
    }
}

/// The service a sidecar's ID names in `trust_domain`, borrowed from
/// `uri`: an inbound asks on every request, so this allocates nothing.
pub fn service_of<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    let name = uri.strip_prefix("spiffe://")?.strip_prefix(trust_domain)?.strip_prefix("/service/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The trust domain of any `spiffe://` URI, whatever its path.
pub fn trust_domain_of(uri: &str) -> Option<&str> {
    uri.strip_prefix("spiffe://")?.split('/').next().filter(|domain| !domain.is_empty())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let domain = &self.trust_domain;
        match &self.subject {
            Subject::Service(name) => write!(f, "spiffe://{domain}/service/{name}"),
            Subject::Node(name) => write!(f, "spiffe://{domain}/node/{name}"),
            Subject::User(name) => write!(f, "spiffe://{domain}/user/{name}"),
            Subject::ControlPlane => write!(f, "spiffe://{domain}/control-plane"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print_back() {
        let d = "mesh.local";
        // (text, parsed)
        let cases = [
            ("spiffe://mesh.local/service/web", Some(SpiffeId::service(d, "web"))),
            ("spiffe://mesh.local/node/a", Some(SpiffeId::node(d, "a"))),
            ("spiffe://mesh.local/user/ci", Some(SpiffeId::user(d, "ci"))),
            ("spiffe://mesh.local/control-plane", Some(SpiffeId::control_plane(d))),
            ("spiffe://mesh.local/service/", None),
            ("spiffe://mesh.local/service/a/b", None),
            ("spiffe://mesh.local/team/x", None),
            ("spiffe:///service/web", None),
            ("https://mesh.local/service/web", None),
        ];
        for (text, parsed) in cases {
            assert_eq!(SpiffeId::parse(text), parsed, "{text}");
            if let Some(id) = parsed {
                assert_eq!(id.to_string(), text);
            }
        }
        assert_eq!(SpiffeId::parse_in("spiffe://other/service/web", d), None);
        // (uri, the service it names in mesh.local)
        let services = [
            ("spiffe://mesh.local/service/web", Some("web")),
            ("spiffe://mesh.local/node/web", None),
            ("spiffe://mesh.localx/service/web", None),
            ("spiffe://mesh.local/service/", None),
            ("spiffe://mesh.local/service/a/b", None),
        ];
        for (uri, service) in services {
            assert_eq!(service_of(uri, d), service, "{uri}");
        }
        assert_eq!(trust_domain_of("spiffe://mesh.local/anything/at/all"), Some(d));
        assert_eq!(trust_domain_of("spiffe:///x"), None);
    }
}
