//! A monotonic clock as plain numbers, so that lock-free state can store
//! times in atomics and pure logic can be tested with made-up times.

use std::sync::OnceLock;
use std::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the first call in this process.
pub fn now_nanos() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// The instant of a `now_nanos` reading.
pub fn instant_of(nanos: u64) -> Instant {
    base() + std::time::Duration::from_nanos(nanos)
}

/// Milliseconds since the first call in this process, never 0 so that 0
/// can mean "no time set" in packed state.
pub fn now_millis() -> u64 {
    millis_of(now_nanos())
}

/// The millisecond reading that goes with a nanosecond one, so one clock
/// read serves both.
pub fn millis_of(nanos: u64) -> u64 {
    nanos / 1_000_000 + 1
}

/// Wall-clock milliseconds since the Unix epoch, for certificate lifetimes
/// (which the control plane states in wall-clock time).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
