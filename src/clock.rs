//! Time as the data path sees it: arrival times in whole unix seconds, and the buckets they
//! fall in (a bucket is named by its start, a multiple of its length since the epoch).

use std::time::{SystemTime, UNIX_EPOCH};

/// The current unix time in seconds (0 before 1970, which no real clock reports).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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
