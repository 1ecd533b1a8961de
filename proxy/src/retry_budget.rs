//! The retry budget: retries may add at most `ratio` of the requests plus
//! `min_per_second` per second, counted over a sliding 10-second window.
//! This bounds the extra load retries can put on a failing service.

use std::sync::atomic::{AtomicU64, Ordering};

pub const WINDOW_SECONDS: u64 = 10;

/// The pure rule: may one more retry be spent, given what the window holds?
pub fn retry_allowed(requests: u64, retries: u64, ratio: f64, min_per_second: u32) -> bool {
    let allowance = ratio * requests as f64 + f64::from(min_per_second) * WINDOW_SECONDS as f64;
    (retries + 1) as f64 <= allowance
}

#[derive(Debug, Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A lock-free budget shared by every request to one service: one slot per
/// second of the window, reset when its second comes round again.
#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [Slot; WINDOW_SECONDS as usize],
}

impl RetryBudget {
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW_SECONDS) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot.second.compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    fn totals(&self, now_second: u64) -> (u64, u64) {
        let oldest = now_second.saturating_sub(WINDOW_SECONDS - 1);
        self.slots.iter().filter(|s| (oldest..=now_second).contains(&s.second.load(Ordering::Acquire))).fold(
            (0, 0),
            |(req, ret), s| {
                (req + s.requests.load(Ordering::Relaxed), ret + s.retries.load(Ordering::Relaxed))
            },
        )
    }

    /// Counts an original request (not a retry).
    pub fn record_request(&self, now_second: u64) {
        self.slot(now_second).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Spends one retry if the budget allows it. The retry is claimed
    /// before the check and given back if refused, so that callers deciding
    /// at the same moment see each other's claims and never overshoot the
    /// budget together (at worst one is refused that could have passed).
    pub fn try_spend_retry(&self, now_second: u64, ratio: f64, min_per_second: u32) -> bool {
        let slot = self.slot(now_second);
        slot.retries.fetch_add(1, Ordering::AcqRel);
        let (requests, retries) = self.totals(now_second);
        // `retries` counts this claim too.
        if retry_allowed(requests, retries.saturating_sub(1), ratio, min_per_second) {
            return true;
        }
        slot.retries.fetch_sub(1, Ordering::AcqRel);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_allows_ratio_plus_reserve() {
        // (requests, retries spent, ratio, min per second, allowed)
        let table = [
            (0, 0, 0.2, 10, true),
            (0, 99, 0.2, 10, true),
            (0, 100, 0.2, 10, false),
            (1000, 299, 0.2, 10, true),
            (1000, 300, 0.2, 10, false),
            (1000, 0, 0.0, 0, false),
            (10, 9, 1.0, 0, true),
        ];
        for (requests, retries, ratio, min, want) in table {
            assert_eq!(
                retry_allowed(requests, retries, ratio, min),
                want,
                "{requests} {retries} {ratio} {min}"
            );
        }
    }

    #[test]
    fn the_window_slides() {
        let budget = RetryBudget::default();
        for _ in 0..100 {
            budget.record_request(5);
        }
        let spent = (0..1000).filter(|_| budget.try_spend_retry(5, 0.2, 1)).count();
        assert_eq!(spent, 30, "20 from the ratio and 10 from the reserve");
        // Ten seconds later the old requests and retries have left the window.
        assert!(budget.try_spend_retry(15, 0.2, 1));
        let spent_later = (0..1000).filter(|_| budget.try_spend_retry(15, 0.2, 1)).count();
        assert_eq!(spent_later, 9);
    }

    #[test]
    fn callers_at_the_same_moment_never_overshoot_together() {
        let budget = std::sync::Arc::new(RetryBudget::default());
        for _ in 0..100 {
            budget.record_request(5);
        }
        let spenders: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || (0..1000).filter(|_| budget.try_spend_retry(5, 0.2, 1)).count())
            })
            .collect();
        let spent: usize = spenders.into_iter().map(|s| s.join().unwrap()).sum();
        assert_eq!(spent, 30, "20 from the ratio and 10 from the reserve, across 8 threads");
    }
}
