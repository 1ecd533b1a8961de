//! Bootstrap tokens, pure: the scheduler's attestation that an instance is
//! the one it placed. An agent asks for a token for the exact instance it
//! is starting; the server grants the instance's service (from the job,
//! never from the asker); the instance's proxy redeems the token once for
//! a certificate. A token is single-use and short-lived.

use std::collections::HashMap;
use std::time::Duration;

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub instance: String,
    pub service: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Unknown => "the token is unknown or was already used",
            Refusal::Expired => "the token has expired",
        })
    }
}

/// Tokens waiting to be redeemed.
#[derive(Debug, Default)]
pub struct Tokens {
    pending: HashMap<String, (Grant, u64)>,
}

impl Tokens {
    /// Records `token` (random, from the caller) for `grant` until `now_ms + ttl`.
    pub fn issue(&mut self, token: String, grant: Grant, now_ms: u64, ttl: Duration) {
        self.pending.retain(|_, (_, expires)| *expires > now_ms);
        self.pending.insert(token, (grant, now_ms + ttl.as_millis() as u64));
    }

    /// Redeems a token: the grant, once; never again.
    pub fn redeem(&mut self, token: &str, now_ms: u64) -> Result<Grant, Refusal> {
        let (grant, expires) = self.pending.remove(token).ok_or(Refusal::Unknown)?;
        if expires <= now_ms {
            return Err(Refusal::Expired);
        }
        Ok(grant)
    }
}

/// A fresh random token: 32 hex bytes of OS-seeded randomness.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_expire() {
        let grant = Grant { instance: "web-0".into(), service: "web".into() };
        let ttl = Duration::from_secs(60);
        // (redeem at ms, expected) after issuing "t" at 1000 ms
        let cases =
            [(1_000, Ok(grant.clone())), (60_999, Ok(grant.clone())), (61_000, Err(Refusal::Expired))];
        for (at, expected) in cases {
            let mut tokens = Tokens::default();
            tokens.issue("t".into(), grant.clone(), 1_000, ttl);
            assert_eq!(tokens.redeem("t", at), expected, "at {at}");
            assert_eq!(tokens.redeem("t", at), Err(Refusal::Unknown), "a second use at {at}");
        }
        let mut tokens = Tokens::default();
        assert_eq!(tokens.redeem("never-issued", 0), Err(Refusal::Unknown));
        // Expired tokens are swept when new ones come.
        tokens.issue("old".into(), grant.clone(), 0, ttl);
        tokens.issue("new".into(), grant, 120_000, ttl);
        assert_eq!(tokens.pending.len(), 1);
        assert_eq!(new_token().len(), 32);
        assert_ne!(new_token(), new_token());
    }
}
