//! Workers: `--workers` threads that take packet batches off the queue, split them into
//! messages, parse, build and hash each metric's context once, and hand samples to shards in
//! per-shard batches (one lock per shard per packet batch). Events and service checks become
//! owned records in the demux backlog.
//!
//! Nothing here allocates per message on the happy path: the tag arena and the per-shard
//! sample vectors are reused across batches (their lifetimes are re-bound to each batch).

mod cache;
mod keep;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use crossbeam_channel::Receiver;

use crate::clock;
use crate::context::ContextRef;
use crate::demux::Demux;
pub use crate::enrichment::Enrichment;
use crate::enrichment::{canonicalize, record_tags, Resolved};
use crate::packet::{scanned_lines, Batch, Pool};
use crate::parser::{
    self, event::unescape, Event, Message, MessageKind, Metric, MetricKind, OriginFields, Reason,
    ServiceCheck, Values,
};
use crate::sample::{
    recycle, ContextTags, EventRecord, Sample, SampleValue, ServiceCheckRecord, ShardBatch,
};
use crate::shaping::{Decisions, Shape, Shaped, Shaping};
use crate::tagger::Entities;
use crate::telemetry::{labels, Counter, Label, PerLabel, Readings, Snapshot};
use cache::{Cached, ContextCache, RawKey, DEFAULT_HOST};
use keep::Keep;

/// What SIGHUP may replace while whippet runs, of what shapes a context: the extra tags and
/// the shaping settings. Each worker checks the generation once per batch (one atomic load)
/// and, when it changed, takes the new ones and forgets its context cache and decisions,
/// made under the old ones. No sample waits or is lost.
#[derive(Debug, Default)]
pub struct LiveTags {
    generation: AtomicU64,
    current: RwLock<Shapers>,
}

/// The extra tags and the shaping settings, replaced together.
type Shapers = (Arc<[Box<str>]>, Option<Arc<Shaping>>);

impl LiveTags {
    pub fn new(tags: &[String], shaping: Option<Arc<Shaping>>) -> LiveTags {
        let live = LiveTags::default();
        live.set(tags, shaping);
        live
    }

    /// Replaces the tags and the shaping; workers apply them from their next batch.
    pub fn set(&self, tags: &[String], shaping: Option<Arc<Shaping>>) {
        let tags: Arc<[Box<str>]> = tags.iter().map(|t| Box::<str>::from(t.as_str())).collect();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (tags, shaping);
        self.generation.fetch_add(1, Relaxed);
    }

    /// The shaping, when its generation is not `seen`.
    pub(crate) fn shaping_since(&self, seen: u64) -> Option<(u64, Option<Arc<Shaping>>)> {
        if self.generation.load(Relaxed) == seen {
            return None;
        }
        let (generation, (_, shaping)) = self.current();
        Some((generation, shaping))
    }

    fn current(&self) -> (u64, Shapers) {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Relaxed), current.clone())
    }
}

labels! {
    /// Why a worker dropped a message or sample it parsed, labelling `whippet_dropped_total`.
    pub enum Discard: "reason" {
        /// A `|T` timestamp on a type other than gauge or count (docs/behaviour.md,
        /// "Timestamps").
        TimestampedUnsupported = "timestamped_unsupported",
        /// Too many events or service checks waiting for the next flush (`--event-backlog`).
        EventBacklogFull = "event_backlog_full",
        /// A sample for a new context while `--context-limit` contexts are live.
        ContextLimit = "context_limit",
        /// A sample that needed memory while `--aggregation-memory` was spent (a new
        /// context, a histogram, set or sketch growing, a timestamped point).
        MemoryLimit = "memory_limit",
        /// A sample of a metric on the filter list (`--metric-filterlist`,
        /// `--metric-blocklist`).
        Filtered = "filtered",
        /// A packet's last message without a newline, on a transport that requires one
        /// (`--eol-required`).
        Unterminated = "unterminated",
    }
}

/// Parse errors of one message kind, per reason.
pub(crate) type ByReason<T> = PerLabel<Reason, T, { Reason::COUNT }>;
/// One entry per message kind.
pub(crate) type ByKind<T> = PerLabel<MessageKind, T, { MessageKind::COUNT }>;

/// The workers' counters, shared by every worker.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages parsed, per kind.
    pub messages: ByKind<Counter>,
    /// Parse errors, per kind and reason.
    pub parse_errors: ByKind<ByReason<Counter>>,
    /// Messages or samples dropped after parsing, per reason.
    pub dropped: PerLabel<Discard, Counter, { Discard::COUNT }>,
    /// `@rate` outside (0, 1], treated as 1.
    pub sample_rate_invalid: Counter,
    /// Metric samples aggregated by shards (one per value).
    pub samples: Counter,
    pub contexts_created: Counter,
    /// Tags the per-metric tag filter removed, counted as a worker builds a context (once
    /// per context and worker, again if its cache forgot the context).
    pub tags_filtered: Counter,
    /// Times a worker found every shard it had left to visit locked by another, and waited.
    pub shard_lock_waits: Counter,
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        out.per_label("whippet_messages_total", &self.messages);
        for (kind, reasons) in self.parse_errors.iter() {
            for (reason, c) in reasons.iter() {
                let labels = [("kind", kind.label()), ("reason", reason.label())];
                out.counter("whippet_parse_errors_total", &labels, c.get());
            }
        }
        out.per_label("whippet_dropped_total", &self.dropped);
        let rate = self.sample_rate_invalid.get();
        out.counter("whippet_sample_rate_invalid_total", &[], rate);
        out.counter("whippet_samples_total", &[], self.samples.get());
        let created = self.contexts_created.get();
        out.counter("whippet_contexts_created_total", &[], created);
        let filtered = self.tags_filtered.get();
        out.counter("whippet_tags_filtered_total", &[], filtered);
        let waits = self.shard_lock_waits.get();
        out.counter("whippet_shard_lock_waits_total", &[], waits);
    }
}

/// Counts kept by one worker during one batch, added to its [`Counters`] at the batch's end.
#[derive(Default)]
struct Tally {
    messages: ByKind<u64>,
    errors: ByKind<ByReason<u64>>,
    dropped: PerLabel<Discard, u64, { Discard::COUNT }>,
    samples: u64,
    new_contexts: u64,
    rate_invalid: u64,
    tags_filtered: u64,
    shard_lock_waits: u64,
}

impl Tally {
    fn drain_into(&mut self, c: &Counters) {
        for (kind, n) in self.messages.iter() {
            c.messages[kind].add(*n);
        }
        for (kind, reasons) in self.errors.iter() {
            for (reason, n) in reasons.iter() {
                c.parse_errors[kind][reason].add(*n);
            }
        }
        for (discard, n) in self.dropped.iter() {
            c.dropped[discard].add(*n);
        }
        c.samples.add(self.samples);
        c.contexts_created.add(self.new_contexts);
        c.sample_rate_invalid.add(self.rate_invalid);
        c.tags_filtered.add(self.tags_filtered);
        c.shard_lock_waits.add(self.shard_lock_waits);
        *self = Tally::default();
    }

    fn inserted(&mut self, stats: crate::shard::InsertStats) {
        self.samples += stats.samples;
        self.new_contexts += stats.new_contexts;
        self.dropped[Discard::ContextLimit] += stats.over_limit;
        self.dropped[Discard::MemoryLimit] += stats.over_memory;
    }
}

/// A batch's reusable buffers, borrowed while its messages are parsed, and what origin
/// detection knows of it.
struct Scratch<'s, 'a> {
    tags: &'s mut Vec<&'a str>,
    sort: &'s mut Vec<(u64, &'a str)>,
    per_shard: &'s mut [ShardBatch<'a>],
    /// The origins of the batch's metrics that have one ([`Sample::origin`] indexes it).
    origins: &'s mut Vec<Resolved<'a>>,
    /// The tagger's snapshot, when origin detection is on.
    snapshot: Option<&'a Entities>,
    /// Each packet's sending container, when the reader learnt the senders' pids.
    sockets: Vec<Option<Arc<str>>>,
    /// The shaping decisions the batch's samples use ([`Sample::shaped`] indexes it).
    keep: &'a Keep,
    /// The values of a metric that has several, as the parser read them: [`PARSING`] for
    /// the message being parsed, [`PENDING`] for the metric waiting for its second half (they
    /// swap as a metric starts waiting). Each holds at most one message's values (a packet's
    /// or a stream line's length at most).
    many: &'s mut [Vec<f64>; 2],
}

pub struct Worker {
    demux: Arc<Demux>,
    counters: Arc<Counters>,
    enrichment: Enrichment,
    /// Reloadable extra tags and the generation this worker applied.
    live: Option<(Arc<LiveTags>, u64)>,
    tally: Tally,
    /// Reused across batches: the tag arena, the origins and one sample batch per shard.
    tags: Vec<&'static str>,
    origins: Vec<Resolved<'static>>,
    sockets: Vec<Option<Arc<str>>>,
    sort_scratch: Vec<(u64, &'static str)>,
    many: [Vec<f64>; 2],
    /// Reused to lay a context out for hashing.
    hash_scratch: Vec<u8>,
    per_shard: Vec<ShardBatch<'static>>,
    /// Raw context bytes → canonical context, so a known context skips splitting, sorting
    /// and hashing its tags.
    cache: ContextCache,
    /// With shaping: the decision of each cached context it changed, by raw key
    /// ([`Cached::shaped`]); the decisions by name, for contexts not yet cached; the
    /// decisions one batch holds.
    shaped: hashbrown::HashTable<Beside>,
    /// Bytes of names and tags of the decisions in `shaped`, counted as they are put in.
    shaped_bytes: usize,
    decisions: Decisions,
    keep: Keep,
    events: Vec<EventRecord>,
    checks: Vec<ServiceCheckRecord>,
}

impl Worker {
    pub fn new(demux: Arc<Demux>, counters: Arc<Counters>, enrichment: Enrichment) -> Worker {
        let shards = demux.shard_count();
        Worker {
            demux,
            counters,
            enrichment,
            live: None,
            tally: Tally::default(),
            tags: Vec::new(),
            origins: Vec::new(),
            sockets: Vec::new(),
            sort_scratch: Vec::new(),
            many: [Vec::new(), Vec::new()],
            hash_scratch: Vec::new(),
            cache: ContextCache::new(),
            shaped: hashbrown::HashTable::new(),
            shaped_bytes: 0,
            decisions: Decisions::default(),
            keep: Keep::default(),
            per_shard: (0..shards).map(|_| ShardBatch::default()).collect(),
            events: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Takes its extra tags and shaping from `live` from now on (and whenever they change).
    pub(crate) fn with_live_tags(mut self, live: Arc<LiveTags>) -> Worker {
        let (generation, (tags, shaping)) = live.current();
        self.enrichment.extra_tags = tags;
        self.enrichment.shaping = shaping;
        self.live = Some((live, generation));
        self
    }

    /// Processes batches until the queue is closed and empty; returns buffers to `pool`.
    pub fn run(mut self, queue: Receiver<Batch>, pool: Arc<Pool>) {
        while let Ok(batch) = queue.recv() {
            self.process(&batch);
            pool.put(batch);
        }
    }

    /// Parses and aggregates every message of one batch.
    pub fn process(&mut self, batch: &Batch) {
        // Wherever it runs: a pool worker, or a reader parsing its own batch.
        crate::inject_fault("worker");
        self.apply_live_tags();
        // Decisions leave the table only here, between batches: a batch's samples borrow
        // their names from the ones it holds. Within a batch it grows by at most the
        // batch's contexts.
        if self.shaped.len() >= SHAPED_MAX || self.shaped_bytes >= SHAPED_BYTES {
            self.shaped.clear();
            self.shaped_bytes = 0;
        }
        let enrichment = self.enrichment.clone();
        // One snapshot of the container tags for the whole batch: lookups take no lock.
        let snapshot = enrichment.origin.as_ref().map(|o| o.tagger.snapshot());
        let mut tags: Vec<&str> = recycle(std::mem::take(&mut self.tags));
        let mut origins: Vec<Resolved<'_>> = recycle(std::mem::take(&mut self.origins));
        let mut sort: Vec<(u64, &str)> = recycle(std::mem::take(&mut self.sort_scratch));
        let mut per_shard: Vec<ShardBatch<'_>> = std::mem::take(&mut self.per_shard)
            .into_iter()
            .map(ShardBatch::rebind)
            .collect();
        let keep = std::mem::take(&mut self.keep);
        let mut many = std::mem::take(&mut self.many);
        let mut scratch = Scratch {
            tags: &mut tags,
            sort: &mut sort,
            per_shard: &mut per_shard,
            origins: &mut origins,
            snapshot: snapshot.as_deref(),
            sockets: std::mem::take(&mut self.sockets),
            keep: &keep,
            many: &mut many,
        };
        self.parse_batch(batch, &enrichment, &mut scratch);
        self.sockets = std::mem::take(&mut scratch.sockets);
        self.sockets.clear();
        let held = (&origins[..], &keep);
        self.insert_into_shards(&mut per_shard, &mut tags, &mut sort, held, &enrichment);
        if !self.events.is_empty() || !self.checks.is_empty() {
            let full = self.demux.push_backlog(&mut self.events, &mut self.checks);
            self.tally.dropped[Discard::EventBacklogFull] += full;
        }
        self.tags = recycle(tags);
        self.origins = recycle(origins);
        self.sort_scratch = recycle(sort);
        self.per_shard = per_shard.into_iter().map(ShardBatch::rebind).collect();
        self.keep = keep;
        self.keep.clear();
        self.many = many.map(recycle);
        self.tally.drain_into(&self.counters);
    }

    /// Takes new extra tags and shaping if SIGHUP changed them, forgetting the contexts
    /// cached and the decisions made under the old ones.
    fn apply_live_tags(&mut self) {
        if let Some((live, seen)) = &mut self.live {
            if live.generation.load(Relaxed) != *seen {
                let (generation, (tags, shaping)) = live.current();
                *seen = generation;
                self.enrichment.extra_tags = tags;
                self.enrichment.shaping = shaping;
                self.cache.clear();
                self.shaped.clear();
                self.shaped_bytes = 0;
                self.decisions.clear();
            }
        }
    }

    /// Parses every message of the batch: metrics become samples in `scratch.per_shard`,
    /// events and service checks records in `self.events` and `self.checks`.
    fn parse_batch<'a>(
        &mut self,
        batch: &'a Batch,
        enrichment: &'a Enrichment,
        scratch: &mut Scratch<'_, 'a>,
    ) {
        let bucket = clock::bucket_start(batch.received_at, enrichment.bucket_seconds);
        // The sending container of each packet, when origin detection learnt the pids.
        if let (Some(pids), Some(o)) = (batch.pids(), &enrichment.origin) {
            if let Some(cache) = &o.pids {
                scratch
                    .sockets
                    .extend(pids.iter().map(|&pid| cache.container(pid)));
            }
        }
        let snapshot = scratch.snapshot;
        // A metric is finished one message late, so the context cache's set it needs is
        // loaded while the next message is parsed.
        let mut pending: Option<Pending<'a>> = None;
        let eol_required = enrichment.eol_required[batch.transport as usize];
        for (i, packet) in batch.packets().enumerate() {
            let packet = if eol_required {
                self.terminated(packet)
            } else {
                packet
            };
            // A record's origin fields are read only when origin detection is on.
            let origin =
                |scratch: &Scratch<'_, 'a>, tags: &str, fields: &dyn Fn() -> OriginFields<'a>| {
                    let o = enrichment.origin.as_ref()?;
                    let socket = scratch.sockets.get(i).and_then(|s| s.as_deref());
                    o.resolve(snapshot?, socket, tags, &fields())
                };
            for line in scanned_lines(packet) {
                match parser::parse_line_into(line, &mut scratch.many[PARSING]) {
                    Ok(Message::Metric(mut m)) => {
                        self.tally.messages[MessageKind::Metric] += 1;
                        if !enrichment.timestamps {
                            m.timestamp = None;
                        }
                        let Some(key) = self.admit(&m) else {
                            continue;
                        };
                        if let Some(p) = pending.replace((m, key, i)) {
                            self.metric(&p, enrichment, bucket, scratch);
                        }
                        scratch.many.swap(PARSING, PENDING);
                    }
                    Ok(Message::Event(e)) => {
                        self.tally.messages[MessageKind::Event] += 1;
                        let resolved = origin(scratch, e.tags, &|| e.origin());
                        self.event(&e, enrichment, batch.received_at, resolved.as_ref());
                    }
                    Ok(Message::ServiceCheck(c)) => {
                        self.tally.messages[MessageKind::ServiceCheck] += 1;
                        let resolved = origin(scratch, c.tags, &|| c.origin());
                        self.service_check(&c, enrichment, batch.received_at, resolved.as_ref());
                    }
                    Err(e) => self.tally.errors[e.kind][e.reason] += 1,
                }
            }
        }
        if let Some(p) = pending.take() {
            self.metric(&p, enrichment, bucket, scratch);
        }
    }

    /// The part of a packet up to its last newline; a message after it (cut short, maybe)
    /// is dropped and counted.
    #[inline(never)]
    fn terminated<'p>(&mut self, packet: &'p [u8]) -> &'p [u8] {
        let end = memchr::memrchr(b'\n', packet).map_or(0, |at| at + 1);
        if packet[end..].iter().any(|b| !b.is_ascii_whitespace()) {
            self.tally.dropped[Discard::Unterminated] += 1;
        }
        &packet[..end]
    }

    /// Hands each shard its samples under one lock; vouched samples a shard sends back (their
    /// context expired) go again with their canonical tags.
    ///
    /// A shard another worker holds is passed over and visited after the rest, so a worker
    /// waits on a lock only when every shard it has left to visit is busy (each such wait is
    /// counted: `whippet_shard_lock_waits_total`).
    fn insert_into_shards<'a>(
        &mut self,
        per_shard: &mut [ShardBatch<'a>],
        tags: &mut Vec<&'a str>,
        sort: &mut Vec<(u64, &'a str)>,
        held: (&[Resolved<'a>], &'a Keep),
        enrichment: &'a Enrichment,
    ) {
        let mut passed_over = false;
        for (shard, batch) in per_shard.iter_mut().enumerate() {
            if !batch.samples.is_empty() {
                let done = self.insert_into(shard, batch, tags, sort, held, enrichment, false);
                passed_over |= !done;
            }
        }
        if !passed_over {
            return;
        }
        for (shard, batch) in per_shard.iter_mut().enumerate() {
            if !batch.samples.is_empty() {
                self.insert_into(shard, batch, tags, sort, held, enrichment, true);
            }
        }
    }

    /// Inserts one shard's samples; without `wait`, only if its lock is free. Returns whether
    /// they were inserted.
    #[allow(clippy::too_many_arguments)]
    fn insert_into<'a>(
        &mut self,
        shard: usize,
        batch: &mut ShardBatch<'a>,
        tags: &mut Vec<&'a str>,
        sort: &mut Vec<(u64, &'a str)>,
        (origins, keep): (&[Resolved<'a>], &'a Keep),
        enrichment: &'a Enrichment,
        wait: bool,
    ) -> bool {
        let stats = if wait {
            let (stats, waited) = self.demux.insert_waiting(shard, batch, tags);
            self.tally.shard_lock_waits += waited as u64;
            stats
        } else {
            match self.demux.try_insert(shard, batch, tags) {
                Some(stats) => stats,
                None => return false,
            }
        };
        self.tally.inserted(stats);
        let resend = batch.resend(|s| {
            let start = tags.len();
            let origin = (s.origin > 0).then(|| &origins[s.origin as usize - 1]);
            // A histogram's distribution copy is the one sample of its decision that is a
            // distribution.
            let shape = (s.shaped > 0).then(|| {
                let shaped = keep.get(s.shaped);
                let copy = shaped.copy.is_some() && s.kind == MetricKind::Distribution;
                shaped.shape(copy)
            });
            let extra = &enrichment.extra_tags;
            let shape = shape.unwrap_or_default();
            let (_, filtered) = canonicalize(s.raw_tags, extra, origin, shape, tags, sort);
            self.tally.tags_filtered += filtered as u64;
            ContextTags::Arena(start as u32, tags.len() as u32)
        });
        if resend {
            let stats = self.demux.insert(shard, batch, tags);
            self.tally.inserted(stats);
        }
        batch.samples.clear();
        true
    }

    /// The first half of a metric: counts what it is owed and returns its key for the
    /// context cache, whose set it starts loading; `None` when the metric is dropped.
    fn admit(&mut self, m: &Metric<'_>) -> Option<RawKey> {
        if m.sample_rate_invalid {
            self.tally.rate_invalid += 1;
        }
        if m.timestamp.is_some() {
            if !matches!(m.kind, MetricKind::Gauge | MetricKind::Count) {
                self.tally.dropped[Discard::TimestampedUnsupported] += 1;
                return None;
            }
            // Timestamped samples bypass the cache.
            return Some(RawKey::Uncached);
        }
        let raw = self.cache.raw_key(self.demux.hasher(), m);
        self.cache.prefetch(raw);
        Some(RawKey::Hash(raw))
    }

    /// The second half: finds or builds the context and queues the samples for its shard.
    fn metric<'a>(
        &mut self,
        (m, key, packet): &Pending<'a>,
        enrichment: &'a Enrichment,
        bucket: i64,
        scratch: &mut Scratch<'_, 'a>,
    ) {
        let (mut key, packet) = (*key, *packet);
        let mut cached = match key {
            RawKey::Hash(raw) => self.cache.find_metric(raw, m),
            RawKey::Uncached => None,
        };
        let mut origin_index = 0;
        if enrichment.origin.is_some() {
            (cached, origin_index) = self.origin(m, &mut key, cached, enrichment, packet, scratch);
        }
        let origin = origin_index
            .checked_sub(1)
            .map(|i| scratch.origins[i as usize]);
        let mut target = Target {
            name: m.name,
            kind: m.kind,
            decision: None,
            shaped: 0,
        };
        let mut copy = None;
        if let Some(shaping) = &enrichment.shaping {
            let found;
            (cached, found) = self.shape(m, key, cached, shaping, scratch.keep);
            if let Some(f) = found {
                if f.blocked {
                    self.tally.dropped[Discard::Filtered] +=
                        value_count(&m.values, &scratch.many[PENDING]);
                    return;
                }
                target.name = f.name;
                target.decision = Some((f.decision, false));
                target.shaped = f.index;
                copy = f.copy.then_some(f.decision);
            }
        }
        let place = Place {
            key,
            origin: origin.as_ref(),
            origin_index,
            bucket,
        };
        self.place(m, target, cached, &place, enrichment, scratch);
        if let Some(c) = copy.and_then(|s| s.copy.as_ref()) {
            let key = match key {
                RawKey::Hash(raw) => RawKey::Hash(ContextCache::with_origin(
                    self.demux.hasher(),
                    raw,
                    COPY_IDENTITY,
                )),
                RawKey::Uncached => RawKey::Uncached,
            };
            let cached = match key {
                RawKey::Hash(raw) => self.cache.find(
                    raw,
                    crate::context::short_len(m.name),
                    crate::context::short_len(m.tags),
                    MetricKind::Distribution,
                ),
                RawKey::Uncached => None,
            };
            let target = Target {
                name: &c.name,
                kind: MetricKind::Distribution,
                decision: target.decision.map(|(s, _)| (s, true)),
                shaped: target.shaped,
            };
            self.place(
                m,
                target,
                cached,
                &Place { key, ..place },
                enrichment,
                scratch,
            );
        }
    }

    /// Finds (cached) or builds the context of `m` as `target` names and shapes it, and
    /// queues its samples for its shard.
    /// Inlined, so that a metric without a copy costs one function as before shaping.
    #[inline(always)]
    fn place<'a>(
        &mut self,
        m: &Metric<'a>,
        target: Target<'a>,
        cached: Option<Cached>,
        place: &Place<'_, 'a>,
        enrichment: &'a Enrichment,
        scratch: &mut Scratch<'_, 'a>,
    ) {
        let (hash, host, tags) = match cached {
            Some(c) => {
                let host = match c.host {
                    DEFAULT_HOST => &*enrichment.hostname,
                    (a, b) => &m.tags[a as usize..b as usize],
                };
                (c.hash, host, ContextTags::Vouched)
            }
            None => self.build_context(m, &target, place, enrichment, scratch),
        };
        let out = &mut scratch.per_shard[self.demux.shard_of(hash)].samples;
        let many = &scratch.many[PENDING];
        let sample = |value| Sample {
            hash,
            name: target.name,
            host,
            tags,
            raw_tags: m.tags,
            kind: target.kind,
            value,
            sample_rate: m.sample_rate,
            timestamp: m.timestamp,
            bucket: place.bucket,
            origin: place.origin_index,
            shaped: target.shaped,
        };
        match m.values {
            Values::One(v) => out.push(sample(SampleValue::Number(v))),
            Values::Member(member) => out.push(sample(SampleValue::Member(member))),
            Values::Many(_) => {
                out.extend(many.iter().map(|&v| sample(SampleValue::Number(v))));
            }
        }
    }

    /// Shaping for a metric: a known context's decision is found beside the cache (also
    /// when the cache forgot the context); a new context's is made (or found by its name)
    /// and kept beside the cache. Returns the
    /// cache entry to trust (none when the decision was forgotten) and the decision, listed
    /// for the batch, unless it changes nothing. Kept out of line: without shaping the hot
    /// path never enters it.
    #[inline(never)]
    fn shape<'a>(
        &mut self,
        m: &Metric<'_>,
        key: RawKey,
        cached: Option<Cached>,
        shaping: &Shaping,
        keep: &'a Keep,
    ) -> (Option<Cached>, Option<Found<'a>>) {
        match (cached, key) {
            (Some(c), _) if !c.shaped => return (cached, None),
            (_, RawKey::Hash(raw)) => {
                if let Some(beside) = self.shaped.find(raw, |e| e.raw == raw) {
                    // SAFETY: entries leave `self.shaped` only between batches (`process`
                    // and `apply_live_tags` clear it before a batch starts).
                    let found = unsafe { beside.lend(keep) };
                    if cached.is_none() && found.blocked {
                        // The cache forgot a filtered context its decision outlived.
                        self.cache_blocked(raw, m);
                    }
                    return (cached, Some(found));
                }
            }
            _ => {}
        }
        let decided = self.decisions.get(shaping, m.name, m.kind);
        if decided.is_identity(m.name) {
            return (None, None);
        }
        let RawKey::Hash(raw) = key else {
            let (index, decision) = keep.hold(decided);
            let found = Found {
                index,
                name: &decision.name,
                blocked: decision.blocked,
                copy: decision.copy.is_some(),
                decision,
            };
            return (None, Some(found));
        };
        if decided.blocked {
            self.cache_blocked(raw, m);
        }
        self.shaped_bytes += decided.size();
        let beside = self
            .shaped
            .insert_unique(raw, Beside::new(raw, decided), |e| e.raw);
        // SAFETY: just put in `self.shaped`, which keeps it until the batch ends (as above).
        (None, Some(unsafe { beside.get().lend(keep) }))
    }

    /// Caches a filtered context, so its next samples are dropped at a cache hit.
    fn cache_blocked(&mut self, raw: u64, m: &Metric<'_>) {
        let mut entry = Cached::new(raw, m, 0, DEFAULT_HOST);
        entry.shaped = true;
        self.cache.insert(entry);
    }

    /// Origin detection for a metric: one that may have an origin is resolved, and its
    /// context is looked up under its raw key and the origin's identity together. One known
    /// to have no `dd.internal.` tag, from no container, naming none, keeps its plain cache
    /// entry. Returns the cache entry to use and the metric's [`Sample::origin`]. Kept out
    /// of line: without origin detection the hot path never enters it.
    #[inline(never)]
    fn origin<'a>(
        &mut self,
        m: &Metric<'a>,
        key: &mut RawKey,
        cached: Option<Cached>,
        enrichment: &'a Enrichment,
        packet: usize,
        scratch: &mut Scratch<'_, 'a>,
    ) -> (Option<Cached>, u32) {
        let (Some(o), Some(snapshot)) = (&enrichment.origin, scratch.snapshot) else {
            return (cached, 0);
        };
        let socket = scratch.sockets.get(packet).and_then(|s| s.as_deref());
        let named = o.client && !m.origin.is_empty();
        if socket.is_none() && !named && cached.is_some_and(|c| !c.magic) {
            return (cached, 0);
        }
        let Some(r) = o.resolve(snapshot, socket, m.tags, &m.origin) else {
            return (cached, 0);
        };
        scratch.origins.push(r);
        let index = scratch.origins.len() as u32;
        match *key {
            RawKey::Hash(raw) => {
                let raw = ContextCache::with_origin(self.demux.hasher(), raw, r.identity());
                *key = RawKey::Hash(raw);
                (self.cache.find_metric(raw, m), index)
            }
            RawKey::Uncached => (None, index),
        }
    }

    /// A context the cache does not know: canonical tags into the arena, the hash, and (for a
    /// cacheable metric) a cache entry. Returns the hash, the host and the tags' range.
    fn build_context<'a>(
        &mut self,
        m: &Metric<'a>,
        target: &Target<'a>,
        place: &Place<'_, 'a>,
        enrichment: &'a Enrichment,
        scratch: &mut Scratch<'_, 'a>,
    ) -> (u64, &'a str, ContextTags) {
        let start = scratch.tags.len();
        let extra = &enrichment.extra_tags;
        let origin = place.origin;
        let shape = target
            .decision
            .map_or_else(Shape::default, |(s, copy)| s.shape(copy));
        let (host_tag, filtered) =
            canonicalize(m.tags, extra, origin, shape, scratch.tags, scratch.sort);
        self.tally.tags_filtered += filtered as u64;
        let host = match (shape.host, host_tag) {
            (Some(_), _) => "",
            (None, Some(h)) => h,
            (None, None) => &enrichment.hostname,
        };
        let context = ContextRef {
            name: target.name,
            host,
            tags: &scratch.tags[start..],
            kind: target.kind,
        };
        let hash = context.hash_with(self.demux.hasher(), &mut self.hash_scratch);
        if let RawKey::Hash(raw) = place.key {
            let host = match (shape.host, host_tag) {
                // A host rule: no host, the empty range.
                (Some(_), _) => (0, 0),
                // The host tag is a slice of the raw field: keep its byte range.
                (None, Some(h)) => {
                    let at = h.as_ptr() as usize - m.tags.as_ptr() as usize;
                    (at as u32, (at + h.len()) as u32)
                }
                (None, None) => DEFAULT_HOST,
            };
            let mut entry = Cached::new(raw, m, hash, host);
            entry.kind = target.kind;
            entry.shaped = target.shaped > 0;
            self.cache.insert(entry);
        }
        let range = ContextTags::Arena(start as u32, scratch.tags.len() as u32);
        (hash, host, range)
    }

    fn event(
        &mut self,
        e: &Event<'_>,
        enrichment: &Enrichment,
        received_at: i64,
        origin: Option<&Resolved<'_>>,
    ) {
        let (host, tags) = record_tags(e.tags, e.host, enrichment, origin);
        self.events.push(EventRecord {
            title: unescape(e.title),
            text: unescape(e.text),
            // Arrival on the pipeline's clock, stamped by the wall clock.
            timestamp: e
                .timestamp
                .map_or_else(|| received_at + clock::wall_drift(), |t| t.get()),
            host,
            aggregation_key: e.aggregation_key.to_string(),
            priority: e.priority,
            source_type: e.source_type.to_string(),
            alert_type: e.alert_type,
            tags,
        });
    }

    fn service_check(
        &mut self,
        c: &ServiceCheck<'_>,
        enrichment: &Enrichment,
        received_at: i64,
        origin: Option<&Resolved<'_>>,
    ) {
        let (host, tags) = record_tags(c.tags, c.host, enrichment, origin);
        self.checks.push(ServiceCheckRecord {
            name: c.name.to_string(),
            status: c.status,
            timestamp: c
                .timestamp
                .unwrap_or_else(|| received_at + clock::wall_drift()),
            host,
            message: c.message.to_string(),
            tags,
        });
    }
}

/// A metric waiting for its second half: its cache key and the index of its packet. Its
/// values, when it has several, are in [`Scratch::many`]'s [`PENDING`].
type Pending<'a> = (Metric<'a>, RawKey, usize);

/// [`Scratch::many`]: the buffer the parser fills, and the one the pending metric's values
/// are in.
const PARSING: usize = 0;
const PENDING: usize = 1;

/// What a metric's samples become: the name and type of their context, the decision that
/// shapes its tags (and whether for the distribution copy), and its index in the batch's
/// list ([`Sample::shaped`]). The decision is read only to build a new context.
#[derive(Clone, Copy)]
struct Target<'a> {
    name: &'a str,
    kind: MetricKind,
    decision: Option<(&'a Shaped, bool)>,
    shaped: u32,
}

/// A metric's shaping decision as the hot path needs it: read from the entry beside the
/// context cache, without touching the decision itself.
struct Found<'a> {
    index: u32,
    name: &'a str,
    blocked: bool,
    copy: bool,
    decision: &'a Shaped,
}

/// A decision kept beside the context cache, by the raw key of a context it shapes, with
/// what a cache hit needs of it in the same entry.
struct Beside {
    raw: u64,
    decision: Arc<Shaped>,
    name: Arc<str>,
    blocked: bool,
    copy: bool,
}

impl Beside {
    fn new(raw: u64, decision: Arc<Shaped>) -> Beside {
        Beside {
            raw,
            name: decision.name.clone(),
            blocked: decision.blocked,
            copy: decision.copy.is_some(),
            decision,
        }
    }

    /// Lists the decision for the batch and lends what the hot path needs.
    ///
    /// # Safety
    ///
    /// The entry must stay in its table until `keep` is cleared (entries leave
    /// `Worker::shaped` only between batches).
    unsafe fn lend<'a>(&self, keep: &'a Keep) -> Found<'a> {
        // SAFETY: the caller keeps the entry, and so the `Arc`s, alive and unmoved in
        // what they point to until the list is cleared. Neither pointer is read here.
        let (index, decision) = unsafe { keep.lend(Arc::as_ptr(&self.decision)) };
        // SAFETY: as above, for the name.
        let name: &'a str = unsafe { &*Arc::as_ptr(&self.name) };
        Found {
            index,
            name,
            blocked: self.blocked,
            copy: self.copy,
            decision,
        }
    }
}

/// Where a metric's samples go, whatever their target: its cache key, origin and bucket.
#[derive(Clone, Copy)]
struct Place<'o, 'a> {
    key: RawKey,
    origin: Option<&'o Resolved<'a>>,
    origin_index: u32,
    bucket: i64,
}

/// What sets a histogram's distribution copy's cache key apart from the histogram's own.
const COPY_IDENTITY: [u64; 4] = [0x636f_7079, 0, 0, 0];

/// Most decisions kept beside the context cache (its largest size), and the most bytes of
/// names and tags they may hold (the table keeps alive decisions the name cache forgot, and
/// hostile clients choose names); beyond either, they are forgotten together at the next
/// batch and made again as their contexts come.
const SHAPED_MAX: usize = 1 << 16;
const SHAPED_BYTES: usize = 4 << 20;

/// How many samples a metric message carries; `many` holds its values when it has several.
fn value_count(values: &Values<'_>, many: &[f64]) -> u64 {
    match values {
        Values::One(_) | Values::Member(_) => 1,
        Values::Many(_) => many.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Pool;
    use crate::packet::Transport;
    use crate::shard::{Accumulator, Expiry};

    fn worker(shards: usize, host: &str, extra: &[&str]) -> Worker {
        let enrichment = Enrichment::plain(host, extra);
        Worker::new(
            Arc::new(Demux::new(shards, 100)),
            Arc::new(Counters::default()),
            enrichment,
        )
    }

    fn feed(w: &mut Worker, packets: &[&str]) {
        let pool = Pool::new(1024, 1);
        let mut batch = pool.get(Transport::Unix);
        let mut at = 0;
        for p in packets {
            batch.buffer_mut()[at..at + p.len()].copy_from_slice(p.as_bytes());
            batch.push_packet(at, at + p.len());
            at += 1024;
        }
        batch.received_at = 1_700_000_005;
        w.process(&batch);
    }

    #[test]
    fn a_known_metric_allocates_nothing_with_origin_detection_or_shaping() {
        use crate::enrichment::OriginDetection;
        use crate::tagger::{Cardinality, Entities, Sources, Tagger};
        // Types whose aggregate does not grow with more samples: what is measured is the
        // path, not a histogram's or sketch's growth.
        let packet = "a:1|c|#env:dev,host:web1\nb:2|g|#x,y\nc:1:2|c\ns:m|s|#k:v\n_sc|n|0";
        for (origin, shaped) in [(false, false), (true, false), (false, true)] {
            let mut w = worker(4, "h", &["team:core"]);
            if shaped {
                let settings = crate::config::ShapingSettings {
                    namespace: "ns.".into(),
                    mapper_cache_size: 100,
                    ..Default::default()
                };
                w.enrichment.shaping = settings.build().unwrap();
            }
            if origin {
                let tagger = Tagger::new(Sources::default(), Arc::default());
                tagger.publish(Entities::default());
                let o = OriginDetection::new(tagger, None, true, false, Cardinality::Low);
                w.enrichment.origin = Some(Arc::new(o));
            }
            let pool = Pool::new(1024, 1);
            let mut batch = pool.get(Transport::Unix);
            let metrics = &packet[..packet.rfind('\n').unwrap()];
            batch.buffer_mut()[..metrics.len()].copy_from_slice(metrics.as_bytes());
            batch.push_packet(0, metrics.len());
            w.process(&batch); // creates the contexts and sizes every buffer
            w.process(&batch);
            let before = crate::allocations::count();
            w.process(&batch);
            let allocated = crate::allocations::count() - before;
            assert_eq!(allocated, 0, "origin {origin}, shaped {shaped}");
            assert_eq!(w.counters.samples.get(), 3 * 5);
        }
    }

    #[test]
    fn a_shard_another_worker_holds_is_visited_after_the_free_ones() {
        let mut w = worker(2, "h", &[]);
        let (demux, counters) = (w.demux.clone(), w.counters.clone());
        // 64 names: both shards get some (all in one has odds of 2 in 2^64).
        let packet: String = (0..64).map(|i| format!("m{i}:1|c\n")).collect();
        let held = demux.hold(0);
        let worker = std::thread::spawn(move || feed(&mut w, &[&packet]));
        // Shard 1 gets its samples while shard 0 is still held...
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while demux.hold(1).len() == 0 {
            assert!(std::time::Instant::now() < deadline, "shard 1 waited for 0");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let in_one = demux.hold(1).len();
        assert_eq!(held.len(), 0);
        // ...and shard 0's once it is let go, after one counted wait.
        drop(held);
        worker.join().unwrap();
        assert_eq!(demux.hold(0).len() + in_one, 64);
        assert_eq!(counters.samples.get(), 64);
        assert_eq!(counters.shard_lock_waits.get(), 1);
    }

    /// Ten-second buckets; a context idle through one flush is freed at the next.
    const FREE_IDLE: Expiry = Expiry {
        interval: 10,
        counter_seconds: 300,
        context_seconds: 0,
    };

    /// (name, host, tags, value description) of every closed context, sorted.
    fn flushed(w: &Worker) -> Vec<String> {
        let expiry = Expiry {
            interval: 10,
            counter_seconds: 300,
            context_seconds: 20,
        };
        let mut out = Vec::new();
        w.demux.flush(i64::MAX, &expiry, &mut out);
        let mut rows: Vec<String> = out
            .iter()
            .map(|c| {
                let value = match &c.acc {
                    Accumulator::Count(v) => format!("count={v}"),
                    Accumulator::Gauge(v) => format!("gauge={v}"),
                    Accumulator::Set(s) => format!("set={}", s.len()),
                    Accumulator::Histogram(h) => format!("hist={}", h.count),
                    Accumulator::Distribution(d) => format!("dist={}", d.summary().count),
                };
                let tags: Vec<&str> = c.context.tags().collect();
                format!(
                    "{} host={} tags={} ts={} {value}",
                    c.context.name(),
                    c.context.host(),
                    tags.join(","),
                    c.timestamp
                )
            })
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn host_tags_set_the_host_and_extra_tags_join_the_context() {
        let mut w = worker(4, "default-host", &["team:core"]);
        feed(
            &mut w,
            &[
                "a:1|c|#env:dev,host:web1\na:2|c|#host:web1,env:dev,env:dev",
                "a:4|c|#env:dev",
                "b:1|g|#host:,x",
                "c:1|g|#team:core",
            ],
        );
        assert_eq!(
            flushed(&w),
            [
                "a host=default-host tags=env:dev,team:core ts=1700000000 count=4",
                "a host=web1 tags=env:dev,team:core ts=1700000000 count=3",
                "b host= tags=team:core,x ts=1700000000 gauge=1",
                "c host=default-host tags=team:core ts=1700000000 gauge=1",
            ]
        );
    }

    #[test]
    fn every_value_of_a_multi_value_message_is_a_sample() {
        let mut w = worker(2, "h", &[]);
        feed(&mut w, &["d:1:2:3|d\nh:1::2|h\nc:1:2|c|@0.5"]);
        assert_eq!(
            flushed(&w),
            [
                "c host=h tags= ts=1700000000 count=6",
                "d host=h tags= ts=1700000000 dist=3",
                "h host=h tags= ts=1700000000 hist=2",
            ]
        );
        assert_eq!(w.counters.samples.get(), 7);
    }

    #[test]
    fn each_metric_keeps_its_own_values_whatever_comes_between() {
        // A metric is finished while the next message is parsed, so consecutive metrics with
        // several values swap two buffers: across an event, a rejected line, a single value
        // and the end of a packet.
        let mut w = worker(2, "h", &[]);
        feed(
            &mut w,
            &[
                "a:1:2:3|c\nb:10:20|c\n_e{1,1}:t|x\nbad:1:x|c\nx:5|g\nc:100:200:300:400|c",
                "d:7:8|g\ne:1000:2000|c",
            ],
        );
        assert_eq!(
            flushed(&w),
            [
                "a host=h tags= ts=1700000000 count=6",
                "b host=h tags= ts=1700000000 count=30",
                "c host=h tags= ts=1700000000 count=1000",
                "d host=h tags= ts=1700000000 gauge=8",
                "e host=h tags= ts=1700000000 count=3000",
                "x host=h tags= ts=1700000000 gauge=5",
            ]
        );
        assert_eq!(w.counters.samples.get(), 14);
    }

    #[test]
    fn batches_of_many_values_or_tags_leave_no_more_room_behind_than_usual() {
        let mut w = worker(2, "h", &[]);
        let line = format!("x:{}1|c\ny:{}1|c", "1:".repeat(12_000), "2:".repeat(12_000));
        feed(&mut w, &[&line]);
        // More tags than the arena keeps room for (a batch of its own: a packet holds 64 KiB).
        let tags: Vec<String> = (0..10_000).map(|i| format!("{i:04x}")).collect();
        feed(&mut w, &[&format!("z:1|c|#{}", tags.join(","))]);
        let mut rows = flushed(&w);
        let z = rows.pop().expect("three contexts");
        assert_eq!(
            rows,
            [
                "x host=h tags= ts=1700000000 count=12001",
                "y host=h tags= ts=1700000000 count=24001",
            ]
        );
        assert_eq!(
            z,
            format!("z host=h tags={} ts=1700000000 count=1", tags.join(","))
        );
        let kept = crate::sample::KEPT_BYTES;
        for shard in &w.per_shard {
            assert!(shard.samples.capacity() * std::mem::size_of::<Sample>() <= kept);
        }
        for values in &w.many {
            assert!(values.capacity() * 8 <= kept);
        }
        assert!(w.tags.capacity() * 16 <= kept);
        assert!(w.sort_scratch.capacity() * 24 <= kept);
    }

    #[test]
    fn errors_are_counted_by_kind_and_reason_and_the_rest_of_the_packet_survives() {
        let mut w = worker(1, "h", &[]);
        feed(
            &mut w,
            &["bad|x\nok:1|c\n_e{0,1}:|x\n_sc|n|9\nt:1|d|T5\nr:1|c|@7\n\n"],
        );
        let t = &w.counters;
        assert_eq!(t.messages[MessageKind::Metric].get(), 3); // ok, t (dropped later), r
        let errors = &t.parse_errors;
        assert_eq!(errors[MessageKind::Metric][Reason::MissingValue].get(), 1);
        assert_eq!(errors[MessageKind::Event][Reason::EmptyTitle].get(), 1);
        assert_eq!(
            errors[MessageKind::ServiceCheck][Reason::InvalidStatus].get(),
            1
        );
        assert_eq!(t.dropped[Discard::TimestampedUnsupported].get(), 1);
        assert_eq!(t.sample_rate_invalid.get(), 1);
        assert_eq!(
            flushed(&w),
            [
                "ok host=h tags= ts=1700000000 count=1",
                "r host=h tags= ts=1700000000 count=1"
            ]
        );
    }

    #[test]
    fn events_and_checks_get_defaults_extra_tags_and_unescaped_text() {
        let mut w = worker(1, "default-host", &["team:core"]);
        feed(
            &mut w,
            &["_e{5,6}:title|a\\nb c|#x\n_sc|db|1|h:dbhost|m:slow"],
        );
        let backlog = w.demux.take_backlog();
        let e = &backlog.events[0];
        assert_eq!((e.title.as_str(), e.text.as_str()), ("title", "a\nb c"));
        assert_eq!(
            (e.timestamp, e.host.as_str()),
            (1_700_000_005, "default-host")
        );
        assert_eq!(e.tags, ["x", "team:core"]);
        let c = &backlog.service_checks[0];
        assert_eq!(
            (c.name.as_str(), c.host.as_str(), c.message.as_str()),
            ("db", "dbhost", "slow")
        );
        assert_eq!(c.tags, ["team:core"]);
    }

    #[test]
    fn cached_contexts_aggregate_exactly_as_fresh_ones_across_batches() {
        let mut w = worker(4, "default-host", &["team:core"]);
        let packet = "a:1|c|#env:dev,host:web1\na:2|c|#host:web1,env:dev\nb:1|g|#x\nc:5|c|#host:,y";
        feed(&mut w, &[packet]);
        feed(&mut w, &[packet]); // every message now hits the cache
        assert_eq!(w.cache.len(), 4);
        assert_eq!(
            flushed(&w),
            [
                "a host=web1 tags=env:dev,team:core ts=1700000000 count=6",
                "b host=default-host tags=team:core,x ts=1700000000 gauge=1",
                "c host= tags=team:core,y ts=1700000000 count=10",
            ]
        );
        assert_eq!(w.counters.samples.get(), 8);
        assert_eq!(w.counters.contexts_created.get(), 3);
    }

    #[test]
    fn a_cached_context_that_expired_from_its_shard_is_created_again() {
        let mut w = worker(2, "h", &[]);
        feed(&mut w, &["gone:1|g|#k:v"]);
        let mut out = Vec::new();
        w.demux.flush(1_700_000_010, &FREE_IDLE, &mut out); // emits the bucket
        w.demux.flush(1_700_000_020, &FREE_IDLE, &mut out); // frees the idle context
        assert_eq!(out.len(), 1);
        // A cache hit and a shard miss, retried with its tags. Received at …005, but that
        // bucket was flushed: it joins the open one, …020.
        feed(&mut w, &["gone:7|g|#k:v"]);
        assert_eq!(flushed(&w), ["gone host=h tags=k:v ts=1700000020 gauge=7"]);
        assert_eq!(w.counters.contexts_created.get(), 2);
        assert_eq!(w.counters.samples.get(), 2);
    }

    #[test]
    fn a_cached_context_refused_over_the_limit_is_counted_once() {
        let demux = Arc::new(Demux::with_context_limit(1, 100, 1));
        let enrichment = Enrichment::plain("h", &[]);
        let mut w = Worker::new(demux, Arc::new(Counters::default()), enrichment);
        feed(&mut w, &["gone:1|g"]);
        let mut out = Vec::new();
        w.demux.flush(1_700_000_010, &FREE_IDLE, &mut out);
        w.demux.flush(1_700_000_020, &FREE_IDLE, &mut out); // frees it; the cache still has it
        feed(&mut w, &["other:1|g"]); // takes the only slot
        feed(&mut w, &["gone:2|g"]); // cache hit, shard miss, refused on the retry
        assert_eq!(w.counters.dropped[Discard::ContextLimit].get(), 1);
        assert_eq!(w.counters.contexts_created.get(), 2);
    }

    /// A worker with shaping compiled from `settings`.
    fn shaped_worker(settings: crate::config::ShapingSettings) -> Worker {
        let mut w = worker(2, "h", &[]);
        w.enrichment.shaping = settings.build().unwrap();
        assert!(w.enrichment.shaping.is_some());
        w
    }

    fn shaping() -> crate::config::ShapingSettings {
        crate::config::ShapingSettings {
            mapper_cache_size: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn mapped_and_namespaced_contexts_aggregate_alike_cached_or_not() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            mapper_profiles: Some(
                r#"[{"name":"air","prefix":"airflow.","mappings":[
                    {"match":"airflow.job.duration.*.*","name":"airflow.job.duration",
                     "tags":{"job_type":"$1","job_name":"$2"}}]}]"#
                    .into(),
            ),
            namespace: "app.".into(),
            namespace_exempt: vec!["jvm".into()],
            ..shaping()
        });
        let packet = "airflow.job.duration.etl.daily:3|g|#env:dev\nreq:1|c\njvm.heap:5|g\nreq:2|c|#host:web1";
        feed(&mut w, &[packet]);
        feed(&mut w, &[packet]); // every context now comes from the cache
        assert_eq!(
            flushed(&w),
            [
                "app.airflow.job.duration host=h tags=env:dev,job_name:daily,job_type:etl ts=1700000000 gauge=3",
                "app.req host=h tags= ts=1700000000 count=2",
                "app.req host=web1 tags= ts=1700000000 count=4",
                "jvm.heap host=h tags= ts=1700000000 gauge=5",
            ]
        );
        assert_eq!(w.counters.contexts_created.get(), 4);
        // One decision per name and type: the mapper ran once for its name.
        assert_eq!(w.decisions.len(), 3);
    }

    #[test]
    fn filtered_metrics_are_dropped_and_counted_per_sample_cached_or_not() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            filterlist: vec!["noisy.".into(), "exact".into()],
            filterlist_prefix: true,
            ..shaping()
        });
        let packet = "noisy.a:1|c\nnoisy.b:1:2:3|d\nexact:1|g|#k:v\nexactly:1|g\nkept:1|c";
        feed(&mut w, &[packet]);
        feed(&mut w, &[packet]);
        assert_eq!(flushed(&w), ["kept host=h tags= ts=1700000000 count=2",]);
        assert_eq!(
            w.counters.dropped[Discard::Filtered].get(),
            2 * (1 + 3 + 1 + 1)
        );
        assert_eq!(w.counters.samples.get(), 2);
    }

    #[test]
    fn a_context_the_cache_forgot_keeps_its_decision_instead_of_making_it_again() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            filterlist: vec!["ns.gone".into()],
            namespace: "ns.".into(),
            ..shaping()
        });
        feed(&mut w, &["gone:1|c\nkept:1|c"]);
        // The cache forgets both contexts, the name cache both names.
        w.cache.clear();
        w.decisions.clear();
        feed(&mut w, &["gone:1|c\nkept:2|c"]);
        assert_eq!(
            w.decisions.len(),
            0,
            "both decisions came from beside the cache"
        );
        assert_eq!(w.shaped.len(), 2);
        assert_eq!(flushed(&w), ["ns.kept host=h tags= ts=1700000000 count=3"]);
        assert_eq!(w.counters.dropped[Discard::Filtered].get(), 2);
        // The filtered context is cached again: its next sample is a cache hit.
        feed(&mut w, &["gone:1|c"]);
        assert_eq!(w.decisions.len(), 0);
        assert_eq!(w.counters.dropped[Discard::Filtered].get(), 3);
    }

    #[test]
    fn histograms_and_timers_feed_a_distribution_copy_with_its_own_tag_filter() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            histogram_copy: Some("dist.".into()),
            tag_filterlist: Some(
                r#"[{"metric_name":"dist.lat","action":"include","tags":["env"]},
                    {"metric_name":"sizes","tags":["pod"]}]"#
                    .into(),
            ),
            ..shaping()
        });
        let packet = "lat:1:2|h|#env:dev,pod:a\nt:5|ms\nsizes:7|d|#pod:a,env:dev\nc:1|c";
        feed(&mut w, &[packet]);
        feed(&mut w, &[packet]);
        assert_eq!(
            flushed(&w),
            [
                "c host=h tags= ts=1700000000 count=2",
                "dist.lat host=h tags=env:dev ts=1700000000 dist=4",
                "dist.t host=h tags= ts=1700000000 dist=2",
                "lat host=h tags=env:dev,pod:a ts=1700000000 hist=4",
                "sizes host=h tags=env:dev ts=1700000000 dist=2",
                "t host=h tags= ts=1700000000 hist=2",
            ]
        );
        assert_eq!(w.counters.samples.get(), 2 * (2 + 2 + 1 + 1 + 1 + 1));
        // The pod tag, once from each filtered context as it was built.
        assert_eq!(w.counters.tags_filtered.get(), 2);
    }

    #[test]
    fn a_shaped_context_that_expired_from_its_shard_is_created_again_shaped() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            namespace: "ns.".into(),
            histogram_copy: Some("d.".into()),
            mapper_profiles: Some(
                r#"[{"name":"p","prefix":"a.","mappings":[{"match":"a.*","name":"b","tags":{"x":"$1"}}]}]"#
                    .into(),
            ),
            ..shaping()
        });
        feed(&mut w, &["a.one:4|h|#k:v"]);
        let mut out = Vec::new();
        w.demux.flush(1_700_000_010, &FREE_IDLE, &mut out);
        w.demux.flush(1_700_000_020, &FREE_IDLE, &mut out);
        assert_eq!(out.len(), 2);
        // Cache hits, shard misses: both samples go back and are sent again with their
        // shaped names and tags.
        feed(&mut w, &["a.one:7|h|#k:v"]);
        assert_eq!(
            flushed(&w),
            [
                "d.ns.b host=h tags=k:v,x:one ts=1700000020 dist=1",
                "ns.b host=h tags=k:v,x:one ts=1700000020 hist=1",
            ]
        );
        assert_eq!(w.counters.contexts_created.get(), 4);
    }

    #[test]
    fn hostile_names_cannot_grow_the_decisions_a_worker_keeps() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            namespace: "ns.".into(),
            mapper_cache_size: 100,
            ..shaping()
        });
        // Each packet of the test batch holds 1 KiB.
        let long = "n".repeat(900);
        for batch in 0..600 {
            let packets: Vec<String> = (0..10).map(|i| format!("{long}.{batch}.{i}:1|c")).collect();
            let packets: Vec<&str> = packets.iter().map(String::as_str).collect();
            feed(&mut w, &packets);
            // At most one batch's decisions past the bound, until the next batch clears.
            assert!(
                w.shaped_bytes < SHAPED_BYTES + 10 * 1024,
                "{}",
                w.shaped_bytes
            );
            assert!(w.decisions.len() <= 100);
        }
        assert!(w.shaped.len() < 6000, "the table was cleared along the way");
        assert_eq!(w.counters.contexts_created.get(), 6000);
    }

    #[test]
    fn host_rules_send_matching_metrics_without_a_host_cached_or_not() {
        let mut w = shaped_worker(crate::config::ShapingSettings {
            host_rules: Some(
                r#"[{"match":"queue.*","types":["gauge"],"tags":["env:prod"]},
                    {"match":"d.*"}]"#
                    .into(),
            ),
            histogram_copy: Some("d.".into()),
            ..shaping()
        });
        let packet = "queue.depth:5|g|#q:a,host:web1\nqueue.depth:1|c\nlat:3|h|#host:web2";
        feed(&mut w, &[packet]);
        feed(&mut w, &[packet]);
        assert_eq!(
            flushed(&w),
            [
                // The copy matches the second rule; the histogram keeps its host.
                "d.lat host= tags= ts=1700000000 dist=2",
                "lat host=web2 tags= ts=1700000000 hist=2",
                "queue.depth host= tags=env:prod,q:a ts=1700000000 gauge=5",
                // A count is not a type of the first rule.
                "queue.depth host=h tags= ts=1700000000 count=2",
            ]
        );
        assert_eq!(w.counters.contexts_created.get(), 4);
    }

    #[test]
    fn new_shaping_from_sighup_applies_from_the_next_batch() {
        let live = Arc::new(LiveTags::new(&[], None));
        let mut w = worker(1, "h", &[]).with_live_tags(live.clone());
        feed(&mut w, &["m:1|c"]);
        // The filter list sees the namespaced name.
        let blocked = crate::config::ShapingSettings {
            filterlist: vec!["x.m".into()],
            namespace: "x.".into(),
            ..shaping()
        };
        live.set(&[], blocked.build().unwrap());
        feed(&mut w, &["m:1|c\nn:1|c"]);
        live.set(&["t:1".into()], None);
        feed(&mut w, &["m:1|c"]);
        assert_eq!(
            flushed(&w),
            [
                "m host=h tags= ts=1700000000 count=1",
                "m host=h tags=t:1 ts=1700000000 count=1",
                "x.n host=h tags= ts=1700000000 count=1",
            ]
        );
        assert_eq!(w.counters.dropped[Discard::Filtered].get(), 1);
    }

    #[test]
    fn an_unterminated_last_message_is_dropped_where_a_newline_is_required() {
        let mut w = worker(1, "h", &[]);
        w.enrichment.eol_required[Transport::Unix as usize] = true;
        feed(
            &mut w,
            &["a:1|c\nb:2|c", "c:3|c\n", "d:4|c\r\n \n", "e:5|c"],
        );
        assert_eq!(
            flushed(&w),
            [
                "a host=h tags= ts=1700000000 count=1",
                "c host=h tags= ts=1700000000 count=3",
                "d host=h tags= ts=1700000000 count=4",
            ]
        );
        assert_eq!(w.counters.dropped[Discard::Unterminated].get(), 2);
        // Another transport is not held to it.
        w.enrichment.eol_required = [false; Transport::COUNT];
        feed(&mut w, &["e:5|c"]);
        assert_eq!(w.counters.dropped[Discard::Unterminated].get(), 2);
        assert_eq!(w.counters.samples.get(), 4);
    }

    #[test]
    fn without_the_no_aggregation_pipeline_timestamps_are_ignored() {
        let mut w = worker(1, "h", &[]);
        w.enrichment.timestamps = false;
        feed(
            &mut w,
            &["g:5|g|T1600000000\nh:1|h|T1600000000\ng:7|g|T1600000001"],
        );
        assert_eq!(
            flushed(&w),
            [
                "g host=h tags= ts=1700000000 gauge=7",
                "h host=h tags= ts=1700000000 hist=1",
            ]
        );
        assert_eq!(w.counters.dropped[Discard::TimestampedUnsupported].get(), 0);
    }

    #[test]
    fn tags_split_at_commas_without_empty_ones() {
        let cases: [(&str, Vec<&str>); 5] = [
            ("", vec![]),
            ("a", vec!["a"]),
            ("a:b,c", vec!["a:b", "c"]),
            (",,a,,b,", vec!["a", "b"]),
            ("é,ü:x", vec!["é", "ü:x"]),
        ];
        for (raw, want) in cases {
            assert_eq!(
                crate::context::split_tags(raw).collect::<Vec<_>>(),
                want,
                "{raw:?}"
            );
        }
    }
}
