//! What a worker hands on: samples (one value of one metric message, its context already
//! hashed) on their way to the shard that owns the context, and records (owned events and
//! service checks) on their way to the demux's backlog.

use crate::parser::{AlertType, CheckStatus, MetricKind, Priority};

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
    /// What the sample carries of its context's canonical tags.
    pub tags: ContextTags,
    /// The raw `#` field, to build the canonical tags for a sample sent back as missing.
    pub raw_tags: &'a str,
    pub kind: MetricKind,
    pub value: SampleValue<'a>,
    /// In (0, 1].
    pub sample_rate: f64,
    /// `|T`: the sample bypasses buckets (gauges and counts only; docs/behaviour.md,
    /// "Timestamps").
    pub timestamp: Option<i64>,
    /// Start of the bucket of its arrival time.
    pub bucket: i64,
    /// Its origin's tags, for a sample sent back: 0 for none, else 1 + its index in the
    /// worker's origins of the batch.
    pub origin: u32,
    /// Its shaping decision, for a sample sent back: 0 for none, else 1 + its index in the
    /// worker's decisions held for the batch.
    pub shaped: u32,
}

/// What a sample carries of its context's canonical tags: the two sides of the handshake
/// between a worker's context cache and the shard that holds the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextTags {
    /// None: the worker's context cache vouched for the context by its hash. The shard finds
    /// it by the hash, the type and the name length kept beside it; if the shard no longer
    /// holds it (it expired), the sample goes back to the worker ([`SendBack`]), which sends
    /// it again with its tags ([`ShardBatch::resend`]).
    Vouched,
    /// The canonical tags (sorted, de-duplicated, extra tags included, `host:` removed): this
    /// range of the batch's tag arena. Enough for the shard to create the context.
    Arena(u32, u32),
}

/// One shard's samples from one packet batch: handed to the shard under one lock, and what
/// the shard sends back.
#[derive(Debug, Default)]
pub struct ShardBatch<'a> {
    pub samples: Vec<Sample<'a>>,
    /// Vouched samples whose context the shard does not hold: indexes into `samples`.
    missing: Vec<u32>,
}

impl<'a> From<Vec<Sample<'a>>> for ShardBatch<'a> {
    fn from(samples: Vec<Sample<'a>>) -> ShardBatch<'a> {
        ShardBatch {
            samples,
            missing: Vec::new(),
        }
    }
}

impl<'a> ShardBatch<'a> {
    /// The same allocations, empty, for samples that borrow from another batch (see
    /// [`recycle`]).
    pub(crate) fn rebind<'b>(self) -> ShardBatch<'b> {
        ShardBatch {
            samples: recycle(self.samples),
            missing: recycle(self.missing),
        }
    }

    /// What a shard works through: the samples, and where it notes those it sends back.
    pub fn split(&mut self) -> (&[Sample<'a>], SendBack<'_>) {
        (&self.samples, SendBack(&mut self.missing))
    }

    /// Keeps only the samples the shard sent back, each given its canonical tags by `tags`,
    /// ready to be inserted again; false when none came back. Samples with tags are never
    /// sent back (the shard creates their context, or refuses it over the limit), so a
    /// second round always comes back empty.
    pub fn resend(&mut self, mut tags: impl FnMut(&Sample<'a>) -> ContextTags) -> bool {
        if self.missing.is_empty() {
            self.samples.clear();
            return false;
        }
        let mut kept = 0;
        for i in 0..self.missing.len() {
            let mut s = self.samples[self.missing[i] as usize];
            s.tags = tags(&s);
            self.samples[kept] = s;
            kept += 1;
        }
        self.samples.truncate(kept);
        self.missing.clear();
        true
    }
}

/// Where a shard notes the samples of a [`ShardBatch`] it sends back.
pub struct SendBack<'b>(&'b mut Vec<u32>);

impl SendBack<'_> {
    /// The sample at `index` names a context the shard does not hold.
    pub fn send_back(&mut self, index: usize) {
        self.0.push(index as u32);
    }
}

/// Room a reused scratch vector keeps between batches (1,024 samples, 8,192 tags): more than
/// a batch of ordinary traffic needs. A batch can need far more (a value takes as little as
/// two bytes of a packet, a tag as little as one), and then gives the rest back, so that such
/// batches do not leave every shard's list and every worker's arena at their size.
pub(crate) const KEPT_BYTES: usize = 128 * 1024;

/// Empties a vector and re-binds its allocation to another lifetime, keeping room for at most
/// [`KEPT_BYTES`]. The in-place `collect` reuses the buffer because the layouts are
/// identical; no element is ever mapped.
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.shrink_to(KEPT_BYTES / std::mem::size_of::<T>().max(1));
    v.into_iter()
        .map(|_| -> U { unreachable!("the vector is empty") })
        .collect()
}

/// An event as it will be sent (owned; `\n` escapes already turned into newlines).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub title: String,
    pub text: String,
    pub timestamp: i64,
    pub host: String,
    pub aggregation_key: String,
    pub priority: Priority,
    pub source_type: String,
    pub alert_type: AlertType,
    pub tags: Vec<String>,
}

/// A service check as it will be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceCheckRecord {
    pub name: String,
    pub status: CheckStatus,
    pub timestamp: i64,
    pub host: String,
    pub message: String,
    pub tags: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(hash: u64) -> Sample<'static> {
        Sample {
            hash,
            name: "m",
            host: "h",
            tags: ContextTags::Vouched,
            raw_tags: "a,b",
            kind: MetricKind::Gauge,
            value: SampleValue::Number(hash as f64),
            sample_rate: 1.0,
            timestamp: None,
            bucket: 0,
            origin: 0,
            shaped: 0,
        }
    }

    #[test]
    fn only_the_samples_sent_back_are_resent_with_their_tags() {
        let mut batch = ShardBatch::from((0..5).map(sample).collect::<Vec<_>>());
        let (_, mut back) = batch.split();
        back.send_back(1);
        back.send_back(3);
        assert!(batch.resend(|s| ContextTags::Arena(s.hash as u32, 9)));
        let got: Vec<(u64, ContextTags)> = batch.samples.iter().map(|s| (s.hash, s.tags)).collect();
        assert_eq!(
            got,
            [(1, ContextTags::Arena(1, 9)), (3, ContextTags::Arena(3, 9))]
        );
        // Nothing sent back: nothing to resend, and the batch is emptied.
        assert!(!batch.resend(|_| unreachable!("nothing was sent back")));
        assert!(batch.samples.is_empty());
        let rebound: ShardBatch<'_> = batch.rebind();
        assert!(rebound.samples.is_empty() && rebound.missing.is_empty());
    }
}
