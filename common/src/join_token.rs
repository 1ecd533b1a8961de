//! The text of a join token, which meshd prints and a node agent reads:
//! `meshjoin.<secret>.<SHA-256 of the CA certificate>`.

/// A join token as the agent is given it: the secret and the SHA-256 of
/// the CA certificate that signs meshd's certificate, so that the agent
/// can tell the real server before it holds the trust bundle.
pub fn format_token(secret: &str, ca_fingerprint: &str) -> String {
    format!("meshjoin.{secret}.{ca_fingerprint}")
}

/// The secret and the CA fingerprint of a join token.
pub fn parse_token(token: &str) -> Result<(&str, &str), String> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("meshjoin"), Some(secret), Some(ca), None)
            if secret.len() == 32 && ca.len() == 64 && ca.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok((secret, ca))
        }
        _ => Err("not a join token: expected meshjoin.<secret>.<CA fingerprint>, as `meshctl node token create` prints".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_its_secret_and_the_ca_it_trusts() {
        let secret = "0123456789abcdef0123456789abcdef";
        let ca = "ab".repeat(32);
        assert_eq!(parse_token(&format_token(secret, &ca)), Ok((secret, ca.as_str())));
        for bad in [
            "",
            "meshjoin",
            "meshjoin.short.ab",
            &format!("other.{secret}.{ca}"),
            &format!("meshjoin.{secret}.{ca}.x"),
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
    }
}
