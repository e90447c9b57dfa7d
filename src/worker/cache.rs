//! The worker's context cache: a metric's raw bytes (name, raw `#` field, type) → its
//! canonical context (hash and host), so a context the worker has seen skips splitting,
//! sorting and hashing its tags. Per worker, unshared, keyed by a hash under a secret drawn
//! per worker so hostile tags cannot be chosen to collide in it (the cache trusts the hash).

use std::hash::{BuildHasher, Hasher};

use twox_hash::xxhash3_64::DEFAULT_SECRET_LENGTH;
use twox_hash::XxHash3_64;

use crate::context::{short_len, ContextHasher};
use crate::parser::{Metric, MetricKind};

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
pub(super) struct ContextCache {
    /// Keys [`ContextCache::raw_key`]: random per worker.
    secret: [u8; DEFAULT_SECRET_LENGTH],
    sets: Vec<Set>,
    hits: u64,
    misses: u64,
}

impl ContextCache {
    pub(super) fn new() -> ContextCache {
        ContextCache::with_capacity(0)
    }

    fn with_capacity(entries: usize) -> ContextCache {
        ContextCache {
            secret: random_secret(),
            sets: vec![Set([Cached::EMPTY; WAYS]); entries / WAYS],
            hits: 0,
            misses: 0,
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// A metric's raw key: its name (foldhash, as contexts are hashed), its raw tag field
    /// (XXH3 under this cache's secret) and its type.
    pub(super) fn raw_key(&self, names: &ContextHasher, m: &Metric<'_>) -> u64 {
        let mut h = names.build_hasher();
        h.write(m.name.as_bytes());
        h.write_u64(self.raw_tags_hash(m.tags));
        h.write_u8(m.kind as u8);
        h.finish()
    }

    /// A hash of a metric's raw tag field: XXH3 under this cache's random secret. The tags
    /// are most of a message (~2 KB in `dsd_base`), and XXH3 takes them with AVX2 where the
    /// CPU has it (chosen at run time), about twice as fast as foldhash's 64-bit multiplies.
    fn raw_tags_hash(&self, tags: &str) -> u64 {
        XxHash3_64::oneshot_with_secret(&self.secret[..], tags.as_bytes())
            .expect("the secret has the default length, above XXH3's minimum")
    }

    /// The key of a metric's raw key under an origin ([`crate::enrichment::Resolved::identity`]):
    /// its context differs from the same bytes' without origin, and from another origin's.
    pub(super) fn with_origin(names: &ContextHasher, raw: u64, identity: [u64; 4]) -> u64 {
        let mut h = names.build_hasher();
        h.write_u64(raw);
        for part in identity {
            h.write_u64(part);
        }
        h.finish()
    }

    /// Looks up a metric by its raw key.
    pub(super) fn find_metric(&mut self, raw: u64, m: &Metric<'_>) -> Option<Cached> {
        self.find(raw, short_len(m.name), short_len(m.tags), m.kind)
    }

    /// The set `raw` picks (none before the first insert).
    fn set_of(&self, raw: u64) -> usize {
        raw as usize & self.sets.len().wrapping_sub(1)
    }

    /// Starts loading the set `raw` picks into the CPU cache (both its lines).
    pub(super) fn prefetch(&self, raw: u64) {
        if let Some(set) = self.sets.get(self.set_of(raw)) {
            crate::prefetch(set);
        }
    }

    pub(super) fn find(
        &mut self,
        raw: u64,
        name_len: u16,
        tags_len: u16,
        kind: MetricKind,
    ) -> Option<Cached> {
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

    pub(super) fn insert(&mut self, entry: Cached) {
        if self.sets.is_empty() {
            let secret = self.secret;
            *self = ContextCache::with_capacity(CACHE_START);
            self.secret = secret;
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
        let mut grown = ContextCache::with_capacity(to);
        grown.secret = self.secret;
        let old = std::mem::replace(self, grown);
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

    pub(super) fn clear(&mut self) {
        self.sets.fill(Set([Cached::EMPTY; WAYS]));
    }

    /// How many contexts it holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
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
pub(super) const DEFAULT_HOST: (u32, u32) = (u32::MAX, u32::MAX);

/// A context the worker has canonicalized before, keyed by its raw bytes (name, raw `#`
/// field, type). Default host and extra tags are the same for every message of a worker, so
/// the raw bytes determine the canonical context; the 64-bit raw hash (plus the lengths) is
/// trusted to tell raw forms apart, as the canonical hash is trusted in the shards.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cached {
    pub(super) raw_hash: u64,
    pub(super) hash: u64,
    /// Where the host comes from: this byte range of the raw tag field (a `host:` tag), or
    /// [`DEFAULT_HOST`].
    pub(super) host: (u32, u32),
    /// Name and raw tag field lengths, saturating (a packet is at most 64 KiB).
    pub(super) name_len: u16,
    pub(super) tags_len: u16,
    pub(super) kind: MetricKind,
    /// The raw tags hold a `dd.internal.` tag, which may name an origin: with origin
    /// detection on, such a metric is resolved again before its entry is trusted.
    pub(super) magic: bool,
    /// Shaping changed its name or tags, dropped it or copies it: the decision is kept
    /// beside the cache, by the raw key.
    pub(super) shaped: bool,
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
        magic: false,
        shaped: false,
    };

    /// The entry for metric `m`, whose raw key is `raw`: its context hashes to `hash` and
    /// takes its host from `host` (a byte range of the raw tag field, or [`DEFAULT_HOST`]).
    pub(super) fn new(raw: u64, m: &Metric<'_>, hash: u64, host: (u32, u32)) -> Cached {
        Cached {
            raw_hash: raw,
            hash,
            host,
            name_len: short_len(m.name),
            tags_len: short_len(m.tags),
            kind: m.kind,
            magic: crate::enrichment::has_magic(m.tags),
            shaped: false,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.name_len == 0
    }
}

/// How a metric's context is looked up: by the hash of its raw bytes in the worker's cache,
/// or (timestamped samples) built afresh.
#[derive(Clone, Copy)]
pub(super) enum RawKey {
    Hash(u64),
    Uncached,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_tags_hash_tells_apart_every_one_byte_change_and_differs_by_cache() {
        let (c, other) = (ContextCache::new(), ContextCache::new());
        // Long enough for XXH3's long-input path (above 240 bytes), with a short tail.
        let tags: String = (0..120).map(|i| format!("k{i}:v{},", i * 7)).collect();
        let h = c.raw_tags_hash(&tags);
        assert_eq!(c.raw_tags_hash(&tags), h, "the same tags hash the same");
        let mut seen = std::collections::HashSet::from([h]);
        let mut changed = tags.clone().into_bytes();
        for i in 0..changed.len() {
            changed[i] ^= 0x01;
            let text = std::str::from_utf8(&changed).unwrap();
            assert!(
                seen.insert(c.raw_tags_hash(text)),
                "byte {i} changed, same hash"
            );
            changed[i] ^= 0x01;
        }
        assert_eq!(seen.len(), tags.len() + 1);
        // Each cache (each worker) draws its own secret, and keeps it as it grows.
        assert_ne!(c.secret, other.secret);
        assert_ne!(other.raw_tags_hash(&tags), h);
        let mut grown = ContextCache::new();
        let secret = grown.secret;
        grown.insert(entry(1, 1));
        grown.hits = 1;
        grown.misses = 1;
        grown.resize();
        assert_eq!(grown.secret, secret);
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
            magic: false,
            shaped: false,
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
}
