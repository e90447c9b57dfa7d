//! Workers: `--workers` threads that take packet batches off the queue, split them into
//! messages, parse, build and hash each metric's context once, and hand samples to shards in
//! per-shard batches (one lock per shard per packet batch). Events and service checks become
//! owned records in the demux backlog.
//!
//! Nothing here allocates per message on the happy path: the tag arena and the per-shard
//! sample vectors are reused across batches (their lifetimes are re-bound to each batch).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use crossbeam_channel::Receiver;

use std::hash::{BuildHasher, Hasher};

use twox_hash::xxhash3_64::DEFAULT_SECRET_LENGTH;
use twox_hash::XxHash3_64;

use crate::context::{canonical_tags, short_len, split_tags, ContextRef};
use crate::demux::Demux;
use crate::output::{EventRecord, ServiceCheckRecord};
use crate::packet::{scanned_lines, Batch, Pool};
use crate::parser::{
    self, event::unescape, Event, Message, Metric, MetricKind, Reason, ServiceCheck, Values,
};
use crate::sample::{Sample, SampleValue};
use crate::telemetry::{Discard, Telemetry};

/// What a worker needs to turn messages into samples.
#[derive(Debug, Clone)]
pub struct Enrichment {
    /// Host for messages without a `host:` tag (or `h:` field); empty for none.
    pub hostname: Arc<str>,
    /// `--tags`, added to every metric, event and service check.
    pub extra_tags: Arc<[Box<str>]>,
    /// Bucket length in seconds.
    pub bucket_seconds: i64,
}

/// Extra tags that SIGHUP may replace while whippet runs: each worker checks the generation
/// once per batch (one atomic load) and, when it changed, takes the new tags and forgets its
/// context cache, whose contexts carry the old ones. No sample waits or is lost.
#[derive(Debug, Default)]
pub struct LiveTags {
    generation: AtomicU64,
    tags: RwLock<Arc<[Box<str>]>>,
}

impl LiveTags {
    pub fn new(tags: &[String]) -> LiveTags {
        let live = LiveTags::default();
        live.set(tags);
        live
    }

    /// Replaces the tags; workers apply them from their next batch.
    pub fn set(&self, tags: &[String]) {
        let tags: Arc<[Box<str>]> = tags.iter().map(|t| Box::<str>::from(t.as_str())).collect();
        *self.tags.write().unwrap_or_else(|e| e.into_inner()) = tags;
        self.generation.fetch_add(1, Relaxed);
    }

    fn current(&self) -> (u64, Arc<[Box<str>]>) {
        let tags = self.tags.read().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Relaxed), tags.clone())
    }
}

/// Counts kept by one worker during one batch, added to [`Telemetry`] at its end.
#[derive(Default)]
struct Tally {
    messages: [u64; 3],
    errors: [[u64; Reason::COUNT]; 3],
    samples: u64,
    new_contexts: u64,
    over_limit: u64,
    rate_invalid: u64,
    timestamped_unsupported: u64,
    backlog_full: u64,
}

impl Tally {
    fn drain_into(&mut self, t: &Telemetry) {
        let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
            if n > 0 {
                counter.fetch_add(n, Relaxed);
            }
        };
        for k in 0..3 {
            add(&t.messages[k], self.messages[k]);
            for r in 0..Reason::COUNT {
                add(&t.parse_errors[k][r], self.errors[k][r]);
            }
        }
        add(&t.samples, self.samples);
        add(&t.contexts_created, self.new_contexts);
        add(&t.sample_rate_invalid, self.rate_invalid);
        add(
            &t.dropped[Discard::TimestampedUnsupported as usize],
            self.timestamped_unsupported,
        );
        add(
            &t.dropped[Discard::EventBacklogFull as usize],
            self.backlog_full,
        );
        add(&t.dropped[Discard::ContextLimit as usize], self.over_limit);
        *self = Tally::default();
    }
}

/// Re-binds an empty vector's allocation to another lifetime. The in-place `collect` reuses
/// the buffer because the layouts are identical; no element is ever mapped.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| -> U { unreachable!("the vector is empty") })
        .collect()
}

/// Contexts in one set of the worker's cache: four 32-byte entries, two cache lines.
const WAYS: usize = 4;
/// Most contexts a worker's cache holds: 64 Ki entries of 32 bytes (2 MiB).
const CACHE_MAX: usize = 1 << 16;
/// Fewest (128 KiB).
const CACHE_MIN: usize = 1 << 12;
/// Its size at the first metric (512 KiB; an idle worker holds none): enough for a few
/// thousand contexts with few sets overflowing.
const CACHE_START: usize = 1 << 14;

/// One set: the contexts whose raw hash picks it, most recently used first.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Set([Cached; WAYS]);

/// Raw context bytes → canonical context: a set-associative cache, so a lookup reads one
/// known set that the worker can prefetch while it parses the next message (a hash table's
/// probe is two dependent cache misses that nothing can start early). A full set forgets its
/// least recently used context. It is sized by how well it pays, judged each time it has
/// missed as many times as it holds contexts: if fewer than 1 in 10 lookups hit (far more
/// contexts than it holds: its memory is wasted) it halves, down to [`CACHE_MIN`]; if 3 in 10
/// or more hit and more than 1 in 100 missed (a little more than it holds, or sets that
/// overflow) it doubles, up to [`CACHE_MAX`].
struct ContextCache {
    sets: Vec<Set>,
    hits: u64,
    misses: u64,
}

impl ContextCache {
    fn new() -> ContextCache {
        ContextCache::with_capacity(0)
    }

    fn with_capacity(entries: usize) -> ContextCache {
        ContextCache {
            sets: vec![Set([Cached::EMPTY; WAYS]); entries / WAYS],
            hits: 0,
            misses: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// The set `raw` picks (none before the first insert).
    fn set_of(&self, raw: u64) -> usize {
        raw as usize & self.sets.len().wrapping_sub(1)
    }

    /// Starts loading the set `raw` picks into the CPU cache.
    fn prefetch(&self, raw: u64) {
        let Some(set) = self.sets.get(self.set_of(raw)) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let at = set as *const Set as *const i8;
            // SAFETY: prefetching is only a hint, valid for any address; both lines are
            // inside `set`.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(at);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = set;
    }

    fn find(&mut self, raw: u64, name_len: u16, tags_len: u16, kind: MetricKind) -> Option<Cached> {
        let i = self.set_of(raw);
        let Some(Set(set)) = self.sets.get_mut(i) else {
            self.misses += 1;
            return None;
        };
        // An empty way has no name; no metric lacks one.
        let way = set.iter().position(|c| {
            c.raw_hash == raw
                && c.name_len == name_len
                && name_len != 0
                && c.tags_len == tags_len
                && c.kind == kind
        });
        match way {
            Some(way) => {
                self.hits += 1;
                set[..=way].rotate_right(1);
                Some(set[0])
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    fn insert(&mut self, entry: Cached) {
        if self.sets.is_empty() {
            *self = ContextCache::with_capacity(CACHE_START);
        } else if self.misses >= self.capacity() as u64 {
            self.resize();
        }
        let i = self.set_of(entry.raw_hash);
        let set = &mut self.sets[i].0;
        set.rotate_right(1);
        set[0] = entry;
    }

    fn resize(&mut self) {
        let looked = self.hits + self.misses;
        let capacity = self.capacity();
        let to = if self.hits * 10 < looked {
            (capacity / 2).max(CACHE_MIN)
        } else if self.hits * 10 >= looked * 3 && self.misses * 100 > looked {
            (capacity * 2).min(CACHE_MAX)
        } else {
            capacity
        };
        self.hits = 0;
        self.misses = 0;
        if to == capacity {
            return;
        }
        let old = std::mem::replace(self, ContextCache::with_capacity(to));
        // Least recently used first, so each set keeps its order.
        for way in (0..WAYS).rev() {
            for set in &old.sets {
                if !set.0[way].is_empty() {
                    let i = self.set_of(set.0[way].raw_hash);
                    let into = &mut self.sets[i].0;
                    into.rotate_right(1);
                    into[0] = set.0[way];
                }
            }
        }
    }

    fn clear(&mut self) {
        self.sets.fill(Set([Cached::EMPTY; WAYS]));
    }

    /// How many contexts it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sets
            .iter()
            .flat_map(|s| &s.0)
            .filter(|c| !c.is_empty())
            .count()
    }
}

/// A random XXH3 secret: SipHash, keyed from the OS's randomness (std's `RandomState`), of
/// the numbers 0, 1, 2 ...
fn random_secret() -> [u8; DEFAULT_SECRET_LENGTH] {
    let keyed = std::collections::hash_map::RandomState::new();
    let mut secret = [0u8; DEFAULT_SECRET_LENGTH];
    for (i, word) in secret.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&keyed.hash_one(i).to_le_bytes());
    }
    secret
}

/// [`Cached::host`] when the host is `--hostname`.
const DEFAULT_HOST: (u32, u32) = (u32::MAX, u32::MAX);

/// A context the worker has canonicalized before, keyed by its raw bytes (name, raw `#`
/// field, type). Default host and extra tags are the same for every message of a worker, so
/// the raw bytes determine the canonical context; the 64-bit raw hash (plus the lengths) is
/// trusted to tell raw forms apart, as the canonical hash is trusted in the shards.
#[derive(Debug, Clone, Copy)]
struct Cached {
    raw_hash: u64,
    hash: u64,
    /// Where the host comes from: this byte range of the raw tag field (a `host:` tag), or
    /// [`DEFAULT_HOST`].
    host: (u32, u32),
    /// Name and raw tag field lengths, saturating (a packet is at most 64 KiB).
    name_len: u16,
    tags_len: u16,
    kind: MetricKind,
}

impl Cached {
    /// An unused way: no metric has an empty name.
    const EMPTY: Cached = Cached {
        raw_hash: 0,
        hash: 0,
        host: DEFAULT_HOST,
        name_len: 0,
        tags_len: 0,
        kind: MetricKind::Count,
    };

    fn is_empty(&self) -> bool {
        self.name_len == 0
    }
}

/// How a metric's context is looked up: by the hash of its raw bytes in the worker's cache,
/// or (timestamped samples) built afresh.
#[derive(Clone, Copy)]
enum RawKey {
    Hash(u64),
    Uncached,
}

/// A batch's reusable buffers, borrowed while its messages are parsed.
struct Scratch<'s, 'a> {
    tags: &'s mut Vec<&'a str>,
    sort: &'s mut Vec<(u64, &'a str)>,
    per_shard: &'s mut [Vec<Sample<'a>>],
}

pub struct Worker {
    demux: Arc<Demux>,
    telemetry: Arc<Telemetry>,
    enrichment: Enrichment,
    /// Reloadable extra tags and the generation this worker applied.
    live: Option<(Arc<LiveTags>, u64)>,
    tally: Tally,
    /// Reused across batches: the tag arena and one sample vector per shard.
    tags: Vec<&'static str>,
    sort_scratch: Vec<(u64, &'static str)>,
    /// Reused to lay a context out for hashing.
    hash_scratch: Vec<u8>,
    per_shard: Vec<Vec<Sample<'static>>>,
    /// Raw context bytes → canonical context, so a known context skips splitting, sorting
    /// and hashing its tags.
    cache: ContextCache,
    /// Keys [`Worker::raw_tags_hash`]: random per worker, so hostile tags cannot be chosen
    /// to collide in the cache (which trusts the hash).
    raw_secret: [u8; DEFAULT_SECRET_LENGTH],
    /// Reused: samples a shard reported missing, and their retries.
    missing: Vec<u32>,
    retry: Vec<Sample<'static>>,
    events: Vec<EventRecord>,
    checks: Vec<ServiceCheckRecord>,
}

impl Worker {
    pub fn new(demux: Arc<Demux>, telemetry: Arc<Telemetry>, enrichment: Enrichment) -> Worker {
        let shards = demux.shard_count();
        Worker {
            demux,
            telemetry,
            enrichment,
            live: None,
            tally: Tally::default(),
            tags: Vec::new(),
            sort_scratch: Vec::new(),
            hash_scratch: Vec::new(),
            cache: ContextCache::new(),
            raw_secret: random_secret(),
            missing: Vec::new(),
            retry: Vec::new(),
            per_shard: (0..shards).map(|_| Vec::new()).collect(),
            events: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Takes its extra tags from `live` from now on (and whenever they change).
    pub fn with_live_tags(mut self, live: Arc<LiveTags>) -> Worker {
        let (generation, tags) = live.current();
        self.enrichment.extra_tags = tags;
        self.live = Some((live, generation));
        self
    }

    /// Processes batches until the queue is closed and empty; returns buffers to `pool`.
    pub fn run(mut self, queue: Receiver<Batch>, pool: Arc<Pool>) {
        while let Ok(batch) = queue.recv() {
            crate::inject_fault("worker");
            self.process(&batch);
            pool.put(batch);
        }
    }

    /// Parses and aggregates every message of one batch.
    pub fn process(&mut self, batch: &Batch) {
        if let Some((live, seen)) = &mut self.live {
            if live.generation.load(Relaxed) != *seen {
                let (generation, tags) = live.current();
                *seen = generation;
                self.enrichment.extra_tags = tags;
                self.cache.clear();
            }
        }
        let enrichment = self.enrichment.clone();
        let mut tags: Vec<&str> = recycle(std::mem::take(&mut self.tags));
        let mut scratch: Vec<(u64, &str)> = recycle(std::mem::take(&mut self.sort_scratch));
        let mut per_shard: Vec<Vec<Sample<'_>>> = std::mem::take(&mut self.per_shard)
            .into_iter()
            .map(recycle)
            .collect();
        let interval = enrichment.bucket_seconds;
        let bucket = batch.received_at - batch.received_at.rem_euclid(interval);
        // A metric is finished one message late, so the context cache's set it needs is
        // loaded while the next message is parsed.
        let mut pending: Option<(Metric<'_>, RawKey)> = None;
        let mut out = Scratch {
            tags: &mut tags,
            sort: &mut scratch,
            per_shard: &mut per_shard,
        };
        for frame in batch.frames() {
            for line in scanned_lines(frame) {
                match parser::parse_line(line) {
                    Ok(Message::Metric(m)) => {
                        self.tally.messages[0] += 1;
                        let Some(key) = self.admit(&m) else { continue };
                        if let Some((m, key)) = pending.replace((m, key)) {
                            self.metric(&m, key, &enrichment, bucket, &mut out);
                        }
                    }
                    Ok(Message::Event(e)) => {
                        self.tally.messages[1] += 1;
                        self.event(&e, &enrichment, batch.received_at);
                    }
                    Ok(Message::ServiceCheck(c)) => {
                        self.tally.messages[2] += 1;
                        self.service_check(&c, &enrichment, batch.received_at);
                    }
                    Err(e) => self.tally.errors[e.kind as usize][e.reason as usize] += 1,
                }
            }
        }
        if let Some((m, key)) = pending.take() {
            self.metric(&m, key, &enrichment, bucket, &mut out);
        }
        let mut retry: Vec<Sample<'_>> = recycle(std::mem::take(&mut self.retry));
        for (shard, samples) in per_shard.iter_mut().enumerate() {
            if samples.is_empty() {
                continue;
            }
            self.missing.clear();
            let stats = self.demux.insert(shard, samples, &tags, &mut self.missing);
            self.tally.samples += stats.samples;
            self.tally.new_contexts += stats.new_contexts;
            self.tally.over_limit += stats.over_limit;
            if !self.missing.is_empty() {
                // Cached contexts the shard no longer holds (expired): send them again with
                // their canonical tags so the shard can create them.
                retry.clear();
                for &i in &self.missing {
                    let mut s = samples[i as usize];
                    let start = tags.len();
                    canonicalize(s.raw_tags, &enrichment.extra_tags, &mut tags, &mut scratch);
                    s.tags = Some((start as u32, tags.len() as u32));
                    retry.push(s);
                }
                self.missing.clear();
                let stats = self.demux.insert(shard, &retry, &tags, &mut self.missing);
                self.tally.samples += stats.samples;
                self.tally.new_contexts += stats.new_contexts;
                self.tally.over_limit += stats.over_limit;
            }
            samples.clear();
        }
        self.retry = recycle(retry);
        if !self.events.is_empty() || !self.checks.is_empty() {
            self.tally.backlog_full += self.demux.push_backlog(&mut self.events, &mut self.checks);
        }
        self.tags = recycle(tags);
        self.sort_scratch = recycle(scratch);
        self.per_shard = per_shard.into_iter().map(recycle).collect();
        self.tally.drain_into(&self.telemetry);
    }

    /// The first half of a metric: counts what it is owed and returns its key for the
    /// context cache, whose set it starts loading; `None` when the metric is dropped.
    fn admit(&mut self, m: &Metric<'_>) -> Option<RawKey> {
        if m.sample_rate_invalid {
            self.tally.rate_invalid += 1;
        }
        if m.timestamp.is_some() {
            if !matches!(m.kind, MetricKind::Gauge | MetricKind::Count) {
                self.tally.timestamped_unsupported += 1;
                return None;
            }
            // Timestamped samples bypass the cache.
            return Some(RawKey::Uncached);
        }
        let mut h = self.demux.hasher().build_hasher();
        h.write(m.name.as_bytes());
        h.write_u64(self.raw_tags_hash(m.tags));
        h.write_u8(m.kind as u8);
        let raw = h.finish();
        self.cache.prefetch(raw);
        Some(RawKey::Hash(raw))
    }

    /// A hash of a metric's raw tag field: XXH3 under this worker's random secret. The tags
    /// are most of a message (~2 KB in `dsd_base`), and XXH3 takes them with AVX2 where the
    /// CPU has it (chosen at run time), about twice as fast as foldhash's 64-bit multiplies.
    fn raw_tags_hash(&self, tags: &str) -> u64 {
        XxHash3_64::oneshot_with_secret(&self.raw_secret[..], tags.as_bytes())
            .expect("the secret has the default length, above XXH3's minimum")
    }

    /// The second half: finds or builds the context and queues the samples for its shard.
    fn metric<'a>(
        &mut self,
        m: &Metric<'a>,
        key: RawKey,
        enrichment: &'a Enrichment,
        bucket: i64,
        scratch: &mut Scratch<'_, 'a>,
    ) {
        let Scratch {
            tags,
            sort,
            per_shard,
        } = scratch;
        let cached = match key {
            RawKey::Hash(raw) => self
                .cache
                .find(raw, short_len(m.name), short_len(m.tags), m.kind),
            RawKey::Uncached => None,
        };
        let (hash, host, range) = match cached {
            Some(c) => {
                let host = match c.host {
                    DEFAULT_HOST => &*enrichment.hostname,
                    (a, b) => &m.tags[a as usize..b as usize],
                };
                (c.hash, host, None)
            }
            None => {
                let start = tags.len();
                let host_tag = canonicalize(m.tags, &enrichment.extra_tags, tags, sort);
                let host = host_tag.unwrap_or(&enrichment.hostname);
                let context = ContextRef {
                    name: m.name,
                    host,
                    tags: &tags[start..],
                    kind: m.kind,
                };
                let hash = context.hash_with(self.demux.hasher(), &mut self.hash_scratch);
                if let RawKey::Hash(raw) = key {
                    let host = match host_tag {
                        // The host tag is a slice of the raw field: keep its byte range.
                        Some(h) => {
                            let at = h.as_ptr() as usize - m.tags.as_ptr() as usize;
                            (at as u32, (at + h.len()) as u32)
                        }
                        None => DEFAULT_HOST,
                    };
                    let entry = Cached {
                        raw_hash: raw,
                        name_len: short_len(m.name),
                        tags_len: short_len(m.tags),
                        kind: m.kind,
                        hash,
                        host,
                    };
                    self.cache.insert(entry);
                }
                (hash, host, Some((start as u32, tags.len() as u32)))
            }
        };
        let out = &mut per_shard[self.demux.shard_of(hash)];
        let sample = |value| Sample {
            hash,
            name: m.name,
            host,
            tags: range,
            raw_tags: m.tags,
            kind: m.kind,
            value,
            sample_rate: m.sample_rate,
            timestamp: m.timestamp,
            bucket,
        };
        match m.values {
            Values::One(v) => out.push(sample(SampleValue::Number(v))),
            Values::Member(member) => out.push(sample(SampleValue::Member(member))),
            values => out.extend(values.iter().map(|v| sample(SampleValue::Number(v)))),
        }
    }

    fn event(&mut self, e: &Event<'_>, enrichment: &Enrichment, received_at: i64) {
        self.events.push(EventRecord {
            title: unescape(e.title),
            text: unescape(e.text),
            timestamp: e.timestamp.unwrap_or(received_at),
            host: e.host.unwrap_or(&enrichment.hostname).to_string(),
            aggregation_key: e.aggregation_key.to_string(),
            priority: e.priority,
            source_type: e.source_type.to_string(),
            alert_type: e.alert_type,
            tags: owned_tags(e.tags, enrichment),
        });
    }

    fn service_check(&mut self, c: &ServiceCheck<'_>, enrichment: &Enrichment, received_at: i64) {
        self.checks.push(ServiceCheckRecord {
            name: c.name.to_string(),
            status: c.status,
            timestamp: c.timestamp.unwrap_or(received_at),
            host: c.host.unwrap_or(&enrichment.hostname).to_string(),
            message: c.message.to_string(),
            tags: owned_tags(c.tags, enrichment),
        });
    }
}

/// Appends the canonical tags of a raw `#` field to `tags` (split, `host:` tags removed,
/// extra tags added, sorted, de-duplicated) and returns the value of the last `host:` tag.
fn canonicalize<'a>(
    raw: &'a str,
    extra: &'a [Box<str>],
    tags: &mut Vec<&'a str>,
    sort: &mut Vec<(u64, &'a str)>,
) -> Option<&'a str> {
    let start = tags.len();
    let mut host = None;
    for tag in split_tags(raw) {
        match tag.strip_prefix("host:") {
            Some(h) => host = Some(h),
            None => tags.push(tag),
        }
    }
    tags.extend(extra.iter().map(|t| &**t));
    canonical_tags(tags, start, sort);
    host
}

fn owned_tags(raw: &str, enrichment: &Enrichment) -> Vec<String> {
    split_tags(raw)
        .chain(enrichment.extra_tags.iter().map(|t| &**t))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Pool;
    use crate::shard::{Accumulator, Expiry};
    use crate::telemetry::Transport;

    fn worker(shards: usize, host: &str, extra: &[&str]) -> Worker {
        let enrichment = Enrichment {
            hostname: host.into(),
            extra_tags: extra.iter().map(|t| Box::<str>::from(*t)).collect(),
            bucket_seconds: 10,
        };
        Worker::new(
            Arc::new(Demux::new(shards, 100)),
            Arc::new(Telemetry::default()),
            enrichment,
        )
    }

    #[test]
    fn the_raw_tags_hash_tells_apart_every_one_byte_change_and_differs_by_worker() {
        let (w, other) = (worker(1, "h", &[]), worker(1, "h", &[]));
        // Long enough for XXH3's long-input path (above 240 bytes), with a short tail.
        let tags: String = (0..120).map(|i| format!("k{i}:v{},", i * 7)).collect();
        let h = w.raw_tags_hash(&tags);
        assert_eq!(w.raw_tags_hash(&tags), h, "the same tags hash the same");
        let mut seen = std::collections::HashSet::from([h]);
        let mut changed = tags.clone().into_bytes();
        for i in 0..changed.len() {
            changed[i] ^= 0x01;
            let text = std::str::from_utf8(&changed).unwrap();
            assert!(
                seen.insert(w.raw_tags_hash(text)),
                "byte {i} changed, same hash"
            );
            changed[i] ^= 0x01;
        }
        assert_eq!(seen.len(), tags.len() + 1);
        // Each worker draws its own secret.
        assert_ne!(w.raw_secret, other.raw_secret);
        assert_ne!(other.raw_tags_hash(&tags), h);
    }

    fn feed(w: &mut Worker, packets: &[&str]) {
        let pool = Pool::new(1024, 1);
        let mut batch = pool.get(Transport::Unix);
        let mut at = 0;
        for p in packets {
            batch.buffer_mut()[at..at + p.len()].copy_from_slice(p.as_bytes());
            batch.push_frame(at, at + p.len());
            at += 1024;
        }
        batch.received_at = 1_700_000_005;
        w.process(&batch);
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
        assert_eq!(w.telemetry.samples.load(Relaxed), 7);
    }

    #[test]
    fn errors_are_counted_by_kind_and_reason_and_the_rest_of_the_packet_survives() {
        let mut w = worker(1, "h", &[]);
        feed(
            &mut w,
            &["bad|x\nok:1|c\n_e{0,1}:|x\n_sc|n|9\nt:1|d|T5\nr:1|c|@7\n\n"],
        );
        let t = &w.telemetry;
        assert_eq!(t.messages[0].load(Relaxed), 3); // ok, t (dropped later), r
        assert_eq!(
            t.parse_errors[0][Reason::MissingValue as usize].load(Relaxed),
            1
        );
        assert_eq!(
            t.parse_errors[1][Reason::EmptyTitle as usize].load(Relaxed),
            1
        );
        assert_eq!(
            t.parse_errors[2][Reason::InvalidStatus as usize].load(Relaxed),
            1
        );
        assert_eq!(
            t.dropped[Discard::TimestampedUnsupported as usize].load(Relaxed),
            1
        );
        assert_eq!(t.sample_rate_invalid.load(Relaxed), 1);
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
        assert_eq!(w.telemetry.samples.load(Relaxed), 8);
        assert_eq!(w.telemetry.contexts_created.load(Relaxed), 3);
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
        assert_eq!(w.telemetry.contexts_created.load(Relaxed), 2);
        assert_eq!(w.telemetry.samples.load(Relaxed), 2);
    }

    #[test]
    fn a_cached_context_refused_over_the_limit_is_counted_once() {
        let demux = Arc::new(Demux::with_context_limit(1, 100, 1));
        let enrichment = Enrichment {
            hostname: "h".into(),
            extra_tags: Arc::new([]),
            bucket_seconds: 10,
        };
        let mut w = Worker::new(demux, Arc::new(Telemetry::default()), enrichment);
        feed(&mut w, &["gone:1|g"]);
        let mut out = Vec::new();
        w.demux.flush(1_700_000_010, &FREE_IDLE, &mut out);
        w.demux.flush(1_700_000_020, &FREE_IDLE, &mut out); // frees it; the cache still has it
        feed(&mut w, &["other:1|g"]); // takes the only slot
        feed(&mut w, &["gone:2|g"]); // cache hit, shard miss, refused on the retry
        let over = &w.telemetry.dropped[Discard::ContextLimit as usize];
        assert_eq!(over.load(Relaxed), 1);
        assert_eq!(w.telemetry.contexts_created.load(Relaxed), 2);
    }

    /// A cache entry for context `n`; `set` picks its set in any cache of at most 2^20 sets.
    fn entry(n: u64, set: u64) -> Cached {
        Cached {
            raw_hash: (n << 20) | set,
            hash: n,
            host: DEFAULT_HOST,
            name_len: 1,
            tags_len: 0,
            kind: MetricKind::Gauge,
        }
    }

    fn look(cache: &mut ContextCache, e: &Cached) -> Option<u64> {
        cache
            .find(e.raw_hash, e.name_len, e.tags_len, e.kind)
            .map(|c| c.hash)
    }

    #[test]
    fn the_context_cache_grows_while_it_pays_and_shrinks_when_it_does_not() {
        let spread = |n: u64| entry(n, n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 44);
        // One round: `capacity` new contexts miss and are inserted, each followed by
        // `hits_per_miss` hits on itself; the next insert judges the round.
        let round = |cache: &mut ContextCache, first: u64, hits_per_miss: u64| {
            for n in first..first + cache.capacity() as u64 + 1 {
                let e = spread(n);
                assert_eq!(look(cache, &e), None);
                cache.insert(e);
                for _ in 0..hits_per_miss {
                    assert_eq!(look(cache, &e), Some(n));
                }
            }
        };
        let mut fresh = ContextCache::new();
        assert_eq!(fresh.capacity(), 0, "an idle worker holds no cache");
        assert_eq!(look(&mut fresh, &spread(1)), None);
        fresh.insert(spread(1));
        assert_eq!(fresh.capacity(), CACHE_START);
        assert_eq!(look(&mut fresh, &spread(1)), Some(1));
        let mut cache = ContextCache::with_capacity(CACHE_MIN);
        // Runs one round per wanted capacity, checking the capacity after each.
        let mut next = 0;
        let mut rounds = |cache: &mut ContextCache, hits_per_miss: u64, wants: &[usize]| {
            for &want in wants {
                round(cache, next, hits_per_miss);
                next += 1 << 20;
                assert_eq!(cache.capacity(), want);
            }
        };
        // Half the lookups hit and half miss: doubles up to the most.
        let doubling = [CACHE_MIN * 2, CACHE_MIN * 4, CACHE_MIN * 8, CACHE_MIN * 16];
        rounds(&mut cache, 1, &doubling);
        rounds(&mut cache, 1, &[CACHE_MAX, CACHE_MAX]);
        // No hits at all: halves.
        rounds(&mut cache, 0, &[CACHE_MAX / 2]);
        // 1 hit in 5 lookups (20%): stays.
        let mut fifth = ContextCache::with_capacity(CACHE_MIN * 2);
        for n in 0..CACHE_MIN as u64 * 2 + 1 {
            let e = spread(n);
            assert_eq!(look(&mut fifth, &e), None);
            fifth.insert(e);
            if n % 4 == 0 {
                look(&mut fifth, &e);
            }
        }
        assert_eq!(fifth.capacity(), CACHE_MIN * 2);
        // Nothing but misses: halves each round down to the floor, and stays there.
        let halving = [
            CACHE_MAX / 4,
            CACHE_MAX / 8,
            CACHE_MAX / 16,
            CACHE_MIN,
            CACHE_MIN,
        ];
        rounds(&mut cache, 0, &halving);
        // Almost every lookup hits (1 miss in 200): growing would not pay, so it stays.
        rounds(&mut cache, 199, &[CACHE_MIN]);
    }

    #[test]
    fn a_full_set_forgets_its_least_recently_used_context() {
        let mut cache = ContextCache::new();
        let set = 5;
        let e: Vec<Cached> = (1..=WAYS as u64 + 1).map(|n| entry(n, set)).collect();
        for c in &e[..WAYS] {
            cache.insert(*c);
        }
        // All four fit; touching the oldest makes the second the least recently used.
        for (n, c) in e[..WAYS].iter().enumerate() {
            assert_eq!(look(&mut cache, c), Some(n as u64 + 1));
        }
        assert_eq!(look(&mut cache, &e[0]), Some(1));
        cache.insert(e[WAYS]);
        assert_eq!(
            look(&mut cache, &e[1]),
            None,
            "the least recently used went"
        );
        for c in [e[0], e[2], e[3], e[4]] {
            assert_eq!(look(&mut cache, &c), Some(c.hash));
        }
        // Another set is untouched by all of it, and an empty way matches nothing.
        assert_eq!(look(&mut cache, &entry(1, set + 1)), None);
        assert_eq!(look(&mut cache, &Cached::EMPTY), None);
        assert_eq!(cache.len(), WAYS);
    }

    #[test]
    fn a_growing_cache_keeps_its_contexts_and_their_order() {
        let mut cache = ContextCache::with_capacity(CACHE_MIN);
        let sets = (CACHE_MIN / WAYS) as u64;
        // Set 3 of the small cache: these land in sets 3 and 3 + sets once it doubles.
        let e: Vec<Cached> = (0..WAYS as u64)
            .map(|n| entry(n, 3 + (n % 2) * sets))
            .collect();
        for c in &e {
            cache.insert(*c);
        }
        cache.hits = 1;
        cache.misses = 1;
        cache.resize(); // 50% hit, 50% missed: doubles
        assert_eq!(cache.capacity(), CACHE_MIN * 2);
        assert_eq!(cache.len(), WAYS);
        for c in &e {
            assert_eq!(look(&mut cache, c), Some(c.hash));
        }
        // Each new set holds its two in the order they were last used.
        let s = &cache.sets[3].0;
        assert_eq!((s[0].hash, s[1].hash, s[2].is_empty()), (2, 0, true));
    }

    #[test]
    fn a_cache_entry_and_set_stay_small() {
        assert_eq!(std::mem::size_of::<Cached>(), 32);
        assert_eq!(std::mem::size_of::<Set>(), 128);
        assert_eq!(std::mem::align_of::<Set>(), 64);
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
            assert_eq!(split_tags(raw).collect::<Vec<_>>(), want, "{raw:?}");
        }
    }
}
