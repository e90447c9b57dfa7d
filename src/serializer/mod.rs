//! The serializer: a flush's series, sketches, events and service checks → compressed HTTP
//! payloads in the Datadog intake formats (docs/behaviour.md, "Payloads"), split to honour
//! every size and point limit. Items are encoded one at a time into an incremental
//! [`PayloadBuilder`] that says "full" before a limit would be crossed; nothing is dropped for
//! size unless one item alone is over a limit, and that is counted.

pub mod compress;
pub mod encode;
pub mod protobuf;

use std::collections::HashMap;
use std::sync::Arc;

pub use compress::Compression;

use crate::flush::{Flushed, Series, SketchPoint};
use compress::Compressor;

/// Where a payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    SeriesV2,
    SeriesV1,
    Sketches,
    Events,
    ServiceChecks,
}

impl Endpoint {
    pub(crate) const ALL: [Endpoint; 5] = [
        Endpoint::SeriesV2,
        Endpoint::SeriesV1,
        Endpoint::Sketches,
        Endpoint::Events,
        Endpoint::ServiceChecks,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::SeriesV2 => "/api/v2/series",
            Endpoint::SeriesV1 => "/api/v1/series",
            Endpoint::Sketches => "/api/beta/sketches",
            Endpoint::Events => "/intake/",
            Endpoint::ServiceChecks => "/api/v1/check_run",
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Endpoint::SeriesV2 | Endpoint::Sketches => "application/x-protobuf",
            _ => "application/json",
        }
    }

    fn limits(self) -> Limits {
        match self {
            Endpoint::SeriesV2 | Endpoint::SeriesV1 => Limits {
                compressed: 512_000,
                uncompressed: 5_242_880,
                items: 10_000,
            },
            _ => Limits {
                compressed: 2_621_440,
                uncompressed: 4_194_304,
                items: usize::MAX,
            },
        }
    }
}

/// Size limits of one payload. `items` counts points for series.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub compressed: usize,
    pub uncompressed: usize,
    pub items: usize,
}

/// A compressed request body, ready for the forwarder.
#[derive(Debug, Clone)]
pub struct Payload {
    pub endpoint: Endpoint,
    pub body: Vec<u8>,
    pub compression: Compression,
    /// Points, sketches, events or checks it carries.
    pub items: usize,
}

/// Builds one payload: `header`, items separated by `separator`, `footer`, compressed on
/// the fly.
pub struct PayloadBuilder {
    endpoint: Endpoint,
    limits: Limits,
    compression: Compression,
    compressor: Compressor,
    header: Vec<u8>,
    separator: &'static [u8],
    footer: Vec<u8>,
    uncompressed: usize,
    entries: usize,
    items: usize,
}

impl PayloadBuilder {
    pub fn new(
        endpoint: Endpoint,
        compression: Compression,
        header: &[u8],
        separator: &'static [u8],
        footer: &[u8],
    ) -> PayloadBuilder {
        Self::with_limits(
            endpoint,
            endpoint.limits(),
            compression,
            header,
            separator,
            footer,
        )
    }

    pub(crate) fn with_limits(
        endpoint: Endpoint,
        limits: Limits,
        compression: Compression,
        header: &[u8],
        separator: &'static [u8],
        footer: &[u8],
    ) -> PayloadBuilder {
        let mut compressor = Compressor::new(compression);
        compressor.write(header);
        PayloadBuilder {
            endpoint,
            limits,
            compression,
            compressor,
            header: header.to_vec(),
            separator,
            footer: footer.to_vec(),
            uncompressed: header.len(),
            entries: 0,
            items: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Would `entry` (carrying `items`) still fit, footer included?
    pub fn fits(&self, entry: &[u8], items: usize) -> bool {
        let sep = if self.entries > 0 {
            self.separator.len()
        } else {
            0
        };
        let added = sep + entry.len() + self.footer.len();
        self.uncompressed + added <= self.limits.uncompressed
            && self.items + items <= self.limits.items
            && self.compressor.bound_with(added) <= self.limits.compressed
    }

    pub fn push(&mut self, entry: &[u8], items: usize) {
        if self.entries > 0 {
            self.compressor.write(self.separator);
            self.uncompressed += self.separator.len();
        }
        self.compressor.write(entry);
        self.uncompressed += entry.len();
        self.entries += 1;
        self.items += items;
    }

    /// Finishes this payload and starts an empty one in its place.
    pub fn take(&mut self) -> Payload {
        let fresh = Self::with_limits(
            self.endpoint,
            self.limits,
            self.compression,
            &self.header,
            self.separator,
            &self.footer,
        );
        let mut done = std::mem::replace(self, fresh);
        done.compressor.write(&done.footer);
        Payload {
            endpoint: done.endpoint,
            body: done.compressor.finish(),
            compression: done.compression,
            items: done.items,
        }
    }
}

/// Adds entries to payloads, starting a new payload whenever the next entry would not fit.
pub(crate) struct Splitter {
    builder: PayloadBuilder,
    pub payloads: Vec<Payload>,
    /// Items in entries that alone exceed a limit (counted, dropped).
    pub oversized: usize,
}

impl Splitter {
    pub fn new(builder: PayloadBuilder) -> Splitter {
        Splitter {
            builder,
            payloads: Vec::new(),
            oversized: 0,
        }
    }

    pub(crate) fn add(&mut self, entry: &[u8], items: usize) {
        if !self.builder.fits(entry, items) {
            if self.builder.is_empty() {
                self.oversized += items.max(1);
                return;
            }
            self.payloads.push(self.builder.take());
            if !self.builder.fits(entry, items) {
                self.oversized += items.max(1);
                return;
            }
        }
        self.builder.push(entry, items);
    }

    pub fn finish(mut self) -> (Vec<Payload>, usize) {
        if !self.builder.is_empty() {
            self.payloads.push(self.builder.take());
        }
        (self.payloads, self.oversized)
    }
}

/// Which series API to use (`--series-api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesApi {
    V1,
    V2,
}

/// Turns flushes into payloads.
#[derive(Debug, Clone)]
pub struct Serializer {
    pub series_api: SeriesApi,
    pub compression: Compression,
    /// `internalHostname` of event payloads.
    pub hostname: String,
}

/// What one serialization produced.
#[derive(Debug, Default)]
pub struct Serialized {
    pub payloads: Vec<Payload>,
    /// Items dropped because alone they exceed a payload limit, per endpoint.
    pub oversized: Vec<(Endpoint, usize)>,
}

impl Serializer {
    pub fn serialize(&self, flushed: &Flushed) -> Serialized {
        let mut out = Serialized::default();
        let mut keep = |endpoint: Endpoint, (payloads, oversized): (Vec<Payload>, usize)| {
            out.payloads.extend(payloads);
            if oversized > 0 {
                out.oversized.push((endpoint, oversized));
            }
        };
        if !flushed.series.is_empty() {
            let endpoint = match self.series_api {
                SeriesApi::V2 => Endpoint::SeriesV2,
                SeriesApi::V1 => Endpoint::SeriesV1,
            };
            keep(endpoint, self.series(&flushed.series));
        }
        if !flushed.sketches.is_empty() {
            keep(Endpoint::Sketches, self.sketches(&flushed.sketches));
        }
        if !flushed.events.is_empty() {
            for (endpoint, result) in
                encode::events(&flushed.events, &self.hostname, self.compression)
            {
                keep(endpoint, result);
            }
        }
        if !flushed.service_checks.is_empty() {
            keep(
                Endpoint::ServiceChecks,
                encode::service_checks(&flushed.service_checks, self.compression),
            );
        }
        out
    }

    fn series(&self, series: &[Series]) -> (Vec<Payload>, usize) {
        let key = |s: &Series| {
            (
                s.context.id(),
                Arc::as_ptr(&s.suffix) as *const u8 as usize,
                s.kind as usize,
            )
        };
        let mut entry = Vec::new();
        let mut scratch = Vec::new();
        let mut split = match self.series_api {
            SeriesApi::V2 => Splitter::new(PayloadBuilder::new(
                Endpoint::SeriesV2,
                self.compression,
                b"",
                b"",
                b"",
            )),
            SeriesApi::V1 => Splitter::new(PayloadBuilder::new(
                Endpoint::SeriesV1,
                self.compression,
                b"{\"series\":[",
                b",",
                b"]}",
            )),
        };
        for_each_group(series, key, |points| {
            entry.clear();
            match self.series_api {
                SeriesApi::V2 => encode::series_v2(&mut entry, points, &mut scratch),
                SeriesApi::V1 => encode::series_v1(&mut entry, points),
            }
            split.add(&entry, points.len());
        });
        split.finish()
    }

    fn sketches(&self, sketches: &[SketchPoint]) -> (Vec<Payload>, usize) {
        let mut split = Splitter::new(PayloadBuilder::new(
            Endpoint::Sketches,
            self.compression,
            b"",
            b"",
            b"",
        ));
        let mut entry = Vec::new();
        let mut scratch = (Vec::new(), Vec::new());
        for_each_group(
            sketches,
            |s| s.context.id(),
            |points| {
                entry.clear();
                encode::sketch(&mut entry, points, &mut scratch);
                split.add(&entry, points.len());
            },
        );
        split.finish()
    }
}

/// Calls `f` with each group of items with equal keys, in first-seen order (a series with
/// several buckets' points becomes one series with several points, as the Agent sends it).
/// A fixed number of allocations whatever the number of groups: items are tagged with their
/// group and sorted stably, so each group is a contiguous run.
fn for_each_group<T, K: std::hash::Hash + Eq>(
    items: &[T],
    key: impl Fn(&T) -> K,
    mut f: impl FnMut(&[&T]),
) {
    let mut index: HashMap<K, u32> = HashMap::with_capacity(items.len());
    let mut tagged: Vec<(u32, &T)> = Vec::with_capacity(items.len());
    for item in items {
        let next = index.len() as u32;
        let g = *index.entry(key(item)).or_insert(next);
        tagged.push((g, item));
    }
    drop(index);
    tagged.sort_by_key(|&(g, _)| g);
    let refs: Vec<&T> = tagged.iter().map(|&(_, t)| t).collect();
    let mut start = 0;
    for i in 1..=refs.len() {
        if i == refs.len() || tagged[i].0 != tagged[start].0 {
            f(&refs[start..i]);
            start = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress(p: &Payload) -> Vec<u8> {
        match p.compression {
            Compression::Zstd => zstd::decode_all(&p.body[..]).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn groups_keep_first_seen_order_and_item_order_within_a_group() {
        let items = [("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5)];
        let mut groups = Vec::new();
        for_each_group(
            &items,
            |i| i.0,
            |g| groups.push(g.iter().map(|i| i.1).collect::<Vec<_>>()),
        );
        assert_eq!(groups, [vec![1, 3], vec![2, 5], vec![4]]);
        let mut none = 0;
        for_each_group(&[] as &[(u8, u8)], |i| i.0, |_| none += 1);
        assert_eq!(none, 0);
    }

    #[test]
    fn a_splitter_starts_a_new_payload_before_any_limit_is_crossed() {
        let limits = Limits {
            compressed: 10_000,
            uncompressed: 1000,
            items: 3,
        };
        let builder = PayloadBuilder::with_limits(
            Endpoint::Events,
            limits,
            Compression::Zstd,
            b"[",
            b",",
            b"]",
        );
        let mut split = Splitter::new(builder);
        let entry = [b'x'; 300];
        for _ in 0..7 {
            split.add(&entry, 1);
        }
        split.add(&[b'y'; 2000], 1); // alone over the uncompressed limit
        let (payloads, oversized) = split.finish();
        assert_eq!(oversized, 1);
        let sizes: Vec<usize> = payloads.iter().map(|p| p.items).collect();
        assert_eq!(sizes, [3, 3, 1]);
        for p in &payloads {
            let body = decompress(p);
            assert!(body.len() <= 1000);
            assert_eq!(body[0], b'[');
            assert_eq!(*body.last().unwrap(), b']');
            assert_eq!(body.iter().filter(|&&b| b == b'x').count(), 300 * p.items);
        }
    }

    #[test]
    fn the_compressed_limit_splits_incompressible_payloads() {
        let limits = Limits {
            compressed: 4096,
            uncompressed: 1 << 20,
            items: usize::MAX,
        };
        let builder = PayloadBuilder::with_limits(
            Endpoint::Sketches,
            limits,
            Compression::Zstd,
            b"",
            b"",
            b"",
        );
        let mut split = Splitter::new(builder);
        let mut rng = crate::blast::Rng::new(88172645463325252);
        let mut total = 0;
        for _ in 0..50 {
            let entry: Vec<u8> = (0..500).map(|_| rng.next_u64() as u8).collect();
            split.add(&entry, 1);
            total += 1;
        }
        let (payloads, oversized) = split.finish();
        assert_eq!(oversized, 0);
        assert_eq!(payloads.iter().map(|p| p.items).sum::<usize>(), total);
        assert!(payloads.len() >= 7, "{}", payloads.len());
        for p in &payloads {
            assert!(p.body.len() <= 4096, "{}", p.body.len());
        }
    }
}
