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

/// One sample, borrowing from the packet it came in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Hash of the context (name, host, tags, kind); computed once by the worker.
    pub hash: u64,
    pub name: &'a str,
    /// Empty means no host.
    pub host: &'a str,
    /// The canonical tags, as a range into the worker's tag arena for the packet (sorted,
    /// de-duplicated, extra tags included, `host:` removed); `None` when the worker's
    /// context cache vouched for the context by its hash: the shard then checks the type and
    /// the name length kept beside the hash, and reports the sample missing if it holds
    /// no such context.
    pub tags: Option<(u32, u32)>,
    /// The raw `#` field, to build the canonical tags for a sample reported missing.
    pub raw_tags: &'a str,
    pub kind: MetricKind,
    pub value: SampleValue<'a>,
    /// In (0, 1].
    pub sample_rate: f64,
    /// `|T`: the sample bypasses buckets (gauges and counts only; SPEC §3.4).
    pub timestamp: Option<i64>,
    /// Start of the bucket of its arrival time.
    pub bucket: i64,
}
