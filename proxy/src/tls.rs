//! mTLS between proxies (rustls, TLS 1.3 only, the ring provider). Both
//! sides present their workload certificate and check the other's chain
//! against the trust bundle. The caller also checks that the peer holds the
//! identity the control plane says the endpoint serves: the name it
//! connects to is `<service>.mesh`, and the peer's certificate must carry
//! `spiffe://<trust domain>/service/<service>`.

use mesh_common::spiffe::SpiffeId;

use crate::identity::IdentityError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::identity::Identity;

/// What the proxy needs to speak mTLS, built once per certificate.
pub struct MeshTls {
    /// For the shared HTTP/2 connection to a peer (ALPN h2).
    pub client: Arc<ClientConfig>,
    /// For a connection that carries one HTTP/1.1 upgrade (ALPN http/1.1).
    pub client_http1: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// For QUIC to a peer (ALPN h3); `None` if quinn refuses the config.
    pub quic_client: Option<quinn::ClientConfig>,
    pub trust_domain: String,
    counters: Arc<HandshakeCounters>,
}

/// TLS handshakes by side and result, for `mesh_tls_handshakes_total`;
/// they outlive certificates.
#[derive(Debug, Default)]
pub struct HandshakeCounters {
    pub inbound_ok: AtomicU64,
    pub inbound_failed: AtomicU64,
    pub outbound_ok: AtomicU64,
    pub outbound_failed: AtomicU64,
    /// Inbound handshakes that resumed an earlier session (no certificates
    /// sent, one round trip fewer over QUIC), for `mesh_tls_resumed_total`.
    pub inbound_resumed: AtomicU64,
}

/// The server's store of TLS 1.3 sessions (rustls' in-memory one), which
/// counts the sessions taken back for resumption. A new store comes with
/// each certificate or trust bundle, so no session outlives the roots it
/// was verified under.
#[derive(Debug)]
struct CountedSessions {
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    counters: Arc<HandshakeCounters>,
}

impl rustls::server::StoresServerSessions for CountedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.sessions.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.sessions.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let session = self.sessions.take(key);
        if session.is_some() {
            self.counters.inbound_resumed.fetch_add(1, Ordering::Relaxed);
        }
        session
    }

    fn can_cache(&self) -> bool {
        self.sessions.can_cache()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Side {
    Inbound,
    Outbound,
}

/// Sessions the server keeps for resumption (rustls' default): one per
/// recent peer connection, a few hundred bytes each.
const SESSIONS_KEPT: usize = 256;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub use mesh_common::spiffe::trust_domain_of;

/// The URI names of a DER certificate: one parser for the proxy, meshd and
/// the agent.
pub use mesh_client::pem::uri_names;

/// The name a proxy connects to for `service`'s endpoints.
pub fn server_name(service: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(format!("{service}.mesh")).ok()
}

impl MeshTls {
    pub fn record_handshake(&self, side: Side, ok: bool) {
        let counter = match (side, ok) {
            (Side::Inbound, true) => &self.counters.inbound_ok,
            (Side::Inbound, false) => &self.counters.inbound_failed,
            (Side::Outbound, true) => &self.counters.outbound_ok,
            (Side::Outbound, false) => &self.counters.outbound_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Fails when the identity's material is unusable (`IdentityError::Local`).
    pub fn new(identity: &Identity, counters: Arc<HandshakeCounters>) -> Result<MeshTls, IdentityError> {
        fn unusable(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> IdentityError {
            move |e| IdentityError::Local(format!("{what}: {e}"))
        }
        let provider = provider();
        let mut roots = RootCertStore::empty();
        for root in
            mesh_client::pem::certificates(&identity.roots_pem).map_err(|e| unusable("trust bundle")(&e))?
        {
            roots.add(root).map_err(|e| unusable("trust bundle")(&e))?;
        }
        let roots = Arc::new(roots);
        let chain = mesh_client::pem::certificates(&identity.certificate_pem)
            .map_err(|e| unusable("certificate")(&e))?;
        let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der().to_vec()));
        let peers: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| unusable("client verifier")(&e))?;
        let trust_domain = trust_domain_of(&identity.spiffe_id)
            .ok_or_else(|| IdentityError::Local("identity without a trust domain".to_owned()))?
            .to_owned();

        let verifier = PeerVerifier {
            chain: peers.clone(),
            trust_domain: trust_domain.clone(),
            provider: provider.clone(),
        };
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| unusable("TLS versions")(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain.clone(), key())
            .map_err(|e| unusable("client certificate")(&e))?;
        let mut client_http1 = client.clone();
        client_http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client_h3 = client.clone();
        client_h3.alpn_protocols = vec![b"h3".to_vec()];
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(client_h3).ok().map(|crypto| {
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            config.transport_config(Arc::new(crate::listen::quic::transport_config()));
            config
        });
        client.alpn_protocols = vec![b"h2".to_vec()];

        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| unusable("TLS versions")(&e))?
            .with_client_cert_verifier(peers)
            .with_single_cert(chain, key())
            .map_err(|e| unusable("server certificate")(&e))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        server.session_storage = Arc::new(CountedSessions {
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSIONS_KEPT),
            counters: counters.clone(),
        });
        Ok(MeshTls {
            client: Arc::new(client),
            client_http1: Arc::new(client_http1),
            server: Arc::new(server),
            quic_client,
            trust_domain,
            counters,
        })
    }
}

/// Checks a peer proxy's certificate: chained to the bundle, and naming
/// the identity of the service the caller meant to reach.
#[derive(Debug)]
struct PeerVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Proxies' certificates serve both ends, so the client-side chain check applies.
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let service = match server_name {
            ServerName::DnsName(name) => name.as_ref().strip_suffix(".mesh").unwrap_or_default().to_owned(),
            _ => String::new(),
        };
        let expected = SpiffeId::service(&self.trust_domain, &service).to_string();
        if uri_names(end_entity).contains(&expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_domains() {
        assert_eq!(trust_domain_of("spiffe://mesh.local/service/web"), Some("mesh.local"));
        assert_eq!(trust_domain_of("https://mesh.local"), None);
        assert!(server_name("web").is_some());
        assert!(server_name("not a name").is_none());
        assert!(uri_names(b"garbage").is_empty());
    }
}
