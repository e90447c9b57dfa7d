//! Contexts: what a metric is aggregated by — (name, host, sorted de-duplicated tags, type).
//!
//! A worker builds a borrowed [`ContextRef`] per message and hashes it once; a shard looks the
//! hash up and only allocates an owned [`ContextKey`] the first time a context is seen.

use std::alloc::{self, Layout};
use std::hash::{BuildHasher, Hasher};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

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
    /// hashed in one call, because foldhash's `write` costs a full mix per call and a
    /// `dsd_base` context has dozens of parts (several times faster).
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

/// An owned context, cheap to clone: one shared allocation holding a 4-byte reference count,
/// a header of varint lengths (5 to 10 bytes) and the type, then the name, the host and the
/// tags joined by commas (a tag never holds a comma: tags are split at commas), behind one
/// 8-byte pointer.
///
/// An `Arc<str>` would take a 16-byte pointer in every shard entry and record, and 16 bytes
/// of counts per allocation; a maintained thin `Arc` (triomphe's `ThinArc`) 16 bytes of
/// count and length. Per context that is 10 to 30 bytes, megabytes at the context counts
/// whippet is built for, so the pointer is hand-rolled (docs/architecture.md).
pub struct ContextKey(NonNull<u8>);

// SAFETY: the allocation is immutable after `new` except for the atomic reference count, so
// sharing and sending it between threads is as safe as for `Arc<str>`.
unsafe impl Send for ContextKey {}
// SAFETY: as above.
unsafe impl Sync for ContextKey {}

/// Bytes of the reference count at the start of the allocation.
const COUNT: usize = 4;
/// A reference count past this aborts, as `Arc` does, rather than risk wrapping.
const MAX_REFS: u32 = i32::MAX as u32;

/// Writes `n` as a little-endian base-128 varint at `out[*at..]`, advancing `*at`.
fn put_varint(out: &mut [u8; MAX_HEADER], at: &mut usize, mut n: usize) {
    while n >= 0x80 {
        out[*at] = (n as u8) | 0x80;
        *at += 1;
        n >>= 7;
    }
    out[*at] = n as u8;
    *at += 1;
}

/// Reads the varint at `base + *at`, advancing `*at`.
///
/// # Safety
/// `base + *at` must start a varint written by [`put_varint`] inside one allocation.
unsafe fn varint(base: *const u8, at: &mut usize) -> usize {
    let (mut n, mut shift) = (0usize, 0);
    loop {
        // SAFETY: a varint's bytes up to the first one below 0x80 are in the allocation.
        let x = unsafe { *base.add(*at) };
        *at += 1;
        n |= ((x & 0x7f) as usize) << shift;
        if x < 0x80 {
            return n;
        }
        shift += 7;
    }
}

/// Most bytes a header takes: four varints of a `usize` and the type byte.
const MAX_HEADER: usize = 4 * 10 + 1;

/// A key's header, read once per accessor call.
struct Parts<'a> {
    text: &'a str,
    /// Header bytes.
    header: usize,
    name_end: usize,
    host_end: usize,
    tags: usize,
    kind: MetricKind,
}

impl<'a> Parts<'a> {
    fn name(&self) -> &'a str {
        &self.text[..self.name_end]
    }

    fn host(&self) -> &'a str {
        &self.text[self.name_end..self.host_end]
    }

    fn tags(&self) -> Tags<'a> {
        Tags {
            rest: &self.text[self.host_end..],
            left: self.tags,
        }
    }
}

/// Bytes of the base-128 varint of `n`.
fn varint_len(n: usize) -> usize {
    (usize::BITS - (n | 1).leading_zeros()).div_ceil(7) as usize
}

impl ContextKey {
    /// Bytes the key of `c` allocates ([`ContextKey::heap_len`]), without allocating it.
    pub fn len_for(c: &ContextRef<'_>) -> usize {
        let tags_len = c.tags.iter().map(|t| t.len() + 1).sum::<usize>();
        let text_len = c.name.len() + c.host.len() + tags_len.saturating_sub(1);
        let header: usize = [text_len, c.name.len(), c.host.len(), c.tags.len()]
            .into_iter()
            .map(varint_len)
            .sum();
        COUNT + header + 1 + text_len
    }

    pub fn new(c: &ContextRef<'_>) -> ContextKey {
        let tags_len = c.tags.iter().map(|t| t.len() + 1).sum::<usize>();
        let text_len = c.name.len() + c.host.len() + tags_len.saturating_sub(1);
        let mut header = [0u8; MAX_HEADER];
        let mut at = 0;
        for n in [text_len, c.name.len(), c.host.len(), c.tags.len()] {
            put_varint(&mut header, &mut at, n);
        }
        header[at] = c.kind as u8;
        let header = &header[..at + 1];
        let layout = layout(COUNT + header.len() + text_len);
        // SAFETY: the layout has a non-zero size (the count alone is 4 bytes).
        let ptr = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: the allocation is `layout.size()` bytes, aligned for the `u32` count at its
        // start; the header and the text are written within it, each part once, in order.
        unsafe {
            ptr.as_ptr().cast::<AtomicU32>().write(AtomicU32::new(1));
            let mut at = ptr.as_ptr().add(COUNT);
            for part in [header, c.name.as_bytes(), c.host.as_bytes()] {
                std::ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                at = at.add(part.len());
            }
            for (i, tag) in c.tags.iter().enumerate() {
                if i > 0 {
                    at.write(b',');
                    at = at.add(1);
                }
                std::ptr::copy_nonoverlapping(tag.as_ptr(), at, tag.len());
                at = at.add(tag.len());
            }
            debug_assert_eq!(at, ptr.as_ptr().add(layout.size()));
        }
        ContextKey(ptr)
    }

    fn count(&self) -> &AtomicU32 {
        // SAFETY: `new` put an `AtomicU32` at the start of the allocation, which lives as
        // long as any `ContextKey` pointing at it.
        unsafe { &*self.0.as_ptr().cast::<AtomicU32>() }
    }

    /// The lengths and type of the header, and the text after it.
    fn parts(&self) -> Parts<'_> {
        let mut at = 0;
        // SAFETY: `new` wrote the header (four varints and the type byte) right after the
        // count, then `text_len` bytes of text copied from `str`s and ASCII commas; nothing
        // changes them while a key exists.
        unsafe {
            let base = self.0.as_ptr().add(COUNT).cast_const();
            let text_len = varint(base, &mut at);
            let name = varint(base, &mut at);
            let host = varint(base, &mut at);
            let tags = varint(base, &mut at);
            let kind = MetricKind::ALL[*base.add(at) as usize];
            let text = std::slice::from_raw_parts(base.add(at + 1), text_len);
            Parts {
                text: std::str::from_utf8_unchecked(text),
                header: at + 1,
                name_end: name,
                host_end: name + host,
                tags,
                kind,
            }
        }
    }

    /// Bytes of this key's allocation (shared by its clones).
    pub fn heap_len(&self) -> usize {
        let p = self.parts();
        COUNT + p.header + p.text.len()
    }

    /// Identifies this allocation: clones of one key share it.
    pub fn id(&self) -> usize {
        self.0.as_ptr() as usize
    }

    pub fn name(&self) -> &str {
        self.parts().name()
    }

    /// The host; empty means "no host".
    pub fn host(&self) -> &str {
        self.parts().host()
    }

    pub fn kind(&self) -> MetricKind {
        self.parts().kind
    }

    /// The tags, sorted and de-duplicated.
    pub fn tags(&self) -> Tags<'_> {
        self.parts().tags()
    }

    /// The value of the `device:` tag, if any (it becomes the v2 `device` resource).
    pub fn device(&self) -> Option<&str> {
        self.tags().find_map(|t| t.strip_prefix("device:"))
    }

    /// True when this key is the borrowed context `c`, given that their hashes are equal.
    ///
    /// Type, name and host are compared byte for byte, the tags by count and each length;
    /// the tag bytes themselves are vouched for by the 64-bit hash, as the Agent identifies a
    /// context by its 64-bit hash alone. Comparing dozens of tags byte by byte would be a
    /// large share of a worker's time; with a per-process seed, two live contexts of equal
    /// structure collide with probability about n²/2⁶⁵ (3·10⁻⁸ for a million contexts).
    pub fn matches(&self, c: &ContextRef<'_>) -> bool {
        let p = self.parts();
        if p.kind != c.kind || p.tags != c.tags.len() {
            return false;
        }
        if p.name() != c.name || p.host() != c.host {
            return false;
        }
        p.tags().zip(c.tags.iter()).all(|(a, b)| a.len() == b.len())
    }
}

/// The layout of a key's allocation of `size` bytes.
fn layout(size: usize) -> Layout {
    match Layout::from_size_align(size, std::mem::align_of::<AtomicU32>()) {
        Ok(l) => l,
        // Only past isize::MAX bytes, which no context built from packets can reach.
        Err(_) => alloc::handle_alloc_error(Layout::new::<AtomicU32>()),
    }
}

impl Clone for ContextKey {
    fn clone(&self) -> ContextKey {
        // Relaxed, as in `Arc`: a new reference is made from an existing one.
        if self.count().fetch_add(1, Ordering::Relaxed) > MAX_REFS {
            std::process::abort();
        }
        ContextKey(self.0)
    }
}

impl Drop for ContextKey {
    fn drop(&mut self) {
        if self.count().fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other owner's use happens before the free, as in `Arc`.
        fence(Ordering::Acquire);
        let p = self.parts();
        let size = COUNT + p.header + p.text.len();
        // SAFETY: this was the last reference; the allocation was made by `new` with this
        // layout (count, header and text).
        unsafe { alloc::dealloc(self.0.as_ptr(), layout(size)) }
    }
}

impl PartialEq for ContextKey {
    fn eq(&self, other: &ContextKey) -> bool {
        if self.0 == other.0 {
            return true;
        }
        let (a, b) = (self.parts(), other.parts());
        (a.kind, a.name_end, a.host_end, a.tags, a.text)
            == (b.kind, b.name_end, b.host_end, b.tags, b.text)
    }
}

impl Eq for ContextKey {}

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
pub(crate) fn short_len(s: &str) -> u16 {
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
        for kind in MetricKind::ALL {
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
    fn a_key_is_one_pointer_and_lives_until_its_last_clone_is_dropped() {
        assert_eq!(std::mem::size_of::<ContextKey>(), 8);
        let key = ContextKey::new(&context("m", "h", &["a:1", "b:2"]));
        let clones: Vec<ContextKey> = (0..4).map(|_| key.clone()).collect();
        assert_eq!(key.count().load(Ordering::Relaxed), 5);
        // Clones dropped on other threads, the original last: the text stays readable until
        // then (valgrind or miri would flag a use after free or a leak here).
        let threads: Vec<_> = clones
            .into_iter()
            .map(|k| std::thread::spawn(move || k.tags().count()))
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 2);
        }
        assert_eq!(key.count().load(Ordering::Relaxed), 1);
        assert_eq!(key.tags().collect::<Vec<_>>(), ["a:1", "b:2"]);
        let same = ContextKey::new(&context("m", "h", &["a:1", "b:2"]));
        assert_eq!(key, same);
        assert_ne!(key.id(), same.id());
        assert_ne!(key, ContextKey::new(&context("m", "h", &["a:1", "b:3"])));
        assert_ne!(key, ContextKey::new(&context("m", "h", &["a:1,b:2"])));
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
