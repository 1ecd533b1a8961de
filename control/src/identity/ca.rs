//! The certificate authority in `meshd server`: a root generated on first
//! start (kept in the store) or an operator's CA from files, signing
//! certificate requests with the one identity a token grants. The request's
//! own names are ignored: a proxy cannot ask for another identity.

use mesh_common::spiffe::{SpiffeId, Subject};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// How long a generated root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past, for clocks that lag.
const BACKDATE: Duration = Duration::from_secs(60);

pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
}

impl std::fmt::Debug for Authority {
    // The key never reaches a log line, not even through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// Why the CA refused or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaError {
    /// A certificate request that cannot be read or signed as asked: the
    /// caller's to fix.
    BadRequest(String),
    /// A certificate offered for renewal that does not qualify (another
    /// CA's, expired, another key, nobody of this trust domain).
    NotRenewable(String),
    /// The CA's own certificate or key, or the trust state, is unusable: an
    /// operator's files or the store.
    Authority(String),
    /// Making a key or a signature failed: the server's fault.
    Signing(String),
}

impl std::fmt::Display for CaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaError::BadRequest(m)
            | CaError::NotRenewable(m)
            | CaError::Authority(m)
            | CaError::Signing(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CaError {}

fn signing(e: impl std::fmt::Display) -> CaError {
    CaError::Signing(e.to_string())
}

fn bad_request(e: impl std::fmt::Display) -> CaError {
    CaError::BadRequest(format!("the certificate request: {e}"))
}

impl Authority {
    /// A new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Authority, CaError> {
        let key = KeyPair::generate().map_err(signing)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("mesh root CA for {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert_pem = params.self_signed(&key).map_err(signing)?.pem();
        let issuer = Issuer::new(params, key);
        Ok(Authority { cert_pem, issuer, trust_domain: trust_domain.to_owned() })
    }

    /// An existing CA (root or intermediate) from PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Authority, CaError> {
        let unusable = |what: &str| {
            let what = what.to_owned();
            move |e: &dyn std::fmt::Display| CaError::Authority(format!("{what}: {e}"))
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| unusable("the CA key")(&e))?;
        // A key that is not the certificate's would sign certificates no
        // proxy can verify under the trusted root.
        let (_, der) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| unusable("the CA certificate")(&e))?;
        let cert = der.parse_x509().map_err(|e| unusable("the CA certificate")(&e))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Authority("the CA key does not belong to the CA certificate".to_owned()));
        }
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| unusable("the CA certificate")(&e))?;
        Ok(Authority { cert_pem: cert_pem.to_owned(), issuer, trust_domain: trust_domain.to_owned() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The key as PEM, for the store only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether `csr_pem` is a certificate request this CA can sign.
    pub fn check_request(csr_pem: &str) -> Result<(), CaError> {
        CertificateSigningRequestParams::from_pem(csr_pem).map(drop).map_err(bad_request)
    }

    /// The service a still-valid certificate from this CA names, for a
    /// renewal: the request must be signed by the same key (which proves the
    /// caller holds it), and the certificate must not have expired.
    pub fn renewal_identity(&self, certificate_pem: &str, csr_pem: &str) -> Result<SpiffeId, CaError> {
        renewal_identity(&[self.cert_pem()], &self.trust_domain, certificate_pem, csr_pem)
    }

    /// The serial number of this CA's certificate, in hex.
    pub fn serial(&self) -> String {
        serial_hex(&self.cert_pem).unwrap_or_default()
    }

    /// Signs a PEM certificate request for `service`, valid for `ttl`. The
    /// certificate's only name is the service's SPIFFE ID.
    pub fn sign(&self, csr_pem: &str, service: &str, ttl: Duration) -> Result<String, CaError> {
        self.sign_id(csr_pem, &super::spiffe_id(&self.trust_domain, service), ttl)
    }

    /// Signs a PEM certificate request for the SPIFFE ID `id` (a service,
    /// a node or a user of this trust domain), valid for `ttl`.
    pub fn sign_id(&self, csr_pem: &str, id: &str, ttl: Duration) -> Result<String, CaError> {
        let mut request = CertificateSigningRequestParams::from_pem(csr_pem).map_err(bad_request)?;
        let uri = Ia5String::try_from(id).map_err(signing)?;
        leaf_params(&mut request.params, vec![SanType::URI(uri)], ttl);
        Ok(request.signed_by(&self.issuer).map_err(signing)?.pem())
    }

    /// A new key and a certificate for it naming `id`: for credentials the
    /// server hands out whole (a user's). Returns (certificate, key) in PEM.
    pub fn issue_with_key(&self, id: &str, ttl: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(signing)?;
        let mut params = CertificateParams::default();
        let uri = Ia5String::try_from(id).map_err(signing)?;
        leaf_params(&mut params, vec![SanType::URI(uri)], ttl);
        let cert = params.signed_by(&key, &self.issuer).map_err(signing)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// meshd's own certificate for its gRPC port: a fresh key, and the IP
    /// addresses and DNS names clients dial. Returns (certificate, key).
    pub fn issue_server(&self, names: &[String], ttl: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(signing)?;
        let mut params = CertificateParams::default();
        let mut sans = Vec::new();
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    Ia5String::try_from(name.as_str())
                        .map_err(|e| CaError::BadRequest(format!("server name {name:?}: {e}")))?,
                ),
            });
        }
        leaf_params(&mut params, sans, ttl);
        params.distinguished_name.push(DnType::CommonName, "meshd");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(signing)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A leaf certificate's fields: only `names`, valid for `ttl` from now.
fn leaf_params(params: &mut CertificateParams, names: Vec<SanType>, ttl: Duration) {
    params.subject_alt_names = names;
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
}

/// What a still-valid certificate from one of `roots_pem` names, for a
/// renewal: a service or a node. The request must be signed by the
/// certificate's key (which proves the caller holds it), and the
/// certificate must not have expired.
pub fn renewal_identity(
    roots_pem: &[&str],
    trust_domain: &str,
    certificate_pem: &str,
    csr_pem: &str,
) -> Result<SpiffeId, CaError> {
    let refuse = |why: &str| CaError::NotRenewable(why.to_owned());
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes())
        .map_err(|e| CaError::NotRenewable(format!("the certificate to renew: {e}")))?;
    let cert =
        pem.parse_x509().map_err(|e| CaError::NotRenewable(format!("the certificate to renew: {e}")))?;
    let from_a_root = roots_pem.iter().any(|root| mesh_client::pem::signing_root(&cert, root).is_some());
    if !from_a_root {
        return Err(refuse("the certificate is not from this CA"));
    }
    if !cert.validity().is_valid() {
        return Err(refuse("the certificate has expired: a new token is needed"));
    }
    let request = CertificateSigningRequestParams::from_pem(csr_pem).map_err(bad_request)?;
    if request.public_key.der_bytes() != &*cert.public_key().subject_public_key.data {
        return Err(refuse("the request is not signed by the certificate's key"));
    }
    let id = mesh_client::pem::uri_names_of(&cert)
        .iter()
        .find_map(|name| SpiffeId::parse_in(name, trust_domain))
        .ok_or_else(|| refuse("the certificate names nobody of this trust domain"))?;
    match id.subject {
        Subject::Service(_) | Subject::Node(_) => Ok(id),
        _ => Err(refuse("only workload and node certificates renew this way")),
    }
}

/// The serial number of the first certificate in `pem`, in hex.
pub fn serial_hex(pem: &str) -> Result<String, CaError> {
    let unreadable = |e: &dyn std::fmt::Display| CaError::Authority(format!("a certificate: {e}"));
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| unreadable(&e))?;
    let cert = pem.parse_x509().map_err(|e| unreadable(&e))?;
    Ok(mesh_client::pem::serial_of(&cert))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as DER integers in certificates must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(names: Vec<String>) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names).unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn a_signed_certificate_names_only_the_granted_service() {
        let ca = Authority::generate("mesh.local").unwrap();
        // The request asks for another identity: it is ignored.
        let (_, csr) = request(vec!["spiffe://mesh.local/service/admin".into(), "evil.example".into()]);
        let pem = ca.sign(&csr, "web", Duration::from_secs(3600)).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec!["URI(spiffe://mesh.local/service/web)".to_owned()]);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);
        // Issued by the root.
        let (_, root) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let root = root.parse_x509().unwrap();
        assert_eq!(cert.issuer(), root.subject());
        assert!(cert.verify_signature(Some(root.public_key())).is_ok());
    }

    #[test]
    fn a_stored_authority_signs_as_before_and_garbage_is_refused() {
        let ca = Authority::generate("mesh.local").unwrap();
        let again = Authority::from_pem(ca.cert_pem(), &ca.key_pem(), "mesh.local").unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.serial(), ca.serial());
        let (_, csr) = request(vec![]);
        // What the reloaded authority signs verifies under the original root.
        let pem = again.sign(&csr, "web", Duration::from_secs(60)).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let (_, root) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let root = root.parse_x509().unwrap();
        assert_eq!(cert.issuer(), root.subject());
        cert.verify_signature(Some(root.public_key())).expect("signed with the original root's key");
        // Another CA's key with this certificate is refused, not used.
        let other = Authority::generate("mesh.local").unwrap();
        let mismatched = Authority::from_pem(ca.cert_pem(), &other.key_pem(), "mesh.local").unwrap_err();
        assert!(
            matches!(&mismatched, CaError::Authority(m) if m.contains("does not belong")),
            "{mismatched}"
        );
        let garbage = again.sign("not a request", "web", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(&garbage, CaError::BadRequest(m) if m.contains("request")), "{garbage}");
        assert!(Authority::from_pem("junk", &ca.key_pem(), "mesh.local").is_err());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn renewals_need_a_live_certificate_and_its_own_key() {
        let ca = Authority::generate("mesh.local").unwrap();
        let (key, csr) = request(vec![]);
        let cert = ca.sign(&csr, "web", Duration::from_secs(3600)).unwrap();
        let again = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        assert_eq!(
            ca.renewal_identity(&cert, &again).unwrap().to_string(),
            "spiffe://mesh.local/service/web"
        );
        // Another key: refused.
        let (_, other) = request(vec![]);
        let refused =
            |error: CaError, why: &str| matches!(&error, CaError::NotRenewable(m) if m.contains(why));
        assert!(refused(
            ca.renewal_identity(&cert, &other).unwrap_err(),
            "not signed by the certificate's key"
        ));
        // Another CA's certificate: refused.
        let stranger = Authority::generate("mesh.local").unwrap();
        let foreign = stranger.sign(&csr, "web", Duration::from_secs(3600)).unwrap();
        assert!(refused(ca.renewal_identity(&foreign, &again).unwrap_err(), "not from this CA"));
        // Expired (a lifetime shorter than the backdating): refused.
        let expired = ca.sign(&csr, "web", Duration::ZERO).unwrap();
        assert!(refused(ca.renewal_identity(&expired, &again).unwrap_err(), "expired"));
        // A node's certificate renews as the node; a user's does not renew this way.
        let node = ca.sign_id(&csr, "spiffe://mesh.local/node/a", Duration::from_secs(3600)).unwrap();
        assert_eq!(ca.renewal_identity(&node, &again).unwrap().to_string(), "spiffe://mesh.local/node/a");
        let user = ca.sign_id(&csr, "spiffe://mesh.local/user/ci", Duration::from_secs(3600)).unwrap();
        assert!(refused(ca.renewal_identity(&user, &again).unwrap_err(), "only workload and node"));
    }
}
