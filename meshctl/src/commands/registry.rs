//! `meshctl register` and `deregister`: endpoints from outside the scheduler.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::registry_client::RegistryClient;

use crate::failure::Failure;
use crate::session::Session;

pub async fn register(
    session: &Session,
    service: String,
    version: String,
    addr: String,
    ready: bool,
    plaintext_ok: bool,
) -> Result<(), Failure> {
    let endpoint = pb::Endpoint {
        service: service.clone(),
        version,
        addr: addr.clone(),
        ready,
        meshed: false,
        quic: false,
    };
    let mut registry = RegistryClient::new(session.channel.clone());
    let request = pb::RegisterRequest { endpoint: Some(endpoint), plaintext_ok };
    let reply = registry.register(request).await?.into_inner();
    println!("registered {addr} for {service} (version {})", reply.version);
    Ok(())
}

pub async fn deregister(session: &Session, service: String, addr: String) -> Result<(), Failure> {
    let mut registry = RegistryClient::new(session.channel.clone());
    let request = pb::DeregisterRequest { service: service.clone(), addr: addr.clone() };
    let reply = registry.deregister(request).await?.into_inner();
    println!("deregistered {addr} from {service} (version {})", reply.version);
    Ok(())
}
