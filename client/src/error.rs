//! What can go wrong reaching meshd, and whether trying again can help.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The TLS material, the address or the credential is unusable: fix
    /// it; trying again cannot help.
    Config(String),
    /// meshd could not be reached, or the handshake with it failed: it may
    /// be down or restarting; try again.
    Unreachable(String),
}

impl ClientError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unreachable(_))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Config(message) | ClientError::Unreachable(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ClientError {}

/// For callers that report errors as text.
impl From<ClientError> for String {
    fn from(error: ClientError) -> String {
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{connect, ClientTls};

    #[tokio::test]
    async fn what_retrying_can_fix_is_told_from_what_it_cannot() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let tls = ClientTls::pinned(&"ab".repeat(32));
        // (address, retrying can help)
        let cases = [(closed.as_str(), true), ("not an address", false)];
        for (addr, retryable) in cases {
            let error = connect(addr, &tls, Duration::from_secs(1)).await.unwrap_err();
            assert_eq!(error.is_retryable(), retryable, "{addr}: {error}");
        }
        let bad_roots = ClientTls::from_roots_pem("not PEM").map(|_| ()).unwrap_err();
        assert!(!bad_roots.is_retryable(), "{bad_roots}");
    }
}
