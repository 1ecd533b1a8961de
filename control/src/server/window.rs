//! How long the publisher waits after a publication before the next one:
//! the publish window. A change after a quiet spell goes out at once;
//! changes within the window of a publication go out together at its end.
//! While changes come faster than one per base window the window grows, so
//! pushing to every proxy does not take all of meshd's CPU; it is back at
//! its base as soon as they come slower.

use std::time::Duration;

/// The window's bounds: `base` while changes come no faster than one per
/// base window, doubled after each publication that carried changes faster
/// than that, up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishWindow {
    pub base: Duration,
    pub max: Duration,
}

impl PublishWindow {
    /// A window that never grows.
    pub fn fixed(window: Duration) -> PublishWindow {
        PublishWindow { base: window, max: window }
    }

    /// The pause after a publication that carried `changes` changes made
    /// over `since_last` (the time since the publication before it), when
    /// the pause before it was `previous`. The rate decides, not the count:
    /// a large window gathers several changes even at a slow rate, and must
    /// not keep itself large. One change at a time (a split shifted, a lone
    /// flap) keeps the base window and its convergence.
    pub fn next(&self, previous: Duration, changes: u64, since_last: Duration) -> Duration {
        let faster_than_one_per_base = self.base.as_nanos() * u128::from(changes) > since_last.as_nanos();
        if faster_than_one_per_base {
            previous.saturating_mul(2).clamp(self.base, self.max.max(self.base))
        } else {
            self.base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_grows_while_changes_come_faster_than_one_per_base_window() {
        let ms = Duration::from_millis;
        let window = PublishWindow { base: ms(50), max: ms(400) };
        // (pause before, changes in the publication, time since the one before, pause after)
        let table = [
            (ms(50), 0, ms(50), ms(50)),
            (ms(50), 1, ms(50), ms(50)),
            (ms(50), 1, ms(60), ms(50)),
            (ms(50), 2, ms(50), ms(100)),
            (ms(100), 40, ms(100), ms(200)),
            (ms(200), 5, ms(200), ms(400)),
            (ms(400), 500, ms(400), ms(400)),
            // Four changes in 400 ms is one per 100 ms: slower than one per base window.
            (ms(400), 4, ms(400), ms(50)),
            (ms(400), 1, ms(400), ms(50)),
            // Two changes after a long quiet spell.
            (ms(50), 2, ms(5_000), ms(50)),
            (ms(0), 5, ms(1), ms(50)),
        ];
        for (previous, changes, since_last, expected) in table {
            assert_eq!(
                window.next(previous, changes, since_last),
                expected,
                "{previous:?} after {changes} changes in {since_last:?}"
            );
        }
        let fixed = PublishWindow::fixed(ms(50));
        assert_eq!(fixed.next(ms(50), 100, ms(50)), ms(50), "a fixed window never grows");
        let inverted = PublishWindow { base: ms(50), max: ms(10) };
        assert_eq!(inverted.next(ms(50), 100, ms(50)), ms(50), "a max below the base is the base");
    }
}
