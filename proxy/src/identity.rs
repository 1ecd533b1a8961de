//! The proxy's workload identity: a key generated in memory (never
//! written anywhere), a certificate request, and the certificate the
//! control plane's CA signs for the one-time bootstrap token the agent
//! handed over. The mTLS transport between proxies uses what this holds.

use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use rcgen::{CertificateParams, KeyPair};

/// A certificate and the key it certifies, in memory only.
pub struct Identity {
    pub spiffe_id: String,
    pub certificate_pem: String,
    pub roots_pem: String,
    pub expires_unix_ms: u64,
    /// PKCS#8 DER; deliberately not in `Debug`.
    key_der: Vec<u8>,
}

impl Identity {
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_unix_ms", &self.expires_unix_ms)
            .finish_non_exhaustive()
    }
}

/// Generates a key and gets it certified for `token` by the control plane at `control`.
pub async fn obtain(control: &str, token: &str) -> Result<Identity, String> {
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    // The request names nothing: the token decides the identity.
    let request = CertificateParams::new(Vec::<String>::new())
        .and_then(|params| params.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("the certificate request: {e}"))?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{control}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let reply = IdentityClient::new(channel)
        .sign(pb::SignRequest { token: token.to_owned(), csr_pem: request })
        .await
        .map_err(|status| format!("the control plane refused a certificate: {}", status.message()))?
        .into_inner();
    Ok(Identity {
        spiffe_id: reply.spiffe_id,
        certificate_pem: reply.certificate_pem,
        roots_pem: reply.bundle.map(|b| b.roots_pem).unwrap_or_default(),
        expires_unix_ms: reply.expires_unix_ms,
        key_der: key.serialize_der(),
    })
}
