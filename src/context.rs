//! Contexts: what a metric is aggregated by — (name, host, sorted de-duplicated tags, type).
//!
//! A worker builds a borrowed [`ContextRef`] per message and hashes it once; a shard looks the
//! hash up and only allocates an owned [`ContextKey`] the first time a context is seen.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use crate::parser::MetricKind;

/// The hasher for contexts: foldhash, seeded once per process so that hostile tag values
/// cannot be chosen to collide. Every worker must hash with clones of the same state.
pub type ContextHasher = foldhash::fast::RandomState;

/// A context borrowed from a packet; `tags` are already sorted and de-duplicated.
#[derive(Debug, Clone, Copy)]
pub struct ContextRef<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub tags: &'a [&'a str],
    pub kind: MetricKind,
}

impl ContextRef<'_> {
    /// The context's hash. Length prefixes keep `("ab","c")` and `("a","bc")` apart.
    pub fn hash(&self, state: &ContextHasher) -> u64 {
        self.hash_with(state, &mut Vec::new())
    }

    /// [`ContextRef::hash`] with a reused buffer: the parts are laid out contiguously and
    /// hashed in one call, because foldhash's `write` costs a full mix per call and a context
    /// averages 54 parts in the benchmark corpus (3× faster measured with `cargo bench`).
    pub fn hash_with(&self, state: &ContextHasher, buf: &mut Vec<u8>) -> u64 {
        buf.clear();
        for part in [self.name, self.host].iter().chain(self.tags.iter()) {
            buf.extend_from_slice(&(part.len() as u32).to_le_bytes());
            buf.extend_from_slice(part.as_bytes());
        }
        buf.push(self.kind as u8);
        let mut h = state.build_hasher();
        h.write(buf);
        h.finish()
    }
}

/// An owned context, cheap to clone: one shared allocation holding a short header, then the
/// name, the host and the tags joined by commas (a tag never holds a comma: tags are split at
/// commas). One allocation a context instead of three (reference count, text, tag offsets):
/// with 10-tag contexts, about 230 bytes a context instead of 315 (massif, 300k contexts).
///
/// The header is [`HEADER`] ASCII bytes, so the whole key is one `str`: the type, then the
/// lengths of name and host and the tag count, 7 bits per byte.
#[derive(Clone, PartialEq, Eq)]
pub struct ContextKey(Arc<str>);

/// Header bytes: type, name length (4), host length (4), tag count (4).
const HEADER: usize = 13;

/// Writes `n` (below 2²⁸: a context comes from one packet of at most 64 KiB plus the
/// configured host and tags) as 4 ASCII bytes.
fn put_field(out: &mut String, n: usize) {
    debug_assert!(n < 1 << 28);
    for shift in [21, 14, 7, 0] {
        out.push(char::from(((n >> shift) & 0x7f) as u8));
    }
}

fn field(b: &[u8]) -> usize {
    b[..4].iter().fold(0, |n, &x| n << 7 | x as usize)
}

const KINDS: [MetricKind; 6] = [
    MetricKind::Count,
    MetricKind::Gauge,
    MetricKind::Histogram,
    MetricKind::Timer,
    MetricKind::Distribution,
    MetricKind::Set,
];

impl ContextKey {
    pub fn new(c: &ContextRef<'_>) -> ContextKey {
        let tags: usize = c.tags.iter().map(|t| t.len() + 1).sum();
        let mut text = String::with_capacity(HEADER + c.name.len() + c.host.len() + tags);
        let kind = KINDS.iter().position(|&k| k == c.kind).unwrap_or(0);
        text.push(char::from(kind as u8));
        put_field(&mut text, c.name.len());
        put_field(&mut text, c.host.len());
        put_field(&mut text, c.tags.len());
        text.push_str(c.name);
        text.push_str(c.host);
        for (i, tag) in c.tags.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(tag);
        }
        ContextKey(Arc::from(text))
    }

    /// Identifies this allocation: clones of one key share it.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as *const u8 as usize
    }

    fn header(&self) -> &[u8] {
        &self.0.as_bytes()[..HEADER]
    }

    fn name_end(&self) -> usize {
        HEADER + field(&self.header()[1..5])
    }

    fn host_end(&self) -> usize {
        self.name_end() + field(&self.header()[5..9])
    }

    pub fn name(&self) -> &str {
        &self.0[HEADER..self.name_end()]
    }

    /// The host; empty means "no host".
    pub fn host(&self) -> &str {
        &self.0[self.name_end()..self.host_end()]
    }

    pub fn kind(&self) -> MetricKind {
        KINDS[self.header()[0] as usize]
    }

    /// The tags, sorted and de-duplicated.
    pub fn tags(&self) -> Tags<'_> {
        Tags {
            rest: &self.0[self.host_end()..],
            left: field(&self.header()[9..13]),
        }
    }

    /// The value of the `device:` tag, if any (it becomes the v2 `device` resource).
    pub fn device(&self) -> Option<&str> {
        self.tags().find_map(|t| t.strip_prefix("device:"))
    }

    /// True when this key is the borrowed context `c`, given that their hashes are equal.
    ///
    /// Type, name and host are compared byte for byte, the tags by count and each length;
    /// the tag bytes themselves are vouched for by the 64-bit hash, as the Agent identifies a
    /// context by its 64-bit hash alone. Comparing 26 tags byte by byte (the corpus average)
    /// cost a quarter of a worker's time; with a per-process seed, two live contexts of equal
    /// structure collide with probability about n²/2⁶⁵ (3·10⁻⁸ for a million contexts).
    pub fn matches(&self, c: &ContextRef<'_>) -> bool {
        let tags = self.tags();
        if self.kind() != c.kind || tags.len() != c.tags.len() {
            return false;
        }
        if self.name() != c.name || self.host() != c.host {
            return false;
        }
        tags.zip(c.tags.iter()).all(|(a, b)| a.len() == b.len())
    }
}

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextKey")
            .field("name", &self.name())
            .field("host", &self.host())
            .field("tags", &self.tags().collect::<Vec<_>>())
            .field("kind", &self.kind())
            .finish()
    }
}

/// The tags of a [`ContextKey`], in order.
#[derive(Debug, Clone)]
pub struct Tags<'a> {
    rest: &'a str,
    left: usize,
}

impl<'a> Iterator for Tags<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (tag, rest) = match memchr::memchr(b',', self.rest.as_bytes()) {
            // A comma is ASCII: both sides are character boundaries.
            Some(at) => (&self.rest[..at], &self.rest[at + 1..]),
            None => (self.rest, ""),
        };
        self.rest = rest;
        Some(tag)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Tags<'_> {}

/// A length as the compact context records keep it (a shard's entry, a worker's cache):
/// saturating at 65535, which a packet of at most 64 KiB never needs to exceed in practice;
/// it is a cheap structural check beside the 64-bit hash, not an identity.
pub fn short_len(s: &str) -> u16 {
    s.len().min(u16::MAX as usize) as u16
}

/// The non-empty tags of a raw `a,b:c` list, split with SIMD `memchr`.
pub fn split_tags(raw: &str) -> impl Iterator<Item = &str> {
    let mut at = 0;
    memchr::memchr_iter(b',', raw.as_bytes())
        .chain(std::iter::once(raw.len()))
        .filter_map(move |comma| {
            // Commas are ASCII, so both ends are character boundaries.
            let tag = &raw[at..comma];
            at = comma + 1;
            (!tag.is_empty()).then_some(tag)
        })
}

/// Sorts and de-duplicates `tags[start..]` in place: the context does not depend on tag order.
///
/// Tags are sorted by an 8-byte big-endian prefix computed once per tag, so most comparisons
/// are integer compares instead of `memcmp` calls; ties fall back to comparing bytes, so the
/// order is exactly the byte order. `scratch` is reused between calls.
pub fn canonical_tags<'a>(
    tags: &mut Vec<&'a str>,
    start: usize,
    scratch: &mut Vec<(u64, &'a str)>,
) {
    let tail = &mut tags[start..];
    if !tail.is_sorted() {
        scratch.clear();
        scratch.extend(tail.iter().map(|t| (prefix(t), *t)));
        scratch.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        for (slot, (_, t)) in tail.iter_mut().zip(scratch.iter()) {
            *slot = t;
        }
    }
    let mut kept = start;
    for i in start..tags.len() {
        if kept == start || tags[i] != tags[kept - 1] {
            tags[kept] = tags[i];
            kept += 1;
        }
    }
    tags.truncate(kept);
}

/// The first 8 bytes as a big-endian number, zero-padded: orders like the bytes themselves
/// (ties, including a shorter string against a zero byte, fall through to a full compare).
fn prefix(s: &str) -> u64 {
    let b = s.as_bytes();
    match b.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        None => b
            .iter()
            .enumerate()
            .fold(0, |p, (i, &x)| p | (x as u64) << (56 - 8 * i)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context<'a>(name: &'a str, host: &'a str, tags: &'a [&'a str]) -> ContextRef<'a> {
        ContextRef {
            name,
            host,
            tags,
            kind: MetricKind::Count,
        }
    }

    #[test]
    fn an_owned_key_gives_back_its_parts_and_matches_its_source() {
        let c = context("page.views", "web1", &["a:1", "device:sda", "env:dev"]);
        let key = ContextKey::new(&c);
        assert_eq!(key.name(), "page.views");
        assert_eq!(key.host(), "web1");
        assert_eq!(
            key.tags().collect::<Vec<_>>(),
            ["a:1", "device:sda", "env:dev"]
        );
        assert_eq!(key.device(), Some("sda"));
        assert!(key.matches(&c));
    }

    #[test]
    fn keys_of_every_shape_give_back_exactly_their_parts() {
        let long_name = "n".repeat(70_000);
        let long_tag = format!("t:{}", "é".repeat(20_000));
        let cases: [(&str, &str, Vec<&str>); 5] = [
            ("", "", vec![]),
            ("m", "", vec!["a"]),
            ("é.m", "höst", vec!["a:1", "b", "ü:ß"]),
            (&long_name, "h", vec![&long_tag, "z"]),
            ("m", "h", (0..300).map(|_| "x").collect()),
        ];
        for kind in KINDS {
            for (name, host, tags) in &cases {
                let c = ContextRef {
                    name,
                    host,
                    tags,
                    kind,
                };
                let key = ContextKey::new(&c);
                assert_eq!(key.name(), *name);
                assert_eq!(key.host(), *host);
                assert_eq!(key.kind(), kind);
                assert_eq!(key.tags().len(), tags.len());
                assert_eq!(key.tags().collect::<Vec<_>>(), *tags);
                assert!(key.matches(&c));
                assert_eq!(key.clone().id(), key.id());
            }
        }
    }

    #[test]
    fn contexts_differing_in_any_part_neither_match_nor_usually_collide() {
        let state = ContextHasher::default();
        let base = context("ab", "h", &["c"]);
        let key = ContextKey::new(&base);
        let others = [
            context("a", "bh", &["c"]),
            context("ab", "", &["hc"]),
            context("ab", "h", &[]),
            context("ab", "h", &["c", "d"]),
            ContextRef {
                kind: MetricKind::Gauge,
                ..base
            },
        ];
        for other in others {
            assert!(!key.matches(&other), "{other:?}");
            assert_ne!(base.hash(&state), other.hash(&state), "{other:?}");
        }
        // Same structure, other tag bytes: told apart by the hash, not by `matches`.
        let same_shape = context("ab", "h", &["x"]);
        assert_ne!(base.hash(&state), same_shape.hash(&state));
        assert_eq!(base.hash(&state), base.hash(&state.clone()));
    }

    #[test]
    fn tag_order_and_duplicates_do_not_change_the_canonical_tags() {
        let mut a = vec!["b", "a", "c", "a"];
        let mut b = vec!["c", "b", "a"];
        canonical_tags(&mut a, 0, &mut Vec::new());
        canonical_tags(&mut b, 0, &mut Vec::new());
        assert_eq!(a, ["a", "b", "c"]);
        assert_eq!(a, b);
    }

    #[test]
    fn canonical_tags_sorts_and_dedups_only_the_tail() {
        let mut tags = vec!["z", "y", "b", "a", "b", "a"];
        canonical_tags(&mut tags, 2, &mut Vec::new());
        assert_eq!(tags, ["z", "y", "a", "b"]);
    }

    #[test]
    fn the_prefix_order_is_the_byte_order() {
        let words = [
            "",
            "a",
            "ab",
            "ab\0",
            "ab\0x",
            "abcdefgh",
            "abcdefgh0",
            "abcdefghZ",
            "abcdefgg~",
            "b",
            "host:x",
            "é",
            "zz",
            "\u{1F600}",
            "abcdefgh\0",
        ];
        let mut by_prefix: Vec<&str> = words.to_vec();
        by_prefix.sort_unstable_by(|a, b| prefix(a).cmp(&prefix(b)).then_with(|| a.cmp(b)));
        let mut by_bytes = words.to_vec();
        by_bytes.sort();
        assert_eq!(by_prefix, by_bytes);
    }
}
