//! How this proxy reaches meshd: over TLS, meshd's certificate verified
//! against the roots the agent handed over (`--control-ca`) and the trust
//! bundle the proxy holds; identity calls go without a client certificate
//! (the token or the certificate in the request is the proof), the
//! discovery stream with the workload certificate, or with an operator's
//! credential for a proxy run by hand (`--credentials`).

use mesh_client::ClientError;
use mesh_client::{ClientTls, Credentials};

use crate::proxy::Proxy;

#[derive(Clone, Debug)]
pub struct ControlAccess {
    pub addr: String,
    /// Roots from `--control-ca` or the credential.
    roots_pem: String,
    credentials: Option<Credentials>,
}

impl ControlAccess {
    pub fn new(
        addr: &str,
        control_ca: Option<&std::path::Path>,
        credentials: Option<&std::path::Path>,
    ) -> Result<ControlAccess, ClientError> {
        let credentials = credentials.map(Credentials::read).transpose()?;
        let roots_pem = match (control_ca, &credentials) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| ClientError::Config(format!("--control-ca {}: {e}", path.display())))?,
            (None, Some(credentials)) => credentials.roots.clone(),
            (None, None) => return Err(ClientError::Config(
                "--control needs the mesh's roots to verify meshd: --control-ca FILE, or --credentials FILE"
                    .to_owned(),
            )),
        };
        // Checked now, so that a bad file is a start-up error.
        ClientTls::from_roots_pem(&roots_pem)
            .map_err(|e| ClientError::Config(format!("--control-ca: {e}")))?;
        Ok(ControlAccess { addr: addr.to_owned(), roots_pem, credentials })
    }

    /// From roots already read (PEM), with no operator credential.
    pub fn with_roots(addr: &str, roots_pem: &str) -> ControlAccess {
        ControlAccess { addr: addr.to_owned(), roots_pem: roots_pem.to_owned(), credentials: None }
    }

    /// The roots meshd's certificate may chain to: the configured ones and
    /// the bundle the proxy holds (which follows root rotations).
    fn roots(&self, proxy: &Proxy) -> String {
        let mut roots = self.roots_pem.clone();
        if let Some(identity) = proxy.identity.load_full() {
            roots.push('\n');
            roots.push_str(&identity.roots_pem);
        }
        roots
    }

    /// For identity calls: no client certificate.
    pub fn anonymous(&self, proxy: &Proxy) -> Result<ClientTls, ClientError> {
        ClientTls::from_roots_pem(&self.roots(proxy))
    }

    /// For the discovery stream: the workload certificate, else the
    /// operator's credential, else none (meshd refuses that).
    pub fn authenticated(&self, proxy: &Proxy) -> Result<ClientTls, ClientError> {
        let tls = self.anonymous(proxy)?;
        if let Some(identity) = proxy.identity.load_full() {
            return tls.with_identity_der(&identity.certificate_pem, identity.key_der());
        }
        match &self.credentials {
            Some(credentials) => tls.with_identity(&credentials.certificate, &credentials.key),
            None => Ok(tls),
        }
    }
}
