//! Time as the data path sees it: arrival times in whole unix seconds, and the buckets they
//! fall in (a bucket is named by its start, a multiple of its length since the epoch).
//!
//! Two clocks. The pipeline's clock ([`data_now`]) is the wall clock as it was when whippet
//! started, carried forward by the monotonic clock: it runs at the wall clock's rate (NTP
//! slews both) but never steps. Arrival times, buckets and the flusher's schedule use it, so
//! a step of the wall clock neither silences the output nor merges buckets. Stamps use the
//! wall clock: at each flush a bucket is stamped [`wall_offset`] from its start, the
//! difference between the two clocks rounded to whole buckets.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The current unix time in seconds (0 before 1970, which no real clock reports).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The wall clock and the monotonic clock at the pipeline clock's first reading.
fn anchor() -> &'static (Instant, Duration) {
    static ANCHOR: OnceLock<(Instant, Duration)> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (Instant::now(), wall)
    })
}

/// Now on the pipeline's clock, precisely.
pub fn data_time() -> Duration {
    let (at, wall) = anchor();
    *wall + at.elapsed()
}

/// Now on the pipeline's clock, in whole seconds.
pub fn data_now() -> i64 {
    data_time().as_secs() as i64
}

/// Wall-clock seconds minus pipeline seconds, now, to the nearest second: 0 until the wall
/// clock steps.
pub fn wall_drift() -> i64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    (wall - data_time().as_secs_f64()).round() as i64
}

/// [`wall_drift`] rounded to whole buckets of `interval` seconds: what moves a bucket's
/// start on the pipeline's clock to its stamp, keeping stamps on bucket boundaries.
pub fn wall_offset(interval: i64) -> i64 {
    let drift = wall_drift();
    let interval = interval.max(1);
    (drift + interval / 2).div_euclid(interval) * interval
}

/// The start of the bucket of `interval` seconds that `t` falls in.
pub(crate) fn bucket_start(t: i64, interval: i64) -> i64 {
    t - t.rem_euclid(interval)
}

/// The first bucket boundary after `t`: where the bucket holding `t` closes.
pub(crate) fn next_boundary(t: i64, interval: i64) -> i64 {
    bucket_start(t, interval) + interval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_clock_starts_at_the_wall_clock_and_offsets_round_to_buckets() {
        let (wall, data) = (unix_now(), data_now());
        assert!((wall - data).abs() <= 1, "{wall} {data}");
        assert_eq!(wall_drift(), 0);
        assert_eq!(wall_offset(10), 0);
    }

    #[test]
    fn buckets_start_at_multiples_of_their_length_even_before_the_epoch() {
        let cases = [
            (1_700_000_005, 10, 1_700_000_000, 1_700_000_010),
            (1_700_000_010, 10, 1_700_000_010, 1_700_000_020),
            (59, 60, 0, 60),
            (-1, 10, -10, 0),
        ];
        for (t, interval, start, next) in cases {
            assert_eq!(bucket_start(t, interval), start, "{t}");
            assert_eq!(next_boundary(t, interval), next, "{t}");
        }
    }
}
