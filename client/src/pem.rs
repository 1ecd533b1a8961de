//! PEM text to the DER forms rustls takes.

use std::fmt;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// PEM text that does not hold what was asked of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemError(String);

impl fmt::Display for PemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PemError {}

/// Every certificate in `pem`, in order.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut certs = Vec::new();
    for entry in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let entry = entry.map_err(|e| PemError(format!("not PEM: {e}")))?;
        if entry.label == "CERTIFICATE" {
            certs.push(CertificateDer::from(entry.contents));
        }
    }
    if certs.is_empty() {
        return Err(PemError("no certificate in the PEM text".to_owned()));
    }
    Ok(certs)
}

/// The PKCS#8 private key in `pem`.
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    for entry in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let entry = entry.map_err(|e| PemError(format!("not PEM: {e}")))?;
        if entry.label == "PRIVATE KEY" {
            return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(entry.contents)));
        }
    }
    Err(PemError("no PKCS#8 private key (BEGIN PRIVATE KEY) in the PEM text".to_owned()))
}

/// The URI names (SPIFFE IDs) of a certificate (DER).
pub fn uri_names(der: &[u8]) -> Vec<String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => uri_names_of(&cert),
        Err(_) => Vec::new(),
    }
}

/// The URI names (SPIFFE IDs) of a parsed certificate.
pub fn uri_names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// The SHA-256 of a certificate's DER, in hex: what a join token pins.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate's serial number in hex, as proxies report their roots.
pub fn serial_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial (hex) of the root among `roots_pem` whose key signed `cert`.
pub fn signing_root(cert: &x509_parser::certificate::X509Certificate<'_>, roots_pem: &str) -> Option<String> {
    x509_parser::pem::Pem::iter_from_buffer(roots_pem.as_bytes()).filter_map(|pem| pem.ok()).find_map(|pem| {
        let root = pem.parse_x509().ok()?;
        cert.verify_signature(Some(root.public_key())).ok()?;
        Some(serial_of(&root))
    })
}

/// The serial (hex) of the root among `roots_pem` that signed the first
/// certificate of `certificate_pem`; "" when it does not parse or no root did.
pub fn root_of(certificate_pem: &str, roots_pem: &str) -> String {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(certificate_pem.as_bytes()) else {
        return String::new();
    };
    let Ok(cert) = pem.parse_x509() else { return String::new() };
    signing_root(&cert, roots_pem).unwrap_or_default()
}

/// One certificate of a PEM bundle, as `meshctl check` shows it.
pub struct CertificateSummary {
    pub subject: String,
    /// Hex, as proxies report the root of their certificate.
    pub serial: String,
    pub expires_unix: u64,
}

/// Every certificate in a PEM bundle; what does not parse is left out.
pub fn certificate_summaries(pem: &str) -> Vec<CertificateSummary> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let cert = entry.parse_x509().ok()?;
            Some(CertificateSummary {
                subject: cert.subject().to_string(),
                serial: serial_of(&cert),
                expires_unix: cert.validity().not_after.timestamp().max(0) as u64,
            })
        })
        .collect()
}
