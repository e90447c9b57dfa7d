//! The Agent-compatible DDSketch that distributions (`|d`) aggregate into, bit-exact with the
//! Datadog Agent's `pkg/quantile` (docs/behaviour.md, "Distributions"): the backend decodes
//! keys with fixed constants.
//!
//! - relative accuracy ε = 1/128, γ = 1 + 2ε, smallest value 1e-9, bias 1338;
//! - bins `{key: i16, count: u16}` sorted by key, at most [`BIN_LIMIT`]; a count past 65535
//!   continues in another bin with the same key; past the limit the lowest keys collapse into
//!   the lowest bin kept (what no longer fits in that bin is lost from the bins, never from the
//!   summary);
//! - inserts of weight 1 are buffered (`BUFFER_CAP` keys) and merged in sorted batches, the
//!   way the Agent does, so that trimming happens at the same moments and gives the same bins.

use std::sync::LazyLock;

/// Most bins a sketch keeps.
pub const BIN_LIMIT: usize = 4096;
/// Largest count one bin holds.
const MAX_BIN_WIDTH: u64 = u16::MAX as u64;
/// Keys above this saturate to [`INF_KEY`].
const MAX_KEY: i64 = 32766;
const INF_KEY: i16 = 32767;
/// Weight-1 inserts buffered before a merge (the Agent's `agentBufCap`).
const BUFFER_CAP: usize = 512;

struct Params {
    /// ln γ, computed as `ln_1p(2ε)` like the Agent for precision near 1.
    ln_gamma: f64,
    /// Bias making key(min) == 1.
    bias: i64,
    /// γ^(1-bias): below this (in magnitude) a value has key 0.
    min: f64,
}

static PARAMS: LazyLock<Params> = LazyLock::new(|| {
    let eps = 2.0 / 128.0;
    let gamma = 1.0 + eps;
    let ln_gamma = f64::ln_1p(eps);
    let emin = (1e-9f64.ln() / ln_gamma).floor() as i64;
    let bias = 1 - emin;
    let min = gamma.powf((1 - bias) as f64);
    Params {
        ln_gamma,
        bias,
        min,
    }
});

/// The sketch key of `v`. `v` must be finite; the parser guarantees it.
pub fn key(v: f64) -> i16 {
    if v < 0.0 {
        return -key(-v);
    }
    let p = &*PARAMS;
    if v == 0.0 || v < p.min {
        return 0;
    }
    let i = (v.ln() / p.ln_gamma).round_ties_even() as i64 + p.bias;
    if i > MAX_KEY {
        INF_KEY
    } else if i < 1 {
        1
    } else {
        i as i16
    }
}

/// One bin: how many values fell on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bin {
    pub k: i16,
    pub n: u16,
}

/// Count, min, max, sum and average of what was inserted, updated exactly as the Agent's
/// `summary.Summary` does (incremental average included), so the floats match bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub avg: f64,
}

impl Summary {
    fn insert(&mut self, v: f64) {
        if v > self.max || self.count == 0 {
            self.max = v;
        }
        if v < self.min || self.count == 0 {
            self.min = v;
        }
        self.count += 1;
        self.sum += v;
        self.avg += (v - self.avg) / self.count as f64;
    }

    /// `n` copies of `v`; `n` is `1/rate`, not truncated for the sum.
    fn insert_n(&mut self, v: f64, n: f64) {
        self.merge(Summary {
            count: n as i64,
            sum: n * v,
            min: v,
            max: v,
            avg: v,
        });
    }

    fn merge(&mut self, o: Summary) {
        if self.count == 0 {
            *self = o;
            return;
        }
        if o.count == 0 {
            return;
        }
        if o.max > self.max {
            self.max = o.max;
        }
        if o.min < self.min {
            self.min = o.min;
        }
        self.count = self.count.saturating_add(o.count);
        self.sum += o.sum;
        self.avg += (o.avg - self.avg) * o.count as f64 / self.count as f64;
    }
}

/// A distribution's sketch for one bucket.
#[derive(Debug, Clone, Default)]
pub struct Sketch {
    bins: Vec<Bin>,
    summary: Summary,
    /// Keys of weight-1 inserts not merged yet.
    pending: Vec<i16>,
}

impl Sketch {
    /// Inserts `v` seen at `sample_rate`: weight `floor(1/rate)` into the bins and the count,
    /// `v/rate` into the sum. A rate outside (0, 1] counts as 1.
    pub fn insert(&mut self, v: f64, sample_rate: f64) {
        let k = key(v);
        if sample_rate > 0.0 && sample_rate < 1.0 {
            let n = 1.0 / sample_rate;
            self.summary.insert_n(v, n);
            self.merge_pending();
            // `as u64` truncates (floor) and saturates for absurdly small rates.
            let n = n as u64;
            if !self.add_in_place(k, n) {
                self.merge_runs(&[(k, n)]);
            }
            return;
        }
        self.summary.insert(v);
        self.pending.push(k);
        if self.pending.len() >= BUFFER_CAP {
            self.merge_pending();
        }
    }

    /// Heap bytes held (bins and buffer, by capacity): at most about 17 KiB, as bins are
    /// limited to [`BIN_LIMIT`] and the buffer to 512 keys.
    pub fn heap_bytes(&self) -> usize {
        self.bins.capacity() * std::mem::size_of::<Bin>()
            + self.pending.capacity() * std::mem::size_of::<i16>()
    }

    /// Whether one more insert may allocate.
    pub fn may_grow(&self) -> bool {
        self.pending.len() == self.pending.capacity() || self.bins.len() == self.bins.capacity()
    }

    /// Merges buffered inserts; call before reading the bins.
    pub fn finish(&mut self) {
        self.merge_pending();
        self.pending = Vec::new();
    }

    pub fn is_empty(&self) -> bool {
        self.summary.count == 0
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// The bins, sorted by key. Only complete after [`Sketch::finish`].
    pub fn bins(&self) -> &[Bin] {
        &self.bins
    }

    fn merge_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut keys = std::mem::take(&mut self.pending);
        keys.sort_unstable();
        let mut runs: Vec<(i16, u64)> = Vec::with_capacity(keys.len());
        for &k in &keys {
            match runs.last_mut() {
                Some((last, n)) if *last == k => *n += 1,
                _ => runs.push((k, 1)),
            }
        }
        self.merge_runs(&runs);
        keys.clear();
        self.pending = keys;
    }

    /// Adds `n` at key `k` without rebuilding the bins, when the result cannot reach the bin
    /// limit (so no trimming could change it): the same bins [`Sketch::merge_runs`] would lay
    /// out, at O(log bins) plus a memmove instead of O(bins). Returns false when it declines.
    fn add_in_place(&mut self, k: i16, n: u64) -> bool {
        let at = self.bins.partition_point(|b| b.k < k);
        let existing = self.bins.get(at).filter(|b| b.k == k).map(|b| b.n as u64);
        let total = existing.unwrap_or(0).saturating_add(n);
        let added = bins_for(total) - u64::from(existing.is_some());
        if self.bins.len() as u64 + added > BIN_LIMIT as u64 {
            return false;
        }
        let mut run = Vec::new();
        append_run(&mut run, k, total);
        let replace = if existing.is_some() {
            at..at + 1
        } else {
            at..at
        };
        self.bins.splice(replace, run);
        true
    }

    /// Merges `new` (sorted by key, one entry a key) into the bins. The first bin of a key
    /// absorbs the new count; the result is laid out as the Agent's `appendSafe` + `trimLeft`
    /// would, without ever materialising bins that trimming would drop.
    fn merge_runs(&mut self, new: &[(i16, u64)]) {
        let mut runs: Vec<(i16, u64)> = Vec::with_capacity(self.bins.len() + new.len());
        let mut j = 0;
        for b in &self.bins {
            while j < new.len() && new[j].0 < b.k {
                runs.push(new[j]);
                j += 1;
            }
            if j < new.len() && new[j].0 == b.k {
                // Only the first bin of a key absorbs; later bins of that key stay as they are.
                runs.push((b.k, (b.n as u64).saturating_add(new[j].1)));
                j += 1;
            } else {
                runs.push((b.k, b.n as u64));
            }
        }
        runs.extend_from_slice(&new[j..]);
        self.bins = lay_out(&runs, BIN_LIMIT);
    }
}

/// How many bins `appendSafe` gives a run of `n`.
fn bins_for(n: u64) -> u64 {
    n.div_ceil(MAX_BIN_WIDTH).max(1)
}

/// Lays out runs (sorted by key) as bins: a run of more than 65535 becomes a partial bin then
/// full ones; past `limit` bins the lowest collapse into the lowest bin kept, which saturates.
fn lay_out(runs: &[(i16, u64)], limit: usize) -> Vec<Bin> {
    // Walk down from the highest run while whole runs still fit.
    let mut keep = limit as u64;
    let mut first = runs.len();
    while first > 0 {
        let b = bins_for(runs[first - 1].1);
        if b > keep {
            break;
        }
        keep -= b;
        first -= 1;
    }
    let mut out = Vec::with_capacity(limit.min(runs.len() + 8));
    if first == 0 {
        for &(k, n) in runs {
            append_run(&mut out, k, n);
        }
        return out;
    }
    // runs[first-1] keeps its `keep` highest bins (full ones); it and everything below
    // collapse into the lowest bin kept.
    let (k, n) = runs[first - 1];
    let mut missing = runs[..first - 1]
        .iter()
        .fold(0u64, |acc, &(_, n)| acc.saturating_add(n));
    missing = missing.saturating_add(n - keep * MAX_BIN_WIDTH);
    for _ in 0..keep {
        out.push(Bin {
            k,
            n: MAX_BIN_WIDTH as u16,
        });
    }
    for &(k, n) in &runs[first..] {
        append_run(&mut out, k, n);
    }
    if let Some(lowest) = out.first_mut() {
        lowest.n = (lowest.n as u64).saturating_add(missing).min(MAX_BIN_WIDTH) as u16;
    }
    out
}

/// `appendSafe`: the remainder bin first, then full bins.
fn append_run(out: &mut Vec<Bin>, k: i16, n: u64) {
    if n <= MAX_BIN_WIDTH {
        out.push(Bin { k, n: n as u16 });
        return;
    }
    let rem = n % MAX_BIN_WIDTH;
    if rem != 0 {
        out.push(Bin { k, n: rem as u16 });
    }
    for _ in 0..n / MAX_BIN_WIDTH {
        out.push(Bin {
            k,
            n: MAX_BIN_WIDTH as u16,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constants_match_the_agent() {
        assert_eq!(PARAMS.bias, 1338);
        assert_eq!(key(PARAMS.min), 1);
    }

    #[test]
    fn keys_match_the_spec_examples() {
        let cases = [
            (1.0, 1338),
            (10.0, 1487),
            (100.0, 1635),
            (0.5, 1293),
            (1e6, 2229),
            (0.0, 0),
            (-1.0, -1338),
        ];
        for (v, k) in cases {
            assert_eq!(key(v), k, "key({v})");
        }
    }

    #[test]
    fn keys_match_the_shared_vectors() {
        let csv = include_str!("../tests/data/sketch_keys.csv");
        let mut checked = 0;
        for line in csv.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (v, k) = line.split_once(',').unwrap();
            let v: f64 = v.parse().unwrap();
            let k: i16 = k.parse().unwrap();
            assert_eq!(key(v), k, "key({v})");
            checked += 1;
        }
        assert_eq!(checked, 46);
    }

    #[test]
    fn the_summary_sees_each_value_and_the_bins_count_them() {
        let mut s = Sketch::default();
        for v in [1.0, 10.0, 10.0, 100.0] {
            s.insert(v, 1.0);
        }
        s.finish();
        let sum = s.summary();
        assert_eq!(sum.count, 4);
        assert_eq!(sum.min, 1.0);
        assert_eq!(sum.max, 100.0);
        assert_eq!(sum.sum, 121.0);
        assert_eq!(sum.avg, 30.25);
        assert_eq!(
            s.bins(),
            &[
                Bin { k: 1338, n: 1 },
                Bin { k: 1487, n: 2 },
                Bin { k: 1635, n: 1 }
            ]
        );
    }

    #[test]
    fn a_sample_rate_inserts_floor_of_its_inverse_and_sums_the_untruncated_weight() {
        let mut s = Sketch::default();
        s.insert(2.0, 0.3); // 1/0.3 = 3.333…: weight 3 in the bins and count
        s.finish();
        let sum = s.summary();
        assert_eq!(sum.count, 3);
        assert_eq!(sum.sum, 2.0 * (1.0 / 0.3));
        assert_eq!(sum.min, 2.0);
        assert_eq!(sum.max, 2.0);
        assert_eq!(sum.avg, 2.0);
        assert_eq!(s.bins(), &[Bin { k: key(2.0), n: 3 }]);
    }

    #[test]
    fn an_invalid_sample_rate_counts_as_one() {
        for rate in [0.0, -1.0, 2.0, f64::NAN] {
            let mut s = Sketch::default();
            s.insert(5.0, rate);
            s.finish();
            assert_eq!(s.summary().count, 1, "rate {rate}");
            assert_eq!(s.bins(), &[Bin { k: key(5.0), n: 1 }]);
        }
    }

    #[test]
    fn the_summary_average_is_incremental_like_the_agent() {
        // Agent: avg += (v - avg) / cnt; a plain sum/count differs in the last bits here.
        let mut s = Sketch::default();
        let mut avg = 0.0f64;
        for (i, v) in [0.1, 0.2, 0.3, 1e10, 7.7].iter().enumerate() {
            s.insert(*v, 1.0);
            avg += (v - avg) / (i + 1) as f64;
        }
        assert_eq!(s.summary().avg.to_bits(), avg.to_bits());
    }

    #[test]
    fn counts_past_65535_continue_in_bins_with_the_same_key() {
        let mut s = Sketch::default();
        s.insert(1.0, 1.0 / 70000.0);
        s.insert(1.0, 1.0 / 70000.0);
        s.finish();
        // 140000 = 8930 + 2 × 65535: the remainder first, then full bins.
        let k = key(1.0);
        assert_eq!(
            s.bins(),
            &[Bin { k, n: 8930 }, Bin { k, n: 65535 }, Bin { k, n: 65535 }]
        );
    }

    #[test]
    fn past_the_bin_limit_the_lowest_keys_collapse_into_the_lowest_kept() {
        let mut s = Sketch::default();
        // 4100 distinct keys, one value each: 4 too many.
        let values: Vec<f64> = (0..4100).map(|i| 1.015625f64.powi(i)).collect();
        let keys: Vec<i16> = values.iter().map(|&v| key(v)).collect();
        let mut distinct = keys.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 4100);
        for v in &values {
            s.insert(*v, 1.0);
        }
        s.finish();
        assert_eq!(s.bins().len(), BIN_LIMIT);
        assert_eq!(s.bins()[0], Bin { k: keys[4], n: 5 });
        assert_eq!(s.bins()[1], Bin { k: keys[5], n: 1 });
        assert_eq!(s.bins().iter().map(|b| b.n as u64).sum::<u64>(), 4100);
        assert_eq!(s.summary().count, 4100);
    }

    #[test]
    fn a_vanishing_sample_rate_cannot_allocate_without_bound() {
        let mut s = Sketch::default();
        s.insert(3.0, 1e-300);
        s.insert(4.0, 1e-300);
        s.finish();
        assert_eq!(s.bins().len(), BIN_LIMIT);
        assert!(s.bins().iter().all(|b| b.n == u16::MAX));
    }

    #[test]
    fn in_place_adds_give_the_same_bins_as_a_full_merge() {
        // Sampled inserts take the in-place path until the limit is near, then the full
        // merge; a reference sketch always merges fully.
        let mut fast = Sketch::default();
        let mut reference = Sketch::default();
        let mut rng = crate::blast::Rng::new(0x9e37_79b9_7f4a_7c15);
        for i in 0..20_000 {
            let v = rng.below(1_000_000) as f64 / 7.0 - 50_000.0;
            let rate = [0.5, 0.01, 1.0, 1e-6][i % 4];
            fast.insert(v, rate);
            if rate > 0.0 && rate < 1.0 {
                reference.merge_pending();
                reference.merge_runs(&[(key(v), (1.0 / rate) as u64)]);
                reference.summary.insert_n(v, 1.0 / rate);
            } else {
                reference.insert(v, rate);
            }
        }
        fast.finish();
        reference.finish();
        assert_eq!(fast.bins(), reference.bins());
        assert_eq!(fast.summary(), reference.summary());
        assert!(fast.bins().len() > 1000);
    }

    #[test]
    fn lay_out_matches_append_safe_then_trim_left() {
        // Reference: lay out every bin, then trim from the left, the Agent's straightforward way.
        fn reference(runs: &[(i16, u64)], limit: usize) -> Vec<Bin> {
            let mut all = Vec::new();
            for &(k, n) in runs {
                append_run(&mut all, k, n);
            }
            if all.len() <= limit {
                return all;
            }
            let remove = all.len() - limit;
            let missing: u64 = all[..remove].iter().map(|b| b.n as u64).sum();
            let mut kept = all[remove..].to_vec();
            kept[0].n = (kept[0].n as u64 + missing).min(MAX_BIN_WIDTH) as u16;
            kept
        }
        let cases: Vec<Vec<(i16, u64)>> = vec![
            vec![(1, 3), (2, 70000), (5, 1), (9, 200000)],
            vec![(1, 65535), (2, 65536), (3, 131070)],
            vec![(-3, 10), (0, 5), (4, 1)],
            (0..20).map(|i| (i as i16, 1 + i as u64 * 40000)).collect(),
        ];
        for runs in cases {
            for limit in [1, 2, 3, 5, 8, 13, 4096] {
                assert_eq!(
                    lay_out(&runs, limit),
                    reference(&runs, limit),
                    "{runs:?} {limit}"
                );
            }
        }
    }
}
