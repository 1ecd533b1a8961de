//! How long the publisher waits after a publication before the next one:
//! the publish window. A change after a quiet spell goes out at once;
//! changes within the window of a publication go out together at its end.
//! Under sustained churn the window grows, so pushing to every proxy does
//! not take all of meshd's CPU; it shrinks back as soon as churn stops.

use std::time::Duration;

/// The window's bounds: `base` after a publication that carried one
/// change, doubled after each that carried several, up to `max`.
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

    /// The pause after a publication that carried `changes` changes, when
    /// the pause before it was `previous`. One change at a time (a split
    /// shifted, a lone flap) keeps the base window and its convergence.
    pub fn next(&self, previous: Duration, changes: u64) -> Duration {
        if changes > 1 {
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
    fn the_window_grows_under_churn_and_shrinks_when_changes_come_alone() {
        let ms = Duration::from_millis;
        let window = PublishWindow { base: ms(50), max: ms(400) };
        // (pause before, changes in the publication, pause after)
        let table = [
            (ms(50), 0, ms(50)),
            (ms(50), 1, ms(50)),
            (ms(50), 2, ms(100)),
            (ms(100), 40, ms(200)),
            (ms(200), 3, ms(400)),
            (ms(400), 500, ms(400)),
            (ms(400), 1, ms(50)),
            (ms(0), 5, ms(50)),
        ];
        for (previous, changes, expected) in table {
            assert_eq!(window.next(previous, changes), expected, "{previous:?} after {changes} changes");
        }
        let fixed = PublishWindow::fixed(ms(50));
        assert_eq!(fixed.next(ms(50), 100), ms(50), "a fixed window never grows");
        let inverted = PublishWindow { base: ms(50), max: ms(10) };
        assert_eq!(inverted.next(ms(50), 100), ms(50), "a max below the base is the base");
    }
}
