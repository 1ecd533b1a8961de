//! Authorization by identity, pure: may this caller reach the local
//! service? Callers are named by the SPIFFE ID of their certificate.

/// `allow_from` lists service names; empty means every caller the inbound
/// let in (every mesh identity, and plaintext callers when permissive).
pub fn allowed(allow_from: &[String], caller: Option<&str>, trust_domain: &str) -> bool {
    if allow_from.is_empty() {
        return true;
    }
    let Some(caller) = caller else { return false };
    mesh_common::spiffe::service_of(caller, trust_domain)
        .is_some_and(|service| allow_from.iter().any(|allowed| allowed == service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_allowed_by_service_identity() {
        let only = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // (allow_from, caller, allowed?)
        let cases: &[(Vec<String>, Option<&str>, bool)] = &[
            (only(&[]), Some("spiffe://mesh.local/service/a"), true),
            (only(&[]), None, true),
            (only(&["frontend", "admin"]), Some("spiffe://mesh.local/service/admin"), true),
            (only(&["frontend"]), Some("spiffe://mesh.local/service/a"), false),
            (only(&["frontend"]), None, false),
            (only(&["frontend"]), Some("spiffe://other.domain/service/frontend"), false),
            (only(&["frontend"]), Some("spiffe://mesh.local/service/frontend/x"), false),
        ];
        for (allow_from, caller, expected) in cases {
            assert_eq!(allowed(allow_from, *caller, "mesh.local"), *expected, "{allow_from:?} {caller:?}");
        }
    }
}
