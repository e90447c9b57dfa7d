//! Shards: one `Mutex<Shard>` per slice of the context space. A shard owns its contexts, their
//! per-bucket accumulators, counter zero-fill and expiry. Workers lock a shard once per batch
//! of samples; the flusher locks it once per bucket boundary and takes closed buckets out, and
//! turns them into series outside the lock.
//!
//! Bucketing (docs/behaviour.md, "Buckets and contexts"): a sample's bucket is chosen by its
//! arrival time. A context holds the accumulator of its open bucket and, beside it, the
//! accumulator of the bucket before, when a sample for a later bucket arrived before the
//! flusher took that one (at a boundary that is nearly every busy context, until the flusher
//! reaches its shard). Older buckets still untaken (a flusher many seconds late) move to
//! `closed`. A sample arriving after its bucket was flushed (a worker racing the boundary)
//! goes into the next bucket, never lost.

pub mod accumulator;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::context::{short_len, ContextHasher, ContextKey, ContextRef};
use crate::parser::MetricKind;
use crate::sample::{ContextTags, Sample, SampleValue, ShardBatch};
pub use accumulator::{Accumulator, Histogram};

/// A bucket's worth of one context, taken out of a shard for flushing.
#[derive(Debug)]
pub struct Closed {
    pub context: ContextKey,
    /// Bucket start, or the sample's own timestamp for a `|T` sample.
    pub timestamp: i64,
    pub acc: Accumulator,
}

/// Timing rules a shard applies at flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Bucket length in seconds.
    pub interval: i64,
    /// Counters report 0 for this long after their last sample, then are freed.
    pub counter_seconds: i64,
    /// Other contexts are freed once idle this long.
    pub context_seconds: i64,
}

/// One live context: 64 bytes, held in the shard's dense vector: what a sample needs is
/// here, the key is shared.
struct Context {
    hash: u64,
    key: ContextKey,
    acc: Accumulator,
    /// The bucket before `bucket`, closed and not yet taken by the flusher. Holding it here
    /// costs 16 bytes a context; a record of its own per context closed at a boundary would
    /// cost 40, plus the slack of the vector holding them.
    prev: Option<Accumulator>,
    /// Bucket `acc` belongs to (when `dirty`); never decreases, so it is also the bucket of
    /// the last sample, which expiry counts from. Seconds since the epoch, as the bucket of
    /// an arrival time (see [`secs`]).
    bucket: u32,
    /// Bucket of `prev`, when there is one.
    prev_bucket: u32,
    /// Samples since the context was created (for `/contexts?top=N`), saturating.
    samples: u32,
    /// The key's type and name length (saturating at 65535; a packet is at most 64 KiB),
    /// kept beside the hash: a sample vouched for by a worker's cache is matched without
    /// touching the key, which would be dependent cache misses on every sample. The hash
    /// vouches for the bytes, the host's as the tags'.
    name_len: u16,
    kind: MetricKind,
    dirty: bool,
}

/// A bucket start as a context stores it: buckets come from arrival times, which fit in 32
/// bits until 2106.
fn secs(bucket: i64) -> u32 {
    bucket.clamp(0, u32::MAX.into()) as u32
}

/// Adds one sample to its context, first moving a closed bucket's accumulator aside.
/// Returns false when the sample would have grown the accumulator while the budget's bytes
/// are spent: it is dropped.
fn accumulate(
    ctx: &mut Context,
    s: &Sample<'_>,
    bucket: u32,
    closed: &mut Vec<Closed>,
    members: &ContextHasher,
    budget: &ContextBudget,
) -> bool {
    let mut bucket = bucket;
    if ctx.dirty && ctx.bucket != bucket {
        if ctx.bucket < bucket {
            // The context's bucket closed and the flusher has not taken it.
            let acc = std::mem::replace(&mut ctx.acc, Accumulator::new(s.kind));
            if let Some(older) = ctx.prev.replace(acc) {
                // Nor the one before: the flusher is late by a whole interval.
                closed.push(Closed {
                    context: ctx.key.clone(),
                    timestamp: ctx.prev_bucket.into(),
                    acc: older,
                });
            }
            ctx.prev_bucket = ctx.bucket;
        } else {
            // A late sample (workers race by microseconds): it joins the later bucket.
            bucket = ctx.bucket;
        }
    }
    // Expiry counts idle time from `bucket`, which relies on it never going back.
    debug_assert!(bucket >= ctx.bucket, "{bucket} < {}", ctx.bucket);
    ctx.bucket = bucket;
    let grows = ctx.acc.full();
    if grows && budget.spent() {
        return false;
    }
    let before = if grows { ctx.acc.sample_bytes() } else { 0 };
    ctx.dirty = true;
    ctx.samples = ctx.samples.saturating_add(1);
    match s.value {
        SampleValue::Number(v) => ctx.acc.add(v, s.sample_rate),
        SampleValue::Member(m) => ctx.acc.add_member(members.hash_one(m)),
    }
    if grows {
        let after = ctx.acc.sample_bytes();
        budget.charge_grown(after.saturating_sub(before));
    }
    true
}

/// Moves every record of `from` to `out`; a vector left large is freed, since it filled only
/// while the flusher was late.
fn take_all(from: &mut Vec<Closed>, out: &mut Vec<Closed>) {
    if out.is_empty() && out.capacity() < from.capacity() {
        std::mem::swap(from, out);
    } else {
        out.append(from);
    }
    if from.capacity() > 1024 {
        *from = Vec::new();
    }
}

/// What one call to [`Shard::insert`] did, for telemetry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InsertStats {
    pub samples: u64,
    pub new_contexts: u64,
    /// Samples dropped because they would have created a context beyond the limit.
    pub over_limit: u64,
    /// Samples dropped because `--aggregation-memory` is spent.
    pub over_memory: u64,
}

/// What every shard draws on: live contexts (`--context-limit`) and bytes of memory
/// (`--aggregation-memory`). A sample that would create a context beyond either is dropped
/// and counted, and so is one that would grow a histogram, set, sketch or timestamped point
/// list while the bytes are spent; what exists keeps working.
#[derive(Debug)]
pub(crate) struct ContextBudget {
    live: AtomicUsize,
    limit: usize,
    bytes: AtomicUsize,
    byte_limit: usize,
}

/// Bytes charged for a context besides its key: its 64-byte entry, its index slot, the
/// slack of the vector and table holding them, and the allocator's overhead on the key.
pub const CONTEXT_BYTES: usize = 128;

/// Why a sample was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// `--context-limit` contexts are live.
    Contexts,
    /// `--aggregation-memory` is spent.
    Memory,
}

impl ContextBudget {
    pub fn new(limit: usize, byte_limit: usize) -> ContextBudget {
        ContextBudget {
            live: AtomicUsize::new(0),
            limit,
            bytes: AtomicUsize::new(0),
            byte_limit,
        }
    }

    /// Takes room for one context of `bytes`, if there is any.
    fn take(&self, bytes: usize) -> Result<(), Refused> {
        if !self.charge(bytes) {
            return Err(Refused::Memory);
        }
        let counted = self
            .live
            .fetch_update(Relaxed, Relaxed, |n| (n < self.limit).then_some(n + 1));
        if counted.is_err() {
            self.free(bytes);
            return Err(Refused::Contexts);
        }
        Ok(())
    }

    fn release(&self, n: usize) {
        self.live.fetch_sub(n, Relaxed);
    }

    /// Takes `bytes`, if they fit.
    fn charge(&self, bytes: usize) -> bool {
        self.bytes
            .fetch_update(Relaxed, Relaxed, |b| {
                let after = b.checked_add(bytes)?;
                (after <= self.byte_limit).then_some(after)
            })
            .is_ok()
    }

    /// Takes `bytes` already allocated (a growth the spent check let through).
    fn charge_grown(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Relaxed);
    }

    fn free(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Relaxed);
    }

    /// Whether the bytes are spent: a sample that would allocate is refused.
    fn spent(&self) -> bool {
        self.bytes.load(Relaxed) >= self.byte_limit
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Relaxed)
    }

    #[cfg(test)]
    fn live(&self) -> usize {
        self.live.load(Relaxed)
    }
}

/// A shard's live contexts: a dense vector of [`Context`]s and a hash table of their indexes.
///
/// A table holding the 64-byte contexts inline sits between 44% and 87% full after each
/// doubling, and every empty bucket costs a whole context's size (tens of MB at hundreds of
/// thousands of contexts); an empty bucket of an index table costs 5 bytes, and the vector
/// grows by a quarter at a time. A lookup probes the small table, then reads the context it
/// was going to update anyway.
#[derive(Default)]
struct Contexts {
    index: HashTable<u32>,
    slab: Vec<Context>,
}

impl Contexts {
    fn len(&self) -> usize {
        self.slab.len()
    }

    fn find(&self, hash: u64, eq: impl Fn(&Context) -> bool) -> Option<usize> {
        let slab = &self.slab;
        self.index
            .find(hash, |&i| eq(&slab[i as usize]))
            .map(|&i| i as usize)
    }

    /// Starts loading the context `hash` most likely names into the CPU cache: the index's
    /// first candidate, taken without reading any context. The index matches 7 bits of the
    /// hash before it reads one, so the candidate is another context's only when their hashes
    /// share those bits, and then the hint is merely wasted.
    fn prefetch(&self, hash: u64) {
        if let Some(&at) = self.index.find(hash, |_| true) {
            // A context may straddle two cache lines: both are loaded.
            crate::prefetch(self.slab.as_ptr().wrapping_add(at as usize));
        }
    }

    fn insert(&mut self, ctx: Context) -> usize {
        let at = self.slab.len();
        if at == self.slab.capacity() {
            self.slab.reserve_exact(at / 4 + 16);
        }
        let hash = ctx.hash;
        self.slab.push(ctx);
        let slab = &self.slab;
        self.index
            .insert_unique(hash, at as u32, |&i| slab[i as usize].hash);
        at
    }

    /// Keeps the contexts `keep` says to keep (it may update them); the last context moves
    /// into each freed place.
    fn retain(&mut self, mut keep: impl FnMut(&mut Context) -> bool) {
        let mut i = 0;
        while i < self.slab.len() {
            if keep(&mut self.slab[i]) {
                i += 1;
                continue;
            }
            let hash = self.slab[i].hash;
            if let Ok(entry) = self.index.find_entry(hash, |&j| j as usize == i) {
                entry.remove();
            }
            let last = self.slab.len() - 1;
            self.slab.swap_remove(i);
            if i < last {
                let moved = self.slab[i].hash;
                if let Some(slot) = self.index.find_mut(moved, |&j| j as usize == last) {
                    *slot = i as u32;
                }
            }
        }
        if self.slab.capacity() > 2 * self.slab.len() + 64 {
            self.slab.shrink_to(self.slab.len() + self.slab.len() / 4);
            self.index
                .shrink_to(self.slab.len(), |&i| self.slab[i as usize].hash);
        }
    }
}

/// One shard of the aggregator.
pub struct Shard {
    contexts: Contexts,
    /// Accumulators of buckets that closed before the flusher took them.
    closed: Vec<Closed>,
    /// `|T` samples, each a point of its own.
    timestamped: Vec<Closed>,
    /// Bytes charged to the budget for `timestamped`.
    timestamped_bytes: usize,
    /// The hash of the last point's context in `timestamped`.
    timestamped_hash: u64,
    /// Every bucket starting before this has been flushed.
    flushed_through: i64,
    members: ContextHasher,
    budget: Arc<ContextBudget>,
}

impl Shard {
    /// A shard without a context limit. `members` hashes set members.
    #[cfg(test)]
    fn new(members: ContextHasher) -> Shard {
        Shard::with_budget(
            members,
            Arc::new(ContextBudget::new(usize::MAX, usize::MAX)),
        )
    }

    /// A shard whose new contexts draw on `budget`, shared by every shard.
    pub(crate) fn with_budget(members: ContextHasher, budget: Arc<ContextBudget>) -> Shard {
        Shard {
            contexts: Contexts::default(),
            closed: Vec::new(),
            timestamped: Vec::new(),
            timestamped_bytes: 0,
            timestamped_hash: 0,
            flushed_through: i64::MIN,
            members,
            budget,
        }
    }

    /// Live contexts.
    pub(crate) fn len(&self) -> usize {
        self.contexts.len()
    }

    /// Aggregates one shard batch; `tags` is the arena its tag ranges index. A vouched
    /// sample whose context this shard does not hold is not aggregated: it is sent back
    /// ([`crate::sample::SendBack`]) for the worker to send again with its tags.
    pub fn insert(&mut self, batch: &mut ShardBatch<'_>, tags: &[&str]) -> InsertStats {
        let mut stats = InsertStats::default();
        let (samples, mut back) = batch.split();
        // The samples' contexts are cache misses that do not depend on each other: start
        // them all before the first one is needed.
        for s in samples.iter() {
            self.contexts.prefetch(s.hash);
        }
        for (i, s) in samples.iter().enumerate() {
            let bucket = secs(s.bucket.max(self.flushed_through));
            let ctx = match s.tags {
                ContextTags::Vouched => {
                    // As in `ContextKey::matches`, the 64-bit hash vouches for the bytes.
                    let found = self.contexts.find(s.hash, |c| {
                        c.hash == s.hash && c.kind == s.kind && c.name_len == short_len(s.name)
                    });
                    match found {
                        Some(at) => &mut self.contexts.slab[at],
                        None => {
                            back.send_back(i);
                            continue;
                        }
                    }
                }
                ContextTags::Arena(a, b) => {
                    let context = ContextRef {
                        name: s.name,
                        host: s.host,
                        tags: &tags[a as usize..b as usize],
                        kind: s.kind,
                    };
                    if let Some(ts) = s.timestamp {
                        if self.insert_timestamped(&context, s, ts) {
                            stats.samples += 1;
                        } else {
                            stats.over_memory += 1;
                        }
                        continue;
                    }
                    let found = self
                        .contexts
                        .find(s.hash, |c| c.hash == s.hash && c.key.matches(&context));
                    let at = match found {
                        Some(at) => at,
                        None => {
                            let bytes = CONTEXT_BYTES + ContextKey::len_for(&context);
                            match self.budget.take(bytes) {
                                Ok(()) => {}
                                Err(Refused::Contexts) => {
                                    stats.over_limit += 1;
                                    continue;
                                }
                                Err(Refused::Memory) => {
                                    stats.over_memory += 1;
                                    continue;
                                }
                            }
                            stats.new_contexts += 1;
                            self.contexts.insert(Context {
                                hash: s.hash,
                                kind: s.kind,
                                name_len: short_len(s.name),
                                key: ContextKey::new(&context),
                                bucket,
                                prev: None,
                                prev_bucket: 0,
                                dirty: false,
                                samples: 0,
                                acc: Accumulator::new(s.kind),
                            })
                        }
                    };
                    &mut self.contexts.slab[at]
                }
            };
            if accumulate(
                ctx,
                s,
                bucket,
                &mut self.closed,
                &self.members,
                &self.budget,
            ) {
                stats.samples += 1;
            } else {
                stats.over_memory += 1;
            }
        }
        stats
    }

    /// Keeps a `|T` sample as a point of its own until the flush; false when
    /// `--aggregation-memory` has no room for it.
    fn insert_timestamped(&mut self, context: &ContextRef<'_>, s: &Sample<'_>, ts: i64) -> bool {
        let SampleValue::Number(v) = s.value else {
            return true;
        };
        // docs/behaviour.md, "Timestamps": one point at its own timestamp; the sample rate
        // is ignored.
        let acc = match s.kind {
            MetricKind::Count => Accumulator::Count(v),
            _ => Accumulator::Gauge(v),
        };
        if self.budget.spent() {
            return false;
        }
        // The values of one multi-value message share one key.
        let shared = self
            .timestamped
            .last()
            .filter(|_| self.timestamped_hash == s.hash)
            .filter(|last| last.context.matches(context))
            .map(|last| last.context.clone());
        // A record, and as much again for the vector's doubling.
        let mut bytes = 2 * std::mem::size_of::<Closed>();
        if shared.is_none() {
            bytes += ContextKey::len_for(context);
        }
        if !self.budget.charge(bytes) {
            return false;
        }
        self.timestamped_bytes += bytes;
        self.timestamped_hash = s.hash;
        self.timestamped.push(Closed {
            context: shared.unwrap_or_else(|| ContextKey::new(context)),
            timestamp: ts,
            acc,
        });
        true
    }

    /// Adds this shard's `n` busiest contexts (most samples since created) to `top`, which
    /// is kept sorted, busiest first, and at most `n` long.
    pub(crate) fn busiest(&self, n: usize, top: &mut Vec<(u64, ContextKey)>) {
        for ctx in self.contexts.slab.iter() {
            let samples = u64::from(ctx.samples);
            if top.len() == n && top.last().is_some_and(|l| l.0 >= samples) {
                continue;
            }
            let at = top.partition_point(|t| t.0 >= samples);
            top.insert(at, (samples, ctx.key.clone()));
            top.truncate(n);
        }
    }

    /// Closes every bucket that starts before `boundary` and appends it to `out`, with a zero
    /// for each counter not sampled in the bucket just closed (until it expires). Frees
    /// expired contexts. Returns the number of contexts freed.
    pub fn flush(&mut self, boundary: i64, expiry: &Expiry, out: &mut Vec<Closed>) -> usize {
        self.flush_stamped(boundary, expiry, 0, out)
    }

    /// [`Shard::flush`], stamping each bucket `offset` seconds from the start it has on the
    /// pipeline's clock (see [`crate::clock`]): buckets are kept and closed by that clock,
    /// which never steps, and stamped by the wall clock. A `|T` sample keeps its own time.
    pub fn flush_stamped(
        &mut self,
        boundary: i64,
        expiry: &Expiry,
        offset: i64,
        out: &mut Vec<Closed>,
    ) -> usize {
        self.flushed_through = self.flushed_through.max(boundary);
        let from = out.len();
        take_all(&mut self.closed, out);
        let before_timestamped = out.len();
        take_all(&mut self.timestamped, out);
        // What leaves the shard no longer counts against the budget; the flusher holds it
        // for one flush.
        let mut freed_bytes = std::mem::take(&mut self.timestamped_bytes);
        // Bucket starts: what a late flusher left in `closed`, and what this flush closes.
        let late_buckets = from..before_timestamped;
        let first_bucket = out.len();
        let closing = boundary - expiry.interval;
        let before = self.contexts.len();
        let mut freed_context_bytes = 0;
        self.contexts.retain(|ctx| {
            if ctx.dirty {
                if i64::from(ctx.prev_bucket) < boundary {
                    if let Some(acc) = ctx.prev.take() {
                        out.push(Closed {
                            context: ctx.key.clone(),
                            timestamp: ctx.prev_bucket.into(),
                            acc,
                        });
                    }
                }
                if i64::from(ctx.bucket) < boundary {
                    let acc = std::mem::replace(&mut ctx.acc, Accumulator::new(ctx.kind));
                    out.push(Closed {
                        context: ctx.key.clone(),
                        timestamp: ctx.bucket.into(),
                        acc,
                    });
                    ctx.dirty = false;
                }
                return true;
            }
            let idle = closing - i64::from(ctx.bucket);
            let keep = if ctx.kind == MetricKind::Count {
                if idle > 0 && idle <= expiry.counter_seconds {
                    out.push(Closed {
                        context: ctx.key.clone(),
                        timestamp: closing,
                        acc: Accumulator::Count(0.0),
                    });
                }
                idle <= expiry.counter_seconds
            } else {
                idle < expiry.context_seconds
            };
            if !keep {
                freed_context_bytes += CONTEXT_BYTES + ctx.key.heap_len();
            }
            keep
        });
        let freed = before - self.contexts.len();
        self.budget.release(freed);
        freed_bytes += freed_context_bytes;
        let (head, buckets) = out.split_at(first_bucket);
        freed_bytes += head[late_buckets.clone()]
            .iter()
            .chain(buckets)
            .map(|c| c.acc.sample_bytes())
            .sum::<usize>();
        self.budget.free(freed_bytes);
        if offset != 0 {
            // Bucket starts, moved to the wall clock; the `|T` samples between are not.
            let (head, buckets) = out.split_at_mut(first_bucket);
            for c in head[late_buckets].iter_mut().chain(buckets) {
                c.timestamp += offset;
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::canonical_tags;

    #[test]
    fn contexts_removed_from_the_middle_leave_every_other_one_findable() {
        let ctx = |n: u64| Context {
            hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            key: ContextKey::new(&ContextRef {
                name: "m",
                host: "",
                tags: &[],
                kind: MetricKind::Gauge,
            }),
            acc: Accumulator::Gauge(n as f64),
            prev: None,
            prev_bucket: 0,
            bucket: 0,
            samples: n as u32,
            name_len: 1,
            kind: MetricKind::Gauge,
            dirty: false,
        };
        let find = |c: &Contexts, n: u64| {
            c.find(ctx(n).hash, |x| x.samples == n as u32)
                .map(|at| c.slab[at].samples)
        };
        let mut contexts = Contexts::default();
        for n in 0..5000 {
            assert_eq!(contexts.insert(ctx(n)), n as usize);
        }
        // Remove every third, and the last ones, so moves and plain pops both happen.
        contexts.retain(|c| c.samples % 3 != 0 && c.samples < 4990);
        let kept: Vec<u64> = (0..5000).filter(|n| n % 3 != 0 && *n < 4990).collect();
        assert_eq!(contexts.len(), kept.len());
        for n in 0..5000 {
            let want = (n % 3 != 0 && n < 4990).then_some(n as u32);
            assert_eq!(find(&contexts, n), want, "{n}");
        }
        // Remove nearly all: the vector and the table shrink, and what is left is found.
        contexts.retain(|c| c.samples < 10);
        assert_eq!(contexts.len(), 6);
        assert!(
            contexts.slab.capacity() < 100,
            "{}",
            contexts.slab.capacity()
        );
        for n in [1, 2, 4, 5, 7, 8] {
            assert_eq!(find(&contexts, n), Some(n as u32));
        }
        assert_eq!(contexts.insert(ctx(9)), 6);
        assert_eq!(find(&contexts, 9), Some(9));
    }

    #[test]
    fn a_context_entry_stays_small() {
        assert_eq!(std::mem::size_of::<Context>(), 64);
    }

    const EXPIRY: Expiry = Expiry {
        interval: 10,
        counter_seconds: 300,
        context_seconds: 20,
    };

    struct Fixture {
        hasher: ContextHasher,
        shard: Shard,
    }

    impl Fixture {
        fn new() -> Fixture {
            let hasher = ContextHasher::default();
            Fixture {
                shard: Shard::new(hasher.clone()),
                hasher,
            }
        }

        fn add(&mut self, name: &str, kind: MetricKind, value: SampleValue<'_>, bucket: i64) {
            self.add_full(name, &["env:dev"], kind, value, 1.0, None, bucket);
        }

        #[allow(clippy::too_many_arguments)]
        fn add_full(
            &mut self,
            name: &str,
            tags: &[&str],
            kind: MetricKind,
            value: SampleValue<'_>,
            sample_rate: f64,
            timestamp: Option<i64>,
            bucket: i64,
        ) {
            let mut tags = tags.to_vec();
            canonical_tags(&mut tags, 0, &mut Vec::new());
            let hash = ContextRef {
                name,
                host: "h",
                tags: &tags,
                kind,
            }
            .hash(&self.hasher);
            let sample = Sample {
                hash,
                name,
                host: "h",
                tags: ContextTags::Arena(0, tags.len() as u32),
                raw_tags: "",
                kind,
                value,
                sample_rate,
                timestamp,
                bucket,
                origin: 0,
                shaped: 0,
            };
            let mut batch = ShardBatch::from(vec![sample]);
            self.shard.insert(&mut batch, &tags);
            assert!(!batch.resend(|_| unreachable!("a sample with tags is never sent back")));
        }

        fn flush(&mut self, boundary: i64) -> Vec<(String, i64, String)> {
            let mut out = Vec::new();
            self.shard.flush(boundary, &EXPIRY, &mut out);
            let mut rows: Vec<_> = out
                .into_iter()
                .map(|c| (c.context.name().to_string(), c.timestamp, describe(&c.acc)))
                .collect();
            rows.sort();
            rows
        }
    }

    fn describe(acc: &Accumulator) -> String {
        match acc {
            Accumulator::Count(v) => format!("count {v}"),
            Accumulator::Gauge(v) => format!("gauge {v}"),
            Accumulator::Set(s) => format!("set {}", s.len()),
            Accumulator::Histogram(h) => format!("hist {} {}", h.count, h.sum),
            Accumulator::Distribution(s) => format!("dist {}", s.summary().count),
        }
    }

    fn n(v: f64) -> SampleValue<'static> {
        SampleValue::Number(v)
    }

    fn row(name: &str, ts: i64, what: &str) -> (String, i64, String) {
        (name.to_string(), ts, what.to_string())
    }

    #[test]
    fn samples_of_one_context_aggregate_into_one_bucket() {
        let mut f = Fixture::new();
        f.add("c", MetricKind::Count, n(1.0), 100);
        f.add("c", MetricKind::Count, n(2.0), 100);
        f.add("g", MetricKind::Gauge, n(5.0), 100);
        f.add("g", MetricKind::Gauge, n(6.0), 100);
        f.add("s", MetricKind::Set, SampleValue::Member("a"), 100);
        f.add("s", MetricKind::Set, SampleValue::Member("b"), 100);
        f.add("s", MetricKind::Set, SampleValue::Member("a"), 100);
        f.add("h", MetricKind::Histogram, n(3.0), 100);
        f.add("d", MetricKind::Distribution, n(4.0), 100);
        assert_eq!(f.shard.len(), 5);
        assert_eq!(
            f.flush(110),
            [
                row("c", 100, "count 3"),
                row("d", 100, "dist 1"),
                row("g", 100, "gauge 6"),
                row("h", 100, "hist 1 3"),
                row("s", 100, "set 2"),
            ]
        );
    }

    #[test]
    fn the_context_limit_drops_new_contexts_only_and_frees_room_on_expiry() {
        let mut f = Fixture::new();
        let budget = Arc::new(ContextBudget::new(2, usize::MAX));
        f.shard = Shard::with_budget(f.hasher.clone(), budget.clone());
        let mut other = Shard::with_budget(f.hasher.clone(), budget.clone());
        f.add("g1", MetricKind::Gauge, n(1.0), 100);
        f.add("g2", MetricKind::Gauge, n(2.0), 100);
        f.add("g3", MetricKind::Gauge, n(3.0), 100); // over the limit: dropped
        f.add("g1", MetricKind::Gauge, n(9.0), 100); // an existing context still works
        assert_eq!((f.shard.len(), budget.live()), (2, 2));
        // The budget is shared: another shard cannot create a context either.
        let tags = ["env:dev"];
        let sample = Sample {
            hash: 7,
            name: "elsewhere",
            host: "h",
            tags: ContextTags::Arena(0, 1),
            raw_tags: "",
            kind: MetricKind::Gauge,
            value: n(1.0),
            sample_rate: 1.0,
            timestamp: None,
            bucket: 100,
            origin: 0,
            shaped: 0,
        };
        let mut batch = ShardBatch::from(vec![sample]);
        let stats = other.insert(&mut batch, &tags);
        assert_eq!(
            stats,
            InsertStats {
                samples: 0,
                new_contexts: 0,
                over_limit: 1,
                over_memory: 0,
            }
        );
        assert_eq!(
            f.flush(110),
            [row("g1", 100, "gauge 9"), row("g2", 100, "gauge 2")]
        );
        // Once idle past --context-expiry-seconds the contexts are freed, and room returns.
        assert_eq!(f.flush(200), []);
        assert_eq!((f.shard.len(), budget.live()), (0, 0));
        f.add("g3", MetricKind::Gauge, n(3.0), 200);
        assert_eq!((f.shard.len(), budget.live()), (1, 1));
    }

    #[test]
    fn aggregation_memory_bounds_contexts_samples_and_timestamped_points_and_returns_at_flush() {
        let mut f = Fixture::new();
        let key = |name| {
            CONTEXT_BYTES
                + ContextKey::len_for(&ContextRef {
                    name,
                    host: "h",
                    tags: &["env:dev"],
                    kind: MetricKind::Histogram,
                })
        };
        // Room for the context and 1,000 histogram samples' worth of growth.
        let limit = key("h") + 1000 * 16;
        let budget = Arc::new(ContextBudget::new(usize::MAX, limit));
        f.shard = Shard::with_budget(f.hasher.clone(), budget.clone());
        for i in 0..100_000 {
            f.add("h", MetricKind::Histogram, n(f64::from(i)), 100);
        }
        // The samples vector doubles: it is refused a growth once the bytes are spent,
        // so it stops at the first capacity past the limit.
        let held = budget.bytes();
        assert!(held >= limit && held <= key("h") + 1024 * 16, "{held}");
        let rows = f.flush(110);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].2, "hist 1024 523776"); // 1,024 samples, Σ 0..1023
                                                   // What left the shard is returned; the context itself stays charged until it expires.
        assert_eq!(budget.bytes(), key("h"));
        // With the room back, a new context fits again.
        f.add("other", MetricKind::Gauge, n(1.0), 110);
        assert_eq!(f.shard.len(), 2);
        // Timestamped points: the values of one message share a key, each point costs its
        // record; beyond the bytes they are dropped.
        let mut tags = vec!["env:dev"];
        canonical_tags(&mut tags, 0, &mut Vec::new());
        let context = ContextRef {
            name: "t",
            host: "h",
            tags: &tags,
            kind: MetricKind::Gauge,
        };
        let samples: Vec<Sample<'_>> = (0..10_000)
            .map(|i| Sample {
                hash: context.hash(&f.hasher),
                name: "t",
                host: "h",
                tags: ContextTags::Arena(0, 1),
                raw_tags: "",
                kind: MetricKind::Gauge,
                value: n(f64::from(i)),
                sample_rate: 1.0,
                timestamp: Some(1_000),
                bucket: 110,
                origin: 0,
                shaped: 0,
            })
            .collect();
        let mut f2 = Fixture::new();
        let limit = ContextKey::len_for(&context) + 100 * 2 * std::mem::size_of::<Closed>();
        let budget = Arc::new(ContextBudget::new(usize::MAX, limit));
        f2.shard = Shard::with_budget(f2.hasher.clone(), budget.clone());
        let stats = f2.shard.insert(&mut ShardBatch::from(samples), &tags);
        assert_eq!((stats.samples, stats.over_memory), (100, 9_900));
        assert_eq!(budget.bytes(), limit);
        let mut out = Vec::new();
        f2.shard.flush(2_000, &EXPIRY, &mut out);
        assert_eq!(out.len(), 100);
        assert!(
            out.iter().all(|c| c.context.id() == out[0].context.id()),
            "one key"
        );
        assert_eq!(budget.bytes(), 0);
    }

    #[test]
    fn a_key_allocates_what_len_for_says() {
        let long = "x".repeat(300);
        for (name, host, tags) in [
            ("m", "", vec![]),
            ("m", "h", vec!["a:b", "c"]),
            (&long[..], &long[..], vec![&long[..]; 200]),
        ] {
            let c = ContextRef {
                name,
                host,
                tags: &tags,
                kind: MetricKind::Gauge,
            };
            assert_eq!(ContextKey::new(&c).heap_len(), ContextKey::len_for(&c));
        }
    }

    #[test]
    fn tag_order_does_not_split_a_context_but_type_does() {
        let mut f = Fixture::new();
        f.add_full("m", &["b", "a"], MetricKind::Count, n(1.0), 1.0, None, 0);
        f.add_full(
            "m",
            &["a", "b", "a"],
            MetricKind::Count,
            n(1.0),
            1.0,
            None,
            0,
        );
        f.add_full("m", &["a", "b"], MetricKind::Gauge, n(1.0), 1.0, None, 0);
        assert_eq!(f.shard.len(), 2);
        assert_eq!(
            f.flush(10),
            [row("m", 0, "count 2"), row("m", 0, "gauge 1")]
        );
    }

    #[test]
    fn the_open_bucket_is_not_flushed() {
        let mut f = Fixture::new();
        f.add("c", MetricKind::Count, n(1.0), 100);
        f.add("c", MetricKind::Count, n(5.0), 110);
        assert_eq!(f.flush(110), [row("c", 100, "count 1")]);
        assert_eq!(f.flush(120), [row("c", 110, "count 5")]);
    }

    #[test]
    fn a_sample_after_its_bucket_was_flushed_joins_the_next_bucket() {
        let mut f = Fixture::new();
        f.add("g", MetricKind::Gauge, n(1.0), 100);
        assert_eq!(f.flush(110), [row("g", 100, "gauge 1")]);
        f.add("g", MetricKind::Gauge, n(2.0), 100); // stamped 100, arrived after the flush
        assert_eq!(f.flush(120), [row("g", 110, "gauge 2")]);
    }

    #[test]
    fn counters_report_zero_until_they_expire_then_are_freed() {
        let mut f = Fixture::new();
        f.add("c", MetricKind::Count, n(1.0), 0);
        assert_eq!(f.flush(10), [row("c", 0, "count 1")]);
        for closing in (10..=300).step_by(10) {
            assert_eq!(
                f.flush(closing + 10),
                [row("c", closing, "count 0")],
                "{closing}"
            );
        }
        assert_eq!(f.flush(320), []);
        assert_eq!(f.shard.len(), 0);
    }

    #[test]
    fn other_contexts_are_not_zero_filled_and_are_freed_when_idle() {
        let mut f = Fixture::new();
        f.add("g", MetricKind::Gauge, n(1.0), 0);
        assert_eq!(f.flush(10), [row("g", 0, "gauge 1")]);
        assert_eq!(f.flush(20), []);
        assert_eq!(f.shard.len(), 1);
        assert_eq!(f.flush(30), []);
        assert_eq!(f.shard.len(), 0);
    }

    #[test]
    fn timestamped_gauges_and_counts_bypass_buckets() {
        let mut f = Fixture::new();
        f.add_full("g", &[], MetricKind::Gauge, n(4.0), 1.0, Some(1000), 5000);
        f.add_full("g", &[], MetricKind::Gauge, n(5.0), 1.0, Some(1001), 5000);
        f.add_full("c", &[], MetricKind::Count, n(3.0), 0.5, Some(999), 5000);
        assert_eq!(f.shard.len(), 0);
        assert_eq!(
            f.flush(10),
            [
                row("c", 999, "count 3"),
                row("g", 1000, "gauge 4"),
                row("g", 1001, "gauge 5")
            ]
        );
    }

    #[test]
    fn a_closed_bucket_waits_for_the_flush_of_its_boundary() {
        let mut f = Fixture::new();
        f.add("g", MetricKind::Gauge, n(1.0), 110);
        f.add("g", MetricKind::Gauge, n(2.0), 120); // 110 closes before 120's flush
                                                    // The flush of boundary 110 (late, or repeated) takes neither bucket.
        assert_eq!(f.flush(110), []);
        assert_eq!(f.flush(120), [row("g", 110, "gauge 1")]);
        f.add("g", MetricKind::Gauge, n(3.0), 120);
        assert_eq!(f.flush(130), [row("g", 120, "gauge 3")]);
        assert_eq!(f.flush(140), []);
    }

    #[test]
    fn a_bucket_closed_by_a_later_sample_is_kept_for_the_flusher() {
        let mut f = Fixture::new();
        f.add("c", MetricKind::Count, n(1.0), 100);
        f.add("c", MetricKind::Count, n(2.0), 110); // flusher late: 100 not taken yet
        f.add("c", MetricKind::Count, n(4.0), 120);
        assert_eq!(
            f.flush(120),
            [row("c", 100, "count 1"), row("c", 110, "count 2")]
        );
        assert_eq!(f.flush(130), [row("c", 120, "count 4")]);
    }
}
