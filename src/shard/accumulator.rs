//! Accumulators: what one context collects during one bucket, per metric type
//! (docs/behaviour.md, "What each type emits").
//! Arithmetic mirrors the Agent's (`v * (1/rate)`, truncated weights) so values match exactly.

use std::collections::HashSet;

use crate::parser::MetricKind;
use crate::sketch::Sketch;

/// Set members are stored as 64-bit hashes: a bucket of a million distinct members costs
/// 8 MB instead of a string each, and a collision needs ~4·10⁹ members to become likely.
pub(crate) type MemberSet = HashSet<u64, foldhash::fast::FixedState>;

/// Samples of a histogram or timer in one bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// (value, weight = floor(1/rate)).
    pub samples: Vec<(f64, i64)>,
    /// Σ value·(1/rate).
    pub sum: f64,
    /// Σ weight.
    pub count: i64,
}

/// One context's data for one bucket. Small (16 bytes) because a context holds one inline:
/// the big variants are boxed.
#[derive(Debug, Clone)]
pub enum Accumulator {
    /// Σ value·(1/rate) of a counter.
    Count(f64),
    /// Last value of a gauge.
    Gauge(f64),
    Set(Box<MemberSet>),
    Histogram(Box<Histogram>),
    Distribution(Box<Sketch>),
}

impl Accumulator {
    pub fn new(kind: MetricKind) -> Accumulator {
        match kind {
            MetricKind::Count => Accumulator::Count(0.0),
            MetricKind::Gauge => Accumulator::Gauge(0.0),
            MetricKind::Set => Accumulator::Set(Box::default()),
            MetricKind::Histogram | MetricKind::Timer => Accumulator::Histogram(Box::default()),
            MetricKind::Distribution => Accumulator::Distribution(Box::default()),
        }
    }

    /// Adds a numeric value seen at `rate` (in (0, 1]).
    pub(crate) fn add(&mut self, v: f64, rate: f64) {
        match self {
            Accumulator::Count(sum) => *sum += v * (1.0 / rate),
            Accumulator::Gauge(last) => *last = v,
            Accumulator::Histogram(h) => {
                let weight = (1.0 / rate) as i64;
                h.samples.push((v, weight));
                h.sum += v * (1.0 / rate);
                h.count = h.count.saturating_add(weight);
            }
            Accumulator::Distribution(s) => s.insert(v, rate),
            // A numeric value cannot reach a set: the parser gives sets a member.
            Accumulator::Set(_) => {}
        }
    }

    /// Heap bytes that grow with samples: a histogram's samples, a set's members, a sketch's
    /// bins and buffer (by capacity, as allocated).
    pub fn sample_bytes(&self) -> usize {
        match self {
            Accumulator::Count(_) | Accumulator::Gauge(_) => 0,
            // hashbrown: a u64 and a control byte per bucket, 8 buckets for 7 members.
            Accumulator::Set(set) => set.capacity() * 11,
            Accumulator::Histogram(h) => h.samples.capacity() * std::mem::size_of::<(f64, i64)>(),
            Accumulator::Distribution(s) => s.heap_bytes(),
        }
    }

    /// Whether one more sample may allocate.
    pub fn full(&self) -> bool {
        match self {
            Accumulator::Count(_) | Accumulator::Gauge(_) => false,
            Accumulator::Set(set) => set.len() >= set.capacity(),
            Accumulator::Histogram(h) => h.samples.len() == h.samples.capacity(),
            Accumulator::Distribution(s) => s.may_grow(),
        }
    }

    /// Adds a set member, by hash.
    pub(crate) fn add_member(&mut self, member_hash: u64) {
        if let Accumulator::Set(set) = self {
            set.insert(member_hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_sums_value_over_rate() {
        let mut a = Accumulator::new(MetricKind::Count);
        a.add(1.0, 1.0);
        a.add(2.0, 0.5);
        a.add(3.0, 0.1);
        let Accumulator::Count(sum) = a else { panic!() };
        assert_eq!(sum, 1.0 + 2.0 * (1.0 / 0.5) + 3.0 * (1.0 / 0.1));
    }

    #[test]
    fn a_gauge_keeps_the_last_value() {
        let mut a = Accumulator::new(MetricKind::Gauge);
        for v in [3.0, -1.0, 7.5] {
            a.add(v, 1.0);
        }
        let Accumulator::Gauge(last) = a else {
            panic!()
        };
        assert_eq!(last, 7.5);
    }

    #[test]
    fn a_histogram_weighs_samples_by_truncated_inverse_rate() {
        let mut a = Accumulator::new(MetricKind::Timer);
        a.add(10.0, 1.0);
        a.add(20.0, 0.3);
        let Accumulator::Histogram(h) = a else {
            panic!()
        };
        assert_eq!(h.samples, [(10.0, 1), (20.0, 3)]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum, 10.0 + 20.0 * (1.0 / 0.3));
    }

    #[test]
    fn a_set_counts_distinct_members() {
        let mut a = Accumulator::new(MetricKind::Set);
        for h in [1, 2, 2, 3, 1] {
            a.add_member(h);
        }
        let Accumulator::Set(s) = a else { panic!() };
        assert_eq!(s.len(), 3);
    }
}
