//! The Identity API: bootstrap tokens for agents, certificates for
//! proxies, the trust bundle. Tokens are held in memory only: a server
//! restart invalidates the unredeemed ones, and agents ask again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_server::Identity;
use tonic::{Request, Response, Status};

use super::jobs::Scheduler;
use crate::identity::ca::Authority;
use crate::identity::tokens::{new_token, Grant, Tokens};

/// How long a token waits to be redeemed: the sidecar's start.
const TOKEN_TTL: Duration = Duration::from_secs(120);

pub struct IdentityService {
    pub authority: Arc<Authority>,
    pub scheduler: Arc<Scheduler>,
    pub tokens: Mutex<Tokens>,
    pub cert_ttl: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl IdentityService {
    fn bundle(&self) -> pb::Bundle {
        pb::Bundle { roots_pem: self.authority.cert_pem().to_owned(), version: 1 }
    }

    fn reply(&self, certificate_pem: String, service: &str) -> pb::SignReply {
        pb::SignReply {
            certificate_pem,
            bundle: Some(self.bundle()),
            spiffe_id: crate::identity::spiffe_id(self.authority.trust_domain(), service),
            expires_unix_ms: now_ms() + self.cert_ttl.as_millis() as u64,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn issue_token(&self, request: Request<pb::TokenRequest>) -> Result<Response<pb::Token>, Status> {
        let request = request.into_inner();
        let Some(service) = self.scheduler.service_of(&request.node, &request.instance) else {
            return Err(Status::permission_denied(format!(
                "instance {:?} is not placed on node {:?}",
                request.instance, request.node
            )));
        };
        let token = new_token();
        let grant = Grant { instance: request.instance, service: service.clone() };
        self.tokens.lock().expect("tokens lock").issue(token.clone(), grant, now_ms(), TOKEN_TTL);
        Ok(Response::new(pb::Token { token, service }))
    }

    async fn sign(&self, request: Request<pb::SignRequest>) -> Result<Response<pb::SignReply>, Status> {
        let request = request.into_inner();
        // A bad request is refused before the token is spent.
        Authority::check_request(&request.csr_pem).map_err(Status::invalid_argument)?;
        let grant = self
            .tokens
            .lock()
            .expect("tokens lock")
            .redeem(&request.token, now_ms())
            .map_err(|refusal| Status::permission_denied(refusal.to_string()))?;
        let certificate_pem = self
            .authority
            .sign(&request.csr_pem, &grant.service, self.cert_ttl)
            .map_err(Status::invalid_argument)?;
        tracing::info!(instance = %grant.instance, service = %grant.service, "certificate issued");
        Ok(Response::new(self.reply(certificate_pem, &grant.service)))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::SignReply>, Status> {
        let request = request.into_inner();
        let service = self
            .authority
            .renewal_service(&request.certificate_pem, &request.csr_pem)
            .map_err(Status::permission_denied)?;
        let certificate_pem = self
            .authority
            .sign(&request.csr_pem, &service, self.cert_ttl)
            .map_err(Status::invalid_argument)?;
        tracing::debug!(%service, "certificate renewed");
        Ok(Response::new(self.reply(certificate_pem, &service)))
    }

    async fn trust_bundle(&self, _: Request<pb::Empty>) -> Result<Response<pb::Bundle>, Status> {
        Ok(Response::new(self.bundle()))
    }
}
