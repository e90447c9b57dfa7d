//! Enrichment: what the Agent does to a message between parsing it and building its context
//! (docs/behaviour.md, "Enrichment"). The `host:` tag sets the host; the magic tags
//! `dd.internal.entity_id:`, `dd.internal.card:` and `dd.internal.jmx_check_name:` leave the
//! tags and say where the message came from; `--tags` join; and, with origin detection, the
//! tags of the sender's container or pod join too, at the cardinality asked for.
//!
//! Pure but for the tagger's lookups: a message without origin costs nothing here beyond
//! what its context costs anyway.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};

use memchr::memmem::Finder;

use crate::context::{canonical_tags, split_tags};
use crate::origin::{self, PidCache};
use crate::packet::Transport;
use crate::parser::OriginFields;
use crate::shaping::{Shape, Shaping};
use crate::tagger::{Cardinality, Entities, EntityTags, Lookup, Tagger};
use crate::telemetry::Label;

/// The prefix every magic tag shares: one check rules them all out for an ordinary tag.
const MAGIC: &str = "dd.internal.";
const ENTITY_ID: &str = "dd.internal.entity_id:";
const CARD: &str = "dd.internal.card:";
const JMX_CHECK_NAME: &str = "dd.internal.jmx_check_name:";

/// What a worker needs to turn messages into samples and records.
#[derive(Debug, Clone)]
pub struct Enrichment {
    /// Host for messages without a `host:` tag (or `h:` field); empty for none.
    pub hostname: Arc<str>,
    /// `--tags`, added to every metric, event and service check.
    pub extra_tags: Arc<[Box<str>]>,
    /// Bucket length in seconds.
    pub bucket_seconds: i64,
    /// Origin detection, when any part of it is on.
    pub origin: Option<Arc<OriginDetection>>,
    /// The shaping settings, when any is set ([`Shaping::is_active`]).
    pub shaping: Option<Arc<Shaping>>,
    /// `--eol-required`, per transport (`Transport as usize`): a packet's last line must end
    /// with a newline, or it is dropped and counted.
    pub eol_required: [bool; Transport::COUNT],
    /// `--no-aggregation-pipeline`: `|T` timestamps are honoured; without, they are ignored
    /// and the samples aggregate at arrival.
    pub timestamps: bool,
}

impl Enrichment {
    /// Only a default host and `extra_tags`: 10-second buckets, no origin detection, no
    /// shaping, no newline required, timestamps honoured. What tests and benchmarks build
    /// workers with; the daemon's comes from its configuration.
    pub fn plain(hostname: &str, extra_tags: &[&str]) -> Enrichment {
        Enrichment {
            hostname: hostname.into(),
            extra_tags: extra_tags.iter().map(|t| Box::<str>::from(*t)).collect(),
            bucket_seconds: 10,
            origin: None,
            shaping: None,
            eol_required: [false; Transport::COUNT],
            timestamps: true,
        }
    }
}

/// How the origin of a message is found and what it adds (the Agent's `dogstatsd_origin_*`
/// settings, in its default, "legacy" mode).
#[derive(Debug)]
pub struct OriginDetection {
    pub tagger: Arc<Tagger>,
    /// Unix-socket origin detection (`--origin-detection`): the pids' containers.
    pub pids: Option<Arc<PidCache>>,
    /// `--origin-detection-client`: honour `|c:` and `|card:`.
    pub client: bool,
    /// `--entity-id-precedence`: a `dd.internal.entity_id` tag overrides the socket's origin.
    pub entity_id_precedence: bool,
    /// `--tag-cardinality`, reloadable.
    cardinality: AtomicU8,
}

impl OriginDetection {
    pub fn new(
        tagger: Arc<Tagger>,
        pids: Option<Arc<PidCache>>,
        client: bool,
        entity_id_precedence: bool,
        cardinality: Cardinality,
    ) -> OriginDetection {
        OriginDetection {
            tagger,
            pids,
            client,
            entity_id_precedence,
            cardinality: AtomicU8::new(cardinality as u8),
        }
    }

    pub fn cardinality(&self) -> Cardinality {
        Cardinality::ALL[self.cardinality.load(Relaxed) as usize]
    }

    /// SIGHUP's new `--tag-cardinality`.
    pub fn set_cardinality(&self, c: Cardinality) {
        self.cardinality.store(c as u8, Relaxed);
    }

    /// The entities a message came from, in `snapshot`, and the cardinality of their tags:
    /// the Agent's rules (docs/behaviour.md, "Origin"). `None` when it adds no tags.
    pub fn resolve<'a, 'f>(
        &self,
        snapshot: &'a Entities,
        socket_container: Option<&str>,
        raw_tags: &'f str,
        fields: &OriginFields<'f>,
    ) -> Option<Resolved<'a>> {
        let magic = if has_magic(raw_tags) {
            origin_tags(raw_tags)
        } else {
            (None, None)
        };
        let (pod_uid, card_tag) = (magic.0.unwrap_or(""), magic.1);
        let client = |s: &'f str| if self.client { s } else { "" };
        let card = match client(fields.cardinality) {
            "" => card_tag.unwrap_or(""),
            field => field,
        };
        // `none` opts out of origin tags entirely (and is no cardinality the tagger knows).
        if card.eq_ignore_ascii_case("none") {
            return None;
        }
        let cardinality = match card {
            "" => self.cardinality(),
            card => Cardinality::parse(card).unwrap_or_else(|| self.cardinality()),
        };
        let mut entities = [None, None];
        if let Some(id) = socket_container {
            if pod_uid.is_empty() || !self.entity_id_precedence {
                entities[0] = self.lookup(&snapshot.containers, id);
            }
        }
        if !pod_uid.is_empty() && pod_uid != "none" {
            entities[1] = self.lookup(&snapshot.pods, pod_uid);
        } else if pod_uid.is_empty() {
            let local = origin::local_data(client(fields.local));
            if !local.container_id.is_empty() {
                entities[1] = self.lookup(&snapshot.containers, local.container_id);
            }
        }
        (entities != [None, None]).then_some(Resolved {
            entities,
            cardinality,
            generation: snapshot.generation,
        })
    }

    fn lookup<'a>(&self, map: &'a crate::tagger::Ids, id: &str) -> Option<&'a EntityTags> {
        let found = map.get(id);
        let lookups = &self.tagger.counters.lookups;
        match found {
            Some(_) => lookups[Lookup::Hit].add(1),
            None => {
                lookups[Lookup::Miss].add(1);
                self.tagger.missed();
            }
        }
        found
    }
}

/// Whether a raw tag field holds a `dd.internal.` tag (one SIMD scan).
pub fn has_magic(raw_tags: &str) -> bool {
    static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(MAGIC));
    FINDER.find(raw_tags.as_bytes()).is_some()
}

/// The value of the last `dd.internal.entity_id:` tag and of the first `dd.internal.card:`
/// tag, as the Agent picks them: found by SIMD search, not by splitting every tag.
fn origin_tags(raw: &str) -> (Option<&str>, Option<&str>) {
    static ENTITY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(ENTITY_ID));
    static CARDS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(CARD));
    (
        tag_values(raw, &ENTITY).last(),
        tag_values(raw, &CARDS).next(),
    )
}

/// The values of the tags `finder`'s prefix begins, in order: matches that start a tag.
fn tag_values<'r>(raw: &'r str, finder: &'r Finder<'static>) -> impl Iterator<Item = &'r str> {
    let bytes = raw.as_bytes();
    let prefix = finder.needle().len();
    finder
        .find_iter(bytes)
        .filter(move |&at| at == 0 || bytes[at - 1] == b',')
        .map(move |at| {
            let value = &raw[at + prefix..];
            memchr::memchr(b',', value.as_bytes()).map_or(value, |end| &value[..end])
        })
}

/// A message's origin, resolved to tagger entities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved<'a> {
    entities: [Option<&'a EntityTags>; 2],
    pub cardinality: Cardinality,
    /// The snapshot the entities are in.
    generation: u64,
}

impl<'a> Resolved<'a> {
    /// What tells this origin from any other: the snapshot, the entities' addresses in it
    /// and the cardinality. Two messages with equal raw bytes and equal identities have the
    /// same context, so the worker's context cache can key on them.
    pub fn identity(&self) -> [u64; 4] {
        let at = |e: Option<&EntityTags>| e.map_or(0, |e| e as *const EntityTags as u64);
        [
            self.generation,
            at(self.entities[0]),
            at(self.entities[1]),
            self.cardinality as u64,
        ]
    }

    /// The tags its origin adds.
    pub fn tags(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.entities
            .iter()
            .flatten()
            .flat_map(move |e| e.at(self.cardinality))
    }
}

/// Whether a tag is magic: it leaves the tags whatever its value.
#[inline]
fn is_magic(tag: &str) -> bool {
    tag.starts_with(MAGIC)
        && (tag.starts_with(ENTITY_ID) || tag.starts_with(CARD) || tag.starts_with(JMX_CHECK_NAME))
}

/// Appends the canonical tags of a raw `#` field to `tags`: split, `host:` and magic tags
/// removed, extra, origin, the mapper's and a host rule's tags added, the tag filter
/// applied, sorted, de-duplicated. Returns the value of the last `host:` tag (which a host
/// rule overrides: the caller sends no host) and how many tags the tag filter removed.
pub fn canonicalize<'a>(
    raw: &'a str,
    extra: &'a [Box<str>],
    origin: Option<&Resolved<'a>>,
    shape: Shape<'a>,
    tags: &mut Vec<&'a str>,
    sort: &mut Vec<(u64, &'a str)>,
) -> (Option<&'a str>, usize) {
    let start = tags.len();
    let mut host = None;
    for tag in split_tags(raw) {
        if let Some(h) = tag.strip_prefix("host:") {
            host = Some(h);
        } else if !is_magic(tag) {
            tags.push(tag);
        }
    }
    tags.extend(extra.iter().map(|t| &**t));
    if let Some(o) = origin {
        tags.extend(o.tags());
    }
    tags.extend(shape.tags.iter().map(|t| &**t));
    if let Some(rule) = shape.host {
        tags.extend(rule.tags.iter().map(|t| &**t));
    }
    let mut filtered = 0;
    if let Some(filter) = shape.filter {
        let mut kept = start;
        for i in start..tags.len() {
            if filter.keeps(tags[i]) {
                tags[kept] = tags[i];
                kept += 1;
            }
        }
        filtered = tags.len() - kept;
        tags.truncate(kept);
    }
    canonical_tags(tags, start, sort);
    (host, filtered)
}

/// The owned tags and host of an event or service check: the raw tags without `host:` and
/// magic tags, then the extra and origin tags, in that order. The host is `h:` when it is not
/// empty, else the last `host:` tag (empty: no host), else the default.
pub fn record_tags(
    raw: &str,
    h_field: Option<&str>,
    enrichment: &Enrichment,
    origin: Option<&Resolved<'_>>,
) -> (String, Vec<String>) {
    let mut host = None;
    let mut tags: Vec<String> = split_tags(raw)
        .filter(|t| match t.strip_prefix("host:") {
            Some(h) => {
                host = Some(h);
                false
            }
            None => !is_magic(t),
        })
        .map(str::to_string)
        .collect();
    tags.extend(enrichment.extra_tags.iter().map(|t| t.to_string()));
    if let Some(o) = origin {
        for t in o.tags() {
            if !tags.iter().any(|have| have == t) {
                tags.push(t.to_string());
            }
        }
    }
    let host = match h_field {
        Some(h) if !h.is_empty() => h,
        _ => host.unwrap_or(&enrichment.hostname),
    };
    (host.to_string(), tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tagger::Sources;

    fn enrichment() -> Enrichment {
        Enrichment::plain("default-host", &["team:core"])
    }

    fn canonical(
        raw: &str,
        extra: &[Box<str>],
        origin: Option<&Resolved<'_>>,
    ) -> (Option<String>, Vec<String>) {
        let mut tags = Vec::new();
        let mut sort = Vec::new();
        let (host, _) = canonicalize(raw, extra, origin, Shape::default(), &mut tags, &mut sort);
        (
            host.map(str::to_string),
            tags.iter().map(|t| t.to_string()).collect(),
        )
    }

    #[test]
    fn magic_tags_leave_the_tags_of_every_kind() {
        let raw = "a,dd.internal.entity_id:pod-1,dd.internal.card:high,dd.internal.jmx_check_name:kafka,dd.internal.other:x,host:h1";
        let (host, tags) = canonical(raw, &[], None);
        assert_eq!(host.as_deref(), Some("h1"));
        assert_eq!(tags, ["a", "dd.internal.other:x"]);
        let (host, tags) = record_tags(raw, None, &enrichment(), None);
        assert_eq!(host, "h1");
        assert_eq!(tags, ["a", "dd.internal.other:x", "team:core"]);
    }

    #[test]
    fn a_records_host_comes_from_h_then_the_host_tag_then_the_default() {
        let e = enrichment();
        let cases = [
            ("x,host:tagged", Some("field"), "field"),
            ("x,host:tagged", Some(""), "tagged"),
            ("x,host:tagged", None, "tagged"),
            ("x,host:", None, ""),
            ("x", None, "default-host"),
            ("x", Some(""), "default-host"),
        ];
        for (raw, h, want) in cases {
            let (host, tags) = record_tags(raw, h, &e, None);
            assert_eq!(host, want, "{raw} {h:?}");
            assert_eq!(tags, ["x", "team:core"]);
        }
    }

    fn detection(client: bool, precedence: bool) -> (OriginDetection, Entities) {
        let mut s = Entities::default();
        let mut c = EntityTags::default();
        c.low("image_name", "app");
        c.high("container_id", "c1");
        s.containers.insert("c1".into(), c);
        let mut c2 = EntityTags::default();
        c2.low("image_name", "other");
        s.containers.insert("c2".into(), c2);
        let mut p = EntityTags::default();
        p.low("kube_namespace", "shop");
        p.orchestrator("pod_name", "web-1");
        s.pods.insert("p1".into(), p);
        let tagger = Tagger::new(Sources::default(), Arc::default());
        let d = OriginDetection::new(tagger, None, client, precedence, Cardinality::Low);
        (d, s)
    }

    fn tags_of(r: Option<Resolved<'_>>) -> Vec<&str> {
        r.map(|r| r.tags().collect()).unwrap_or_default()
    }

    #[test]
    fn origins_follow_the_agents_precedence() {
        let f = OriginFields::default();
        let cid = OriginFields {
            local: "ci-c2",
            ..f
        };
        let high = OriginFields {
            cardinality: "high",
            ..f
        };
        let none = OriginFields {
            cardinality: "none",
            ..f
        };
        // (client, precedence, socket, raw tags, fields, tags)
        type Case<'a> = (
            bool,
            bool,
            Option<&'a str>,
            &'a str,
            OriginFields<'a>,
            Vec<&'a str>,
        );
        let cases: [Case<'_>; 11] = [
            (false, false, Some("c1"), "", f, vec!["image_name:app"]),
            (
                false,
                false,
                None,
                "dd.internal.entity_id:p1",
                f,
                vec!["kube_namespace:shop"],
            ),
            // Both the socket's container and the pod, unless the entity id takes precedence.
            (
                false,
                false,
                Some("c1"),
                "dd.internal.entity_id:p1",
                f,
                vec!["image_name:app", "kube_namespace:shop"],
            ),
            (
                false,
                true,
                Some("c1"),
                "dd.internal.entity_id:p1",
                f,
                vec!["kube_namespace:shop"],
            ),
            // `none` as an entity id names no pod, and hides the client's container.
            (true, false, None, "dd.internal.entity_id:none", cid, vec![]),
            // `|c:` counts only with client origin detection.
            (false, false, None, "", cid, vec![]),
            (true, false, None, "", cid, vec!["image_name:other"]),
            // Cardinality: the field (client only), then the tag, then the default.
            (
                true,
                false,
                Some("c1"),
                "dd.internal.card:low",
                high,
                vec!["image_name:app", "container_id:c1"],
            ),
            (
                false,
                false,
                Some("c1"),
                "dd.internal.card:orchestrator,dd.internal.entity_id:p1",
                high,
                vec!["image_name:app", "kube_namespace:shop", "pod_name:web-1"],
            ),
            // `card:none` opts out, whatever the origin.
            (true, false, Some("c1"), "", none, vec![]),
            (false, false, Some("c1"), "dd.internal.card:none", f, vec![]),
        ];
        for (client, precedence, socket, raw, fields, want) in cases {
            let (d, s) = detection(client, precedence);
            let got = tags_of(d.resolve(&s, socket, raw, &fields));
            assert_eq!(
                got, want,
                "client={client} precedence={precedence} {socket:?} {raw} {fields:?}"
            );
        }
    }

    #[test]
    fn misses_are_counted_and_ask_for_a_refresh() {
        let (d, s) = detection(false, false);
        assert_eq!(
            d.resolve(&s, Some("gone"), "", &OriginFields::default()),
            None
        );
        assert_eq!(
            d.resolve(&s, Some("c1"), "", &OriginFields::default())
                .map(|r| r.cardinality),
            Some(Cardinality::Low)
        );
        let lookups = &d.tagger.counters.lookups;
        assert_eq!(
            (lookups[Lookup::Hit].get(), lookups[Lookup::Miss].get()),
            (1, 1)
        );
    }

    #[test]
    fn origin_tags_are_found_only_where_a_tag_begins() {
        let cases = [
            ("", (None, None)),
            ("dd.internal.entity_id:a", (Some("a"), None)),
            (
                "x,dd.internal.entity_id:a,dd.internal.entity_id:b,y",
                (Some("b"), None),
            ),
            (
                "dd.internal.card:high,dd.internal.card:low",
                (None, Some("high")),
            ),
            (
                "xdd.internal.entity_id:a,k:dd.internal.card:low",
                (None, None),
            ),
            (
                "dd.internal.entity_id:,dd.internal.card:",
                (Some(""), Some("")),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(origin_tags(raw), want, "{raw}");
        }
    }

    #[test]
    fn origin_tags_join_the_canonical_tags_sorted_once() {
        let (d, s) = detection(false, false);
        let r = d.resolve(&s, Some("c1"), "", &OriginFields::default());
        let extra: [Box<str>; 1] = ["image_name:app".into()];
        let (_, tags) = canonical("z,a", &extra, r.as_ref());
        assert_eq!(tags, ["a", "image_name:app", "z"]);
    }
}
