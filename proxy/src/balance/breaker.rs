//! The per-endpoint circuit breaker: consecutive failures eject an endpoint
//! for an exponentially growing time; afterwards one probe request decides
//! whether it comes back.
//!
//! The state fits in one `u64` so that requests update it with a
//! compare-and-swap instead of a lock. The transitions are pure functions
//! of (state, event, time, policy), tested with tables below.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::BreakerPolicy;

/// The breaker state of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerState {
    /// Failures in a row since the last success.
    pub consecutive_failures: u16,
    /// Ejections in a row; the next ejection lasts base × 2^ejections.
    pub ejections: u8,
    /// A probe request is on its way to the endpoint.
    pub probing: bool,
    /// While non-zero, the endpoint is ejected until this millisecond of
    /// the proxy's clock (at most `MAX_MILLIS`). While a probe is out, this
    /// is the probe's deadline: a probe that never reports back (its caller
    /// went away) lets another probe go after it.
    pub ejected_until_ms: u64,
}

/// The packed state keeps 39 bits of milliseconds: over 17 years of uptime.
pub const MAX_MILLIS: u64 = (1 << 39) - 1;

/// What a request may do with an endpoint right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// The ejection is over and no probe is out: one request may probe it.
    ProbeDue,
    Ejected,
}

impl BreakerState {
    pub fn availability(self, now_ms: u64) -> Availability {
        if self.ejected_until_ms == 0 {
            Availability::Available
        } else if now_ms < self.ejected_until_ms {
            Availability::Ejected
        } else {
            Availability::ProbeDue
        }
    }

    pub fn is_ejected(self) -> bool {
        self.ejected_until_ms != 0
    }

    /// Sends the single probe, which must report back within one ejection
    /// length.
    pub fn with_probe(self, now_ms: u64, policy: &BreakerPolicy) -> BreakerState {
        let deadline = now_ms
            .saturating_add(ejection_length(self.ejections.saturating_sub(1), policy).as_millis() as u64);
        BreakerState { probing: true, ejected_until_ms: deadline.min(MAX_MILLIS), ..self }
    }

    /// Any success closes the breaker.
    pub fn on_success(self) -> BreakerState {
        BreakerState::default()
    }

    /// Returns the next state and whether this failure ejected the endpoint.
    pub fn on_failure(self, now_ms: u64, policy: &BreakerPolicy) -> (BreakerState, bool) {
        if self.is_ejected() {
            if self.probing {
                // The probe failed: eject again, for longer.
                return (self.ejected(now_ms, policy), true);
            }
            // A request that began before the ejection; it changes nothing.
            return (self, false);
        }
        let failures = self.consecutive_failures.saturating_add(1);
        if u32::from(failures) >= policy.consecutive_failures {
            (self.ejected(now_ms, policy), true)
        } else {
            (BreakerState { consecutive_failures: failures, ..self }, false)
        }
    }

    fn ejected(self, now_ms: u64, policy: &BreakerPolicy) -> BreakerState {
        let length = ejection_length(self.ejections, policy);
        let until = now_ms.saturating_add(length.as_millis() as u64).min(MAX_MILLIS);
        BreakerState {
            consecutive_failures: 0,
            ejections: self.ejections.saturating_add(1),
            probing: false,
            ejected_until_ms: until,
        }
    }

    fn pack(self) -> u64 {
        u64::from(self.consecutive_failures)
            | u64::from(self.ejections) << 16
            | u64::from(self.probing) << 24
            | self.ejected_until_ms.min(MAX_MILLIS) << 25
    }

    fn unpack(bits: u64) -> BreakerState {
        BreakerState {
            consecutive_failures: bits as u16,
            ejections: (bits >> 16) as u8,
            probing: (bits >> 24) & 1 == 1,
            ejected_until_ms: bits >> 25,
        }
    }
}

/// base × 2^ejections, capped at the maximum.
pub fn ejection_length(ejections: u8, policy: &BreakerPolicy) -> Duration {
    let factor = 1u32.checked_shl(u32::from(ejections)).unwrap_or(u32::MAX);
    policy.base_ejection.saturating_mul(factor).min(policy.max_ejection)
}

/// A breaker shared by every request to one endpoint.
#[derive(Debug, Default)]
pub struct BreakerCell(AtomicU64);

impl BreakerCell {
    pub fn load(&self) -> BreakerState {
        BreakerState::unpack(self.0.load(Ordering::Acquire))
    }

    /// Claims the single probe of an endpoint whose ejection is over; only
    /// one caller wins.
    pub fn try_claim_probe(&self, now_ms: u64, policy: &BreakerPolicy) -> bool {
        let current = self.0.load(Ordering::Acquire);
        let state = BreakerState::unpack(current);
        if state.availability(now_ms) != Availability::ProbeDue {
            return false;
        }
        self.0
            .compare_exchange(
                current,
                state.with_probe(now_ms, policy).pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    pub fn record_success(&self) {
        // The common case is a closed breaker with no failures: skip the write.
        if self.0.load(Ordering::Relaxed) != 0 {
            self.0.store(0, Ordering::Release);
        }
    }

    /// Returns true when this failure ejected the endpoint.
    pub fn record_failure(&self, now_ms: u64, policy: &BreakerPolicy) -> bool {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let (next, ejected) = BreakerState::unpack(current).on_failure(now_ms, policy);
            match self.0.compare_exchange_weak(current, next.pack(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return ejected,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[test]
    fn failures_in_a_row_eject_and_success_resets() {
        let p = policy();
        let (s, e) = BreakerState::default().on_failure(100, &p);
        assert!(!e);
        let (s, e) = s.on_failure(100, &p);
        assert!(!e);
        let reset = s.on_success();
        assert_eq!(reset, BreakerState::default());
        let (s, e) = s.on_failure(100, &p);
        assert!(e, "third failure in a row ejects");
        assert_eq!(s.ejected_until_ms, 1100);
        assert_eq!(s.availability(500), Availability::Ejected);
        assert_eq!(s.availability(1100), Availability::ProbeDue);
    }

    #[test]
    fn failed_probe_doubles_the_ejection_up_to_the_cap() {
        let p = policy();
        // (ejections so far, expected length of the next ejection)
        let table = [(0u8, 1u64), (1, 2), (2, 4), (3, 5), (10, 5), (200, 5)];
        for (ejections, seconds) in table {
            assert_eq!(ejection_length(ejections, &p), Duration::from_secs(seconds), "after {ejections}");
        }
        let ejected = BreakerState { ejections: 1, ejected_until_ms: 1000, ..Default::default() };
        let probing = ejected.with_probe(1000, &p);
        assert_eq!(probing.availability(1500), Availability::Ejected, "one probe at a time");
        let (after_probe, e) = probing.on_failure(1000, &p);
        assert!(e);
        assert_eq!(after_probe.ejected_until_ms, 3000);
        assert_eq!(after_probe.ejections, 2);
        assert!(!after_probe.probing);
    }

    #[test]
    fn late_failures_do_not_extend_an_ejection() {
        let p = policy();
        let ejected = BreakerState { ejections: 1, ejected_until_ms: 1000, ..Default::default() };
        assert_eq!(ejected.on_failure(900, &p), (ejected, false));
    }

    #[test]
    fn only_one_probe_is_claimed() {
        let cell = BreakerCell::default();
        let p = policy();
        for _ in 0..3 {
            cell.record_failure(10, &p);
        }
        assert!(!cell.try_claim_probe(500, &p), "still ejected");
        assert!(cell.try_claim_probe(1010, &p));
        assert!(!cell.try_claim_probe(1010, &p), "a probe is already out");
        // The probe never reports back; after its deadline another may go.
        assert!(!cell.try_claim_probe(1900, &p));
        assert!(cell.try_claim_probe(2010, &p));
        cell.record_success();
        assert_eq!(cell.load().availability(1010), Availability::Available);
    }

    #[test]
    fn state_survives_packing() {
        for until in [123_456, u64::from(u32::MAX) + 1, MAX_MILLIS] {
            let s = BreakerState {
                consecutive_failures: 513,
                ejections: 7,
                probing: true,
                ejected_until_ms: until,
            };
            assert_eq!(BreakerState::unpack(s.pack()), s);
        }
    }

    #[test]
    fn ejection_works_past_49_days_of_uptime() {
        let p = policy();
        // (proxy uptime in ms when the failures come): 49.7 days is 2^32 ms.
        for start in [u64::from(u32::MAX) - 500, u64::from(u32::MAX) + 1, 1 << 38] {
            let cell = BreakerCell::default();
            let ejected = (0..3).map(|_| cell.record_failure(start, &p)).filter(|e| *e).count();
            assert_eq!(ejected, 1, "at {start}");
            assert_eq!(cell.load().availability(start + 500), Availability::Ejected, "at {start}");
            assert!(!cell.try_claim_probe(start + 999, &p), "at {start}");
            assert!(cell.try_claim_probe(start + 1000, &p), "at {start}");
            cell.record_success();
            assert_eq!(cell.load().availability(start + 1000), Availability::Available, "at {start}");
        }
    }
}
