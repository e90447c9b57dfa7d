//! The tagger: what each container and pod on this node is tagged with, at each cardinality,
//! as the Agent's tagger tags them (docs/behaviour.md, "Container tags").
//!
//! One thread, `whippet-tagger`, asks the providers (the kubelet's `/pods`, the Docker Engine
//! API) for what runs here, every [`REFRESH`] and soon after a lookup misses (at most once per
//! [`MISS_REFRESH`]), and publishes the answer as an immutable [`Entities`]. Workers take the
//! current snapshot once per batch and look entities up in it without locks; they never wait
//! for a provider. A provider that cannot be reached keeps its last answer (none at first),
//! is logged once per outage and counted.

pub mod docker;
pub mod kubelet;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::log;
use crate::telemetry::{labels, Counter, Gauge, Label, PerLabel, Readings, Snapshot};

/// How often the providers are asked again.
pub const REFRESH: Duration = Duration::from_secs(10);
/// Soonest a lookup that missed asks again: a burst of unknown containers costs one request.
pub const MISS_REFRESH: Duration = Duration::from_secs(2);

labels! {
    /// Which tags of an entity a metric gets (`--tag-cardinality`, `card:`).
    pub enum Cardinality: "cardinality" {
        Low = "low",
        Orchestrator = "orchestrator",
        High = "high",
    }
}

impl Cardinality {
    /// The Agent's names (`orch` too). `None` for `none` and anything unknown.
    pub fn parse(s: &str) -> Option<Cardinality> {
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        if is("low") {
            Some(Cardinality::Low)
        } else if is("orchestrator") || is("orch") {
            Some(Cardinality::Orchestrator)
        } else if is("high") {
            Some(Cardinality::High)
        } else {
            None
        }
    }
}

/// An entity's tags by the cardinality that first includes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityTags {
    pub low: Vec<Box<str>>,
    pub orchestrator: Vec<Box<str>>,
    pub high: Vec<Box<str>>,
}

impl EntityTags {
    /// The tags at `cardinality`: low; low and orchestrator; or all three.
    pub fn at(&self, cardinality: Cardinality) -> impl Iterator<Item = &str> {
        let orchestrator = match cardinality {
            Cardinality::Low => &[][..],
            _ => &self.orchestrator[..],
        };
        let high = match cardinality {
            Cardinality::High => &self.high[..],
            _ => &[][..],
        };
        self.low
            .iter()
            .chain(orchestrator)
            .chain(high)
            .map(|t| &**t)
    }

    pub(crate) fn low(&mut self, key: &str, value: &str) {
        push(&mut self.low, key, value);
    }

    pub(crate) fn orchestrator(&mut self, key: &str, value: &str) {
        push(&mut self.orchestrator, key, value);
    }

    pub(crate) fn high(&mut self, key: &str, value: &str) {
        push(&mut self.high, key, value);
    }

    /// Adds `other`'s tags (another provider's view of the same entity), without repeats.
    fn merge(&mut self, other: EntityTags) {
        for (mine, theirs) in [
            (&mut self.low, other.low),
            (&mut self.orchestrator, other.orchestrator),
            (&mut self.high, other.high),
        ] {
            for t in theirs {
                if !mine.contains(&t) {
                    mine.push(t);
                }
            }
        }
    }
}

/// `key:value`, unless the value is empty (the Agent adds no tag for an empty value).
fn push(tags: &mut Vec<Box<str>>, key: &str, value: &str) {
    if !value.is_empty() {
        let tag: Box<str> = format!("{key}:{value}").into();
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
}

/// Container ids or pod UIDs → tags. The ids come from the providers, not from clients, so
/// foldhash's speed costs no flooding risk.
pub type Ids = HashMap<Box<str>, EntityTags, foldhash::fast::RandomState>;

/// What the providers said, at one moment: container ids and pod UIDs → their tags.
#[derive(Debug, Default)]
pub struct Entities {
    pub containers: Ids,
    pub pods: Ids,
    /// Which snapshot this is: every published one has a new number, so an entity is known
    /// by its snapshot and its address in it.
    pub generation: u64,
}

impl Entities {
    fn merge(&mut self, other: Entities) {
        for (map, theirs) in [
            (&mut self.containers, other.containers),
            (&mut self.pods, other.pods),
        ] {
            for (id, tags) in theirs {
                map.entry(id).or_default().merge(tags);
            }
        }
    }

    fn len(&self) -> usize {
        self.containers.len() + self.pods.len()
    }
}

labels! {
    /// Where container tags come from.
    pub enum Provider: "provider" {
        Kubelet = "kubelet",
        Docker = "docker",
    }
}

labels! {
    /// What a lookup of an entity found.
    pub enum Lookup: "result" {
        Hit = "hit",
        Miss = "miss",
    }
}

/// The tagger's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Entity lookups by workers, by what they found.
    pub lookups: PerLabel<Lookup, Counter, { Lookup::COUNT }>,
    /// Answers from each provider.
    pub refreshes: PerLabel<Provider, Counter, { Provider::COUNT }>,
    /// Failed requests to each provider.
    pub errors: PerLabel<Provider, Counter, { Provider::COUNT }>,
    /// Containers and pods known.
    pub entities: Gauge,
}

impl Readings for Counters {
    fn read(&self, out: &mut Snapshot) {
        out.per_label("whippet_tagger_lookups_total", &self.lookups);
        out.per_label("whippet_tagger_refreshes_total", &self.refreshes);
        out.per_label("whippet_tagger_errors_total", &self.errors);
        out.gauge("whippet_tagger_entities", &[], self.entities.get());
    }
}

/// Where the providers are; replaced in place on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sources {
    pub kubelet: Option<kubelet::KubeletConfig>,
    /// The Docker Engine API's Unix socket.
    pub docker: Option<std::path::PathBuf>,
    /// Longest one request to a provider may take.
    pub timeout: Duration,
}

/// One provider's last answer and whether it is failing now (so an outage logs once).
#[derive(Default)]
pub struct Last {
    answer: Option<Entities>,
    failing: bool,
}

/// The tagger: the current snapshot, and what the refresher needs.
pub struct Tagger {
    current: RwLock<Arc<Entities>>,
    sources: Mutex<Sources>,
    /// A lookup missed since the last refresh.
    missed: AtomicBool,
    /// Wakes the refresher early (a miss, a reload, shutdown).
    wake: (Mutex<bool>, Condvar),
    stopping: AtomicBool,
    /// The last snapshot's [`Entities::generation`].
    generation: AtomicU64,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tagger").finish_non_exhaustive()
    }
}

impl Tagger {
    pub fn new(sources: Sources, counters: Arc<Counters>) -> Arc<Tagger> {
        Arc::new(Tagger {
            current: RwLock::new(Arc::new(Entities::default())),
            sources: Mutex::new(sources),
            missed: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            stopping: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            counters,
        })
    }

    /// The current snapshot: taken once per batch, then read without locks.
    pub fn snapshot(&self) -> Arc<Entities> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks for a refresh soon: an entity was not in the snapshot. Costs one atomic store
    /// when a request is already pending.
    pub fn missed(&self) {
        if !self.missed.swap(true, Relaxed) {
            self.poke();
        }
    }

    /// New provider settings (SIGHUP), applied by an immediate refresh.
    pub fn set_sources(&self, sources: Sources) {
        *self.sources.lock().unwrap_or_else(|e| e.into_inner()) = sources;
        self.poke();
    }

    fn poke(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }

    /// Asks every provider once and publishes the merged answer. Run once before whippet
    /// reports ready, so the first messages already find their containers.
    pub fn refresh(&self, last: &mut [Last; Provider::COUNT]) {
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let asks: [(Provider, Option<Result<Entities, String>>); Provider::COUNT] = [
            (
                Provider::Kubelet,
                sources
                    .kubelet
                    .as_ref()
                    .map(|k| kubelet::fetch(k, sources.timeout)),
            ),
            (
                Provider::Docker,
                sources
                    .docker
                    .as_deref()
                    .map(|d| docker::fetch(d, sources.timeout)),
            ),
        ];
        let mut merged = Entities::default();
        for ((provider, answer), last) in asks.into_iter().zip(last.iter_mut()) {
            match answer {
                // Not configured (any more): forget what it said.
                None => *last = Last::default(),
                Some(Ok(snapshot)) => {
                    self.counters.refreshes[provider].add(1);
                    if last.failing {
                        log::info(&format!("tagger: {} answers again", provider.label()));
                    }
                    *last = Last {
                        answer: Some(snapshot),
                        failing: false,
                    };
                }
                Some(Err(e)) => {
                    self.counters.errors[provider].add(1);
                    if !last.failing {
                        log::warn(&format!(
                            "tagger: {} cannot be asked for container tags ({e}); metrics get no tags from it until it answers, and whippet keeps asking every {} s",
                            provider.label(),
                            REFRESH.as_secs()
                        ));
                    }
                    last.failing = true;
                }
            }
        }
        for l in last.iter() {
            if let Some(s) = &l.answer {
                merged.merge(clone_snapshot(s));
            }
        }
        self.publish(merged);
    }

    /// Makes `entities` the snapshot workers read from their next batch.
    pub fn publish(&self, mut entities: Entities) {
        entities.generation = self.generation.fetch_add(1, Relaxed) + 1;
        self.counters.entities.set(entities.len() as u64);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entities);
    }

    /// Refreshes until [`Tagger::stop`]: every [`REFRESH`], sooner after a miss or reload.
    pub fn run(self: Arc<Tagger>, mut last: [Last; Provider::COUNT]) {
        let mut refreshed = Instant::now();
        while !self.stopping.load(Relaxed) {
            let (lock, cv) = &self.wake;
            let mut poked = lock.lock().unwrap_or_else(|e| e.into_inner());
            let due = refreshed + REFRESH;
            while !*poked && !self.stopping.load(Relaxed) {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                poked = cv
                    .wait_timeout(poked, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *poked = false;
            drop(poked);
            if self.stopping.load(Relaxed) {
                break;
            }
            // A miss waits out the rate limit; a timer or a reload does not.
            let soonest = refreshed + MISS_REFRESH;
            if Instant::now() < soonest && self.missed.load(Relaxed) && Instant::now() < due {
                std::thread::sleep(soonest.saturating_duration_since(Instant::now()));
            }
            self.missed.store(false, Relaxed);
            self.refresh(&mut last);
            refreshed = Instant::now();
        }
    }

    /// Ends [`Tagger::run`] at its next wakeup (at once when it waits).
    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        self.poke();
    }

    /// Starts the refresher thread after one refresh in this thread.
    pub fn start(self: &Arc<Tagger>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let mut last: [Last; Provider::COUNT] = Default::default();
        self.refresh(&mut last);
        let me = self.clone();
        std::thread::Builder::new()
            .name("whippet-tagger".into())
            .spawn(move || me.run(last))
    }
}

fn clone_snapshot(s: &Entities) -> Entities {
    Entities {
        containers: s.containers.clone(),
        pods: s.pods.clone(),
        generation: 0,
    }
}

/// An image reference as the Agent splits it: name (registry and path, without tag or
/// digest), short name (the last path segment) and tag (`latest` when none is given).
pub(crate) fn split_image(reference: &str) -> (&str, &str, &str) {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match without_digest[last_slash..].find(':') {
        Some(i) => (
            &without_digest[..last_slash + i],
            &without_digest[last_slash + i + 1..],
        ),
        None => (without_digest, ""),
    };
    let short = &name[last_slash..];
    // A reference by digest alone names no tag.
    let tag = if tag.is_empty() && !reference.contains('@') {
        "latest"
    } else {
        tag
    };
    (name, short, tag)
}

/// Image tags of a container: `image_name`, `short_image`, `image_tag` (low).
pub(crate) fn image_tags(tags: &mut EntityTags, reference: &str) {
    let (name, short, tag) = split_image(reference);
    tags.low("image_name", name);
    tags.low("short_image", short);
    tags.low("image_tag", tag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cardinality_includes_every_lower_one() {
        let mut t = EntityTags::default();
        t.low("a", "1");
        t.orchestrator("b", "2");
        t.high("c", "3");
        t.low("empty", "");
        let at = |c| t.at(c).collect::<Vec<_>>();
        assert_eq!(at(Cardinality::Low), ["a:1"]);
        assert_eq!(at(Cardinality::Orchestrator), ["a:1", "b:2"]);
        assert_eq!(at(Cardinality::High), ["a:1", "b:2", "c:3"]);
        assert_eq!(Cardinality::parse("ORCH"), Some(Cardinality::Orchestrator));
        assert_eq!(Cardinality::parse("none"), None);
    }

    #[test]
    fn images_split_as_the_agent_splits_them() {
        let cases = [
            ("nginx", ("nginx", "nginx", "latest")),
            ("nginx:1.25", ("nginx", "nginx", "1.25")),
            (
                "docker.io/library/redis:7",
                ("docker.io/library/redis", "redis", "7"),
            ),
            (
                "registry:5000/team/app:v2",
                ("registry:5000/team/app", "app", "v2"),
            ),
            ("gcr.io/x/app@sha256:abcd", ("gcr.io/x/app", "app", "")),
            ("app:v1@sha256:abcd", ("app", "app", "v1")),
        ];
        for (reference, want) in cases {
            assert_eq!(split_image(reference), want, "{reference}");
        }
    }

    #[test]
    fn providers_merge_their_views_of_one_container() {
        let mut a = Entities::default();
        let mut t = EntityTags::default();
        t.low("kube_namespace", "web");
        t.high("container_id", "c1");
        a.containers.insert("c1".into(), t);
        let mut b = Entities::default();
        let mut t = EntityTags::default();
        t.high("container_id", "c1");
        t.high("container_name", "web_app");
        b.containers.insert("c1".into(), t);
        a.merge(b);
        let c = &a.containers["c1"];
        assert_eq!(
            c.at(Cardinality::High).collect::<Vec<_>>(),
            [
                "kube_namespace:web",
                "container_id:c1",
                "container_name:web_app"
            ]
        );
    }
}
