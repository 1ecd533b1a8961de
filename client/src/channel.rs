//! A gRPC channel to meshd over TLS. The server's certificate must chain
//! to the mesh's roots and name the address dialled (an IP SAN for an IP,
//! a DNS SAN for a name); a client certificate is presented when the
//! caller has one.

use crate::error::ClientError;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint};

use crate::pem;
use crate::servers::{server_name, ServerList};

/// What the client trusts, and who it is.
#[derive(Debug)]
pub struct ClientTls {
    trust: Trust,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

#[derive(Debug, Clone)]
enum Trust {
    /// The mesh's trust bundle.
    Roots(Vec<CertificateDer<'static>>),
    /// Before a node holds the bundle: the CA certificate whose SHA-256 a
    /// join token names, which the server sends in its chain.
    Pinned(String),
    /// The mesh's roots, and the one SPIFFE ID the server must hold (a
    /// node's agent, reached by meshd), whatever address was dialled.
    Spiffe(Vec<CertificateDer<'static>>, String),
}

impl Clone for ClientTls {
    fn clone(&self) -> Self {
        ClientTls {
            trust: self.trust.clone(),
            identity: self.identity.as_ref().map(|(certs, key)| (certs.clone(), key.clone_key())),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Trusts the roots in `roots_pem` (the mesh's trust bundle).
    pub fn from_roots_pem(roots_pem: &str) -> Result<ClientTls, ClientError> {
        let roots =
            pem::certificates(roots_pem).map_err(|e| ClientError::Config(format!("the trust roots: {e}")))?;
        Ok(ClientTls { trust: Trust::Roots(roots), identity: None })
    }

    /// Trusts a server that holds `spiffe_id` from one of `roots_pem`.
    pub fn expecting(roots_pem: &str, spiffe_id: &str) -> Result<ClientTls, ClientError> {
        let roots =
            pem::certificates(roots_pem).map_err(|e| ClientError::Config(format!("the trust roots: {e}")))?;
        Ok(ClientTls { trust: Trust::Spiffe(roots, spiffe_id.to_owned()), identity: None })
    }

    /// Trusts the CA certificate with this SHA-256 fingerprint (hex).
    pub fn pinned(fingerprint: &str) -> ClientTls {
        ClientTls { trust: Trust::Pinned(fingerprint.to_ascii_lowercase()), identity: None }
    }

    /// Presents this certificate chain and key to the server.
    pub fn with_identity(mut self, certificate_pem: &str, key_pem: &str) -> Result<ClientTls, ClientError> {
        let config = |e| ClientError::Config(e);
        let certs =
            pem::certificates(certificate_pem).map_err(|e| config(format!("the client certificate: {e}")))?;
        let key = pem::private_key(key_pem).map_err(|e| config(format!("the client key: {e}")))?;
        self.identity = Some((certs, key));
        Ok(self)
    }

    /// Presents this certificate chain (PEM) and PKCS#8 key (DER).
    pub fn with_identity_der(
        mut self,
        certificate_pem: &str,
        key_der: &[u8],
    ) -> Result<ClientTls, ClientError> {
        let certs = pem::certificates(certificate_pem)
            .map_err(|e| ClientError::Config(format!("the client certificate: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key_der.to_vec()));
        self.identity = Some((certs, key));
        Ok(self)
    }

    fn config(&self) -> Result<Arc<ClientConfig>, ClientError> {
        self.config_for(b"h2")
    }

    /// A rustls configuration offering `alpn` (`http/1.1` for a plain HTTPS call).
    pub fn config_for(&self, alpn: &[u8]) -> Result<Arc<ClientConfig>, ClientError> {
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &self.trust {
            Trust::Roots(roots) => webpki_verifier(roots.iter().cloned(), provider.clone())?,
            Trust::Pinned(fingerprint) => {
                Arc::new(PinnedVerifier { fingerprint: fingerprint.clone(), provider: provider.clone() })
            }
            Trust::Spiffe(roots, id) => {
                let mut store = RootCertStore::empty();
                for root in roots {
                    store.add(root.clone()).map_err(|e| ClientError::Config(format!("a trust root: {e}")))?;
                }
                Arc::new(SpiffeVerifier {
                    roots: Arc::new(store),
                    id: id.clone(),
                    provider: provider.clone(),
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.identity {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| ClientError::Config(format!("the client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}

fn webpki_verifier(
    roots: impl Iterator<Item = CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, ClientError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root).map_err(|e| ClientError::Config(format!("a trust root: {e}")))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| ClientError::Config(format!("the trust roots: {e}")))
}

fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Config(format!("{addr:?} is not host:port: {e}")))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .tcp_nodelay(true))
}

type Connector = tower::util::BoxCloneSyncService<
    http_uri::Uri,
    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    std::io::Error,
>;
mod http_uri {
    pub use tonic::codegen::http::Uri;
}

/// Dials the servers of `servers` in turn, each within `attempt`, and
/// keeps the first whose TLS handshake completes.
fn connector(servers: Arc<ServerList>, tls: &ClientTls, attempt: Duration) -> Result<Connector, ClientError> {
    let config = tls.config()?;
    Ok(tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: http_uri::Uri| {
        let (config, servers) = (config.clone(), servers.clone());
        async move {
            let mut failures = Vec::new();
            for (index, (addr, name)) in servers.in_turn() {
                let dial = async {
                    let stream = tokio::net::TcpStream::connect(addr).await?;
                    let _ = stream.set_nodelay(true);
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), stream).await
                };
                match tokio::time::timeout(attempt, dial).await {
                    Ok(Ok(stream)) => {
                        servers.answered(index);
                        return Ok(TokioIo::new(stream));
                    }
                    Ok(Err(e)) if servers.len() == 1 => return Err(e),
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!("{addr}: no answer within {attempt:?}")),
                }
            }
            Err(std::io::Error::other(failures.join("; ")))
        }
    })))
}

/// Connects now: an unreachable server or a failed handshake is an error
/// that says which. `addr` may list several servers, comma-separated.
pub async fn connect(addr: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Channel, ClientError> {
    connect_to(ServerList::parse(addr)?, tls, connect_timeout).await
}

/// Connects now to the first of `servers` that answers.
pub async fn connect_to(
    servers: Arc<ServerList>,
    tls: &ClientTls,
    connect_timeout: Duration,
) -> Result<Channel, ClientError> {
    let listed = servers.in_turn().map(|(_, (addr, _))| addr.clone()).collect::<Vec<_>>().join(",");
    let endpoint = endpoint(servers.current(), connect_timeout * servers.len() as u32)?;
    let connector = connector(servers, tls, connect_timeout)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Unreachable(describe(&listed, &e)))
}

/// Connects at the first call, and again (to the first server that
/// answers) after a connection is lost.
pub fn connect_lazy(addr: &str, tls: &ClientTls, connect_timeout: Duration) -> Result<Channel, ClientError> {
    connect_lazy_to(ServerList::parse(addr)?, tls, connect_timeout)
}

pub fn connect_lazy_to(
    servers: Arc<ServerList>,
    tls: &ClientTls,
    connect_timeout: Duration,
) -> Result<Channel, ClientError> {
    let endpoint = endpoint(servers.current(), connect_timeout * servers.len() as u32)?;
    Ok(endpoint.connect_with_connector_lazy(connector(servers, tls, connect_timeout)?))
}

/// The certificate (DER) the server at `addr` presents, after verifying it
/// as `connect` does: for `meshctl check`.
pub async fn server_certificate(
    addr: &str,
    tls: &ClientTls,
    within: Duration,
) -> Result<Vec<u8>, ClientError> {
    let config = tls.config()?;
    let name = server_name(addr)?;
    let handshake = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| format!("{addr}: TLS: {e}"))?;
        let leaf = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first().cloned());
        leaf.map(|cert| cert.to_vec()).ok_or_else(|| "the server sent no certificate".to_owned())
    };
    tokio::time::timeout(within, handshake)
        .await
        .map_err(|_| format!("{addr}: no TLS handshake within {within:?}"))
        .and_then(|done| done)
        .map_err(ClientError::Unreachable)
}

/// A transport error with its causes, which name a TLS failure.
fn describe(addr: &str, error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("cannot reach meshd at {addr}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        // Many errors print their cause in their own text already.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text
}

/// Trusts the CA certificate a join token pins, found in the server's
/// chain; the server's certificate must chain to it as to a root.
#[derive(Debug)]
struct PinnedVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pinned = intermediates
            .iter()
            .find(|cert| pem::fingerprint(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA is not the one the join token names (wrong server or wrong token)"
                        .to_owned(),
                )
            })?;
        let verifier = webpki_verifier(std::iter::once(pinned.clone().into_owned()), self.provider.clone())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Trusts a server holding one SPIFFE ID, chained to the roots.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    id: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if pem::uri_names(end_entity).contains(&self.id) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_dialled_host() {
        let cases = [
            ("127.0.0.1:7400", Ok("127.0.0.1")),
            ("[::1]:7400", Ok("::1")),
            ("meshd.example:7400", Ok("meshd.example")),
            ("bad name:7400", Err(())),
        ];
        for (addr, expected) in cases {
            let got = server_name(addr).map(|name| match name {
                ServerName::IpAddress(ip) => std::net::IpAddr::from(ip).to_string(),
                ServerName::DnsName(dns) => dns.as_ref().to_owned(),
                _ => unreachable!(),
            });
            assert_eq!(got.map_err(drop), expected.map(str::to_owned), "{addr}");
        }
    }
}
