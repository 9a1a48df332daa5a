//! pgswitch's clock for the data path: monotonic time as plain microseconds.
//!
//! Every transaction stamps its start and its end (latency histograms, a server's last use,
//! the failover controller's evidence that a node answers). Integer microseconds read straight
//! from the clock cost a few instructions; `Instant` arithmetic (`duration_since`, then a
//! conversion to seconds) cost a few hundred per transaction.

use std::sync::OnceLock;
use std::time::Instant;

/// When the clock started, as an `Instant` and in raw clock microseconds.
fn start() -> &'static (Instant, u64) {
    static START: OnceLock<(Instant, u64)> = OnceLock::new();
    START.get_or_init(|| (Instant::now(), raw_micros()))
}

/// The monotonic clock `Instant` reads on Linux (CLOCK_MONOTONIC), in microseconds.
#[cfg(target_os = "linux")]
fn raw_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

/// Elsewhere `Instant` may read another clock: go through it.
#[cfg(not(target_os = "linux"))]
fn raw_micros() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX / 2)
}

/// Now, as 1 + microseconds since the clock started (its first use): a monotonic time that
/// fits in an atomic, where 0 means "never".
pub fn now_micros() -> u64 {
    raw_micros().saturating_sub(start().1).saturating_add(1)
}

/// `at` on the same scale as [`now_micros`]. Instants before the start read as 1.
pub fn micros(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(start().0).as_micros())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// The `Instant` of a [`now_micros`] stamp (the inverse of [`micros`]).
pub fn instant(micros: u64) -> Instant {
    start().0 + std::time::Duration::from_micros(micros.saturating_sub(1))
}

/// Seconds from `from` to `to` (both [`now_micros`] stamps), 0 if `to` is earlier.
pub fn seconds_between(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

/// A duration in microseconds, saturating.
pub fn duration_micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn instants_and_raw_readings_share_one_scale() {
        let before = micros(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        let raw = now_micros();
        std::thread::sleep(Duration::from_millis(5));
        let after = micros(Instant::now());
        assert!(before < raw && raw < after, "{before} < {raw} < {after}");
        assert!(
            raw - before >= 5_000,
            "a 5 ms sleep reads as {} µs",
            raw - before
        );
        assert!(now_micros() >= 1, "0 is kept for never");
        assert_eq!(seconds_between(2_000_000, 1_000_000), 0.0);
        assert_eq!(seconds_between(1_000_000, 3_500_000), 2.5);
    }
}
