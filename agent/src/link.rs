//! The agent's link to meshd: its node identity and the channels it uses.
//!
//! A node joins once with a join token: it makes a key in memory, sends a
//! certificate request with the token over TLS to the server whose CA the
//! token pins, and keeps the node certificate, its key and the trust roots
//! in `<data dir>/node.credentials.toml` (0600), so a restarted agent needs
//! no token. From then on it calls meshd with that certificate, renews it
//! at 70 % of its life, and follows the trust bundle when it changes. The
//! roots are also written to `<data dir>/control-roots.pem` for the
//! sidecars, which verify meshd against them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_client::{ClientTls, Credentials};
use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use mesh_proto::mesh::v1::nodes_client::NodesClient;
use rcgen::{CertificateParams, KeyPair};
use tonic::transport::Channel;

use mesh_common::join_token::parse_token;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the node's link to the control plane could not be made or kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The node's own files, key or certificates are unusable: fix them.
    Local(String),
    /// The control plane will not have this node (no token, a token or a
    /// node description refused): trying again cannot help.
    Refused(String),
    /// The control plane could not be reached, or failed: try again.
    Unreachable(String),
}

impl LinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, LinkError::Unreachable(_))
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Local(m) | LinkError::Refused(m) | LinkError::Unreachable(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LinkError {}

impl From<mesh_client::ClientError> for LinkError {
    fn from(error: mesh_client::ClientError) -> Self {
        match error {
            mesh_client::ClientError::Config(m) => LinkError::Local(m),
            mesh_client::ClientError::Unreachable(m) => LinkError::Unreachable(m),
        }
    }
}

/// A file, key or certificate of the node's: the error names it.
fn local(what: impl std::fmt::Display) -> impl Fn(&dyn std::fmt::Display) -> LinkError {
    move |e| LinkError::Local(format!("{what}: {e}"))
}

pub struct ControlLink {
    /// The servers as given (comma-separated), passed on to sidecars.
    pub server: String,
    /// The same, tried in turn; the leader first once one named it.
    servers: Arc<mesh_client::ServerList>,
    node: String,
    file: PathBuf,
    roots_file: PathBuf,
    credentials: ArcSwap<Credentials>,
    /// Presents the node's certificate.
    channel: ArcSwap<Channel>,
    /// The bundle version the roots came with.
    bundle_version: std::sync::atomic::AtomicU64,
}

impl ControlLink {
    /// The node's stored identity, or a new one for `join_token`.
    pub async fn establish(
        server: &str,
        node: &str,
        data_dir: &Path,
        join_token: Option<String>,
    ) -> Result<Arc<ControlLink>, LinkError> {
        let file = data_dir.join("node.credentials.toml");
        let stored = file.exists().then(|| Credentials::read(&file)).transpose()?;
        let credentials = match stored {
            Some(stored) if stored.user != node => {
                return Err(LinkError::Local(format!(
                    "{} holds the identity of node {:?}, not {node:?}: use another data dir",
                    file.display(),
                    stored.user
                )))
            }
            Some(stored) if expires_unix_ms(&stored.certificate) > now_ms() => stored,
            _ => {
                let token = join_token.ok_or_else(|| {
                    LinkError::Refused(format!("node {node:?} has not joined yet (or its certificate expired): give --join-token-file FILE or MESH_JOIN_TOKEN, from `meshctl node token create`"))
                })?;
                let credentials = enroll(server, node, &token).await?;
                credentials.write(&file).map_err(|e| LinkError::Local(e.to_string()))?;
                tracing::info!(node, file = %file.display(), "joined the mesh with a join token");
                credentials
            }
        };
        let roots_file = data_dir.join("control-roots.pem");
        std::fs::write(&roots_file, &credentials.roots).map_err(|e| local(roots_file.display())(&e))?;
        let servers = mesh_client::ServerList::parse_spread_by(server, node)?;
        let channel = mesh_client::connect_lazy_to(servers.clone(), &credentials.tls()?, CONNECT_TIMEOUT)?;
        Ok(Arc::new(ControlLink {
            server: server.to_owned(),
            servers,
            node: node.to_owned(),
            file,
            roots_file,
            credentials: ArcSwap::from_pointee(credentials),
            channel: ArcSwap::from_pointee(channel),
            bundle_version: Default::default(),
        }))
    }

    /// A channel that presents the node's current certificate.
    pub fn channel(&self) -> Channel {
        (**self.channel.load()).clone()
    }

    /// The server the node talks to now.
    pub fn current_server(&self) -> &str {
        self.servers.current()
    }

    /// When `status` is a follower's refusal naming the leader, moves the
    /// node's connection to the leader; true if it did.
    pub fn follow_leader(&self, status: &tonic::Status) -> bool {
        let Some(leader) = leader_named(status) else { return false };
        if !self.servers.prefer(&leader) {
            tracing::warn!(%leader, servers = %self.server, "the leader is not in --server; cannot move to it");
            return false;
        }
        let credentials = self.credentials.load_full();
        match credentials
            .tls()
            .map_err(LinkError::from)
            .and_then(|tls| Ok(mesh_client::connect_lazy_to(self.servers.clone(), &tls, CONNECT_TIMEOUT)?))
        {
            Ok(channel) => {
                self.channel.store(Arc::new(channel));
                tracing::info!(%leader, "moved to the leader");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot connect to the leader");
                false
            }
        }
    }

    /// The trust domain the node's certificate is from.
    pub fn trust_domain(&self) -> String {
        let certificate = &self.credentials.load().certificate;
        let der = mesh_client::pem::certificates(certificate).ok().and_then(|chain| chain.into_iter().next());
        der.map(|der| mesh_client::pem::uri_names(&der))
            .unwrap_or_default()
            .iter()
            .find_map(|id| mesh_common::spiffe::trust_domain_of(id).map(str::to_owned))
            .unwrap_or_default()
    }

    /// TLS for the node's own listener (instance logs): the node's
    /// certificate, and a client certificate from the mesh required.
    pub fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, LinkError> {
        let credentials = self.credentials.load();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for root in
            mesh_client::pem::certificates(&credentials.roots).map_err(|e| local("the trust roots")(&e))?
        {
            roots.add(root).map_err(|e| local("a trust root")(&e))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| local("the client verifier")(&e))?;
        let certificate = mesh_client::pem::certificates(&credentials.certificate)
            .map_err(|e| local("the node certificate")(&e))?;
        let key = mesh_client::pem::private_key(&credentials.key).map_err(|e| local("the node key")(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| local("TLS versions")(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certificate, key)
            .map_err(|e| local("the node certificate")(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The trust bundle version the node holds (0 before the first heartbeat).
    pub fn bundle_version(&self) -> u64 {
        self.bundle_version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the node's certificate expires (Unix ms).
    pub fn certificate_expires_unix_ms(&self) -> u64 {
        expires_unix_ms(&self.credentials.load().certificate)
    }

    /// The serial (hex) of the root the node's certificate is from.
    pub fn certificate_root(&self) -> String {
        let credentials = self.credentials.load();
        mesh_client::pem::root_of(&credentials.certificate, &credentials.roots)
    }

    /// The file of trust roots for the sidecars (`mesh-proxy --control-ca`).
    pub fn roots_file(&self) -> &Path {
        &self.roots_file
    }

    /// Renews the node certificate when 70 % of its life has passed, and
    /// with the trust bundle when `bundle_version` differs from the one
    /// held; then later connections use the new ones. The first heartbeat
    /// after a start renews too: the stored certificate and roots may be
    /// from before a root rotation, and the version they came with is not
    /// kept. The version is taken only with a renewal, so the one a node
    /// reports says its certificate is from that bundle's signer.
    pub async fn keep_fresh(&self, bundle_version: u64) {
        let held = self.bundle_version.load(std::sync::atomic::Ordering::Relaxed);
        let credentials = self.credentials.load_full();
        let issued = not_before_unix_ms(&credentials.certificate);
        let expires = expires_unix_ms(&credentials.certificate);
        let due = issued + (expires.saturating_sub(issued)) * 7 / 10;
        if now_ms() < due && bundle_version == held {
            return;
        }
        match self.renew(&credentials).await {
            Ok(renewed) => {
                if let Err(error) = self.install(renewed) {
                    tracing::warn!(%error, "cannot keep the renewed node certificate");
                    return;
                }
                self.bundle_version.store(bundle_version, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(node = %self.node, "node certificate renewed");
            }
            Err(error) => {
                tracing::warn!(%error, "node certificate renewal failed; retrying at the next heartbeat")
            }
        }
    }

    async fn renew(&self, current: &Credentials) -> Result<Credentials, LinkError> {
        // Over the connection the heartbeats keep open: after a root
        // rotation, meshd's new certificate is from a root this node may
        // not hold yet, and the old certificate no longer passes a new
        // handshake; the request itself proves the old certificate's key.
        let channel = self.channel();
        // The request is signed by the key the certificate names: that is
        // the proof of holding it. The key stays; the certificate is new.
        let key = KeyPair::from_pem(&current.key).map_err(|e| local("the node key")(&e))?;
        let csr_pem = certificate_request(&key)?;
        let request = pb::RenewRequest { certificate_pem: current.certificate.clone(), csr_pem };
        let reply = IdentityClient::new(channel)
            .renew(request)
            .await
            .map_err(|status| refused_or_unreachable(&status, "the renewal"))?
            .into_inner();
        let roots = reply.bundle.map(|b| b.roots_pem).unwrap_or_else(|| current.roots.clone());
        Ok(Credentials { certificate: reply.certificate_pem, roots, ..current.clone() })
    }

    fn install(&self, credentials: Credentials) -> Result<(), LinkError> {
        credentials.write(&self.file).map_err(|e| LinkError::Local(e.to_string()))?;
        std::fs::write(&self.roots_file, &credentials.roots)
            .map_err(|e| local(self.roots_file.display())(&e))?;
        let channel =
            mesh_client::connect_lazy_to(self.servers.clone(), &credentials.tls()?, CONNECT_TIMEOUT)?;
        self.channel.store(Arc::new(channel));
        self.credentials.store(Arc::new(credentials));
        Ok(())
    }
}

/// Whether `status` is a follower's refusal of a call only the leader serves.
pub fn not_leader(status: &tonic::Status) -> bool {
    status.metadata().get("mesh-failure").is_some_and(|v| v == "not-leader")
}

/// The leader a follower's refusal names, if it is one.
pub fn leader_named(status: &tonic::Status) -> Option<String> {
    status.metadata().get("mesh-leader").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Exchanges `token` for a node certificate, with the leader (which keeps
/// the tokens): a follower that answers names it.
async fn enroll(server: &str, node: &str, token: &str) -> Result<Credentials, LinkError> {
    match enroll_with(server, node, token).await {
        Err(EnrollError::Status(status)) => match leader_named(&status) {
            Some(leader) => enroll_with(&leader, node, token)
                .await
                .map_err(|e| e.into_link_error())
                .map(|credentials| Credentials { server: server.to_owned(), ..credentials }),
            None => Err(refused_or_unreachable(&status, "the join")),
        },
        other => other.map_err(|e| e.into_link_error()),
    }
}

enum EnrollError {
    Link(LinkError),
    Status(tonic::Status),
}

impl EnrollError {
    fn into_link_error(self) -> LinkError {
        match self {
            EnrollError::Link(error) => error,
            EnrollError::Status(status) => refused_or_unreachable(&status, "the join"),
        }
    }
}

impl From<LinkError> for EnrollError {
    fn from(error: LinkError) -> Self {
        EnrollError::Link(error)
    }
}

async fn enroll_with(server: &str, node: &str, token: &str) -> Result<Credentials, EnrollError> {
    let (secret, ca) = parse_token(token).map_err(LinkError::Refused)?;
    let channel = mesh_client::connect(server, &ClientTls::pinned(ca), CONNECT_TIMEOUT)
        .await
        .map_err(LinkError::from)?;
    let key = KeyPair::generate().map_err(|e| local("a new node key")(&e))?;
    let request = pb::EnrollRequest {
        token_secret: secret.to_owned(),
        name: node.to_owned(),
        csr_pem: certificate_request(&key)?,
    };
    let reply = NodesClient::new(channel).enroll(request).await.map_err(EnrollError::Status)?.into_inner();
    let roots = reply
        .bundle
        .map(|b| b.roots_pem)
        .ok_or_else(|| LinkError::Unreachable("the join reply has no trust bundle".to_owned()))?;
    Ok(Credentials {
        user: node.to_owned(),
        role: "node".to_owned(),
        server: server.to_owned(),
        certificate: reply.certificate_pem,
        key: key.serialize_pem(),
        roots,
    })
}

/// What a failed call to meshd means for the node: refused (the answer is
/// about the node, its token or its certificate) or unreachable.
fn refused_or_unreachable(status: &tonic::Status, call: &str) -> LinkError {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            LinkError::Refused(format!("{call} was refused: {}", status.message()))
        }
        _ => LinkError::Unreachable(format!("{call} failed: {}", status.message())),
    }
}

/// A request naming nothing: the token (or the certificate renewed) decides the identity.
fn certificate_request(key: &KeyPair) -> Result<String, LinkError> {
    let params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| local("a certificate request")(&e))?;
    let request = params.serialize_request(key).map_err(|e| local("a certificate request")(&e))?;
    request.pem().map_err(|e| local("a certificate request")(&e))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn validity_ms(certificate_pem: &str) -> Option<(u64, u64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64) * 1000;
    Some((ms(cert.validity().not_before), ms(cert.validity().not_after)))
}

fn expires_unix_ms(certificate_pem: &str) -> u64 {
    validity_ms(certificate_pem).map_or(0, |(_, until)| until)
}

fn not_before_unix_ms(certificate_pem: &str) -> u64 {
    validity_ms(certificate_pem).map_or(0, |(from, _)| from)
}
