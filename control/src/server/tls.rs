//! meshd's TLS on its gRPC port: a certificate from the mesh's own CA for
//! the addresses clients dial, sent with the CA's certificate (a joining
//! node finds the CA its token pins there); client certificates are asked
//! for, not required, and verified against the trust bundle. The config in
//! force is swapped whole when the certificate or the roots change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::auth::principal::{control_plane_id, node_id};
use crate::identity::ca::CaError;
use crate::identity::rotation::{Stage, Trust};
use mesh_client::ClientError;

/// How long meshd's own certificate lives; a new one comes at half of it.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct ServerTls {
    names: Vec<String>,
    config: ArcSwap<ServerConfig>,
    issued: std::sync::Mutex<Issued>,
}

/// What the config in force was built from.
struct Issued {
    at: Instant,
    /// The serial of the CA that signed the server certificate.
    by: String,
    chain_pem: String,
    key_pem: String,
    roots_pem: String,
    /// meshd's client certificate and key for calls to agents.
    client: (String, String),
}

impl ServerTls {
    /// A certificate for `names` (IP addresses and DNS names) from `trust`'s signer.
    pub fn new(names: Vec<String>, trust: &Trust) -> Result<ServerTls, CaError> {
        let issued = issue(&names, trust)?;
        let config = build(&issued)?;
        Ok(ServerTls { names, config: ArcSwap::from_pointee(config), issued: std::sync::Mutex::new(issued) })
    }

    /// The SHA-256 (hex) of the CA certificate meshd's certificate is sent
    /// with: what a join token pins.
    pub fn issuer_fingerprint(&self) -> String {
        let issued = self.issued.lock().expect("tls lock");
        mesh_client::pem::certificates(&issued.chain_pem)
            .ok()
            .and_then(|chain| chain.get(1).map(|ca| mesh_client::pem::fingerprint(ca)))
            .unwrap_or_default()
    }

    /// TLS for meshd's calls to the agent of `node`: meshd's client
    /// certificate, and the node's identity expected of the agent.
    pub fn to_node(&self, trust_domain: &str, node: &str) -> Result<mesh_client::ClientTls, ClientError> {
        let issued = self.issued.lock().expect("tls lock");
        let tls = mesh_client::ClientTls::expecting(&issued.roots_pem, &node_id(trust_domain, node))?
            .with_identity(&issued.client.0, &issued.client.1)?;
        Ok(tls)
    }

    /// TLS for meshd's calls to another server (a follower handing a call
    /// on to the leader): meshd's client certificate, and the roots.
    pub fn to_server(&self) -> Result<mesh_client::ClientTls, ClientError> {
        let issued = self.issued.lock().expect("tls lock");
        mesh_client::ClientTls::from_roots_pem(&issued.roots_pem)?
            .with_identity(&issued.client.0, &issued.client.1)
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Follows `trust`: new client roots as the bundle changes, and a new
    /// certificate at half its life or when the signer changed. During a
    /// rotation's `Switched` stage the certificate from the old root is
    /// kept, so clients that do not yet hold the new root still connect.
    pub fn follow(&self, trust: &Trust) -> Result<(), CaError> {
        let mut issued = self.issued.lock().expect("tls lock");
        let signer = trust.signer.serial();
        let stale = issued.at.elapsed() > SERVER_CERT_TTL / 2;
        let reissue = stale || (issued.by != signer && trust.stage != Stage::Switched);
        let roots_pem = trust.roots_pem();
        if !reissue && issued.roots_pem == roots_pem {
            return Ok(());
        }
        let next = if reissue {
            issue(&self.names, trust)?
        } else {
            Issued {
                at: issued.at,
                by: issued.by.clone(),
                chain_pem: issued.chain_pem.clone(),
                key_pem: issued.key_pem.clone(),
                roots_pem,
                client: issued.client.clone(),
            }
        };
        self.config.store(Arc::new(build(&next)?));
        if reissue {
            tracing::info!(ca = %next.by, "meshd's TLS certificate issued");
        }
        *issued = next;
        Ok(())
    }
}

fn issue(names: &[String], trust: &Trust) -> Result<Issued, CaError> {
    let (cert_pem, key_pem) = trust.signer.issue_server(names, SERVER_CERT_TTL)?;
    let client =
        trust.signer.issue_with_key(&control_plane_id(trust.signer.trust_domain()), SERVER_CERT_TTL)?;
    Ok(Issued {
        client,
        at: Instant::now(),
        by: trust.signer.serial(),
        chain_pem: format!("{}\n{}", cert_pem.trim_end(), trust.signer.cert_pem()),
        key_pem,
        roots_pem: trust.roots_pem(),
    })
}

/// The TLS configuration for what `issue` made. Its failures are the trust
/// state's (roots that do not parse), so they count as the CA's.
fn build(issued: &Issued) -> Result<ServerConfig, CaError> {
    fn unusable(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> CaError {
        move |e| CaError::Authority(format!("{what}: {e}"))
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for root in
        mesh_client::pem::certificates(&issued.roots_pem).map_err(|e| unusable("the trust roots")(&e))?
    {
        roots.add(root).map_err(|e| unusable("a trust root")(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| unusable("the client verifier")(&e))?;
    let chain =
        mesh_client::pem::certificates(&issued.chain_pem).map_err(|e| unusable("meshd's certificate")(&e))?;
    let key = mesh_client::pem::private_key(&issued.key_pem).map_err(|e| unusable("meshd's key")(&e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable("TLS versions")(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| unusable("meshd's certificate")(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The names meshd's certificate carries: the listen address (or, for an
/// unspecified one, every loopback and this host's name), and `extra`.
pub fn names_for(listen: std::net::SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let ip = listen.ip();
    if ip.is_unspecified() {
        names.extend(["127.0.0.1".to_owned(), "::1".to_owned(), "localhost".to_owned()]);
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(host.trim().to_owned());
        }
    } else {
        names.push(ip.to_string());
        if ip.is_loopback() {
            names.push("localhost".to_owned());
        }
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names.retain(|n| !n.is_empty());
    names
}
