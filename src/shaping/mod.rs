//! Shaping: what the operator's configuration does to a metric's name and tags, in the
//! Agent's order: mapper → namespace → filter list → per-metric tag filter → histogram copy
//! (docs/behaviour.md, "Shaping"). Nothing here runs per sample: a worker asks once per
//! context it does not know ([`Decisions`]), keeps the answer with the context, and a metric
//! no setting touches costs nothing.

pub mod host;
pub mod mapper;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::parser::MetricKind;
pub use host::{HostRule, HostRules};
pub use mapper::Mapper;

/// The Agent's `statsd_metric_namespace_blacklist` default: prefixes the namespace is never
/// put before (the Agent's own metrics and those of its JMX and runtime integrations).
pub const NAMESPACE_EXEMPT: &str = "datadog.agent datadog.dogstatsd datadog.process datadog.trace_agent datadog.tracer activemq activemq_58 airflow cassandra confluent hazelcast hive ignite jboss jvm kafka presto sidekiq solr tomcat runtime";

/// Every shaping setting, validated and compiled. Built by the configuration, replaced whole
/// on SIGHUP.
#[derive(Debug, Default)]
pub struct Shaping {
    pub mapper: Mapper,
    /// `--mapper-cache-size`: names each worker remembers the decision for.
    pub cache_size: usize,
    /// `--metric-namespace`, ending with a dot; empty for none.
    pub namespace: Box<str>,
    /// `--metric-namespace-blacklist`: names beginning with one of these get no namespace.
    pub namespace_exempt: Vec<Box<str>>,
    /// The filter list: names whose metrics are dropped.
    pub filter: NameList,
    /// `--metric-tag-filterlist`: per distribution name, which tag keys it keeps.
    pub tag_filters: HashMap<Box<str>, Arc<TagFilter>>,
    /// `--histogram-copy-to-distribution`: the prefix of each histogram's distribution copy.
    pub histogram_copy: Option<Box<str>>,
    /// `--host-rules`: which metrics are sent without a host.
    pub host_rules: HostRules,
}

impl Shaping {
    /// Whether any setting changes anything: without one, workers never ask.
    pub fn is_active(&self) -> bool {
        !self.mapper.is_empty()
            || !self.namespace.is_empty()
            || !self.filter.is_empty()
            || !self.tag_filters.is_empty()
            || !self.host_rules.is_empty()
            || self.histogram_copy.is_some()
    }

    /// What becomes of a metric named `name` of type `kind`.
    pub fn decide(&self, name: &str, kind: MetricKind) -> Shaped {
        let (mut name, tags) = match self.mapper.map(name) {
            Some(m) => (m.name, m.tags),
            None => (name.to_string(), Vec::new()),
        };
        if !self.namespace.is_empty()
            && !self.namespace_exempt.iter().any(|p| name.starts_with(&**p))
        {
            name.insert_str(0, &self.namespace);
        }
        let blocked = self.filter.contains(&name);
        let filter = (kind == MetricKind::Distribution)
            .then(|| self.tag_filters.get(name.as_str()).cloned())
            .flatten();
        let copy = match (&self.histogram_copy, kind) {
            (Some(prefix), MetricKind::Histogram | MetricKind::Timer) if !blocked => {
                let copy = format!("{prefix}{name}");
                let filter = self.tag_filters.get(copy.as_str()).cloned();
                let host = self.host_rules.find(&copy, MetricKind::Distribution);
                Some(Copy {
                    name: copy.into(),
                    filter,
                    host,
                })
            }
            _ => None,
        };
        let host = self.host_rules.find(&name, kind);
        Shaped {
            name: name.into(),
            tags: tags.into_iter().map(String::into_boxed_str).collect(),
            blocked,
            filter,
            copy,
            host,
        }
    }
}

/// What becomes of one metric name of one type.
#[derive(Debug, Clone, PartialEq)]
pub struct Shaped {
    /// The name its context takes.
    pub name: Arc<str>,
    /// Tags the mapper adds.
    pub tags: Box<[Box<str>]>,
    /// On the filter list: its samples are dropped and counted.
    pub blocked: bool,
    /// The tag filter of its name, for a distribution.
    pub filter: Option<Arc<TagFilter>>,
    /// A histogram's or timer's distribution copy.
    pub copy: Option<Copy>,
    /// The host rule it matches: sent without a host.
    pub host: Option<Arc<HostRule>>,
}

impl Shaped {
    /// About how many bytes it holds: its names and tags, and a fixed part.
    pub fn size(&self) -> usize {
        let tags: usize = self.tags.iter().map(|t| t.len() + 16).sum();
        let copy = self.copy.as_ref().map_or(0, |c| c.name.len());
        std::mem::size_of::<Shaped>() + self.name.len() + tags + copy
    }

    /// A decision that changes nothing: the metric keeps its name and tags.
    pub fn is_identity(&self, name: &str) -> bool {
        &*self.name == name
            && self.tags.is_empty()
            && !self.blocked
            && self.filter.is_none()
            && self.copy.is_none()
            && self.host.is_none()
    }
}

impl Shaped {
    /// What it does to the tags of its context (`copy`: of its distribution copy's).
    pub fn shape(&self, copy: bool) -> Shape<'_> {
        let (filter, host) = match (&self.copy, copy) {
            (Some(c), true) => (c.filter.as_deref(), c.host.as_deref()),
            _ => (self.filter.as_deref(), self.host.as_deref()),
        };
        Shape {
            tags: &self.tags,
            filter,
            host,
        }
    }
}

/// What shaping does to a context's tags: the mapper's tags join, and a distribution's tag
/// filter keeps some.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape<'a> {
    pub tags: &'a [Box<str>],
    pub filter: Option<&'a TagFilter>,
    /// A host rule: no host, and the rule's tags join.
    pub host: Option<&'a HostRule>,
}

/// The distribution copy of a histogram or timer.
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    pub name: Box<str>,
    pub filter: Option<Arc<TagFilter>>,
    pub host: Option<Arc<HostRule>>,
}

/// Metric names, matched exactly or as prefixes (the Agent's filter list).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NameList {
    /// Sorted; with `prefix`, no entry is a prefix of another.
    names: Vec<Box<str>>,
    prefix: bool,
}

impl NameList {
    pub fn new(names: &[String], prefix: bool) -> NameList {
        let mut names: Vec<Box<str>> = names
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| n.as_str().into())
            .collect();
        names.sort();
        names.dedup();
        if prefix {
            // A name that another entry begins is enough: drop what it covers. Sorted, a
            // covered name follows its prefix.
            let mut kept: Vec<Box<str>> = Vec::with_capacity(names.len());
            for n in names {
                if !kept.last().is_some_and(|p| n.starts_with(&**p)) {
                    kept.push(n);
                }
            }
            names = kept;
        }
        NameList { names, prefix }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// The entries that end with one of `suffixes`, matched the same way: the Agent's list
    /// for a histogram's aggregate series (`my.hist.max` on the list drops that series of
    /// the histogram `my.hist`, whose samples the list does not name).
    pub fn with_suffixes<S: AsRef<str>>(&self, suffixes: &[S]) -> NameList {
        NameList {
            names: self
                .names
                .iter()
                .filter(|n| suffixes.iter().any(|s| n.ends_with(s.as_ref())))
                .cloned()
                .collect(),
            prefix: self.prefix,
        }
    }

    /// Whether `name` is on the list: equal to an entry or, in prefix mode, beginning with
    /// one. One binary search: an entry that begins `name` sorts just before it.
    pub fn contains(&self, name: &str) -> bool {
        match self.names.binary_search_by(|n| (**n).cmp(name)) {
            Ok(_) => true,
            Err(i) => self.prefix && i > 0 && name.starts_with(&*self.names[i - 1]),
        }
    }
}

/// Which tags of one distribution are kept, by key (the part before the first `:`).
#[derive(Debug, Clone, PartialEq)]
pub struct TagFilter {
    keys: Vec<Box<str>>,
    /// `exclude` drops the listed keys; `include` keeps only them.
    exclude: bool,
}

impl TagFilter {
    pub fn keeps(&self, tag: &str) -> bool {
        let key = tag.split_once(':').map_or(tag, |(k, _)| k);
        self.keys.iter().any(|k| &**k == key) != self.exclude
    }
}

/// Reads `--metric-tag-filterlist`: a JSON list of `{"metric_name": …, "action": "include" |
/// "exclude", "tags": [keys]}`. As the Agent merges them: entries for one name with the same
/// action add their keys; an `exclude` entry replaces an `include` one and is never replaced
/// by one; an entry without a name is skipped. A missing action is `exclude`; an unknown one
/// is an error.
pub fn tag_filters(value: &Value) -> Result<HashMap<Box<str>, Arc<TagFilter>>, String> {
    let list = match value {
        Value::Null => return Ok(HashMap::new()),
        Value::Array(list) => list,
        _ => return Err("must be a list of {metric_name, action, tags}".into()),
    };
    let mut merged: HashMap<Box<str>, TagFilter> = HashMap::new();
    for (i, entry) in list.iter().enumerate() {
        let name = entry
            .get("metric_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if name.is_empty() {
            continue;
        }
        let exclude = match entry.get("action").and_then(Value::as_str).unwrap_or("") {
            "" | "exclude" => true,
            "include" => false,
            other => {
                return Err(format!(
                    "entry {i} ({name}): action '{other}' is not include or exclude"
                ))
            }
        };
        let keys: Vec<Box<str>> = match entry.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tags)) => tags
                .iter()
                .map(|t| t.as_str().map(Box::from))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("entry {i} ({name}): tags must be strings"))?,
            Some(_) => return Err(format!("entry {i} ({name}): tags must be a list")),
        };
        match merged.get_mut(name) {
            None => {
                merged.insert(name.into(), TagFilter { keys, exclude });
            }
            Some(have) if have.exclude == exclude => have.keys.extend(keys),
            Some(have) if exclude => *have = TagFilter { keys, exclude },
            Some(_) => {}
        }
    }
    Ok(merged.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
}

/// One worker's decisions by metric name and type, so a name shared by many contexts is
/// decided once; at most `--mapper-cache-size` names, forgetting an arbitrary one when full.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Per name, one slot per metric type (`MetricKind as usize`).
    by_name: HashMap<Box<str>, [Option<Arc<Shaped>>; 6], foldhash::fast::RandomState>,
}

impl Decisions {
    /// The decision for `name` of type `kind`.
    pub fn get(&mut self, shaping: &Shaping, name: &str, kind: MetricKind) -> Arc<Shaped> {
        if let Some(found) = self
            .by_name
            .get(name)
            .and_then(|k| k[kind as usize].as_ref())
        {
            return found.clone();
        }
        let decided = Arc::new(shaping.decide(name, kind));
        if !self.by_name.contains_key(name) && self.by_name.len() >= shaping.cache_size.max(1) {
            let forget = self.by_name.keys().next().cloned();
            if let Some(k) = forget {
                self.by_name.remove(&k);
            }
        }
        let slots = self.by_name.entry(name.into()).or_default();
        slots[kind as usize] = Some(decided.clone());
        decided
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn name_lists_match_whole_names_or_prefixes_with_one_search() {
        let names: Vec<String> = ["b.c", "a", "b", "ab", "b.c.d", ""]
            .map(String::from)
            .to_vec();
        let exact = NameList::new(&names, false);
        let hits = |l: &NameList| {
            ["a", "ab", "abc", "b", "b.c", "b.cz", "c", "", "0"].map(|n| l.contains(n))
        };
        assert_eq!(exact.len(), 5);
        assert_eq!(
            hits(&exact),
            [true, true, false, true, true, false, false, false, false]
        );
        // Prefixes: "a" covers "ab", "b" covers "b.c" and "b.c.d".
        let prefix = NameList::new(&names, true);
        assert_eq!(prefix.len(), 2);
        assert_eq!(
            hits(&prefix),
            [true, true, true, true, true, true, false, false, false]
        );
    }

    #[test]
    fn tag_filters_merge_as_the_agent_and_filter_by_key() {
        let f = tag_filters(&json!([
            {"metric_name": "m", "action": "include", "tags": ["env"]},
            {"metric_name": "m", "action": "include", "tags": ["service"]},
            {"metric_name": "x", "action": "include", "tags": ["env"]},
            {"metric_name": "x", "tags": ["pod"]},
            {"metric_name": "x", "action": "include", "tags": ["ignored"]},
            {"metric_name": "", "tags": ["skipped"]},
        ]))
        .unwrap();
        assert_eq!(f.len(), 2);
        let keeps = |name: &str| {
            ["env:prod", "service:web", "pod:p-1", "env", "ignored:1"].map(|t| f[name].keeps(t))
        };
        assert_eq!(keeps("m"), [true, true, false, true, false]);
        // exclude replaced the include and was not replaced by the later include.
        assert_eq!(keeps("x"), [true, true, false, true, true]);
        let bad = tag_filters(&json!([{"metric_name": "m", "action": "drop"}])).unwrap_err();
        assert_eq!(bad, "entry 0 (m): action 'drop' is not include or exclude");
        assert!(tag_filters(&json!({"m": {}})).is_err());
    }

    #[test]
    fn decisions_follow_the_agents_order_and_are_bounded() {
        let shaping = Shaping {
            mapper: Mapper::from_json(
                r#"[{"name":"p","prefix":"svc.","mappings":[{"match":"svc.*.lat","name":"lat","tags":{"svc":"$1"}}]}]"#,
            )
            .unwrap(),
            cache_size: 2,
            namespace: "ns.".into(),
            namespace_exempt: vec!["jvm".into()],
            filter: NameList::new(&["ns.lat".into(), "jvm.gc".into()], false),
            tag_filters: tag_filters(&json!([{"metric_name": "d.ns.size", "tags": ["pod"]}]))
                .unwrap(),
            histogram_copy: Some("d.".into()),
            host_rules: HostRules::default(),
        };
        assert!(shaping.is_active());
        // Mapped, then namespaced, then filtered: the filter sees "ns.lat".
        let lat = shaping.decide("svc.api.lat", MetricKind::Histogram);
        assert_eq!(
            (&*lat.name, lat.blocked, lat.copy.is_none()),
            ("ns.lat", true, true)
        );
        assert_eq!(&*lat.tags, [Box::from("svc:api")]);
        let size = shaping.decide("size", MetricKind::Timer);
        let copy = size.copy.as_ref().unwrap();
        assert_eq!((&*size.name, &*copy.name), ("ns.size", "d.ns.size"));
        assert!(size.filter.is_none() && copy.filter.is_some());
        assert!(size.shape(true).filter.is_some() && size.shape(false).filter.is_none());
        let gc = shaping.decide("jvm.gc", MetricKind::Gauge);
        assert_eq!((&*gc.name, gc.blocked), ("jvm.gc", true));
        assert!(shaping
            .decide("jvm.heap", MetricKind::Gauge)
            .is_identity("jvm.heap"));

        let mut d = Decisions::default();
        assert!(Arc::ptr_eq(
            &d.get(&shaping, "a", MetricKind::Count),
            &d.get(&shaping, "a", MetricKind::Count)
        ));
        d.get(&shaping, "a", MetricKind::Gauge);
        assert_eq!(d.len(), 1);
        d.get(&shaping, "b", MetricKind::Count);
        d.get(&shaping, "c", MetricKind::Count);
        assert_eq!(d.len(), 2, "at most --mapper-cache-size names");
        d.clear();
        assert!(d.is_empty());
    }
}
