//! Workload identity: the certificate authority (`ca.rs`) and the one-time
//! bootstrap tokens through which the scheduler attests an instance
//! (`tokens.rs`). An identity is `spiffe://<trust domain>/service/<service>`.

pub mod ca;
pub mod rotation;
pub mod tokens;

/// The SPIFFE ID of a service in a trust domain.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    mesh_common::spiffe::SpiffeId::service(trust_domain, service).to_string()
}
