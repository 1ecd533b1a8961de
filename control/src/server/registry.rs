//! The Registry API: endpoints in and out.

use std::sync::Arc;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::registry_server::Registry;
use tonic::{Request, Response, Status};

use crate::auth::policy::Role;
use crate::auth::principal::Principal;
use crate::auth::users::Users;
use crate::server::{ChangeFailure, ControlPlane};
use crate::state::Change;

pub struct RegistryService {
    pub control: Arc<ControlPlane>,
    pub users: Arc<Users>,
}

/// Maps a failed change to the status a client sees.
pub fn status_of(failure: ChangeFailure) -> Status {
    match failure {
        ChangeFailure::Refused(error) => Status::invalid_argument(error.0),
        ChangeFailure::Store(error) => super::store_failure(error),
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        if request.get_ref().plaintext_ok {
            let is_admin = match request.extensions().get::<Principal>() {
                Some(Principal::User { name, serial }) => self.users.role_of(name, serial) == Ok(Role::Admin),
                _ => false,
            };
            if !is_admin {
                return Err(Status::permission_denied(
                    "--plaintext-ok needs the admin role: it lets callers of a meshed service go plaintext",
                ));
            }
        }
        let request = request.into_inner();
        let Some(endpoint) = request.endpoint else {
            return Err(Status::invalid_argument("RegisterRequest.endpoint is missing"));
        };
        let change = Change::Register {
            service: endpoint.service,
            version: endpoint.version,
            addr: endpoint.addr,
            ready: endpoint.ready,
            meshed: endpoint.meshed,
            quic: endpoint.quic,
            plaintext_ok: request.plaintext_ok,
        };
        let version = self.control.change(change).await.map_err(status_of)?;
        Ok(Response::new(pb::ChangeReply { version }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::ChangeReply>, Status> {
        let request = request.into_inner();
        let change = Change::Deregister { service: request.service, addr: request.addr };
        let version = self.control.change(change).await.map_err(status_of)?;
        Ok(Response::new(pb::ChangeReply { version }))
    }
}
