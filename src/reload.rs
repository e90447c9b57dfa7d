//! What SIGHUP changes in a running whippet, and the settings `/status` shows: the API key,
//! intake URL, extra tags, shaping (mapper, namespace, filter lists, histogram copies), log
//! level, tag cardinality and the tagger's providers are applied
//! in place (no thread stops, no sample waits); any other setting that changed is named as
//! needing a restart. Settings declare
//! which they are (`Setting::reload`).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Map};

use crate::config::{Config, SETTINGS};
use crate::enrichment::OriginDetection;
use crate::forwarder::Handle;
use crate::listener::Bound;
use crate::log;
use crate::status;
use crate::worker::LiveTags;

/// The settings in effect, and the handles that change them while whippet runs.
pub struct Reloader {
    config: Config,
    bound: Bound,
    tags: Arc<LiveTags>,
    /// The forwarder's target, when whippet forwards to an intake.
    retarget: Option<Handle>,
    /// The status endpoint's settings section, when it is on.
    status: Option<Arc<status::Sources>>,
    /// Origin detection, when it runs: its cardinality and the tagger's providers.
    origin: Option<Arc<OriginDetection>>,
}

impl Reloader {
    pub fn new(
        config: &Config,
        bound: Bound,
        tags: Arc<LiveTags>,
        retarget: Option<Handle>,
        status: Option<Arc<status::Sources>>,
        origin: Option<Arc<OriginDetection>>,
    ) -> Reloader {
        let r = Reloader {
            config: config.clone(),
            bound,
            tags,
            retarget,
            status,
            origin,
        };
        r.publish();
        r
    }

    /// Applies a re-read configuration. Returns a line for each other setting that changed
    /// and needs a restart, and for an intake change the running output cannot make.
    pub fn apply(&mut self, new: &Config) -> Vec<String> {
        let mut notes = Vec::new();
        let old = &self.config;
        log::set_level(new.operation.log_level);
        if new.aggregation.tags != old.aggregation.tags || new.shaping != old.shaping {
            match new.shaping.build() {
                Ok(shaping) => self.tags.set(&new.aggregation.tags, shaping),
                // Validated when read: not expected, but the old settings stay if it happens.
                Err(e) => notes.push(format!("{e}; the previous shaping stays")),
            }
        }
        let mut applied = new.clone();
        match (&self.retarget, &new.forwarding.intake_url) {
            (Some(retarget), Some(url)) => retarget.retarget(url, &new.forwarding.api_key.0),
            (None, None) => {}
            (Some(_), None) => notes.push("the new settings have no intake (no --dd-url and no API key); still forwarding to the old one until a restart".into()),
            (None, Some(_)) => notes.push("an intake is now configured, but whippet started printing to stdout; restart whippet to forward".into()),
        }
        match &self.origin {
            Some(o) => {
                o.set_cardinality(new.origin.cardinality);
                if new.origin.sources() != old.origin.sources() {
                    o.tagger.set_sources(new.origin.sources());
                }
            }
            None if new.origin.tagger() => notes.push(
                "origin detection and the tagger were off at start; restart whippet to start them"
                    .into(),
            ),
            None => {}
        }
        if self.retarget.is_some() != new.forwarding.intake_url.is_some() {
            // The output cannot change kind while running: the old intake stays in effect.
            applied.forwarding.intake_url = old.forwarding.intake_url.clone();
        }
        for (flag, value, _) in &new.sources {
            if SETTINGS.iter().any(|s| s.flag == *flag && s.reload) {
                continue;
            }
            let before = old
                .sources
                .iter()
                .find(|(f, _, _)| f == flag)
                .map(|(_, v, _)| v);
            if before != Some(value) {
                notes.push(format!("--{flag} changed; restart whippet to apply it"));
            }
        }
        self.config = applied;
        self.publish();
        notes
    }

    /// Writes the settings section of `/status`.
    fn publish(&self) {
        let Some(sources) = &self.status else {
            return;
        };
        let c = &self.config;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let mut info = Map::new();
        info.insert(
            "listeners".into(),
            json!({
                "udp": self.bound.udp.map(|a| a.to_string()),
                "socket": path(&self.bound.socket),
                "stream_socket": path(&self.bound.stream_socket),
                "socket_activated": self.bound.activated,
            }),
        );
        info.insert(
            "intake".into(),
            json!(c
                .forwarding
                .intake_url
                .as_deref()
                .map(crate::forwarder::redact_url)),
        );
        let additional: Vec<String> = c
            .forwarders()
            .iter()
            .filter(|f| f.additional)
            .filter_map(|f| f.intake.map(str::to_string))
            .collect();
        info.insert("additional_intakes".into(), json!(additional));
        let proxy = c.forwarding.intake_url.as_deref().and_then(|url| {
            c.forwarding
                .egress
                .proxy_url(url)
                .map(crate::forwarder::redact_url)
        });
        info.insert("proxy".into(), json!(proxy));
        info.insert("hostname".into(), json!(c.aggregation.hostname));
        info.insert("tags".into(), json!(c.aggregation.tags));
        info.insert("config_file".into(), json!(path(&c.config_file)));
        let level = format!("{:?}", c.operation.log_level).to_lowercase();
        info.insert("log_level".into(), json!(level));
        *sources.info.write().unwrap_or_else(|e| e.into_inner()) = info;
    }
}
