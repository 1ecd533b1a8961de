//! The Access API: who the caller is, operators and their credentials,
//! and join tokens for nodes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_client::Credentials;
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::access_server::Access;
use tonic::{Request, Response, Status};

use super::identity::TrustError;
use super::identity::TrustKeeper;
use super::tls::ServerTls;
use super::ControlPlane;
use crate::auth::join::JoinTokens;
use crate::auth::policy::Role;
use crate::auth::principal::{user_id, Principal};
use crate::auth::users::{StoredUser, Users};
use crate::identity::ca;
use crate::state::check_name;
use crate::store::Store;
use mesh_common::join_token::format_token;

/// How long a user's credential lives.
pub const USER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);

/// A new credential for `name` with `role`; any earlier one of that user
/// stops counting. `server` is the address written into it for meshctl.
pub fn issue_credential(
    trust: &TrustKeeper,
    users: &Users,
    store: &dyn Store,
    name: &str,
    role: Role,
    server: &str,
) -> Result<Credentials, TrustError> {
    let current = trust.current();
    let id = user_id(current.signer.trust_domain(), name);
    let (certificate, key) = current.signer.issue_with_key(&id, USER_CERT_TTL)?;
    let serial = ca::serial_hex(&certificate)?;
    users.put(store, name, StoredUser { role, serial })?;
    Ok(Credentials {
        user: name.to_owned(),
        role: role.name().to_owned(),
        server: server.to_owned(),
        certificate,
        key,
        roots: current.roots_pem(),
    })
}

pub struct AccessService {
    pub users: Arc<Users>,
    pub control: Arc<ControlPlane>,
    pub trust: Arc<TrustKeeper>,
    pub tls: Arc<ServerTls>,
    pub join_tokens: Arc<Mutex<JoinTokens>>,
    /// The address written into new credentials.
    pub server: String,
    pub leader: crate::server::leader::Leader,
}

impl AccessService {
    /// Issues a credential off the async workers: it makes a key and writes
    /// the store.
    async fn issue(&self, name: &str, role: Role) -> Result<Credentials, TrustError> {
        let (trust, users) = (self.trust.clone(), self.users.clone());
        let (name, server) = (name.to_owned(), self.server.clone());
        let issue = move |store: &dyn Store| issue_credential(&trust, &users, store, &name, role, &server);
        self.control.durably(issue).await
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn info(name: &str, user: &StoredUser) -> pb::UserInfo {
    pb::UserInfo { name: name.to_owned(), role: user.role.name().to_owned(), serial: user.serial.clone() }
}

#[tonic::async_trait]
impl Access for AccessService {
    async fn who_am_i(&self, request: Request<pb::Empty>) -> Result<Response<pb::UserInfo>, Status> {
        let Some(Principal::User { name, serial }) = request.extensions().get::<Principal>() else {
            return Err(Status::unauthenticated("no user credential"));
        };
        let role = self.users.role_of(name, serial).map_err(Status::unauthenticated)?;
        Ok(Response::new(pb::UserInfo {
            name: name.clone(),
            role: role.name().to_owned(),
            serial: serial.clone(),
        }))
    }

    async fn list_users(&self, _: Request<pb::Empty>) -> Result<Response<pb::UserList>, Status> {
        let users = self.users.list().iter().map(|(name, user)| info(name, user)).collect();
        Ok(Response::new(pb::UserList { users }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::Credential>, Status> {
        let by = request.extensions().get::<Principal>().map(ToString::to_string).unwrap_or_default();
        let request = request.into_inner();
        check_name("user", &request.name).map_err(|e| Status::invalid_argument(e.0))?;
        let role = Role::parse(&request.role).map_err(Status::invalid_argument)?;
        if self.users.get(&request.name).is_some() && !request.replace {
            return Err(Status::already_exists(format!(
                "user {:?} exists; `meshctl user rotate {}` gives them a new credential",
                request.name, request.name
            )));
        }
        let credential = self.issue(&request.name, role).await?;
        tracing::info!(user = %request.name, role = role.name(), %by, replaced = request.replace, "user credential issued");
        Ok(Response::new(pb::Credential { text: credential.to_text() }))
    }

    async fn revoke_user(&self, request: Request<pb::UserName>) -> Result<Response<pb::UserName>, Status> {
        let by = request.extensions().get::<Principal>().map(ToString::to_string).unwrap_or_default();
        let name = request.into_inner().name;
        let (users, key) = (self.users.clone(), name.clone());
        let removed = self.control.durably(move |store| users.remove(store, &key)).await;
        if !removed.map_err(super::write_failure)? {
            return Err(Status::not_found(format!("no user {name:?}")));
        }
        tracing::info!(user = %name, %by, "user credential revoked");
        Ok(Response::new(pb::UserName { name }))
    }

    async fn renew_credential(
        &self,
        request: Request<pb::Empty>,
    ) -> Result<Response<pb::Credential>, Status> {
        let Some(Principal::User { name, serial }) = request.extensions().get::<Principal>() else {
            return Err(Status::unauthenticated("no user credential"));
        };
        let role = self.users.role_of(name, serial).map_err(Status::unauthenticated)?;
        let credential = self.issue(name, role).await?;
        tracing::info!(user = %name, "user renewed their credential");
        Ok(Response::new(pb::Credential { text: credential.to_text() }))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        // Nodes enroll with the leader, which keeps the tokens.
        self.leader.require()?;
        let request = request.into_inner();
        let ttl = match request.ttl_ms {
            0 => DEFAULT_JOIN_TTL,
            ms => Duration::from_millis(ms),
        };
        let uses = request.uses.max(1);
        let secret = crate::identity::tokens::new_token();
        let now = now_ms();
        self.join_tokens.lock().expect("join tokens lock").create(secret.clone(), uses, now, ttl);
        tracing::info!(uses, ttl = %humantime::format_duration(ttl), "join token created");
        Ok(Response::new(pb::JoinToken {
            token: format_token(&secret, &self.tls.issuer_fingerprint()),
            expires_unix_ms: now + ttl.as_millis() as u64,
            uses,
        }))
    }
}
