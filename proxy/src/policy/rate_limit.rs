//! Local rate limits at a service's inbound: one token bucket for every
//! caller together and one per caller identity, each a lock-free GCRA
//! (one atomic: the time the bucket is next empty), so admitting a request
//! is a compare-and-swap, exact at any rate.
//!
//! Callers are found in a copy-on-write map: a request reads it without a
//! lock; only a caller seen for the first time takes the lock to add its
//! bucket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use mesh_common::traffic_policy::{Bucket, RateLimitSpec};

/// Distinct callers with a bucket of their own; past that, new callers
/// share one, so a flood of identities cannot grow the map without end.
pub const MAX_CALLERS: usize = 10_000;
/// The key of the bucket plaintext callers (no identity) share.
const PLAINTEXT: &str = "";

/// A token bucket as the generic cell rate algorithm: `next_free` is when
/// the bucket would be full again, in `clock::now_nanos` time.
pub struct Gcra {
    next_free: AtomicU64,
    interval_nanos: u64,
    tolerance_nanos: u64,
}

impl Gcra {
    pub fn new(bucket: Bucket) -> Gcra {
        let interval_nanos = (1_000_000_000 / u64::from(bucket.requests_per_second.max(1))).max(1);
        Gcra {
            next_free: AtomicU64::new(0),
            interval_nanos,
            tolerance_nanos: interval_nanos * u64::from(bucket.burst.max(1)),
        }
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn admit(&self, now: u64) -> Result<(), u64> {
        let mut seen = self.next_free.load(Ordering::Relaxed);
        loop {
            let next = seen.max(now) + self.interval_nanos;
            if next - now > self.tolerance_nanos {
                return Err(next - now - self.tolerance_nanos);
            }
            match self.next_free.compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => seen = actual,
            }
        }
    }

    /// Gives back a token taken by `admit` (another limit refused the request).
    pub fn refund(&self) {
        let interval = self.interval_nanos;
        let _ = self
            .next_free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(interval)));
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Overall,
    Caller,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Overall => "overall",
            Limit::Caller => "caller",
        }
    }
}

/// A refused request: by which limit, and when to try again (whole
/// seconds, at least 1, for `Retry-After`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_after_secs: u64,
}

/// Refused requests by limit, for /metrics.
#[derive(Default)]
pub struct RateLimitMetrics {
    pub overall: AtomicU64,
    pub caller: AtomicU64,
}

pub struct RateLimiter {
    pub spec: RateLimitSpec,
    overall: Option<Gcra>,
    callers: ArcSwap<HashMap<Box<str>, Arc<Gcra>>>,
    adding: Mutex<()>,
    pub metrics: Arc<RateLimitMetrics>,
}

impl RateLimiter {
    pub fn new(spec: RateLimitSpec, metrics: Arc<RateLimitMetrics>) -> RateLimiter {
        RateLimiter {
            overall: spec.overall.map(Gcra::new),
            spec,
            callers: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            metrics,
        }
    }

    /// Admits a request from `caller` (its SPIFFE ID; `None` for
    /// plaintext) at `now`, or says which limit refused it.
    pub fn admit(&self, caller: Option<&str>, now: u64) -> Result<(), Refused> {
        let refused = |limit: Limit, wait_nanos: u64| Refused {
            limit,
            retry_after_secs: wait_nanos.div_ceil(1_000_000_000).max(1),
        };
        let own = self.caller_bucket(caller.unwrap_or(PLAINTEXT));
        if let Some(own) = &own {
            if let Err(wait) = own.admit(now) {
                self.metrics.caller.fetch_add(1, Ordering::Relaxed);
                return Err(refused(Limit::Caller, wait));
            }
        }
        if let Some(overall) = &self.overall {
            if let Err(wait) = overall.admit(now) {
                if let Some(own) = &own {
                    own.refund();
                }
                self.metrics.overall.fetch_add(1, Ordering::Relaxed);
                return Err(refused(Limit::Overall, wait));
            }
        }
        Ok(())
    }

    fn caller_bucket(&self, caller: &str) -> Option<Arc<Gcra>> {
        if self.spec.per_caller.is_none() && self.spec.overrides.is_empty() {
            return None;
        }
        if let Some(bucket) = self.callers.load().get(caller) {
            return Some(bucket.clone());
        }
        let bucket = self.spec.caller_bucket(caller)?;
        let _adding = self.adding.lock().expect("rate limiter lock");
        let current = self.callers.load_full();
        if let Some(bucket) = current.get(caller) {
            return Some(bucket.clone());
        }
        let key: Box<str> = if current.len() >= MAX_CALLERS && !self.spec.overrides.contains_key(caller) {
            // Over the cap, new callers share the plaintext callers' bucket.
            PLAINTEXT.into()
        } else {
            caller.into()
        };
        let mut next = (*current).clone();
        let bucket = next.entry(key).or_insert_with(|| Arc::new(Gcra::new(bucket))).clone();
        self.callers.store(Arc::new(next));
        Some(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::traffic_policy::file::parse_traffic_policy;

    const SECOND: u64 = 1_000_000_000;

    fn limiter(fields: &str) -> RateLimiter {
        let text = format!("[[rate_limits]]\nservice = \"s\"\n{fields}\n");
        let spec = parse_traffic_policy(&text).unwrap().rate_limits.remove("s").unwrap();
        RateLimiter::new(spec, Arc::default())
    }

    /// Requests admitted when `callers` each send one every `gap` nanos
    /// for `seconds`, by caller.
    fn admitted(limiter: &RateLimiter, callers: &[&str], gap: u64, seconds: u64) -> Vec<u64> {
        let mut counts = vec![0; callers.len()];
        let mut now = SECOND;
        while now < SECOND + seconds * SECOND {
            for (i, caller) in callers.iter().enumerate() {
                if limiter.admit(Some(caller), now).is_ok() {
                    counts[i] += 1;
                }
            }
            now += gap;
        }
        counts
    }

    #[test]
    fn buckets_admit_their_rate_plus_their_burst() {
        let a = "spiffe://mesh.local/service/a";
        let b = "spiffe://mesh.local/service/batch";
        // (limit, callers, gap between requests, admitted per caller in 10 s)
        type Case<'a> = (&'a str, &'a [&'a str], u64, &'a [u64]);
        let table: &[Case] = &[
            // 5 000/s offered (every 200 µs) against 1 000/s with a burst of 200.
            ("requests_per_second = 1000\nburst = 200", &[a], 200_000, &[10_000 + 200 - 1]),
            // Under the limit: everything.
            ("requests_per_second = 1000", &[a], 2_000_000, &[5_000]),
            // Per caller, and an override holds batch to its own.
            (
                "per_caller = { requests_per_second = 100, burst = 10 }\noverrides = [ { caller = \"spiffe://mesh.local/service/batch\", requests_per_second = 10, burst = 1 } ]",
                &[a, b],
                1_000_000,
                &[1_000 + 10 - 1, 100],
            ),
            // The overall limit holds two callers that each stay within
            // theirs to 100/s together (here the first in line each
            // millisecond takes every token that comes free).
            ("requests_per_second = 100\nburst = 1\nper_caller = { requests_per_second = 1000 }", &[a, b], 1_000_000, &[1_000, 0]),
        ];
        for (fields, callers, gap, want) in table {
            let got = admitted(&limiter(fields), callers, *gap, 10);
            for (got, want) in got.iter().zip(*want) {
                // One request either side of the edge, from where the clock starts.
                assert!(got.abs_diff(*want) <= 1, "{fields}: {got} admitted, want {want}");
            }
        }
    }

    #[test]
    fn a_refusal_says_which_limit_and_when_to_come_back() {
        let limiter = limiter(
            "requests_per_second = 10\nburst = 1\nper_caller = { requests_per_second = 1, burst = 2 }",
        );
        let a = Some("spiffe://mesh.local/service/a");
        assert_eq!(limiter.admit(a, SECOND), Ok(()));
        // The caller's bucket has a second token; the overall one is empty for 100 ms.
        let refused = limiter.admit(a, SECOND).unwrap_err();
        assert_eq!(refused, Refused { limit: Limit::Overall, retry_after_secs: 1 });
        // The overall refusal gave the caller's token back: once the overall
        // bucket refills, the caller still has it (its own refills once a second).
        let later = SECOND + SECOND / 10 + 1;
        assert_eq!(limiter.admit(a, later), Ok(()), "the caller's token came back");
        let refused = limiter.admit(a, later + SECOND / 10).unwrap_err();
        assert_eq!(refused.limit, Limit::Caller, "now the caller's own bucket is empty");
        let limiter = self::limiter("per_caller = { requests_per_second = 1, burst = 1 }");
        assert_eq!(limiter.admit(None, SECOND), Ok(()));
        assert_eq!(limiter.admit(None, SECOND).unwrap_err().limit, Limit::Caller);
        assert_eq!(limiter.admit(a, SECOND), Ok(()), "plaintext callers share their own bucket");
        assert_eq!(limiter.metrics.caller.load(Ordering::Relaxed), 1);
    }
}
