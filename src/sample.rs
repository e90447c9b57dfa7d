//! Samples: one value of one metric message, with its context already hashed, on its way from
//! a worker to the shard that owns the context.

use crate::parser::MetricKind;

/// What a sample adds to its context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleValue<'a> {
    Number(f64),
    /// A set member, opaque.
    Member(&'a str),
}

/// One sample, borrowing from the packet it came in. The tags are a range into the worker's
/// tag arena for the packet (sorted, de-duplicated, extra tags included, `host:` removed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Hash of the context (name, host, tags, kind); computed once by the worker.
    pub hash: u64,
    pub name: &'a str,
    /// Empty means no host.
    pub host: &'a str,
    pub tags: (u32, u32),
    pub kind: MetricKind,
    pub value: SampleValue<'a>,
    /// In (0, 1].
    pub sample_rate: f64,
    /// `|T`: the sample bypasses buckets (gauges and counts only; SPEC §3.4).
    pub timestamp: Option<i64>,
    /// Start of the bucket of its arrival time.
    pub bucket: i64,
}
