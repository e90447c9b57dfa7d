//! Contexts: what a metric is aggregated by — (name, host, sorted de-duplicated tags, type).
//!
//! A worker builds a borrowed [`ContextRef`] per message and hashes it once; a shard looks the
//! hash up and only allocates an owned [`ContextKey`] the first time a context is seen.

use std::hash::{BuildHasher, Hasher};

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

/// An owned context. Name, host and tags live in one string with an offset table: two
/// allocations a context instead of one per tag (the corpus averages 26 tags a message).
#[derive(Debug, PartialEq, Eq)]
pub struct ContextKey {
    text: Box<str>,
    /// ends[0] = end of name, ends[1] = end of host, ends[2..] = end of each tag.
    ends: Box<[u32]>,
    kind: MetricKind,
}

impl ContextKey {
    pub fn new(c: &ContextRef<'_>) -> ContextKey {
        let len = c.name.len() + c.host.len() + c.tags.iter().map(|t| t.len()).sum::<usize>();
        let mut text = String::with_capacity(len);
        let mut ends = Vec::with_capacity(2 + c.tags.len());
        for part in [c.name, c.host].iter().chain(c.tags.iter()) {
            text.push_str(part);
            ends.push(text.len() as u32);
        }
        ContextKey {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            kind: c.kind,
        }
    }

    pub fn name(&self) -> &str {
        &self.text[..self.ends[0] as usize]
    }

    /// The host; empty means "no host".
    pub fn host(&self) -> &str {
        &self.text[self.ends[0] as usize..self.ends[1] as usize]
    }

    pub fn kind(&self) -> MetricKind {
        self.kind
    }

    /// The tags, sorted and de-duplicated.
    pub fn tags(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.ends
            .windows(2)
            .skip(1)
            .map(|w| &self.text[w[0] as usize..w[1] as usize])
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
        if self.kind != c.kind || self.ends.len() != c.tags.len() + 2 {
            return false;
        }
        if self.name() != c.name || self.host() != c.host {
            return false;
        }
        let mut at = self.ends[1];
        for (tag, &end) in c.tags.iter().zip(self.ends[2..].iter()) {
            if (end - at) as usize != tag.len() {
                return false;
            }
            at = end;
        }
        true
    }
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
