//! Who the caller is, users and their credentials, and node join tokens.

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::access_client::AccessClient;
use serde_json::json;

use crate::cli::{Output, UserCommand};
use crate::failure::Failure;
use crate::render::{print_rows, Rows};
use crate::session::{write_credential, Session};

pub async fn whoami(session: &Session, output: Output) -> Result<(), Failure> {
    let me = AccessClient::new(session.channel.clone()).who_am_i(pb::Empty {}).await?.into_inner();
    match output {
        Output::Table => println!("user {} (role {})", me.name, me.role),
        Output::Json => println!("{}", json!({"name": me.name, "role": me.role})),
    }
    Ok(())
}

pub async fn user(session: &Session, command: UserCommand, output: Output) -> Result<(), Failure> {
    let mut access = AccessClient::new(session.channel.clone());
    match command {
        UserCommand::Create { name, role, out } => {
            let request = pb::CreateUserRequest { name: name.clone(), role, replace: false };
            let credential = access.create_user(request).await?.into_inner();
            write_credential(&credential.text, &name, out)?;
        }
        UserCommand::Rotate { name, role, out } => {
            let role = match role {
                Some(role) => role,
                None => {
                    let users = access.list_users(pb::Empty {}).await?.into_inner().users;
                    let user = users.into_iter().find(|u| u.name == name);
                    user.ok_or_else(|| Failure(format!("no user {name:?}"), 2))?.role
                }
            };
            let request = pb::CreateUserRequest { name: name.clone(), role, replace: true };
            let credential = access.create_user(request).await?.into_inner();
            write_credential(&credential.text, &name, out)?;
        }
        UserCommand::Revoke { name } => {
            access.revoke_user(pb::UserName { name: name.clone() }).await?;
            println!("revoked the credential of {name}");
        }
        UserCommand::List => {
            let users = access.list_users(pb::Empty {}).await?.into_inner().users;
            let rows: Rows = users
                .iter()
                .map(|u| vec![("name", json!(u.name)), ("role", json!(u.role)), ("serial", json!(u.serial))])
                .collect();
            print_rows(output, &rows);
        }
    }
    Ok(())
}

pub async fn join_token(
    session: &Session,
    ttl: std::time::Duration,
    uses: u32,
    output: Output,
) -> Result<(), Failure> {
    let request = pb::JoinTokenRequest { ttl_ms: ttl.as_millis() as u64, uses };
    let token = AccessClient::new(session.channel.clone()).create_join_token(request).await?.into_inner();
    match output {
        Output::Table => println!("{}", token.token),
        Output::Json => println!(
            "{}",
            json!({"token": token.token, "uses": token.uses, "expires_unix_ms": token.expires_unix_ms})
        ),
    }
    Ok(())
}
