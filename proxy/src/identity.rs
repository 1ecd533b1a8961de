//! The proxy's workload identity: a key generated in memory (never
//! written anywhere), a certificate request, and the certificate the
//! control plane's CA signs for the one-time bootstrap token the agent
//! handed over. The mTLS transport between proxies uses what this holds.

use crate::control_tls::ControlAccess;
use crate::proxy::Proxy;
use std::time::Duration;

use mesh_proto::mesh::v1 as pb;
use mesh_proto::mesh::v1::identity_client::IdentityClient;
use rcgen::{CertificateParams, KeyPair};

/// A certificate and the key it certifies, in memory only.
pub struct Identity {
    pub spiffe_id: String,
    pub certificate_pem: String,
    /// The roots trusted with this certificate, and their bundle's version.
    pub roots_pem: String,
    pub bundle_version: u64,
    /// The serial (hex) of the root among `roots_pem` that signed the
    /// certificate, "" if none did.
    pub certificate_root: String,
    pub issued_unix_ms: u64,
    pub expires_unix_ms: u64,
    /// PKCS#8 DER; deliberately not in `Debug`.
    key_der: Vec<u8>,
}

/// The roots the control plane says to trust, and which of them signs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustBundle {
    pub roots_pem: String,
    pub version: u64,
    pub signer_serial: String,
}

impl TrustBundle {
    pub fn from_pb(bundle: pb::Bundle) -> TrustBundle {
        TrustBundle {
            roots_pem: bundle.roots_pem,
            version: bundle.version,
            signer_serial: bundle.signer_serial,
        }
    }
}

impl Identity {
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// The same certificate and key, trusting `bundle`'s roots.
    pub fn with_bundle(&self, bundle: &TrustBundle) -> Identity {
        Identity {
            spiffe_id: self.spiffe_id.clone(),
            certificate_pem: self.certificate_pem.clone(),
            roots_pem: bundle.roots_pem.clone(),
            bundle_version: bundle.version,
            certificate_root: mesh_client::pem::root_of(&self.certificate_pem, &bundle.roots_pem),
            issued_unix_ms: self.issued_unix_ms,
            expires_unix_ms: self.expires_unix_ms,
            key_der: self.key_der.clone(),
        }
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

/// Why a certificate could not be had, and so whether trying again helps.
#[derive(Debug)]
pub enum IdentityError {
    /// The key or the request could not be made here.
    Local(String),
    /// The control plane could not be reached, or failed: try again.
    Unreachable(String),
    /// The control plane refused (the token or the certificate is not
    /// good): trying again cannot help.
    Refused(String),
}

impl IdentityError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, IdentityError::Unreachable(_))
    }

    /// A gRPC failure: a refusal when the control plane judged the request,
    /// otherwise the control plane was not there to judge it.
    fn of_status(what: &str, status: tonic::Status) -> IdentityError {
        use tonic::Code;
        let message = format!("{what}: {}", status.message());
        match status.code() {
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => IdentityError::Refused(message),
            _ => IdentityError::Unreachable(message),
        }
    }
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityError::Local(message) => f.write_str(message),
            IdentityError::Unreachable(message) => write!(f, "the control plane is unreachable: {message}"),
            IdentityError::Refused(message) => write!(f, "the control plane refused {message}"),
        }
    }
}

impl std::error::Error for IdentityError {}

/// Generates a key and gets it certified for `token` by the control plane.
pub async fn obtain(control: &ControlAccess, proxy: &Proxy, token: &str) -> Result<Identity, IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Local(format!("generating a key: {e}")))?;
    let csr_pem = certificate_request(&key)?;
    let request = pb::SignRequest { token: token.to_owned(), csr_pem };
    let reply = match client(control, proxy, &control.addr).await?.sign(request.clone()).await {
        // The token is the leader's to redeem; a follower names it.
        Err(status) if status.metadata().get("mesh-leader").is_some() => {
            let leader =
                status.metadata().get("mesh-leader").and_then(|v| v.to_str().ok()).unwrap_or_default();
            client(control, proxy, leader).await?.sign(request).await
        }
        other => other,
    };
    let reply = reply.map_err(|status| IdentityError::of_status("a certificate", status))?;
    Ok(Identity::from_reply(reply.into_inner(), key.serialize_der()))
}

/// A new certificate for the same identity and key, before this one expires.
pub async fn renew(
    control: &ControlAccess,
    proxy: &Proxy,
    current: &Identity,
) -> Result<Identity, IdentityError> {
    let key =
        KeyPair::try_from(current.key_der()).map_err(|e| IdentityError::Local(format!("the key: {e}")))?;
    let csr_pem = certificate_request(&key)?;
    let request = pb::RenewRequest { certificate_pem: current.certificate_pem.clone(), csr_pem };
    let reply = client(control, proxy, &control.addr)
        .await?
        .renew(request)
        .await
        .map_err(|status| IdentityError::of_status("a renewal", status))?;
    Ok(Identity::from_reply(reply.into_inner(), current.key_der.clone()))
}

/// An identity from files (a standalone proxy's): certificate chain, PKCS#8
/// key and roots, PEM. The SPIFFE ID is the leaf's URI name.
pub fn from_files(files: &crate::config::IdentityFiles) -> Result<Identity, IdentityError> {
    let unusable = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        IdentityError::Local(format!("{what} {}: {e}", path.display()))
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| unusable(what, path, &e))
    };
    let certificate_pem = read("certificate", &files.certificate)?;
    let roots_pem = read("roots", &files.roots)?;
    let key = KeyPair::from_pem(&read("key", &files.key)?).map_err(|e| unusable("key", &files.key, &e))?;
    let (_, leaf) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes())
        .map_err(|e| unusable("certificate", &files.certificate, &e))?;
    let spiffe_id = crate::tls::uri_names(&leaf.contents)
        .into_iter()
        .find(|name| name.starts_with("spiffe://"))
        .ok_or_else(|| unusable("certificate", &files.certificate, &"no spiffe:// URI name"))?;
    let expires = leaf.parse_x509().map_err(|e| unusable("certificate", &files.certificate, &e))?;
    let expires = expires.validity().not_after.timestamp().max(0) as u64;
    Ok(Identity {
        spiffe_id,
        certificate_root: mesh_client::pem::root_of(&certificate_pem, &roots_pem),
        certificate_pem,
        roots_pem,
        bundle_version: 0,
        issued_unix_ms: crate::clock::unix_millis(),
        expires_unix_ms: expires * 1000,
        key_der: key.serialize_der(),
    })
}

/// A request naming nothing: the token (or the certificate renewed) decides the identity.
fn certificate_request(key: &KeyPair) -> Result<String, IdentityError> {
    CertificateParams::new(Vec::<String>::new())
        .and_then(|params| params.serialize_request(key))
        .and_then(|csr| csr.pem())
        .map_err(|e| IdentityError::Local(format!("the certificate request: {e}")))
}

/// A client of the control plane's identity API at `servers` (one, or a
/// comma-separated list).
async fn client(
    control: &ControlAccess,
    proxy: &Proxy,
    servers: &str,
) -> Result<IdentityClient<tonic::transport::Channel>, IdentityError> {
    let tls = control.anonymous(proxy).map_err(|e| IdentityError::Local(e.to_string()))?;
    let channel = mesh_client::connect(servers, &tls, Duration::from_secs(2)).await.map_err(|e| {
        match e.is_retryable() {
            true => IdentityError::Unreachable(e.to_string()),
            false => IdentityError::Local(e.to_string()),
        }
    })?;
    Ok(IdentityClient::new(channel))
}

impl Identity {
    fn from_reply(reply: pb::SignReply, key_der: Vec<u8>) -> Identity {
        let bundle = reply.bundle.unwrap_or_default();
        Identity {
            spiffe_id: reply.spiffe_id,
            certificate_root: mesh_client::pem::root_of(&reply.certificate_pem, &bundle.roots_pem),
            certificate_pem: reply.certificate_pem,
            roots_pem: bundle.roots_pem,
            bundle_version: bundle.version,
            issued_unix_ms: crate::clock::unix_millis(),
            expires_unix_ms: reply.expires_unix_ms,
            key_der,
        }
    }

    /// When to renew: at 70 % of the lifetime, moved by up to ±5 % of it
    /// (`jitter` in -1..=1) so that proxies certified together do not all
    /// renew at once.
    pub fn renew_at_unix_ms(&self, jitter: f64) -> u64 {
        let lifetime = self.expires_unix_ms.saturating_sub(self.issued_unix_ms) as f64;
        let at = lifetime * (0.70 + 0.05 * jitter.clamp(-1.0, 1.0));
        self.issued_unix_ms + at.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_judged_request_is_a_refusal() {
        use tonic::{Code, Status};
        // (the control plane's answer, may the proxy try again?)
        let cases = [
            (Code::PermissionDenied, false),
            (Code::InvalidArgument, false),
            (Code::Unauthenticated, false),
            (Code::Unavailable, true),
            (Code::DeadlineExceeded, true),
            (Code::Internal, true),
        ];
        for (code, retryable) in cases {
            let error = IdentityError::of_status("a certificate", Status::new(code, "why"));
            assert_eq!(error.is_retryable(), retryable, "{code:?}: {error}");
        }
    }

    #[test]
    fn renewal_comes_at_seventy_percent_of_the_life_give_or_take_five() {
        let identity = Identity {
            spiffe_id: String::new(),
            certificate_pem: String::new(),
            roots_pem: String::new(),
            bundle_version: 1,
            certificate_root: String::new(),
            issued_unix_ms: 1_000_000,
            expires_unix_ms: 1_000_000 + 60_000,
            key_der: Vec::new(),
        };
        // (jitter, renew at)
        for (jitter, at) in [(0.0, 1_042_000), (1.0, 1_045_000), (-1.0, 1_039_000), (7.0, 1_045_000)] {
            assert_eq!(identity.renew_at_unix_ms(jitter), at, "jitter {jitter}");
        }
    }
}
