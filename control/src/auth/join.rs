//! Join tokens, pure: an admin creates one (`meshctl node token create`)
//! for a number of uses within a lifetime; an agent exchanges it for a
//! node certificate. A token that is used up or expired is remembered
//! long enough to say so instead of "unknown".

use std::collections::HashMap;
use std::time::Duration;

/// How long a spent or expired token is remembered, to name the reason.
const REMEMBER: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    Unknown,
    UsedUp,
    Expired,
}

impl std::fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JoinRefusal::Unknown => {
                "the join token is not one this server issued (wrong token, or meshd restarted since)"
            }
            JoinRefusal::UsedUp => "the join token has been used as many times as it allows",
            JoinRefusal::Expired => "the join token has expired",
        })
    }
}

#[derive(Debug)]
struct Entry {
    uses_left: u32,
    expires_ms: u64,
}

#[derive(Debug, Default)]
pub struct JoinTokens {
    tokens: HashMap<String, Entry>,
}

impl JoinTokens {
    /// Records `secret` (random, from the caller) for `uses` joins until `now_ms + ttl`.
    pub fn create(&mut self, secret: String, uses: u32, now_ms: u64, ttl: Duration) {
        self.tokens.retain(|_, entry| entry.expires_ms + REMEMBER.as_millis() as u64 > now_ms);
        self.tokens.insert(secret, Entry { uses_left: uses, expires_ms: now_ms + ttl.as_millis() as u64 });
    }

    /// Spends one use of `secret`.
    pub fn redeem(&mut self, secret: &str, now_ms: u64) -> Result<(), JoinRefusal> {
        let entry = self.tokens.get_mut(secret).ok_or(JoinRefusal::Unknown)?;
        if entry.expires_ms <= now_ms {
            return Err(JoinRefusal::Expired);
        }
        if entry.uses_left == 0 {
            return Err(JoinRefusal::UsedUp);
        }
        entry.uses_left -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_joins_as_often_as_it_allows_within_its_life() {
        let ttl = Duration::from_secs(60);
        // (uses, redeem times in ms) → expected results, the token made at 1 000 ms
        let ok = Ok(());
        type Case = (u32, Vec<u64>, Vec<Result<(), JoinRefusal>>);
        let cases: Vec<Case> = vec![
            (1, vec![2_000, 3_000], vec![ok.clone(), Err(JoinRefusal::UsedUp)]),
            (2, vec![2_000, 3_000, 4_000], vec![ok.clone(), ok.clone(), Err(JoinRefusal::UsedUp)]),
            (5, vec![60_999, 61_000], vec![ok.clone(), Err(JoinRefusal::Expired)]),
            (0, vec![2_000], vec![Err(JoinRefusal::UsedUp)]),
        ];
        for (uses, times, expected) in cases {
            let mut tokens = JoinTokens::default();
            tokens.create("s".into(), uses, 1_000, ttl);
            let got: Vec<_> = times.iter().map(|at| tokens.redeem("s", *at)).collect();
            assert_eq!(got, expected, "{uses} uses at {times:?}");
            assert_eq!(tokens.redeem("other", 2_000), Err(JoinRefusal::Unknown));
        }
    }
}
