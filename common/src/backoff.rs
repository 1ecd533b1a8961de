//! Reconnection backoff: doubling pauses up to a cap, with full jitter so
//! that clients cut off together do not all come back together.

use std::time::Duration;

use rand::Rng;

/// `first` × 2^`failures`, at most `cap`: the pause after that many
/// failures in a row.
pub fn doubled(failures: u32, first: Duration, cap: Duration) -> Duration {
    let factor = 1u32.checked_shl(failures).unwrap_or(u32::MAX);
    first.saturating_mul(factor).min(cap)
}

/// The pause before the next try of something that keeps failing.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// Pauses start at `first` and double up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff { first, cap, failures: 0 }
    }

    /// The pause before the next try: a uniform draw in `0..=bound`
    /// (full jitter); the bound then doubles, up to the cap.
    pub fn jittered(&mut self, rng: &mut impl Rng) -> Duration {
        rng.random_range(Duration::ZERO..=self.plain())
    }

    /// The pause before the next try without jitter: the bound, which then
    /// doubles. For one client alone (a certificate request).
    pub fn plain(&mut self) -> Duration {
        let pause = doubled(self.failures, self.first, self.cap);
        self.failures = self.failures.saturating_add(1);
        pause
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn doubling_stops_at_the_cap() {
        let (first, cap) = (Duration::from_millis(250), Duration::from_secs(8));
        // (failures so far, expected pause in ms)
        let table = [(0, 250), (1, 500), (2, 1000), (4, 4000), (5, 8000), (6, 8000), (40, 8000)];
        for (failures, ms) in table {
            assert_eq!(doubled(failures, first, cap), Duration::from_millis(ms), "after {failures}");
        }
    }

    #[test]
    fn pauses_double_to_the_cap_and_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let plain: Vec<Duration> = (0..5).map(|_| backoff.plain()).collect();
        assert_eq!(plain, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.plain(), ms(100));
    }

    #[test]
    fn jittered_pauses_stay_under_the_current_bound() {
        let ms = Duration::from_millis;
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(ms(100), ms(400));
        // (bound of the nth pause)
        for bound in [ms(100), ms(200), ms(400), ms(400), ms(400)] {
            let pause = backoff.jittered(&mut rng);
            assert!(pause <= bound, "{pause:?} > {bound:?}");
        }
        // Over many draws at the cap, pauses spread over the whole range.
        let draws: Vec<Duration> = (0..200).map(|_| backoff.jittered(&mut rng)).collect();
        assert!(draws.iter().any(|d| *d < ms(100)) && draws.iter().any(|d| *d > ms(300)));
    }
}
