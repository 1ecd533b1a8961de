//! Choosing where a request goes: a weighted pick among versions, then
//! power-of-two-choices over peak-EWMA cost inside the version, skipping
//! endpoints that are not ready or are ejected by their breaker.
//!
//! These functions are pure over indices and closures, so they are tested
//! with tables and a seeded RNG; the snapshot supplies the real endpoints.

pub mod breaker;
pub mod ewma;

use rand::Rng;

/// Picks an index with probability proportional to its weight, among the
/// indices `usable` accepts. Unusable entries give their share to the rest,
/// so a version without a healthy endpoint fails over instead of failing.
pub fn pick_weighted(weights: &[u32], usable: impl Fn(usize) -> bool, rng: &mut impl Rng) -> Option<usize> {
    let total: u64 = weights.iter().enumerate().filter(|(i, _)| usable(*i)).map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = rng.random_range(0..total);
    for (index, weight) in weights.iter().enumerate() {
        if !usable(index) {
            continue;
        }
        let weight = u64::from(*weight);
        if roll < weight {
            return Some(index);
        }
        roll -= weight;
    }
    None
}

/// Power of two choices: draws two distinct eligible indices at random and
/// keeps the cheaper. With one eligible index it is that one.
pub fn pick_p2c(
    count: usize,
    eligible: impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> f64,
    rng: &mut impl Rng,
) -> Option<usize> {
    let eligible_count = (0..count).filter(|i| eligible(*i)).count();
    let nth_eligible = |n: usize| (0..count).filter(|i| eligible(*i)).nth(n);
    match eligible_count {
        0 => None,
        1 => nth_eligible(0),
        _ => {
            let first = rng.random_range(0..eligible_count);
            let mut second = rng.random_range(0..eligible_count - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (nth_eligible(first)?, nth_eligible(second)?);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn weighted_pick_follows_weights_and_skips_unusable() {
        // (weights, usable mask, expected share of each index in percent)
        let table: &[(&[u32], &[bool], &[f64])] = &[
            (&[90, 10], &[true, true], &[90.0, 10.0]),
            (&[50, 50], &[true, true], &[50.0, 50.0]),
            (&[90, 10], &[false, true], &[0.0, 100.0]),
            (&[0, 100], &[true, true], &[0.0, 100.0]),
            (&[1, 1, 2], &[true, true, true], &[25.0, 25.0, 50.0]),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for (weights, usable, expected) in table {
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..20_000 {
                let i = pick_weighted(weights, |i| usable[i], &mut rng).unwrap();
                counts[i] += 1;
            }
            for (i, want) in expected.iter().enumerate() {
                let got = f64::from(counts[i]) / 200.0;
                assert!(
                    (got - want).abs() < 1.5,
                    "{weights:?} {usable:?}: index {i} got {got}%, want {want}%"
                );
            }
        }
        assert_eq!(pick_weighted(&[5, 5], |_| false, &mut rng), None);
        assert_eq!(pick_weighted(&[0, 0], |_| true, &mut rng), None);
    }

    #[test]
    fn p2c_prefers_the_cheaper_of_two_and_skips_ineligible() {
        let mut rng = StdRng::seed_from_u64(11);
        // Three endpoints; index 2 is fifty times as expensive.
        let costs = [1.0, 1.0, 50.0];
        let mut counts = [0u32; 3];
        for _ in 0..3_000 {
            counts[pick_p2c(3, |_| true, |i| costs[i], &mut rng).unwrap()] += 1;
        }
        // The expensive one only wins when drawn against itself, which P2C never does.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > 1_000 && counts[1] > 1_000, "{counts:?}");

        // (count, eligible mask, expected pick) where the answer is forced.
        let table: &[(usize, &[bool], Option<usize>)] =
            &[(3, &[false, false, true], Some(2)), (2, &[false, false], None), (0, &[], None)];
        for (count, mask, want) in table {
            assert_eq!(pick_p2c(*count, |i| mask[i], |_| 1.0, &mut rng), *want, "{mask:?}");
        }
    }
}
