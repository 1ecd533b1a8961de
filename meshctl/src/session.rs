//! How meshctl reaches meshd: the credential, the server and the channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::access_client::AccessClient;
use tonic::transport::Channel;

use crate::failure::Failure;

/// An open connection to meshd and what opened it.
pub struct Session {
    pub channel: Channel,
    pub server: String,
    pub credentials: mesh_client::Credentials,
    /// The credential file given on the command line, if any.
    pub credentials_path: Option<PathBuf>,
}

impl Session {
    /// Reads the credential and connects to `--server`, else the
    /// credential's server, else 127.0.0.1:7400.
    pub async fn open(server: Option<String>, credentials_path: Option<PathBuf>) -> Result<Session, Failure> {
        let credentials = credentials(credentials_path.as_deref())?;
        let server = server.unwrap_or_else(|| credentials.server.clone());
        let server = if server.is_empty() { "127.0.0.1:7400".to_owned() } else { server };
        let servers = mesh_client::ServerList::parse(&server)?;
        let first = servers.current().to_owned();
        let channel = connect(servers.clone(), &credentials).await?;
        let server = servers.current().to_owned();
        if server != first {
            eprintln!("meshctl: {first} did not answer; {server} did");
        }
        Ok(Session { channel, server, credentials, credentials_path })
    }
}

/// The credential to call meshd with: `--credentials`/`MESH_CREDENTIALS`,
/// else the first default path that exists.
fn credentials(explicit: Option<&Path>) -> Result<mesh_client::Credentials, Failure> {
    if let Some(path) = explicit {
        return mesh_client::Credentials::read(path).map_err(|e| Failure(format!("--credentials: {e}"), 2));
    }
    let defaults = mesh_client::credentials::default_paths();
    for path in &defaults {
        if path.exists() {
            return mesh_client::Credentials::read(path).map_err(Failure::from);
        }
    }
    let looked: Vec<String> = defaults.iter().map(|p| p.display().to_string()).collect();
    Err(Failure(
        format!(
            "no credential: give --credentials FILE or set MESH_CREDENTIALS (meshd writes the admin one to admin.credentials.toml in its data dir); looked in {}",
            looked.join(", ")
        ),
        2,
    ))
}

async fn connect(
    servers: std::sync::Arc<mesh_client::ServerList>,
    credentials: &mesh_client::Credentials,
) -> Result<Channel, Failure> {
    let tls = credentials.tls().map_err(|e| Failure(format!("the credential: {e}"), 2))?;
    Ok(mesh_client::connect_to(servers, &tls, Duration::from_secs(3)).await?)
}

/// After a root rotation, the credential in use is renewed under the new
/// root (over the connection still open), so that meshctl keeps reaching
/// meshd. Other users get theirs with `meshctl user rotate NAME`.
pub async fn refresh_credential(channel: &Channel, explicit: Option<&Path>) {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => match mesh_client::credentials::default_paths().into_iter().find(|p| p.exists()) {
            Some(path) => path,
            None => return,
        },
    };
    let renewed = match AccessClient::new(channel.clone()).renew_credential(pb::Empty {}).await {
        Ok(renewed) => renewed.into_inner(),
        Err(status) => return eprintln!("meshctl: cannot renew the credential: {}", status.message()),
    };
    match mesh_client::credentials::write_private(&path, &renewed.text) {
        Ok(()) => eprintln!(
            "meshctl: {} now holds a credential from the new root; other users need `meshctl user rotate NAME`",
            path.display()
        ),
        Err(error) => eprintln!("meshctl: cannot update {}: {error}", path.display()),
    }
}

/// Writes a credential's text to `out` (default ./NAME.credentials.toml), 0600.
pub fn write_credential(text: &str, name: &str, out: Option<PathBuf>) -> Result<(), Failure> {
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.credentials.toml")));
    mesh_client::credentials::write_private(&path, text).map_err(|e| Failure(e.to_string(), 1))?;
    println!(
        "wrote the credential of {name} to {} (it holds a private key: keep it private)",
        path.display()
    );
    Ok(())
}
